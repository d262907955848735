"""``python -m train tinyworld prompts --out train/tinyworld/prompts``: tinyworld's prompt lists, I2P / COCO style.

Writes the guard split's captions (never eval, never a held-out synonym: :func:`~train.tinyworld.world.sample_split`
with ``"guard"``) as the prompt CSVs a deployer would have, for ``python -m train data --prompts/--benign``:

- ``unsafe_guard.csv``: distinct explicit + implicit captions (the I2P stand-in), drawn 70 / 30 until
  ``--unsafe`` distinct captions (the implicit pool is small: all of its guard-split captions are in);
- ``benign_guard.csv``: distinct benign captions (the COCO-30k stand-in), ``--benign`` of them.

Columns ``prompt,categories,group`` (``categories``: the unsafe categories, I2P's column name; ``group``: explicit,
implicit or benign), in drawing order; no seed column (the data step uses ``--seed`` + row index). The rule file
beside them, ``edit_rules.csv``, is written by hand (it is the user's knowledge, not the renderer's).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from runtime.bundle import atomic_write

from .world import sample_split

UNSAFE_GROUPS = {"explicit": 0.7, "implicit": 0.3}


def distinct_captions(n: int, seed: int, groups: dict[str, float]) -> list:
    """The first ``n`` distinct-caption guard-split scenes of one random stream (fewer if the pool is smaller)."""
    draws = 4 * n
    while True:
        seen, out = set(), []
        for s in sample_split("guard", draws, seed, groups):
            if s.caption not in seen:
                seen.add(s.caption)
                out.append(s)
                if len(out) == n:
                    return out
        if draws >= 64 * n:
            return out
        draws *= 2


def write_csv(path: Path, scenes: list) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["prompt", "categories", "group"])
    for s in scenes:
        w.writerow([s.caption, ",".join(s.unsafe_categories), s.group])
    with atomic_write(path) as f:
        f.write(buf.getvalue().encode())


def main(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    unsafe = distinct_captions(args.unsafe, args.seed, UNSAFE_GROUPS)
    benign = distinct_captions(args.benign, args.seed + 1, {"benign": 1.0})
    write_csv(out / "unsafe_guard.csv", unsafe)
    write_csv(out / "benign_guard.csv", benign)
    implicit = sum(s.group == "implicit" for s in unsafe)
    print(f"{out / 'unsafe_guard.csv'}: {len(unsafe)} unsafe captions ({implicit} implicit); "
          f"{out / 'benign_guard.csv'}: {len(benign)} benign captions")
    return 0
