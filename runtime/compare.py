"""What the guards changed: one prompt through a guarded and an unguarded bundle, side by side in one PNG.

    runtime compare --prompt "a large red circle and a small knife on sand" --baseline tinyworld --out side.png

Both bundles generate with the same settings and seed; the picture has a caption line (prompt, seed, sampler),
the two images with their bundle names, and one line per guard saying what it saw and did (from each guard's
``summary`` of its report). Small images are scaled up by a whole factor (nearest neighbour) so a 64 px
tinyworld image stays readable.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MIN_SIDE = 256  # images are scaled up (nearest) to at least this many pixels per side
MARGIN = 8
LINE = 14


def guard_lines(pipe, report: dict[str, Any]) -> list[str]:
    """One line per guard of ``pipe``: its ``summary`` of what it reported in this run."""
    return [f"{g.name}: {g.summary(report['guards'].get(g.name, {}))}" for g in pipe.guards]


def side_by_side(left: np.ndarray, right: np.ndarray, titles: tuple[str, str], caption: str,
                 lines: list[str]) -> np.ndarray:
    """``left`` and ``right`` ((H, W, 3) uint8) scaled up and framed, with the caption above and ``lines`` below."""
    from PIL import Image, ImageDraw

    scale = max(1, -(-MIN_SIDE // max(left.shape[:2])))
    tiles = [np.repeat(np.repeat(im, scale, axis=0), scale, axis=1) for im in (left, right)]
    h, w = tiles[0].shape[:2]
    width = 2 * w + 3 * MARGIN
    lines = _wrap(lines, width - 2 * MARGIN)
    top = MARGIN + LINE + MARGIN
    height = top + LINE + h + MARGIN + LINE * len(lines) + MARGIN
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, MARGIN), caption, fill=(0, 0, 0))
    for k, (tile, title) in enumerate(zip(tiles, titles)):
        x = MARGIN + k * (w + MARGIN)
        draw.text((x, top), title, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(tile), (x, top + LINE))
    y = top + LINE + h + MARGIN
    for line in lines:
        draw.text((MARGIN, y), line, fill=(60, 60, 60))
        y += LINE
    return np.asarray(canvas)


def _wrap(lines: list[str], width: int) -> list[str]:
    """``lines`` broken at spaces to fit ``width`` pixels of the default font (a cut line hides what a guard did)."""
    import textwrap

    from PIL import Image, ImageDraw

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    out = []
    for line in lines:
        chars = len(line)
        wrapped = textwrap.wrap(line, chars, subsequent_indent="  ")
        while chars > 10 and max(map(measure, wrapped)) > width:
            chars -= 1
            wrapped = textwrap.wrap(line, chars, subsequent_indent="  ")
        out += wrapped or [""]
    return out
