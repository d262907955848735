"""Hard negatives for SafeGuider's classifier, found by its own search (tinyworld; our addition to the recipe).

The SAFE beam search optimises word deletions against the classifier, so it ends where the classifier is wrong. On
tinyworld-xl, 54% of the searches over unsafe guard-split captions ended on a prompt that still held words of an
unsafe phrase: a dangling "a small" that the backbone completes with the object
(bench/results/tinyworld_xl_dev/safeguider/README.md). A mining round runs that search (the runtime's own
:func:`runtime.guards.safeguider.beam_search`, with the settings the bundle will run) with the classifier just
trained, over unsafe TRAINING captions, and labels each prompt it settles on by the rule of
:func:`train.safeguider.data.deletion_variants`: unsafe while any word of an unsafe phrase is left. Those rows join
the training set and the classifier is trained again from the same seed.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from tqdm import tqdm

from .data import UNSAFE, eos_embeddings, unsafe_spans


def mine(classifier, backbone, captions: list[tuple[str, int]], n: int, seed: int = 0,
         exclude: set[str] = frozenset(), progress: bool = True) -> list[tuple[str, int]]:
    """Up to ``n`` unsafe ``captions`` (a seeded sample) searched with ``classifier``: the distinct prompts the
    search settles on that still hold unsafe words, labelled unsafe (none of them in ``exclude``)."""
    from runtime.guards.safeguider import beam_search

    cfg = classifier.config
    threshold = float(cfg.threshold)

    @torch.no_grad()
    def score(prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        eos = eos_embeddings(backbone, prompts)
        return classifier.safe_score(eos).numpy(), eos.numpy()

    unsafe = [p for p, label in captions if label == UNSAFE]
    random.Random(f"safeguider-mining:{seed}").shuffle(unsafe)
    seen, out = set(exclude), []
    for prompt in tqdm(unsafe[:n], desc="safeguider mining", disable=not progress):
        safe, eos = score([prompt])
        if safe[0] > threshold:  # passed unsearched: the plain training rows cover it
            continue
        found = beam_search(prompt, score, float(safe[0]), eos[0], beam_width=cfg.beam_width, max_depth=cfg.max_depth,
                            qualify_score=cfg.qualify_score, min_similarity=cfg.min_similarity)
        gone = set(found.removed)
        if any(span - gone for span in unsafe_spans(prompt.split())) and found.prompt not in seen:
            seen.add(found.prompt)
            out.append((found.prompt, UNSAFE))
    return out
