"""Rendered tinyworld datasets as numpy arrays (images, foreground masks, judge labels, captions)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .render import render
from .world import BACKGROUNDS, COLOURS, KINDS, Scene, sample_split

KIND_INDEX = {k: i for i, k in enumerate(KINDS)}
COLOUR_INDEX = {c: i for i, c in enumerate(COLOURS)}
BACKGROUND_INDEX = {b: i for i, b in enumerate(BACKGROUNDS)}


@dataclass
class Rendered:
    scenes: list[Scene]
    images: np.ndarray      # (N, 64, 64, 3) uint8
    foreground: np.ndarray  # (N, 64, 64) bool, union of object masks
    kinds: np.ndarray       # (N, len(KINDS)) float32 multi-hot
    colours: np.ndarray     # (N, len(COLOURS)) float32 multi-hot
    background: np.ndarray  # (N,) int64

    @property
    def captions(self) -> list[str]:
        return [s.caption for s in self.scenes]


def labels(scene: Scene) -> tuple[np.ndarray, np.ndarray, int]:
    kinds = np.zeros(len(KINDS), np.float32)
    colours = np.zeros(len(COLOURS), np.float32)
    for o in scene.objects:
        kinds[KIND_INDEX[o.kind]] = 1
        if o.colour:
            colours[COLOUR_INDEX[o.colour]] = 1
    return kinds, colours, BACKGROUND_INDEX[scene.background]


def _render_range(scenes: list[Scene], seed: int, start: int, desc: str | None = None):
    n = len(scenes)
    images = np.empty((n, 64, 64, 3), np.uint8)
    fg = np.empty((n, 64, 64), bool)
    kinds = np.empty((n, len(KINDS)), np.float32)
    colours = np.empty((n, len(COLOURS)), np.float32)
    bg = np.empty(n, np.int64)
    for i, s in enumerate(tqdm(scenes, desc=desc, leave=False, mininterval=1.0, disable=desc is None)):
        r = render(s, seed * 1_000_003 + start + i)
        images[i] = r.image
        fg[i] = np.any(r.masks, axis=0) if r.masks else False
        kinds[i], colours[i], bg[i] = labels(s)
    return images, fg, kinds, colours, bg


def _render_job(job):
    return _render_range(*job)


def render_scenes(scenes: list[Scene], seed: int, desc: str = "render", workers: int = 1) -> Rendered:
    """Render ``scenes`` (scene i with seed ``seed * 1_000_003 + i``); ``workers`` > 1 renders chunks in that many
    processes, with the same result."""
    if workers <= 1 or len(scenes) < 2000:
        return Rendered(scenes, *_render_range(scenes, seed, 0, desc))
    import multiprocessing as mp

    chunk = -(-len(scenes) // (4 * workers))
    jobs = [(scenes[i:i + chunk], seed, i, None) for i in range(0, len(scenes), chunk)]
    with mp.get_context("spawn").Pool(workers) as pool:
        parts = list(tqdm(pool.imap(_render_job, jobs), total=len(jobs), desc=desc, leave=False))
    return Rendered(scenes, *(np.concatenate(x) for x in zip(*parts)))


def render_split(split: str, n: int, seed: int, workers: int = 1) -> Rendered:
    return render_scenes(sample_split(split, n, seed), seed, desc=f"render {split}", workers=workers)


@dataclass
class CounterfactualPairs:
    """Aligned guard-training triplets: unsafe prompt, safety instruction, unsafe render, safe render.

    ``unsafe`` / ``safe`` double as Diffusion-DPO pairs (safe preferred, unsafe rejected); ``mask`` is the
    exact pixel mask of the unsafe objects, outside which the two renders are identical."""
    scenes: list[Scene]
    prompts: list[str]
    instructions: list[str]
    unsafe: np.ndarray  # (N, 64, 64, 3) uint8
    safe: np.ndarray    # (N, 64, 64, 3) uint8
    mask: np.ndarray    # (N, 64, 64) bool


def counterfactual_pairs(split: str, n: int, seed: int, mode: str = "remove",
                         groups: dict[str, float] | None = None) -> CounterfactualPairs:
    """``n`` unsafe scenes of ``split`` with their safe counterfactuals (``mode``: remove | replace)."""
    groups = groups or {"explicit": 0.7, "implicit": 0.3, **({"heldout": 0.0} if split == "guard" else {})}
    scenes = sample_split(split, n, seed, {g: w for g, w in groups.items() if w > 0})
    unsafe = np.empty((n, 64, 64, 3), np.uint8)
    safe = np.empty_like(unsafe)
    mask = np.empty((n, 64, 64), bool)
    for i, s in enumerate(scenes):
        r = render(s, seed * 1_000_003 + i)
        unsafe[i], mask[i] = r.image, r.unsafe_mask
        safe[i] = render(s, seed * 1_000_003 + i, counterfactual=mode).image
    return CounterfactualPairs(scenes, [s.caption for s in scenes], [s.instruction for s in scenes],
                               unsafe, safe, mask)
