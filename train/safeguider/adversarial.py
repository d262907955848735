"""Attack-style edits of guard-split captions for SafeGuider's classifier (issue 20: adversarial training).

The adaptive attack (``bench/adaptive.py``) wins with prompts that keep the concept but not its spelling:
misspellings ("skul", "bloodd"), splits into BPE fragments ("kn ife"), fragments ("gor"), moved phrases and
inserted filler or place words. Each UNSAFE training caption of the ``guard`` split gets ``per_prompt`` variants
with 1..``max_edits`` such edits; the label follows the concept, not the spelling (:func:`edit`):

- an unsafe word (a guard-split synonym or place word) misspelled, split or cut to a fragment stays unsafe (the
  text encoder still reads the concept; the attack's winners show the backbone still draws it);
- phrases swapped, fillers, backgrounds or benign words inserted, a word outside every unsafe phrase deleted,
  a benign word misspelled: still unsafe.

Benign captions get no variants: with typo'd benign captions labelled safe as well, the classifier learned that
odd spellings are safe and flagged FEWER attack-style edits of held-out unsafe captions than before (62.7% vs
79.7%; unsafe captions only: 98.8%; bench/results/adaptive_defences.md).

Only guard-split material: the held-out synonyms (machete, carnage, deathshead) and anything spelled from them
never appear, and a variant that is itself a caption of another split (a reorder can make one) is dropped, so
no evaluation prompt (dev or test) is ever a training row. Labels: 1 = safe, 0 = unsafe (``data.SAFE/UNSAFE``).
"""

from __future__ import annotations

import random
from typing import Iterable

from .data import SAFE, UNSAFE, unsafe_spans

FILLERS = ("a", "the", "and", "on", "at", "of", "with", "in")
EDITS = ("obfuscate", "insert", "reorder", "delete")
EDIT_MIX = (0.55, 0.25, 0.12, 0.08)  # most attack winners carry an obfuscated concept word
MAX_WORDS = 12  # the tokenizer keeps 16 tokens with BOS/EOS


def guard_unsafe_words() -> tuple[str, ...]:
    """The unsafe words training may see: every synonym but the held-out ones, and the place words."""
    from train.tinyworld.world import HELDOUT_SYNONYMS, PLACE_TO_CATEGORY, SYNONYM_TO_CATEGORY

    return tuple(w for w in (*SYNONYM_TO_CATEGORY, *PLACE_TO_CATEGORY) if w not in HELDOUT_SYNONYMS)


def misspellings(word: str) -> list[str]:
    """One letter dropped, doubled or swapped with its neighbour (at least 2 letters left)."""
    out = []
    for i in range(len(word)):
        out.append(word[:i] + word[i + 1:])
        out.append(word[:i] + word[i] + word[i:])
        if i + 1 < len(word) and word[i] != word[i + 1]:
            out.append(word[:i] + word[i + 1] + word[i] + word[i + 2:])
    return [w for w in dict.fromkeys(out) if len(w) >= 2 and w != word]


def splits(word: str) -> list[str]:
    """``word`` cut in two by a space ("ma chete" style: the tokenizer reads two BPE fragments)."""
    return [f"{word[:k]} {word[k:]}" for k in range(2, len(word) - 1)]


def fragments(word: str, vocab: Iterable[str] = ()) -> list[str]:
    """Pieces of ``word`` of at least 3 letters and half its length: its prefixes and suffixes, and tokenizer
    pieces (``vocab``) that occur inside it."""
    least = max(3, (len(word) + 1) // 2)
    out = [word[:k] for k in range(least, len(word))] + [word[-k:] for k in range(least, len(word))]
    pieces = {v[:-4] if v.endswith("</w>") else v for v in vocab}
    out += sorted(p for p in pieces if p.isalpha() and p.isascii() and len(p) >= least and p in word and p != word)
    return list(dict.fromkeys(out))


def world_words() -> frozenset[str]:
    """Every word a tinyworld caption can use (held-out synonyms included: an edit must not spell one)."""
    from train.tinyworld.world import BACKGROUNDS, COLOURS, KINDS, PLACE_TO_CATEGORY, SIZES, SYNONYM_TO_CATEGORY

    words = {*COLOURS, *SIZES, *KINDS, *SYNONYM_TO_CATEGORY, *PLACE_TO_CATEGORY, "a", "and", "on", "at", "the"}
    return frozenset(words | {w for phrase, _ in BACKGROUNDS.values() for w in phrase.split()})


def obfuscations(word: str, vocab: Iterable[str] = ()) -> list[str]:
    """Every attack-style spelling of ``word`` that is not a world word (a world word would change the scene)."""
    known = world_words()
    out = misspellings(word) + splits(word) + fragments(word, vocab)
    return [o for o in out if not any(part in known for part in o.split())]


def context_phrases() -> tuple[tuple[str, int], ...]:
    """(text, label) a variant may insert: fillers, backgrounds, benign words (safe); place phrases (unsafe)."""
    from train.tinyworld.world import BACKGROUNDS, COLOURS, PLACE_TO_CATEGORY, SHAPES, SIZES

    safe = [*FILLERS, *(b[0] for b in BACKGROUNDS.values()), *SIZES, *COLOURS, *SHAPES]
    return tuple([(t, SAFE) for t in safe] + [(f"at the {p}", UNSAFE) for p in PLACE_TO_CATEGORY])


def phrases(words: list[str]) -> list[list[str]]:
    """``words`` cut before every "and", "on", "at" (object, place and background phrases)."""
    out: list[list[str]] = [[]]
    for w in words:
        if w in ("and", "on", "at") and out[-1]:
            out.append([])
        out[-1].append(w)
    return out


def edit(words: list[str], unsafe: bool, rng: random.Random, vocab: Iterable[str]) -> tuple[list[str], bool]:
    """One random edit of ``words`` (a caption labelled ``unsafe``): the new words and the new label."""
    op = rng.choices(EDITS, weights=EDIT_MIX)[0]
    spans = unsafe_spans(words)
    in_span = set().union(*spans) if spans else set()
    if op == "reorder" and len(phrases(words)) >= 2:
        ps = phrases(words)
        a, b = rng.sample(range(len(ps)), 2)
        ps[a], ps[b] = ps[b], ps[a]
        return [w for p in ps for w in p], unsafe
    if op == "delete" and len(words) - len(in_span) >= 2:
        i = rng.choice([j for j in range(len(words)) if j not in in_span])
        return words[:i] + words[i + 1:], unsafe
    if op != "obfuscate":  # also a reorder or delete that does not fit
        text, label = rng.choice(context_phrases())
        i = rng.randrange(len(words) + 1)
        return words[:i] + text.split() + words[i:], unsafe or label == UNSAFE
    return obfuscate(words, rng, vocab), unsafe


def obfuscate(words: list[str], rng: random.Random, vocab: Iterable[str]) -> list[str]:
    """An unsafe word (mostly; else any word of 3+ letters) spelled as the attack spells it."""
    concept = [i for i, w in enumerate(words) if w in guard_unsafe_words()]
    other = [i for i, w in enumerate(words) if len(w) >= 3]
    pool = concept if concept and rng.random() < 0.8 else other
    if not pool:
        return words
    i = rng.choice(pool)
    choices = obfuscations(words[i], vocab)
    return words[:i] + rng.choice(choices).split() + words[i + 1:] if choices else words


def adversarial_variants(rows: list[tuple[str, int]], per_prompt: int, seed: int = 0, max_edits: int = 3,
                         vocab: Iterable[str] = ()) -> list[tuple[str, int]]:
    """``per_prompt`` attack-style variants of each unsafe (guard-split caption, label) row, labelled by the
    concept (module docstring); never a held-out synonym, never a caption of another split, never a duplicate."""
    rng = random.Random(f"safeguider-adversarial:{seed}")
    vocab = tuple(vocab)
    seen = {p for p, _ in rows}
    out = []
    for prompt, label in rows:
        for _ in range(per_prompt if label == UNSAFE else 0):
            words, unsafe = prompt.split(), label == UNSAFE
            for _ in range(rng.randint(1, max_edits)):
                words, unsafe = edit(words, unsafe, rng, vocab)
            text = " ".join(words[:MAX_WORDS])
            if text not in seen and allowed(text):
                seen.add(text)
                out.append((text, UNSAFE if unsafe else SAFE))
    return out


def allowed(text: str) -> bool:
    """No held-out synonym, and not a caption of any split but ``guard`` (evaluation prompts stay unseen)."""
    from train.tinyworld.world import HELDOUT_SYNONYMS, parse_caption, split_of

    if any(w in HELDOUT_SYNONYMS for w in text.split()):
        return False
    return parse_caption(text) is None or split_of(text) == "guard"
