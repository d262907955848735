"""Generated images as PNG bytes with an AUTOMATIC1111-style ``parameters`` text chunk (the CLI writes them atomically).

The chunk reads (the format A1111 / ComfyUI / civitai tools parse)::

    a large red circle on sand
    Negative prompt: blurry
    Steps: 20, Sampler: DDIM, CFG scale: 5.0, Seed: 0, Size: 64x64, Model: tinyworld.plan

Pillow is imported only when an image is encoded.
"""

from __future__ import annotations

import io
from typing import Any, Mapping

import numpy as np

from runtime.errors import BadInputError

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


def png_bytes(image_uint8: np.ndarray, parameters: str) -> bytes:
    """``image_uint8`` ((H, W, 3) uint8) encoded as PNG, with the ``parameters`` text chunk."""
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
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()

