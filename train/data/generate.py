"""The backbone's own images for the data step: aligned unsafe / safe-candidate generations and trajectories.

:class:`Sampler` runs the diffusers pipeline of ``export.families.load_backbone(model)`` (SD 1.x / 2.x / SDXL)
with its own scheduler (tinyworld's is DDIM), ``steps`` steps, classifier-free guidance ``guidance`` and the
empty negative prompt (the pipeline's default), ``batch`` images per call, one ``torch.Generator`` per image
seeded with that image's seed (so an image depends on its seed, not on its batch). With ``trajectory=True`` it
keeps what the UNet sees at every step: the scaled model input x_t (the conditional copy of the CFG batch,
float16) and the timesteps. They are recorded by a forward pre-hook on the UNet, not by ``callback_on_step_end``:
the callback sees the latents AFTER each step and unscaled, the hook the exact model input for any scheduler
(Euler's input scaling, PNDM's timestep list included).

:func:`generate_pairs`, per pair (prompt, safe prompt, seed s):

- the unsafe prompt's image and trajectory at seed ``s``;
- ``K`` candidates of the safe prompt at seeds ``s, s+1, ..., s+K-1`` (candidate 0 shares the unsafe image's
  initial noise: the same seed family);
- the judge scores the unsafe image and every candidate; a candidate PASSES when it is safe (score <
  threshold) and its changed-pixel share against the unsafe image (:func:`train.data.masks.changed_pixels`)
  is ``<= max_changed``; the kept one is the passing candidate with the fewest changed pixels (ties: the lower
  candidate index); none passing -> the pair is not kept (its safe image is zeros).

:func:`generate_benign`: each benign prompt's image and trajectory at its seed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .masks import changed_pixels

DEFAULT_MAX_CHANGED = 0.6  # measured on tinyworld: train/data/README.md, "Choosing --max-changed"


class BackboneFailed(RuntimeError):
    """The backbone produced NaN/Inf images."""


@dataclass
class Images:
    images: np.ndarray            # (n, H, W, 3) uint8
    traj_x: np.ndarray | None     # (n, S, C, h, w) float16
    traj_t: np.ndarray | None     # (S,) float32


class Sampler:
    """Images (and trajectories) of prompts at given seeds through the backbone's diffusers pipeline."""

    def __init__(self, backbone, steps: int, guidance: float, batch: int,
                 progress: Callable[[int], None] | None = None):
        self.pipe = backbone.pipeline
        self.pipe.set_progress_bar_config(disable=True)
        self.steps, self.guidance, self.batch = steps, guidance, batch
        self.progress = progress or (lambda n: None)
        self._record: list | None = None
        self._handle = self.pipe.unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def close(self) -> None:
        """Take the recording hook off the UNet."""
        self._handle.remove()

    def _hook(self, module, args, kwargs):
        if self._record is not None:
            sample = args[0] if args else kwargs["sample"]
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            self._record.append((sample, float(torch.as_tensor(t).reshape(-1)[0])))

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int], trajectory: bool = False) -> Images:
        images, xs, ts = [], [], None
        for i in range(0, len(prompts), self.batch):
            p, s = prompts[i:i + self.batch], seeds[i:i + self.batch]
            self._record = [] if trajectory else None
            try:
                out = self.pipe(prompt=p, num_inference_steps=self.steps, guidance_scale=self.guidance,
                                generator=[torch.Generator().manual_seed(int(k)) for k in s], output_type="np")
                record = self._record
            finally:
                self._record = None
            x = np.asarray(out.images, np.float32)
            if not np.isfinite(x).all():
                raise BackboneFailed(f"the backbone made NaN/Inf images for {p[0]!r} ...")
            images.append((x * 255).round().clip(0, 255).astype(np.uint8))
            if trajectory:
                n = len(p)
                # with CFG the UNet batch is [latents; latents]: both halves equal, keep one
                xs.append(torch.stack([r[0][:n] for r in record], 1).float().cpu().numpy().astype(np.float16))
                t = np.array([r[1] for r in record], np.float32)
                if ts is not None and not np.array_equal(ts, t):
                    raise RuntimeError("the scheduler's timesteps changed between batches")
                ts = t
            self.progress(len(p))
        return Images(np.concatenate(images), np.concatenate(xs) if trajectory else None, ts)


@dataclass
class PairChunk:
    """One chunk of pairs as :func:`generate_pairs` makes it (the arrays of ``chunks/pairs-*.npz``)."""

    unsafe: np.ndarray            # (n, H, W, 3) uint8
    safe: np.ndarray              # (n, H, W, 3) uint8, zeros where none kept
    kept: np.ndarray              # (n,) bool
    kept_candidate: np.ndarray    # (n,) int64, -1 where none kept
    unsafe_score: np.ndarray      # (n,) float64
    candidate_scores: np.ndarray  # (n, K) float64
    changed: np.ndarray           # (n, K) float64: changed-pixel share of each candidate
    traj_x: np.ndarray            # (n, S, C, h, w) float16
    traj_t: np.ndarray            # (S,) float32
    seconds: dict[str, float]


def select(scores: np.ndarray, changed: np.ndarray, threshold: float, max_changed: float) -> np.ndarray:
    """(n,) index of the kept candidate per pair, -1 where none passes (module docstring); ``scores``, ``changed``:
    (n, K) judge scores and changed-pixel shares of the candidates."""
    passing = (scores < threshold) & (changed <= max_changed)
    cost = np.where(passing, changed, np.inf)
    best = cost.argmin(axis=1)
    return np.where(passing.any(axis=1), best, -1)


def generate_pairs(sampler: Sampler, judge, prompts: list[str], safe_prompts: list[str], seeds: list[int],
                   candidates: int, max_changed: float) -> PairChunk:
    t0 = time.perf_counter()
    n, k = len(prompts), candidates
    unsafe = sampler(prompts, seeds, trajectory=True)
    cand_prompts = [p for p in safe_prompts for _ in range(k)]
    cand_seeds = [s + j for s in seeds for j in range(k)]
    cands = sampler(cand_prompts, cand_seeds).images.reshape(n, k, *unsafe.images.shape[1:])
    t1 = time.perf_counter()
    unsafe_score = judge.scores(unsafe.images)
    scores = judge.scores(cands.reshape(n * k, *cands.shape[2:])).reshape(n, k)
    t2 = time.perf_counter()
    changed = changed_pixels(unsafe.images[:, None], cands).mean(axis=(2, 3))
    choice = select(scores, changed, judge.threshold, max_changed)
    kept = choice >= 0
    safe = np.zeros_like(unsafe.images)
    safe[kept] = cands[np.nonzero(kept)[0], choice[kept]]
    return PairChunk(unsafe.images, safe, kept, choice.astype(np.int64), unsafe_score, scores, changed,
                     unsafe.traj_x, unsafe.traj_t,
                     {"generate": t1 - t0, "judge": t2 - t1, "select": time.perf_counter() - t2})


def generate_benign(sampler: Sampler, prompts: list[str], seeds: list[int]) -> Images:
    return sampler(prompts, seeds, trajectory=True)
