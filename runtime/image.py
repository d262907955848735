"""Writing generated images: atomic PNG files with an AUTOMATIC1111-style ``parameters`` text chunk.

The chunk reads (the format A1111 / ComfyUI / civitai tools parse)::

    a large red circle on sand
    Negative prompt: blurry
    Steps: 20, Sampler: DDIM, CFG scale: 5.0, Seed: 0, Size: 64x64, Model: tinyworld.plan

Pillow is imported only when an image is written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from runtime.bundle import atomic_write
from runtime.errors import BadInputError, OutputError

SAMPLER_NAMES = {"ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M"}


def parameters_text(report: Mapping[str, Any]) -> str:
    """The A1111 ``parameters`` text of a :class:`~runtime.pipeline.Result` report."""
    sampler = SAMPLER_NAMES.get(report["scheduler"], report["scheduler"])
    if report.get("karras"):
        sampler += " Karras"
    fields = [f"Steps: {report['steps']}", f"Sampler: {sampler}", f"CFG scale: {float(report['guidance'])}",
              f"Seed: {report['seed']}", f"Size: {report['width']}x{report['height']}"]
    if report.get("model"):
        fields.append(f"Model: {report['model']}")
    return f"{report['prompt']}\nNegative prompt: {report.get('negative_prompt', '')}\n{', '.join(fields)}"


def check_writable(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse (OutputError) an existing ``path`` unless ``overwrite``, or a folder that cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory: pass a .png file name")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists: pass --overwrite (overwrite=True) or choose another file name")
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} does not exist: create it or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {folder} is not writable: check its permissions or choose another path")
    return path


def save_png(path: str | os.PathLike, image_uint8: np.ndarray, parameters: str, overwrite: bool = False) -> Path:
    """Write ``image_uint8`` ((H, W, 3) uint8) to ``path`` atomically, with the ``parameters`` text chunk."""
    path = check_writable(path, overwrite)
    image = np.asarray(image_uint8)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise BadInputError(f"image has dtype {image.dtype} and shape {list(image.shape)}: expected (H, W, 3) uint8")
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    try:
        parameters.encode("latin-1")
        info.add_text("parameters", parameters)  # tEXt
    except UnicodeEncodeError:
        info.add_itxt("parameters", parameters)  # iTXt (UTF-8), as A1111 does for non-Latin-1 prompts
    try:
        with atomic_write(path) as f:
            Image.fromarray(image).save(f, format="PNG", pnginfo=info)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}; check the path, permissions and free space") from None
    return path
