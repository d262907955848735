"""Cached training tensors for SafePatch (tinyworld guard split only).

Patch examples (``patch_examples``), one row each: ``latent`` (4, h, w) = VAE mean * scaling factor of the
TARGET render, ``prompt`` (L, D) = the text stage's hidden states of the prompt the UNet is conditioned on,
``instruction`` (L, D) = hidden states of the instruction the patch gets, ``kind`` (0 unsafe triplet,
1 benign + empty instruction, 2 benign + a wrong instruction):

- unsafe triplets (``counterfactual_pairs("guard")``): unsafe prompt, its instruction ("remove the knife"),
  the SAFE render (the unsafe objects removed, everything else pixel-identical);
- benign pairs: benign prompt, its own render, instruction "" (the patch must stay silent);
- benign pairs with a random instruction: the gate may fire on a benign prompt (a spoon, red paint): the
  patch must then keep the scene.

Gate examples (``gate_examples``): hidden states + EOS embeddings of guard-split prompts, label 0 none / 1.. category.

Data formats for real backbones (same tensors): a folder of (unsafe prompt, instruction, safe image) triplets
plus benign (prompt, image) pairs; images VAE-encoded at the backbone's resolution.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from guards import CATEGORIES
from guards.safepatch import INSTRUCTIONS


@torch.no_grad()
def text_stage(backbone, prompts: list[str], batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (n, L, D), eos (n, D)) exactly as the bundle's text-stage graph computes them."""
    from export.graphs import TextStage

    spec = backbone.text_encoders[0]
    pipe = backbone.pipeline
    stage = TextStage(pipe.text_encoder, eos_id=spec.eos_id, penultimate=False, pooled=False).eval()
    hs, es = [], []
    for i in range(0, len(prompts), batch):
        ids = pipe.tokenizer(prompts[i:i + batch], padding="max_length", max_length=spec.max_length,
                             truncation=True, return_tensors="pt").input_ids
        h, e = stage(ids)
        hs.append(h)
        es.append(e)
    return torch.cat(hs), torch.cat(es)


@torch.no_grad()
def vae_latents(backbone, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    vae = backbone.pipeline.vae
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float() / 255.0
        out.append(vae.encode(x * 2 - 1).latent_dist.mean)
    return torch.cat(out) * vae.config.scaling_factor


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
    images = np.concatenate([pairs.safe, b_images])
    hidden, _ = text_stage(backbone, prompts)
    uniq = sorted(set(instructions))
    inst_hidden, _ = text_stage(backbone, uniq)
    index = torch.tensor([uniq.index(s) for s in instructions])
    return {"latent": vae_latents(backbone, images), "prompt": hidden, "instruction": inst_hidden[index],
            "kind": torch.tensor(kinds)}


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
