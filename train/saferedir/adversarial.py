"""SafeRedir ``--adversarial N`` (tinyworld, issue 20): attack-style variants of each redirect pair's unsafe prompt,
which stage 2 redirects toward the pair's safe image, so that the redirect also cleans misspelled, split or moved
concepts (the adaptive attack's winners are flagged and redirected but not cleaned:
``bench/results/stack_prompt_only_dev/README.md``).

The edits are SafeGuider's (``train/safeguider/adversarial.py``: tinyworld's guard-split vocabulary, never a held-out
synonym or an evaluation caption), so this is the trainer's one door to tinyworld's world besides ``--renderer``; the
default material path never enters it (``tests/test_train_prompt_only.py``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from train.safeguider.adversarial import adversarial_variants
from train.safeguider.data import UNSAFE

from .data import _cached, _embed


def adversarial_pairs(pipe, d: dict, cache: Path, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` attack-style variants of each redirect pair's unsafe prompt (tinyworld's edits of the guard split:
    ``train/safeguider/adversarial.py``; never a held-out synonym or an evaluation caption) -> ``{"emb": (M, L, D),
    "pair": (M,) index of the pair, "prompt": (M,)}`` (SDXL also ``"pooled": (M, P)``). Stage 2 redirects them toward
    their pair's safe image."""
    prompts = [str(p) for p in d["pair_prompt"]]
    # the pairs' own embeddings in the key: the same prompts under another text encoder are other variants' rows
    key = f"adversarial_{_sha(prompts, d['pair_emb'])}_n{n}_s{seed}.npz"

    def make() -> dict[str, np.ndarray]:
        vocab = list(pipe.tokenizer.get_vocab())
        rows = [(v, k) for k, p in enumerate(prompts)
                for v, _ in adversarial_variants([(p, UNSAFE)], n, seed * 100_003 + k, vocab=vocab)]
        return {**_embed(pipe, [v for v, _ in rows]), "pair": np.array([k for _, k in rows], np.int64),
                "prompt": np.array([v for v, _ in rows])}

    return _cached(Path(cache) / key, make)


def _sha(texts: list[str], array: np.ndarray) -> str:
    return hashlib.sha256("\n".join(texts).encode() + array.tobytes()).hexdigest()[:16]
