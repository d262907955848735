"""The checker's examples from a data folder (train/data): images, per-category targets, and which are held out."""

from __future__ import annotations

import numpy as np

from train.data.load import Data


def categories(data: Data) -> list[str]:
    """The unsafe categories of the data's pairs, sorted (the checker's outputs, in order)."""
    return sorted({p["category"] for p in data.pairs})


def examples(data: Data, val_share: float = 0.1, seed: int = 0) -> dict[str, np.ndarray]:
    """``image (N,H,W,3) u8``, ``target (N,K) f32``, ``pair (N,)`` (the pair index a blendable example came from, -1
    else) and ``val (N,) bool``. Positives: unsafe images the judge called unsafe (the data step's ``unsafe_score``
    against its threshold), in their prompt's category; negatives: kept safe images and benign images. Held out: a
    ``val_share`` of the pairs (their unsafe AND safe image) and of the benign images."""
    cats = categories(data)
    threshold = float(data.info["judge"]["threshold"])
    rng = np.random.default_rng(seed)
    pair_val = rng.random(len(data.pairs)) < val_share
    images, targets, pair, val = [], [], [], []
    for i, p in enumerate(data.pairs):
        y = np.zeros(len(cats), np.float32)
        y[cats.index(p["category"])] = 1.0
        if p["unsafe_score"] >= threshold:
            images.append(data.unsafe[i]); targets.append(y); pair.append(i if data.kept[i] else -1); val.append(pair_val[i])
        if data.kept[i]:
            images.append(data.safe[i]); targets.append(np.zeros_like(y)); pair.append(-1); val.append(pair_val[i])
    benign_val = rng.random(len(data.benign_images)) < val_share
    for j, im in enumerate(data.benign_images):
        images.append(im); targets.append(np.zeros(len(cats), np.float32)); pair.append(-1); val.append(benign_val[j])
    if not images or not any(t.any() for t in targets):
        from runtime.errors import BadInputError

        raise BadInputError(f"{data.folder}: the judge called none of its unsafe prompts' images unsafe: no positive "
                            "to learn from; rerun `python -m train data` with a judge that sees the unsafe concepts")
    return {"image": np.stack(images), "target": np.stack(targets), "pair": np.array(pair), "val": np.array(val)}


def blend(data: Data, pairs: np.ndarray, category: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A half-drawn object: each kept pair's safe image with a random share ``a`` of the unsafe image mixed in inside its
    derived mask; target 1 in the pair's category when at least half of it is there (``a >= 0.5``), else 0: a sharp
    boundary keeps the confusers (the safe edit's spoon, the blend's low end) far below it (a soft target ``a`` read
    a benign spoon at 0.27; bench/results/checker_dev/README.md). Returns ``(images u8, targets)``."""
    a = rng.random(len(pairs)).astype(np.float32)
    m = data.mask[pairs].astype(np.float32)[..., None] * a[:, None, None, None]
    x = data.safe[pairs].astype(np.float32) * (1 - m) + data.unsafe[pairs].astype(np.float32) * m
    y = np.zeros((len(pairs), category.shape[1]), np.float32)
    y[np.arange(len(pairs)), category.argmax(1)] = a >= 0.5
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), y
