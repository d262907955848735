"""SafeCtrl training tensors from a data folder of ``python -m train data`` (:func:`train.data.load.load_data`),
cached once per data folder (``<work>/<sha256 of data.json>[:12]-p<P>-b<B>/data.pt``: a new data folder never
reuses stale tensors). No renderer: what a deployer has (prompts, the backbone's own images, a judge, a few
exact masks). The tinyworld renderer path for comparison is :mod:`train.safectrl.renderer`.

- ``fewshot``: the few-shot images (and their horizontal mirror images, masks mirrored too) with their EXACT
  masks, ``lat`` (m, C, h, w) scaled VAE latents (posterior mean), ``emb`` (m, L, D) their captions'
  text-encoder hidden states, ``mask`` (m, 1, h, w) area-pooled to latent size, ``category`` (m,) 1 + index in
  ``categories``: the detector's positives.
- ``pairs``: every KEPT pair (capped by ``--pairs``): ``lat_safe`` (the judge-kept safe-prompt image: preferred),
  ``lat_unsafe`` (rejected), ``emb`` the UNSAFE prompt, ``mask_derived`` (area-pooled difference mask: a coarse
  region, ~2.8x the object, not a detector target). Safe images under the unsafe prompt are detector negatives.
- ``benign`` / ``benign_eval``: the benign images with their prompts (mask 0); the last tenth is held back from
  training for the false-coverage measurement.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from guards import CATEGORIES
from runtime.errors import BadInputError
from train.encode import encode_prompts, vae_latents


def latent_masks(masks: np.ndarray, size) -> torch.Tensor:
    m = torch.from_numpy(np.ascontiguousarray(masks)).float()[:, None]
    return F.adaptive_avg_pool2d(m, size)


def fewshot_categories(d) -> list[str]:
    """The detector's category list: the few-shot categories, in guards.CATEGORIES order when they are exactly
    those (tinyworld), in sorted order otherwise. No few-shot set -> BadInputError (exit 3)."""
    if d.fewshot is None or not len(d.fewshot["image"]):
        raise BadInputError(f"{d.folder} has no few-shot masks: rerun the data step with --masks FEWSHOT_DIR (SafeCtrl's "
                            "detector trains on exact few-shot masks; the derived difference masks are ~2.8x the "
                            "object and not a detector target)")
    cats = sorted({str(c) for c in d.fewshot["category"]})
    return list(CATEGORIES) if set(cats) == set(CATEGORIES) else cats


def build_data_cache(pipe, d, path: Path, categories: list[str], n_pairs: int | None = None,
                     n_benign: int | None = None) -> dict:
    """Encode and save (or load if present) every tensor the two stages need (module docstring)."""
    path = Path(path)
    if path.is_file():
        return torch.load(path, weights_only=False)
    size = tuple(pipe.unet.config.sample_size for _ in range(2))
    fs = d.fewshot
    images = np.concatenate([fs["image"], fs["image"][:, :, ::-1]])
    masks = np.concatenate([fs["mask"], fs["mask"][:, :, ::-1]])
    captions = [str(c) for c in fs["caption"]] * 2
    cats = [1 + categories.index(str(c)) for c in fs["category"]] * 2
    fewshot = {"lat": vae_latents(pipe.vae, images), "emb": encode_prompts(pipe, captions),
               "mask": latent_masks(masks, size), "category": torch.tensor(cats), "captions": captions}

    kept = np.flatnonzero(d.kept)[:n_pairs]
    prompts = [d.pairs[i]["prompt"] for i in kept]
    pairs = {"lat_unsafe": vae_latents(pipe.vae, d.unsafe[kept]), "lat_safe": vae_latents(pipe.vae, d.safe[kept]),
             "emb": encode_prompts(pipe, prompts), "mask_derived": latent_masks(d.mask[kept], size),
             "prompts": prompts, "index": kept.tolist(),
             "category": [str(d.pairs[i].get("category", "")) for i in kept]}

    nb = len(d.benign) if n_benign is None else min(n_benign, len(d.benign))
    held = nb // 10 if nb >= 10 else min(1, nb - 1) if nb >= 2 else 0
    benign, benign_eval = {}, {}
    for part, (a, b) in ((benign, (0, nb - held)), (benign_eval, (nb - held, nb))):
        ps = [d.benign[i]["prompt"] for i in range(a, b)]
        part.update({"lat": vae_latents(pipe.vae, d.benign_images[a:b]),
                     "emb": encode_prompts(pipe, ps) if ps else torch.zeros(0, 1, 1),
                     "mask": torch.zeros(b - a, 1, *size), "prompts": ps})
    data = {"fewshot": fewshot, "pairs": pairs, "benign": benign, "benign_eval": benign_eval,
            "categories": categories, "folder": str(d.folder), "data_sha256": d.sha256}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data


def stage1_sets(data: dict, pair_masks: torch.Tensor | None = None) -> tuple[dict, dict]:
    """(positives, negatives) for stage 1: the few-shot images with their exact masks (with ``pair_masks``, one
    latent mask per kept pair, also every kept pair's unsafe image whose mask is not empty, with that mask); the
    kept safe images under the UNSAFE prompt and the training benign images under their own prompts (mask 0,
    category 0)."""
    p, b = data["pairs"], data["benign"]
    pos = {k: data["fewshot"][k] for k in ("lat", "emb", "mask", "category")}
    if pair_masks is not None:
        cats = data["categories"]
        ok = [i for i, c in enumerate(p["category"]) if c in cats and float(pair_masks[i].max()) > 0]
        extra = {"lat": p["lat_unsafe"][ok], "emb": p["emb"][ok], "mask": pair_masks[ok],
                 "category": torch.tensor([1 + cats.index(p["category"][i]) for i in ok], dtype=torch.long)}
        pos = {k: torch.cat([pos[k], extra[k]]) for k in pos}
    zeros = torch.zeros(len(p["lat_safe"]), *b["mask"].shape[1:])
    parts = [(p["lat_safe"], p["emb"], zeros)] + ([(b["lat"], b["emb"], b["mask"])] if len(b["lat"]) else [])
    neg = {"lat": torch.cat([x[0] for x in parts]), "emb": torch.cat([x[1] for x in parts]),
           "mask": torch.cat([x[2] for x in parts])}
    neg["category"] = torch.zeros(len(neg["lat"]), dtype=torch.long)
    return pos, neg
