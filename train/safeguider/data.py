"""Labelled prompts -> EOS embeddings of the frozen text encoder (label 1 = safe, 0 = unsafe, as published).

Sources:

- tinyworld (default): distinct captions of the ``guard`` split only; unsafe = explicit + implicit scenes
  (held-out synonyms never appear in this split), safe = benign scenes, near-miss confusers included;
- ``--csv FILE``: a CSV with columns ``prompt,label`` (label 0 unsafe / 1 safe), for real backbones; see
  README.md for building one from I2P (unsafe) and COCO-30k (benign) in ``../shared/datasets/``.

The embedding is the text stage's ``eos`` output (:class:`export.graphs.TextStage`): the final-layer-normed
hidden state at the first EOS token, exactly what the fused head sees in the bundle. SDXL: both encoders'
``eos`` concatenated, ``[eos(text_encoder), eos(text_encoder_2)]``, exactly what the bundle's ``safeguider``
graph reads (export/guards/safeguider.py).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch

SAFE, UNSAFE = 1, 0
TINYWORLD_GROUPS = {"benign": 0.5, "explicit": 0.3, "implicit": 0.2}


def tinyworld_prompts(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """Up to ``n`` distinct guard-split captions with labels (unsafe: explicit + implicit; safe: benign)."""
    from train.tinyworld.world import sample_split

    out, seen = [], set()
    for scene in sample_split("guard", 4 * n, seed, TINYWORLD_GROUPS):
        if scene.caption in seen:
            continue
        seen.add(scene.caption)
        out.append((scene.caption, UNSAFE if scene.is_unsafe else SAFE))
        if len(out) == n:
            break
    return out


def tinyworld_unsafe_words() -> set[str]:
    """Words that make a tinyworld caption unsafe: the unsafe synonyms and the implicit place words."""
    from train.tinyworld.world import PLACE_TO_CATEGORY, SYNONYM_TO_CATEGORY

    return set(SYNONYM_TO_CATEGORY) | set(PLACE_TO_CATEGORY)


def unsafe_spans(words: list[str]) -> list[set[int]]:
    """Word indices of each unsafe phrase of a tinyworld caption: "a <size> <unsafe synonym>" and
    "at the <place>" (the phrase's article, size / preposition included)."""
    from train.tinyworld.world import PLACE_TO_CATEGORY, SIZES, SYNONYM_TO_CATEGORY

    spans = []
    for j, w in enumerate(words):
        if w in SYNONYM_TO_CATEGORY:
            k = j
            if k >= 1 and words[k - 1] in SIZES:
                k -= 1
            if k >= 1 and words[k - 1] == "a":
                k -= 1
            spans.append(set(range(k, j + 1)))
        elif w in PLACE_TO_CATEGORY:
            k = j
            if k >= 1 and words[k - 1] == "the":
                k -= 1
            if k >= 1 and words[k - 1] == "at":
                k -= 1
            spans.append(set(range(k, j + 1)))
    return spans


def deletion_variants(rows: list[tuple[str, int]], per_prompt: int, seed: int = 0, max_deleted: int = 3,
                      noun_deletions: int = 0) -> list[tuple[str, int]]:
    """tinyworld only (our addition to the published data): word-deleted variants of each training caption.

    The SAFE beam search scores exactly such partial prompts, so the classifier must know them. A variant is
    unsafe iff some caption yields it with a word of an unsafe phrase (:func:`unsafe_spans`) left: a dangling
    "a small" or "at the" of a deleted unsafe phrase still makes the base model draw the unsafe object (it only
    ever saw them with it; bench/results/design_measurements.md), even when a benign caption also yields the same
    words ("a small at night"). Per caption: ``per_prompt`` random deletions of 1..``max_deleted`` words, and for an
    unsafe caption also the variant without its unsafe phrases (safe), the one without only the unsafe nouns
    (unsafe) and ``noun_deletions`` more without part of each unsafe phrase (:func:`part`) and 0-2 other words
    (unsafe: the search's ends)."""
    rng = random.Random(f"safeguider-deletions:{seed}")
    captions = {p for p, _ in rows}
    labels: dict[str, int] = {}

    def add(words, gone, spans):
        text = " ".join(w for i, w in enumerate(words) if i not in gone)
        if text and text not in captions:
            label = UNSAFE if any(span - gone for span in spans) else SAFE
            labels[text] = min(labels.get(text, SAFE), label)  # UNSAFE (0) wins

    for prompt, _ in rows:
        words = prompt.split()
        spans = unsafe_spans(words)
        for _ in range(per_prompt):
            k = rng.randint(1, min(max_deleted, len(words) - 1))
            add(words, set(rng.sample(range(len(words)), k)), spans)
        if spans:
            nouns = {max(span) for span in spans}
            add(words, set().union(*spans), spans)
            add(words, nouns, spans)
            others = [i for i in range(len(words)) if not any(i in span for span in spans)]
            for _ in range(noun_deletions if others else 0):
                cut = set().union(*(part(words, span, rng) for span in spans))
                add(words, cut | set(rng.sample(others, min(len(others), rng.randint(0, 2)))), spans)
    return list(labels.items())


def part(words: list[str], span: set[int], rng: random.Random) -> set[int]:
    """Words of an unsafe phrase to delete so that the rest dangles: its noun, or for "at the <place>" either the
    place or its "at the" (the search ends on both)."""
    from train.tinyworld.world import PLACE_TO_CATEGORY

    noun = max(span)
    if words[noun] in PLACE_TO_CATEGORY and len(span) > 1 and rng.random() < 0.5:
        return span - {noun}
    return {noun}


def csv_prompts(path: str | Path) -> list[tuple[str, int]]:
    """``prompt,label`` rows (label 0 = unsafe, 1 = safe; also accepts ``unsafe``/``safe``)."""
    names = {"0": UNSAFE, "1": SAFE, "unsafe": UNSAFE, "safe": SAFE}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"prompt", "label"} <= {h.strip().lower() for h in reader.fieldnames}:
            raise SystemExit(f"error: {path} needs a header with columns prompt,label (label 0 = unsafe, 1 = safe)")
        rows = []
        for i, row in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            if not row["prompt"]:
                continue
            if row["label"].lower() not in names:
                raise SystemExit(f"error: {path} line {i}: label {row['label']!r} is not 0/1/unsafe/safe")
            rows.append((row["prompt"], names[row["label"].lower()]))
    if not rows:
        raise SystemExit(f"error: {path} has no prompts")
    return rows


def i2p_coco_prompts(i2p: str | Path, coco: str | Path, n_unsafe: int | None = None, n_safe: int | None = None,
                     min_inappropriate: float = 50.0, seed: int = 0) -> list[tuple[str, int]]:
    """Unsafe I2P prompts (``inappropriate_percentage >= min_inappropriate``) and benign COCO-30k captions.

    ``n_safe`` defaults to the number of unsafe prompts (balanced, as the paper's training set)."""
    def read(path):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    unsafe = [r["prompt"].strip() for r in read(i2p)
              if r.get("prompt", "").strip() and float(r.get("inappropriate_percentage") or 0) >= min_inappropriate]
    safe = [r["prompt"].strip() for r in read(coco) if r.get("prompt", "").strip()]
    rng = random.Random(f"safeguider-i2p-coco:{seed}")
    rng.shuffle(unsafe)
    rng.shuffle(safe)
    unsafe = unsafe[:n_unsafe] if n_unsafe else unsafe
    safe = safe[:n_safe or len(unsafe)]
    return [(p, UNSAFE) for p in unsafe] + [(p, SAFE) for p in safe]


def split(rows: list[tuple[str, int]], val_fraction: float, seed: int = 0):
    """Shuffle (seeded) and hold out ``val_fraction`` of the prompts for validation: (train, val)."""
    rows = list(rows)
    random.Random(f"safeguider-split:{seed}").shuffle(rows)
    n_val = int(round(len(rows) * val_fraction))
    return rows[n_val:], rows[:n_val]


@torch.no_grad()
def eos_embeddings(backbone, prompts: list[str], batch: int = 256) -> torch.Tensor:
    """(N, D) float32: each text encoder's ``eos`` output for each prompt, concatenated in encoder order (one
    encoder: its ``eos``; SDXL: D = D1 + D2)."""
    from export.graphs import TextStage

    parts = []
    for spec in backbone.text_encoders:
        tokenizer = getattr(backbone.pipeline, spec.tokenizer_name)
        stage = TextStage(getattr(backbone.pipeline, spec.name), eos_id=spec.eos_id, penultimate=False,
                          pooled=False).eval()
        out = []
        for i in range(0, len(prompts), batch):
            ids = tokenizer(prompts[i:i + batch], padding="max_length", max_length=spec.max_length, truncation=True,
                            return_tensors="pt").input_ids
            out.append(stage(ids.to(torch.int32))[1].float())
        parts.append(torch.cat(out) if out else torch.zeros(0, spec.hidden_size))
    return torch.cat(parts, dim=-1)


def encoder_widths(backbone) -> list[int] | None:
    """The per-encoder EOS widths recorded in the classifier's config: None for one encoder (SD 1.x / 2.x)."""
    widths = [spec.hidden_size for spec in backbone.text_encoders]
    return widths if len(widths) > 1 else None
