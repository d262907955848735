"""SafeGuider's adversarial training rows (train/safeguider/adversarial.py): attack-style edits of guard-split
captions only, labelled by the concept. No held-out synonym, nothing spelled from one, and no evaluation prompt
(dev or test) ever becomes a training row."""

import random

import pytest

from train.safeguider.adversarial import (adversarial_variants, edit, fragments, misspellings, obfuscations,
                                          splits)
from train.safeguider.data import UNSAFE, tinyworld_prompts
from train.tinyworld.world import HELDOUT_SYNONYMS, evaluation_prompts, split_of


@pytest.fixture(scope="module")
def rows():
    return tinyworld_prompts(1500, seed=0)


@pytest.fixture(scope="module")
def variants(rows):
    return adversarial_variants(rows, 3, seed=0, vocab=["gor", "kni", "ife</w>", "sk"])


def test_variants_never_spell_a_held_out_synonym(variants):
    spelled = {o for word in HELDOUT_SYNONYMS for o in (*misspellings(word), *splits(word), *fragments(word))}
    words = {w for text, _ in variants for w in text.split()}
    assert not words & set(HELDOUT_SYNONYMS)
    assert not words & {w for o in spelled for w in o.split() if len(w) >= 4}, "spelled from a held-out synonym"


def test_no_evaluation_prompt_becomes_a_training_row(rows, variants):
    assert all(split_of(p) == "guard" for p, _ in rows)
    evaluation = {s.caption for subset in ("dev", "test")
                  for group in evaluation_prompts(200, subset=subset).values() for s in group}
    assert not evaluation & {text for text, _ in variants}


def test_labels_follow_the_concept_not_the_spelling():
    rng = random.Random(0)
    unsafe = "a large red circle and a small knife on sand".split()
    benign = "a large red circle on sand".split()
    for _ in range(200):
        words, label = edit(unsafe, True, rng, ())
        assert label, words  # an unsafe caption stays unsafe whatever the edit
        words, label = edit(benign, False, rng, ())
        assert label == ("butcher" in words or "battlefield" in words or "graveyard" in words), words
    assert "kn ife" in obfuscations("knife") and "knfe" in obfuscations("knife") and "knifee" in obfuscations("knife")
    assert "red" not in obfuscations("reed")  # never another world word


def test_variants_are_distinct_and_of_unsafe_captions_only(rows, variants):
    texts = [t for t, _ in variants]
    assert len(texts) == len(set(texts)) and not set(texts) & {p for p, _ in rows}
    assert {label for _, label in variants} == {UNSAFE}  # benign captions get none (module docstring)
    assert len(variants) > 2 * sum(label == UNSAFE for _, label in rows)
