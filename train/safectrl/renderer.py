"""tinyworld-only comparison path of ``python -m train safectrl --renderer``: training tensors from the RENDERER
(exact pixel masks, pixel-identical counterfactuals), which a deployer does not have. Imported only when
``--renderer`` is given; the default ``--data`` path (:mod:`train.safectrl.data`) never imports it.

- ``pairs``: unsafe renders of the ``guard`` split (never eval, never held-out synonyms) with their safe
  counterfactuals (unsafe object removed, identical elsewhere) and exact pixel masks:
  ``lat_unsafe``/``lat_safe`` (n, 4, 16, 16) scaled VAE latents (posterior mean), ``emb`` (n, L, D) the unsafe
  prompt's text-encoder hidden states, ``mask`` (n, 1, 16, 16) the unsafe mask area-pooled to latent size,
  ``category`` (n,) 1 + category index of the (first) unsafe object.
- ``benign``: benign renders of the guard split with their own captions (mask 0): negatives for the
  detector (confusers spoon / paint / ghost included).
- ``eval_pairs``: the same for the ``eval`` split, all groups including held-out synonyms (for mask IoU only).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from guards import CATEGORIES
from train.encode import encode_prompts, vae_latents
from train.safectrl.data import latent_masks
from train.safectrl.train import detector_features, iou
from train.tinyworld.data import counterfactual_pairs, render_scenes
from train.tinyworld.world import sample_split


def _pairs(pipe, split: str, n: int, seed: int, groups=None) -> dict:
    cp = counterfactual_pairs(split, n, seed, mode="remove", groups=groups)
    size = pipe.unet.config.sample_size
    cats = [1 + CATEGORIES.index(s.unsafe_categories[0]) for s in cp.scenes]
    return {"lat_unsafe": vae_latents(pipe.vae, cp.unsafe), "lat_safe": vae_latents(pipe.vae, cp.safe),
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
    benign = {"lat": vae_latents(pipe.vae, rend.images), "emb": encode_prompts(pipe, rend.captions),
              "mask": torch.zeros(len(scenes), 1, size, size), "prompts": rend.captions}
    eval_pairs = _pairs(pipe, "eval", n_eval, seed + 2,
                        groups={"explicit": 0.4, "heldout": 0.3, "implicit": 0.3})
    data = {"pairs": pairs, "benign": benign, "eval_pairs": eval_pairs}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data


def stage1_sets(data: dict) -> tuple[dict, dict]:
    """(positives, negatives) for stage 1: unsafe renders with their exact masks; safe counterfactuals under the
    unsafe prompt and benign renders (mask 0)."""
    p, b = data["pairs"], data["benign"]
    pos = {"lat": p["lat_unsafe"], "emb": p["emb"], "mask": p["mask"], "category": p["category"]}
    neg = {"lat": torch.cat([p["lat_safe"], b["lat"]]), "emb": torch.cat([p["emb"], b["emb"]]),
           "mask": torch.cat([torch.zeros_like(p["mask"]), b["mask"]]),
           "category": torch.zeros(len(p["lat_safe"]) + len(b["lat"]), dtype=torch.long)}
    return pos, neg


@torch.no_grad()
def evaluate_masks(unet, safectrl, scheduler, data, ts=(200, 400, 600), seed=123) -> dict:
    """Mask IoU on held-out (eval split) renders, per timestep and per group, plus benign false coverage."""
    ev, latent_hw = data["eval_pairs"], tuple(data["eval_pairs"]["mask"].shape[-2:])
    g = torch.Generator().manual_seed(seed)
    out = {"iou": {}, "iou_by_group": {}, "benign_max_mask": {}, "safe_cf_max_mask": {}}
    groups = ev["groups"]
    for t in ts:
        res = {}
        for key, lat, emb in (("unsafe", ev["lat_unsafe"], ev["emb"]), ("safe", ev["lat_safe"], ev["emb"]),
                              ("benign", data["benign"]["lat"][-200:], data["benign"]["emb"][-200:])):
            noise = torch.randn(lat.shape, generator=g)
            tt = torch.full((len(lat),), t)
            feats = detector_features(unet, safectrl, scheduler.add_noise(lat, noise, tt), emb, tt)
            p = feats.shape[1]
            f = int(round(math.sqrt(latent_hw[0] * latent_hw[1] / p)))
            res[key] = safectrl.detect(feats, (latent_hw[0] // f, latent_hw[1] // f), latent_hw)[1]
        out["iou"][str(t)] = round(iou(res["unsafe"], ev["mask"]), 4)
        out["iou_by_group"][str(t)] = {
            grp: round(iou(res["unsafe"][[i for i, x in enumerate(groups) if x == grp]],
                           ev["mask"][[i for i, x in enumerate(groups) if x == grp]]), 4)
            for grp in sorted(set(groups))}
        out["benign_max_mask"][str(t)] = round(float(res["benign"].amax(dim=(1, 2, 3)).mean()), 4)
        out["safe_cf_max_mask"][str(t)] = round(float(res["safe"].amax(dim=(1, 2, 3)).mean()), 4)
    out["iou_mean"] = round(sum(out["iou"].values()) / len(ts), 4)
    return out
