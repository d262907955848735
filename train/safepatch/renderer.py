"""SafePatch examples from tinyworld's RENDERER (``python -m train safepatch --renderer``): the comparison path.

The default path (:mod:`train.safepatch.data`, ``--data DATA_DIR``) trains from the prompt-only data step's
folder, as a deployer without a renderer would. This module keeps the original renderer-built examples for
comparing against it: tinyworld only, imported only when ``--renderer`` is given.

- unsafe triplets (``counterfactual_pairs("guard", mode="remove")``): unsafe prompt, its instruction ("remove the
  knife"), the SAFE render (the unsafe objects removed, everything else pixel-identical);
- benign: benign guard-split renders, half with instruction "", half with a random category instruction;
- gate: distinct guard-split captions (benign 50%, explicit 30%, implicit 20%), label 0 none / 1 + category.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from guards import CATEGORIES
from guards.safepatch import INSTRUCTIONS

from .data import assemble_patch_examples, text_stage


def patch_examples(backbone, n_unsafe: int, n_benign: int, seed: int = 0) -> dict[str, torch.Tensor]:
    from train.tinyworld.data import counterfactual_pairs, render_split

    pairs = counterfactual_pairs("guard", n_unsafe, seed, mode="remove")
    benign = render_split("guard", n_benign, seed + 1) if n_benign else None
    rng = random.Random(seed)
    b_scenes = [s for s in benign.scenes if not s.is_unsafe] if benign else []
    keep = [i for i, s in enumerate(benign.scenes) if not s.is_unsafe] if benign else []
    b_images = benign.images[keep] if benign else np.zeros((0, 64, 64, 3), np.uint8)
    half = len(b_scenes) // 2
    prompts = pairs.prompts + [s.caption for s in b_scenes]
    instructions = (pairs.instructions + [""] * half
                    + [INSTRUCTIONS[rng.choice(CATEGORIES)] for _ in range(len(b_scenes) - half)])
    kinds = [0] * len(pairs.prompts) + [1] * half + [2] * (len(b_scenes) - half)
    return assemble_patch_examples(backbone, prompts, instructions, kinds, np.concatenate([pairs.safe, b_images]))


def gate_examples(backbone, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Hidden states, EOS embeddings and labels (0 none, 1 + category index) of ``n`` distinct guard-split
    prompts, and the prompts."""
    from train.tinyworld.world import sample_split

    scenes, seen = [], set()
    for s in sample_split("guard", 4 * n, seed + 7, {"benign": 0.5, "explicit": 0.3, "implicit": 0.2}):
        if s.caption not in seen:
            seen.add(s.caption)
            scenes.append(s)
        if len(scenes) == n:
            break
    labels = torch.tensor([1 + CATEGORIES.index(s.unsafe_categories[0]) if s.is_unsafe else 0 for s in scenes])
    hidden, eos = text_stage(backbone, [s.caption for s in scenes])
    return hidden, eos, labels, [s.caption for s in scenes]
