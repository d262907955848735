"""SafeCtrl detector masks for the data step: derived from an aligned pair, or read from a few-shot folder.

**Derived** (:func:`derived_masks`): a pixel changed between the unsafe image and its kept safe candidate when
``max over channels |unsafe - safe| > 0.1`` on the [0, 1] scale (:func:`changed_pixels`, the same rule the
candidate selection's changed-pixel share uses); the changed map is cleaned by a 3x3 binary closing (fills
pinholes) then a 3x3 opening (drops isolated specks), numpy only, at image resolution, uint8 0/1; outside the
image counts as unchanged (the maps are padded with 0 before and cropped after), so a speck at the frame is
dropped like any other and an object touching the frame keeps its edge.

**Few-shot** (:func:`read_fewshot`, ``--masks DIR``): one folder per concept, each holding up to
:data:`MAX_PER_CONCEPT` images ``<name>.png`` (or .jpg / .jpeg / .webp) with ``<name>_mask.png`` (white = the
unsafe object: pixels > 127 in the mask's luminance) and ``<name>.txt`` (its caption). The concept folder's name
is the ``category`` of its images. Images are resized to the data's image size (bilinear; masks nearest) so
they stack with the generated ones. Everything is checked before any file is written; a problem is one
:class:`~runtime.errors.BadInputError` line (exit 3) naming the file and the fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.errors import BadInputError

CHANGE_THRESHOLD = 0.1     # |difference| on [0, 1] above which a pixel counts as changed
MAX_PER_CONCEPT = 10       # SafeCtrl's few-shot set: about 10 masked images per concept
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def changed_pixels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(..., H, W) bool: any channel of uint8 images ``a``, ``b`` (..., H, W, 3) differs by more than 0.1."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1)
    return diff > CHANGE_THRESHOLD * 255


def _shift_reduce(m: np.ndarray, op, pad: bool) -> np.ndarray:
    """3x3 neighbourhood ``op`` (np.maximum / np.minimum) of bool maps (..., H, W), border padded with ``pad``."""
    h, w = m.shape[-2:]
    p = np.pad(m, [(0, 0)] * (m.ndim - 2) + [(1, 1), (1, 1)], constant_values=pad)
    out = p[..., 1:h + 1, 1:w + 1].copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out = op(out, p[..., dy:dy + h, dx:dx + w])
    return out


def dilate(m: np.ndarray) -> np.ndarray:
    return _shift_reduce(m, np.maximum, False)


def erode(m: np.ndarray) -> np.ndarray:
    return _shift_reduce(m, np.minimum, True)


def clean(m: np.ndarray) -> np.ndarray:
    """3x3 closing then 3x3 opening of bool maps (..., H, W); outside the image is background."""
    p = np.pad(m, [(0, 0)] * (m.ndim - 2) + [(2, 2), (2, 2)], constant_values=False)
    opened = dilate(erode(erode(dilate(p))))
    return opened[..., 2:-2, 2:-2]


def derived_masks(unsafe: np.ndarray, safe: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """(n, H, W) uint8 0/1 masks of the aligned pairs (zeros where no candidate was kept)."""
    masks = clean(changed_pixels(unsafe, safe)) & np.asarray(kept, bool)[:, None, None]
    return masks.astype(np.uint8)


# ---- few-shot folder ---------------------------------------------------------------------------------------

def read_fewshot(folder: str | Path, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """``image`` (m, H, W, 3) uint8, ``mask`` (m, H, W) uint8 0/1, ``caption`` (m,) str, ``category`` (m,) str of a
    few-shot folder (module docstring), concepts and names in sorted order, resized to ``size`` (H, W)."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(f"--masks {folder} is not a folder: pass a folder with one subfolder per concept "
                            "(<concept>/<name>.png, <name>_mask.png, <name>.txt), e.g. train/tinyworld/fewshot")
    stray = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if stray:
        raise BadInputError(f"--masks {folder}: images {', '.join(stray[:3])} lie outside a concept folder: move "
                            "them into <concept>/ (the folder name is their category)")
    images, masks, captions, categories = [], [], [], []
    for concept in sorted(p for p in folder.iterdir() if p.is_dir()):
        names = sorted(p for p in concept.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                       and not p.stem.endswith("_mask"))
        if len(names) > MAX_PER_CONCEPT:
            raise BadInputError(f"--masks {concept}: {len(names)} images for concept {concept.name!r}; the few-shot "
                                f"set takes at most {MAX_PER_CONCEPT} per concept: keep the {MAX_PER_CONCEPT} best")
        for path in names:
            mask_path = path.with_name(path.stem + "_mask.png")
            text_path = path.with_suffix(".txt")
            for need, what in ((mask_path, "mask (white = the unsafe object)"), (text_path, "caption")):
                if not need.is_file():
                    raise BadInputError(f"--masks {path}: its {what} {need.name} is missing: add it beside the image")
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
                with Image.open(mask_path) as im:
                    mask = im.convert("L")
            except OSError as e:
                raise BadInputError(f"--masks {path}: cannot read the image or its mask ({e}): save both as "
                                    "PNG") from None
            if image.size != mask.size:
                raise BadInputError(f"--masks {mask_path}: mask is {mask.size[0]}x{mask.size[1]} but the image is "
                                    f"{image.size[0]}x{image.size[1]}: draw the mask at the image's size")
            caption = " ".join(text_path.read_text(encoding="utf-8").split())
            if not caption:
                raise BadInputError(f"--masks {text_path}: empty caption: write the image's prompt in it")
            m = np.asarray(mask.resize(size[::-1], Image.NEAREST)) > 127
            if not m.any():
                raise BadInputError(f"--masks {mask_path}: no white pixel: paint the unsafe object white")
            images.append(np.asarray(image.resize(size[::-1], Image.BILINEAR), np.uint8))
            masks.append(m.astype(np.uint8))
            captions.append(caption)
            categories.append(concept.name)
    if not images:
        raise BadInputError(f"--masks {folder} holds no few-shot images: add <concept>/<name>.png with "
                            "<name>_mask.png and <name>.txt")
    return {"image": np.stack(images), "mask": np.stack(masks), "caption": np.array(captions),
            "category": np.array(categories)}
