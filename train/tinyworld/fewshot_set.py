"""``python -m train tinyworld fewshot --out train/tinyworld/fewshot``: SafeCtrl's few-shot mask set for tinyworld.

Plays the user who annotates a handful of images: ``--per-concept`` (10) rendered guard-split explicit scenes per
unsafe category, each written as ``<category>/<kind>_NN.png`` (64x64), ``<kind>_NN_mask.png`` (the renderer's exact
mask of the unsafe object, white) and ``<kind>_NN.txt`` (its caption): the folder layout ``python -m train data
--masks`` reads (:mod:`train.data.masks`). Written once and committed; the data step never imports the renderer.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from runtime.bundle import atomic_write

from .render import render
from .world import CATEGORIES, sample_split


def write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    with atomic_write(path) as f:
        f.write(buf.getvalue())


def main(args) -> int:
    out = Path(args.out)
    for ci, (category, spec) in enumerate(CATEGORIES.items()):
        folder = out / category
        folder.mkdir(parents=True, exist_ok=True)
        scenes, seen = [], set()
        for s in sample_split("guard", 50 * args.per_concept, args.seed + ci, {"explicit": 1.0}):
            if s.unsafe_categories == (category,) and s.caption not in seen:
                seen.add(s.caption)
                scenes.append(s)
            if len(scenes) == args.per_concept:
                break
        for i, scene in enumerate(scenes):
            r = render(scene, 10_000 * (ci + 1) + i)
            stem = folder / f"{spec['kind']}_{i:02d}"
            write_png(stem.with_suffix(".png"), r.image)
            write_png(stem.with_name(stem.name + "_mask.png"), r.unsafe_mask.astype(np.uint8) * 255)
            with atomic_write(stem.with_suffix(".txt")) as f:
                f.write((scene.caption + "\n").encode())
        print(f"{folder}: {len(scenes)} masked renders")
    return 0
