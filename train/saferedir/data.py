"""SafeRedir training material from a data folder of ``python -m train data`` (the default, prompt-only path:
the backbone's own generations and the user's prompt lists; nothing here imports tinyworld's renderer).

- trajectories: every benign prompt's (label 0) and every unsafe prompt's (label 1) sampling trajectory as the
  data step recorded it (the scaled model input x_t of each step, exactly what the runtime's classifier sees),
  with the prompt's embedding (the text encoder's hidden states the UNet cross-attends to);
- redirect pairs: every KEPT pair: the VAE latent of the judge-kept safe image (same backbone, same seed
  family), the unsafe prompt's embedding and the safe prompt's;
- step-0 text samples: prompts of the whole lists (``text.jsonl``, beyond the generated ones) with fresh noise.

SDXL: the embedding is both encoders' penultimate hidden states side by side (``encode_sdxl``: what the UNet
cross-attends to), and the arrays gain ``traj_pooled``, ``pair_pooled``, ``pair_cf_pooled`` (encoder 2's pooled
``text_embeds`` of the same prompts) for the pooled head and the stage-2 UNet calls.

:func:`build` returns the same arrays as :func:`train.saferedir.renderer.build` (the ``--renderer`` comparison),
cached under ``--cache`` keyed by the data folder's ``data.json`` hash.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from train.data.load import Data, check_backbone, load_data
from train.encode import encode_prompts, encode_sdxl, is_sdxl, vae_latents


def _embed(pipe, prompts: list[str]) -> dict[str, np.ndarray]:
    """``{"emb": (N, L, D)}`` as the UNet cross-attends to it; SDXL also ``{"pooled": (N, P)}``."""
    if not is_sdxl(pipe):
        return {"emb": encode_prompts(pipe, prompts).numpy().astype(np.float32)}
    hidden, pooled = encode_sdxl(pipe, prompts)
    return {"emb": hidden.numpy().astype(np.float32), "pooled": pooled.numpy().astype(np.float32)}


def _cached(path: Path, make) -> dict[str, np.ndarray]:
    if path.is_file():
        with np.load(path) as f:
            return dict(f)
    arrays = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return arrays


def build(pipe, data: Data, cache: Path, n_prompts: int | None, n_pairs: int | None) -> dict[str, np.ndarray]:
    """Trajectories of at most ``n_prompts`` prompts per class and at most ``n_pairs`` kept pairs (None: all)."""
    kept = np.flatnonzero(data.kept)[:n_pairs]
    n_b = len(data.benign) if n_prompts is None else min(n_prompts, len(data.benign))
    n_u = len(data.pairs) if n_prompts is None else min(n_prompts, len(data.pairs))
    key = f"data_{data.sha256[:16]}_p{n_b}-{n_u}_c{len(kept)}.npz"

    def make() -> dict[str, np.ndarray]:
        safe = [b["prompt"] for b in data.benign[:n_b]]
        unsafe = [p["prompt"] for p in data.pairs[:n_u]]
        prompts = safe + unsafe
        pairs = [data.pairs[i] for i in kept]
        traj, pair = _embed(pipe, prompts), _embed(pipe, [p["prompt"] for p in pairs])
        cf = _embed(pipe, [p["safe_prompt"] for p in pairs])
        return {"traj_x": np.concatenate([data.benign_traj_x[:n_b], data.traj_x[:n_u]]),
                "traj_t": data.traj_t.astype(np.float32),
                "traj_emb": traj["emb"],
                "traj_label": np.array([0] * n_b + [1] * n_u, np.int64), "traj_prompt": np.array(prompts),
                "pair_emb": pair["emb"],
                "pair_cf_emb": cf["emb"],
                "pair_z0": vae_latents(pipe.vae, data.safe[kept]).numpy().astype(np.float32),
                "pair_prompt": np.array([p["prompt"] for p in pairs]),
                "pair_cf_prompt": np.array([p["safe_prompt"] for p in pairs]),
                "uncond_emb": _embed(pipe, [""])["emb"],
                **({"traj_pooled": traj["pooled"], "pair_pooled": pair["pooled"], "pair_cf_pooled": cf["pooled"]}
                   if "pooled" in traj else {})}

    return _cached(Path(cache) / key, make)


def text_samples(pipe, data: Data, cache: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``n`` prompts per class from the whole lists (benign: label 0; unsafe: label 1), drawn with
    ``seed`` -> embeddings (m, L, D), labels (m,)."""
    if n <= 0:
        return np.zeros((0, 1, 1), np.float32), np.zeros(0, np.int64)
    rng = random.Random(seed + 10)
    safe = sorted(set(data.text_benign))
    unsafe = sorted({p["prompt"] for p in data.text_pairs})
    safe, unsafe = rng.sample(safe, min(n, len(safe))), rng.sample(unsafe, min(n, len(unsafe)))
    key = f"text_{data.sha256[:16]}_n{n}_s{seed}.npz"
    arrays = _cached(Path(cache) / key, lambda: {
        "emb": _embed(pipe, safe + unsafe)["emb"],
        "label": np.array([0] * len(safe) + [1] * len(unsafe), np.int64)})
    return arrays["emb"], arrays["label"]


class DataSource:
    """The trainer's material from ``--data`` (the interface :class:`train.saferedir.renderer.RendererSource` shares)."""

    def __init__(self, args, backbone):
        self.args, self.pipe = args, backbone.pipeline
        self.data = load_data(args.data)
        check_backbone(self.data, backbone)

    def build(self) -> dict[str, np.ndarray]:
        return build(self.pipe, self.data, self.args.cache, self.args.prompts, self.args.pairs)

    def text_samples(self) -> tuple[np.ndarray, np.ndarray]:
        return text_samples(self.pipe, self.data, self.args.cache, self.args.text_prompts, self.args.seed)

    def describe(self, d: dict) -> dict:
        return {"source": "data", "data": str(self.data.folder), "data_sha256": self.data.sha256, **counts(d)}


def counts(d: dict) -> dict:
    return {"trajectories_benign": int((d["traj_label"] == 0).sum()),
            "trajectories_unsafe": int((d["traj_label"] == 1).sum()), "redirect_pairs": int(len(d["pair_z0"]))}
