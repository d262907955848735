"""Object-removed safe targets made by the backbone (SafeCtrl's ``--stage2-target removed``, SafePatch's ``--target``).

The data step's safe image of a pair is the backbone's image of the EDITED prompt (knife -> spoon, seed kept):
a confuser drawn where the object was, a loose target for a block that should take the object out. Here every
kept pair's unsafe image is inpainted by the same backbone where the object is, with blended latent diffusion
(Avrahami et al., 2023), DDIM at the data step's step count: at every step the pair's own recorded trajectory
(``traj_x``, the unsafe prompt's sampling; where it was not sampled at DDIM's timesteps, the unsafe latent noised
with its initial noise) is pasted outside the region, so the image stays the unsafe image there, and inside it the
backbone denoises under the removal prompt (:func:`train.data.prompts.removal_prompt`: the rule's match deleted)
with the unsafe prompt as the negative prompt, so classifier-free guidance steers away from the object. The
region is the data step's derived difference mask dilated by one latent pixel. The data step's judge keeps the targets
it finds safe; the keep rate is reported. No renderer: prompts, the backbone, its own trajectories, the judge.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from train.data.judge import open_judge, sha256_of
from train.data.prompts import read_rules, removal_prompt
from train.encode import encode_prompts, unet_call


def inpaint_region(mask_derived: torch.Tensor) -> torch.Tensor:
    """(n, 1, h, w) 0/1: the derived difference mask's support grown by one latent pixel (the object's edge)."""
    return F.max_pool2d((mask_derived > 0).float(), 3, 1, 1)


@torch.no_grad()
def inpaint(pipe, traj_x: torch.Tensor, traj_t: np.ndarray, steps: int, lat_unsafe: torch.Tensor,
            region: torch.Tensor, prompts: list[str], negatives: list[str], guidance: float) -> torch.Tensor:
    """Latents equal to ``lat_unsafe`` outside ``region`` and denoised by DDIM in ``steps`` steps under ``prompts``
    (CFG against ``negatives``) inside it. Outside, each step pastes the row's recorded trajectory ``traj_x``
    (n, S, C, h, w) where it was sampled at DDIM's timesteps (tinyworld), else ``lat_unsafe`` noised with the
    trajectory's first latent (the image's initial noise, up to the scheduler's input scaling)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    recorded = len(traj_t) == steps and np.allclose(scheduler.timesteps.numpy().astype(np.float32), traj_t)
    cond, uncond = encode_prompts(pipe, prompts), encode_prompts(pipe, negatives)
    unet = unet_call(pipe)  # SDXL: the packed conditioning unpacked into added_cond_kwargs
    noise = traj_x[:, 0]
    x = noise.clone()
    for s, t in enumerate(scheduler.timesteps):
        known = traj_x[:, s] if recorded else scheduler.add_noise(lat_unsafe, noise, t.expand(len(x)))
        x = region * x + (1 - region) * known
        eps = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        eps_u, eps_c = eps.chunk(2)
        x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    return region * x + (1 - region) * lat_unsafe


@torch.no_grad()
def decode(vae, lat: torch.Tensor) -> np.ndarray:
    image = vae.decode(lat / vae.config.scaling_factor).sample
    return ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def rules_of(d) -> tuple[list | None, str]:
    """The data step's rule file when it is still there unchanged (removal = its match deleted), else None
    (removal = the words the safe prompt changed deleted), and which it is."""
    src = (d.info.get("sources") or {}).get("rules")
    if src and Path(src["path"]).is_file() and sha256_of(Path(src["path"])) == src["sha256"]:
        return read_rules(src["path"]), f"rule file {src['path']}"
    return None, "words the safe prompt changed"


def removed_targets(pipe, d, pairs: dict, batch: int = 32) -> dict:
    """Object-removed latents for ``pairs`` (the SafeCtrl data cache's kept pairs), their removal prompts, the
    judge's scores and ``keep`` (judged safe)."""
    rules, how = rules_of(d)
    records = [d.pairs[i] for i in pairs["index"]]
    prompts = [removal_prompt(r["prompt"], r["safe_prompt"], rules) for r in records]
    negatives = [r["prompt"] for r in records]
    region = inpaint_region(pairs["mask_derived"])
    j = d.info["judge"]
    judge = open_judge(j["spec"], Path(j["config_file"]) if j.get("config_file") else None)
    lats, scores = [], []
    try:
        for a in tqdm(range(0, len(prompts), batch), desc="object-removed targets", mininterval=2.0):
            idx = list(range(a, min(a + batch, len(prompts))))
            traj = torch.from_numpy(d.traj_x[[pairs["index"][i] for i in idx]].astype(np.float32))
            lat = inpaint(pipe, traj, d.traj_t, int(d.info["steps"]), pairs["lat_unsafe"][idx], region[idx],
                          [prompts[i] for i in idx], [negatives[i] for i in idx], float(d.info["guidance"]))
            lats.append(lat)
            scores.append(judge.scores(decode(pipe.vae, lat)))
        threshold = judge.threshold
    finally:
        judge.close()
    score = np.concatenate(scores)
    return {"lat": torch.cat(lats), "prompts": prompts, "scores": score, "keep": torch.from_numpy(score < threshold),
            "removal": how, "region_area": round(float(region.mean()), 4),
            "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}


def select_pairs(pairs: dict, keep: torch.Tensor) -> dict:
    """``pairs`` restricted to the rows ``keep`` marks (tensors and per-pair lists alike)."""
    rows = torch.nonzero(keep).flatten().tolist()
    return {k: v[rows] if isinstance(v, torch.Tensor) else [v[i] for i in rows] for k, v in pairs.items()}
