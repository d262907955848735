"""SafeCtrl training data from tinyworld, cached once as tensors (``<out>/cache/data.pt``).

- ``pairs``: unsafe renders of the ``guard`` split (never eval, never held-out synonyms) with their safe
  counterfactuals (unsafe object removed, identical elsewhere) and exact pixel masks:
  ``lat_unsafe``/``lat_safe`` (n, 4, 16, 16) scaled VAE latents (posterior mean), ``emb`` (n, L, D) the unsafe
  prompt's text-encoder hidden states, ``mask`` (n, 1, 16, 16) the unsafe mask area-pooled to latent size,
  ``category`` (n,) 1 + category index of the (first) unsafe object.
- ``benign``: benign renders of the guard split with their own captions (mask 0): negatives for the
  detector (confusers spoon / paint / ghost included).
- ``eval_pairs``: the same for the ``eval`` split, all groups including held-out synonyms (for mask IoU only).

Real backbones: the same fields from any image set with pixel masks of the concept and an inpainted or
re-rendered counterfactual (e.g. I2P-style prompts, segmentation masks, object-removal edits); preference
pairs are (counterfactual = preferred, original = rejected, original prompt as the condition).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from guards import CATEGORIES
from train.tinyworld.data import counterfactual_pairs, render_scenes
from train.tinyworld.world import sample_split


def _images(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def encode_images(vae, images: np.ndarray, batch: int = 128) -> torch.Tensor:
    out = [vae.encode(_images(images[i:i + batch]) * 2 - 1).latent_dist.mean for i in range(0, len(images), batch)]
    return torch.cat(out) * vae.config.scaling_factor


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], batch: int = 256) -> torch.Tensor:
    tok = pipe.tokenizer
    out = []
    for i in range(0, len(prompts), batch):
        ids = tok(prompts[i:i + batch], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out.append(pipe.text_encoder(ids)[0])
    return torch.cat(out)


def latent_masks(masks: np.ndarray, size: int) -> torch.Tensor:
    m = torch.from_numpy(masks).float()[:, None]
    return F.adaptive_avg_pool2d(m, size)


def _pairs(pipe, split: str, n: int, seed: int, groups=None) -> dict:
    cp = counterfactual_pairs(split, n, seed, mode="remove", groups=groups)
    size = pipe.unet.config.sample_size
    cats = [1 + CATEGORIES.index(s.unsafe_categories[0]) for s in cp.scenes]
    return {"lat_unsafe": encode_images(pipe.vae, cp.unsafe), "lat_safe": encode_images(pipe.vae, cp.safe),
            "emb": encode_prompts(pipe, cp.prompts), "mask": latent_masks(cp.mask, size),
            "category": torch.tensor(cats), "prompts": cp.prompts,
            "groups": [s.group for s in cp.scenes]}


def build_cache(pipe, path: Path, n_pairs: int, n_benign: int, n_eval: int, seed: int = 0) -> dict:
    """Render, encode and save (or load if present) every tensor the two stages need."""
    path = Path(path)
    if path.is_file():
        return torch.load(path, weights_only=False)
    pairs = _pairs(pipe, "guard", n_pairs, seed)
    scenes = sample_split("guard", n_benign, seed + 1, {"benign": 1.0})
    rend = render_scenes(scenes, seed + 1, desc="benign")
    size = pipe.unet.config.sample_size
    benign = {"lat": encode_images(pipe.vae, rend.images), "emb": encode_prompts(pipe, rend.captions),
              "mask": torch.zeros(len(scenes), 1, size, size), "prompts": rend.captions}
    eval_pairs = _pairs(pipe, "eval", n_eval, seed + 2,
                        groups={"explicit": 0.4, "heldout": 0.3, "implicit": 0.3})
    data = {"pairs": pairs, "benign": benign, "eval_pairs": eval_pairs}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data
