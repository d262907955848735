"""Hard negatives for SafeGuider's classifier, found by its own search (our addition to the recipe).

The SAFE beam search optimises word deletions against the classifier, so it ends where the classifier is wrong. On
tinyworld-xl, 54% of the searches over unsafe guard-split captions ended on a prompt that still held words of an
unsafe phrase: a dangling "a small" that the backbone completes with the object
(bench/results/tinyworld_xl_dev/safeguider/README.md). A mining round runs that search (the runtime's own
:func:`runtime.guards.safeguider.beam_search`, with the settings the bundle will run) with the classifier just
trained, over unsafe TRAINING captions, labels the prompts it settles on, and the classifier is trained again from
the same seed with those rows added. Two labellings:

- ``rule`` (tinyworld only): unsafe while any word of an unsafe phrase is left (the rule of
  :func:`train.safeguider.data.deletion_variants`); only those rows are added;
- ``judge`` (any backbone; what a deployer has): every prompt the search settles on is drawn by the backbone
  (``images`` images at fixed seeds, :class:`train.data.generate.Sampler`) and labelled unsafe when the judge
  finds any image unsafe, safe otherwise; both kinds are added, so the safe ends teach the classifier that a
  fragment is not unsafe for being one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from .data import SAFE, UNSAFE, eos_embeddings, unsafe_spans

JUDGE_SEED = 7_000_000  # the judge's images of mined prompt i: seeds JUDGE_SEED + images * i + k


def search_ends(classifier, backbone, prompts: list[str], progress: bool = True) -> list[tuple[str, object]]:
    """(prompt, SearchResult) for each of ``prompts`` the classifier flags, searched as the runtime does."""
    from runtime.guards.safeguider import beam_search

    cfg = classifier.config
    threshold = float(cfg.threshold)

    @torch.no_grad()
    def score(batch: list[str]) -> tuple[np.ndarray, np.ndarray]:
        eos = eos_embeddings(backbone, batch)
        return classifier.safe_score(eos).numpy(), eos.numpy()

    out = []
    for prompt in tqdm(prompts, desc="safeguider mining: search", disable=not progress):
        safe, eos = score([prompt])
        if safe[0] > threshold:  # passed unsearched: the plain training rows cover it
            continue
        out.append((prompt, beam_search(prompt, score, float(safe[0]), eos[0], beam_width=cfg.beam_width,
                                        max_depth=cfg.max_depth, qualify_score=cfg.qualify_score,
                                        min_similarity=cfg.min_similarity)))
    return out


def judge_labels(backbone, judge, prompts: list[str], images: int = 2, steps: int = 20, guidance: float = 5.0,
                 batch: int = 16, progress: bool = True) -> np.ndarray:
    """(n,) labels of ``prompts``: UNSAFE when the judge finds any of the backbone's ``images`` images unsafe."""
    from train.data.generate import Sampler

    seeds = [JUDGE_SEED + images * i + k for i in range(len(prompts)) for k in range(images)]
    with tqdm(total=len(seeds), desc="safeguider mining: judge", unit="img", disable=not progress) as bar:
        sampler = Sampler(backbone, steps, guidance, batch, progress=bar.update)
        try:
            drawn = sampler([p for p in prompts for _ in range(images)], seeds).images
        finally:
            sampler.close()
    unsafe = (judge.scores(drawn) >= judge.threshold).reshape(len(prompts), images).any(axis=1)
    return np.where(unsafe, UNSAFE, SAFE)


def mine(classifier, backbone, captions: list[tuple[str, int]], n: int, seed: int = 0,
         exclude: set[str] = frozenset(), progress: bool = True, judge=None, images: int = 2, steps: int = 20,
         guidance: float = 5.0, allowed: Callable[[str], bool] = lambda prompt: True) -> list[tuple[str, int]]:
    """Up to ``n`` unsafe ``captions`` (a seeded sample) searched with ``classifier``; the distinct prompts the
    search settles on (none of them in ``exclude``, each ``allowed``: tinyworld keeps out every caption of another
    split, since a deletion can spell an evaluation prompt), labelled by the phrase rule (``judge`` None: only the
    unsafe ones) or by the backbone's images and ``judge`` (module docstring)."""
    unsafe = [p for p, label in captions if label == UNSAFE]
    random.Random(f"safeguider-mining:{seed}").shuffle(unsafe)
    seen, ends = set(exclude), []
    for prompt, found in search_ends(classifier, backbone, unsafe[:n], progress):
        if found.prompt in seen or not allowed(found.prompt):
            continue
        if judge is None:
            gone = set(found.removed)
            if not any(span - gone for span in unsafe_spans(prompt.split())):
                continue
        seen.add(found.prompt)
        ends.append(found.prompt)
    if judge is None:
        return [(p, UNSAFE) for p in ends]
    labels = judge_labels(backbone, judge, ends, images, steps, guidance, progress=progress) if ends else []
    return [(p, int(label)) for p, label in zip(ends, labels)]


def mine_rounds(rounds: int, folder: Path, fit_round: Callable, tensors: Callable, train: tuple, backbone,
                captions: list[tuple[str, int]], exclude: set[str], *, prompts: int, seed: int, judge=None,
                images: int = 2, guidance: float = 5.0,
                allowed: Callable[[str], bool] = lambda prompt: True) -> tuple[tuple, list[tuple[str, int]]]:
    """``rounds`` rounds: ``fit_round(folder/round<k>, x, y, k)`` on the training tensors so far, :func:`mine` with
    that classifier, the rows added. Each round's fit and rows (``mined.json``) stay in ``folder/round<k>`` so a
    resumed run redoes neither; the caller removes ``folder`` at the end. Returns the grown ``(x, y)`` and the rows."""
    from guards.safeguider import SafeGuiderClassifier
    from runtime.bundle import atomic_write

    (x, y), mined, exclude = train, [], set(exclude)
    for k in range(rounds):
        here = folder / f"round{k}"
        if not (here / "model.safetensors").is_file():
            fit_round(here, x, y, k)
        rows_file = here / "mined.json"
        if rows_file.is_file():
            found = [(p, int(label)) for p, label in json.loads(rows_file.read_text())]
        else:
            found = mine(SafeGuiderClassifier.from_pretrained(here), backbone, captions, prompts, seed + k, exclude,
                         judge=judge, images=images, guidance=guidance, allowed=allowed)
            with atomic_write(rows_file) as f:
                f.write(json.dumps(found).encode())
        exclude |= {p for p, _ in found}
        mined += found
        if found:
            mx, my = tensors(found)
            x, y = torch.cat([x, mx]), torch.cat([y, my])
        print(f"safeguider mining round {k + 1}: {len(found)} prompts the search settles on, "
              f"{sum(1 for _, label in found if label == UNSAFE)} of them unsafe ({len(mined)} in all)")
    return (x, y), mined
