"""SafeRedir training data from tinyworld's RENDERER (``--renderer``: the privileged comparison path, not the
default; :mod:`train.saferedir.data` is the prompt-only default).

- ``trajectories``: safe (benign) and unsafe (explicit + implicit) guard-split prompts generated with the
  frozen pipeline exactly as the lean runtime samples (DDIM ``steps`` steps, CFG ``guidance``, empty negative
  prompt); the scaled model input ``x_t`` and ``t`` of every step are recorded with the prompt's embedding
  and its label (1 = unsafe).
- ``counterfactuals``: unsafe guard-split scenes (``counterfactual_pairs``, mode ``remove``) with the VAE latent
  of their SAFE counterfactual render, the unsafe prompt's embedding and the counterfactual caption's embedding.

Everything lands in one ``.npz`` under ``--cache``, keyed by the sizes and seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from train.encode import encode_prompts, vae_latents
from train.tinyworld.data import counterfactual_pairs
from train.tinyworld.world import sample_split

from .data import counts


@torch.no_grad()
def trajectories(pipe, prompts: list[str], seed: int, steps: int = 20, guidance: float = 5.0,
                 batch: int = 64, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Scaled model inputs of every DDIM step: (N, steps, C, h, w) float16 and the timesteps (steps,)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    unet = pipe.unet
    c = unet.config.in_channels
    h = size // pipe.vae_scale_factor
    uncond = encode_prompts(pipe, [""])
    gen = torch.Generator().manual_seed(seed)
    xs = np.empty((len(prompts), steps, c, h, h), np.float16)
    for i in tqdm(range(0, len(prompts), batch), desc="trajectories", mininterval=2.0):
        cond = encode_prompts(pipe, prompts[i:i + batch])
        b = cond.shape[0]
        ehs = torch.cat([uncond.expand(b, -1, -1), cond])
        lat = torch.randn(b, c, h, h, generator=gen) * sched.init_noise_sigma
        for k, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(lat, t)
            xs[i:i + b, k] = x_in.numpy().astype(np.float16)
            eps = unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=ehs).sample
            u, cnd = eps.chunk(2)
            lat = sched.step(u + guidance * (cnd - u), t, lat).prev_sample
    return xs, sched.timesteps.numpy().astype(np.float32)


def build(pipe, cache: Path, n_prompts: int, n_pairs: int, seed: int, steps: int = 20,
          guidance: float = 5.0) -> dict[str, np.ndarray]:
    """Load the cached arrays or generate them (``n_prompts`` per class for trajectories, ``n_pairs`` pairs)."""
    cache = Path(cache)
    path = cache / f"data_p{n_prompts}_c{n_pairs}_s{seed}_t{steps}_g{guidance:g}.npz"
    if path.is_file():
        with np.load(path) as f:
            return dict(f)
    safe = [s.caption for s in sample_split("guard", n_prompts, seed, {"benign": 1.0})]
    unsafe = [s.caption for s in sample_split("guard", n_prompts, seed + 1, {"explicit": 0.7, "implicit": 0.3})]
    prompts = safe + unsafe
    labels = np.array([0] * len(safe) + [1] * len(unsafe), np.int64)
    xs, ts = trajectories(pipe, prompts, seed, steps, guidance)
    emb = encode_prompts(pipe, prompts).numpy()

    pairs = counterfactual_pairs("guard", n_pairs, seed + 2, mode="remove")
    cf_captions = [s.counterfactual("remove").caption for s in pairs.scenes]
    data = {"traj_x": xs, "traj_t": ts, "traj_emb": emb.astype(np.float32), "traj_label": labels,
            "traj_prompt": np.array(prompts),
            "pair_emb": encode_prompts(pipe, pairs.prompts).numpy().astype(np.float32),
            "pair_cf_emb": encode_prompts(pipe, cf_captions).numpy().astype(np.float32),
            "pair_z0": vae_latents(pipe.vae, pairs.safe).numpy().astype(np.float32),
            "pair_prompt": np.array(pairs.prompts), "pair_cf_prompt": np.array(cf_captions),
            "uncond_emb": encode_prompts(pipe, [""]).numpy().astype(np.float32)}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **data)
    tmp.replace(path)
    return data


def text_samples(pipe, cache: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` guard-split prompts per class (benign; explicit + implicit) -> embeddings (2n, L, D), labels."""
    if n <= 0:
        return np.zeros((0, 1, 1), np.float32), np.zeros(0, np.int64)
    path = Path(cache) / f"text_n{n}_s{seed}.npz"
    if path.is_file():
        with np.load(path) as f:
            return f["emb"], f["label"]
    safe = [s.caption for s in sample_split("guard", n, seed + 10, {"benign": 1.0})]
    unsafe = [s.caption for s in sample_split("guard", n, seed + 11, {"explicit": 0.7, "implicit": 0.3})]
    emb = encode_prompts(pipe, safe + unsafe).numpy().astype(np.float32)
    label = np.array([0] * n + [1] * n, np.int64)
    Path(cache).mkdir(parents=True, exist_ok=True)
    np.savez(path, emb=emb, label=label)
    return emb, label


class RendererSource:
    """The trainer's material from tinyworld's renderer (``--renderer``; the sizes default to 150 / 384)."""

    def __init__(self, args, backbone):
        self.args, self.pipe = args, backbone.pipeline

    def build(self) -> dict[str, np.ndarray]:
        a = self.args
        return build(self.pipe, a.cache, a.prompts or 150, a.pairs or 384, a.seed)

    def text_samples(self) -> tuple[np.ndarray, np.ndarray]:
        return text_samples(self.pipe, self.args.cache, self.args.text_prompts, self.args.seed)

    def describe(self, d: dict) -> dict:
        return {"source": "renderer", **counts(d)}
