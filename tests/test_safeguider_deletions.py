"""SafeGuider's word-deletion rows (train/safeguider/data.py): each variant is a deletion of a training caption,
never a caption itself, labelled by its words (unsafe when any caption yields it with a word of an unsafe phrase
left, whichever caption comes first), and the noun deletions of an unsafe caption keep its dangling size word."""

import pytest

from train.safeguider.data import SAFE, UNSAFE, deletion_variants, tinyworld_prompts, unsafe_spans

from .test_safeguider_mining import _subsequence


@pytest.fixture(scope="module")
def rows():
    return tinyworld_prompts(1500, seed=0)


def test_variants_are_distinct_deletions_of_captions(rows):
    variants = deletion_variants(rows, 3, seed=0, noun_deletions=2)
    texts = [t for t, _ in variants]
    assert len(texts) == len(set(texts)) and not set(texts) & {p for p, _ in rows}
    captions = [p.split() for p, _ in rows]
    assert all(any(_subsequence(t.split(), c) for c in captions) for t in texts[:300])
    assert {label for _, label in variants} == {SAFE, UNSAFE}


def test_a_fragment_an_unsafe_caption_leaves_is_unsafe_whoever_else_yields_it():
    benign = ("a small red star at night", SAFE)  # deleting "red star" leaves "a small at night": safe by itself
    unsafe = ("a small knife at night", UNSAFE)   # deleting "knife" leaves the same words with a dangling "a small"
    for order in ([benign, unsafe], [unsafe, benign]):
        labels = dict(deletion_variants(order, 60, seed=0, max_deleted=2))
        assert labels["a small at night"] == UNSAFE
        assert labels["at night"] == SAFE  # the whole unsafe phrase gone


def test_noun_deletions_keep_the_dangling_size_word():
    caption = "a large knife and a small blue ring on sand"
    without = deletion_variants([(caption, UNSAFE)], 0, seed=0)
    labels = dict(deletion_variants([(caption, UNSAFE)], 0, seed=0, noun_deletions=8))
    assert dict(without) == {"and a small blue ring on sand": SAFE, "a large and a small blue ring on sand": UNSAFE}
    extra = {t: label for t, label in labels.items() if t not in dict(without)}
    assert extra and set(extra.values()) == {UNSAFE}
    for text in extra:  # the noun and 1-2 words outside the phrase are gone (0: the noun-only row); "a large" stays
        words = text.split()
        assert "knife" not in words and words[:2] == ["a", "large"] and len(words) in (7, 8)
    assert unsafe_spans(caption.split()) == [{0, 1, 2}]


def test_a_place_phrase_dangles_by_its_place_or_by_its_at_the():
    caption = "a small blue ring at the butcher"
    labels = dict(deletion_variants([(caption, UNSAFE)], 0, seed=0, noun_deletions=20))
    extra = [t.split() for t, label in labels.items() if t not in ("a small blue ring", "a small blue ring at the")]
    assert extra and all(labels[" ".join(w)] == UNSAFE for w in extra)
    assert all(("butcher" in w) != (w[-2:] == ["at", "the"]) for w in extra)
    assert {"butcher" in w for w in extra} == {True, False}  # the search ends on both
    assert labels["a small blue ring butcher"] == UNSAFE  # only "at the" gone: an end the search settled on
