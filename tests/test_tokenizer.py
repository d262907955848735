"""CLIP-format BPE tokenizer: reproducible ids, and the lean tokenizer equals transformers' CLIPTokenizer."""

import random

import numpy as np
import pytest
from transformers import CLIPTokenizer as HFCLIPTokenizer

from runtime.tokenizer import CLIPTokenizer, TokenizerError
from train.tinyworld.world import sample_scene, vocabulary_corpus
from export.families.clip_tokenizer import build_clip_tokenizer

PROMPTS = ["", "a large red circle on sand", "A  Small   BLUE knife,  at night!?", "héllo wörld 42 it's",
           "a knife " * 30, "unseen wordzz and emoji 🪦"]


def test_ids_are_reproducible(tmp_path):
    a = build_clip_tokenizer(vocabulary_corpus(), tmp_path / "a", merges=400, max_length=16)
    b = build_clip_tokenizer(vocabulary_corpus(), tmp_path / "b", merges=400, max_length=16)
    for f in ("vocab.json", "merges.txt"):
        assert (a / f).read_bytes() == (b / f).read_bytes()


def test_every_world_word_is_one_token(tinyworld_dir):
    tok = CLIPTokenizer(tinyworld_dir / "tokenizer")
    for word in {w for line in vocabulary_corpus() for w in line.split()}:
        assert len(tok.tokenize(word)) == 3, word  # BOS word EOS


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_lean_tokenizer_matches_transformers(tmp_path, pad):
    d = build_clip_tokenizer(vocabulary_corpus(), tmp_path, merges=400, max_length=16, pad_token=pad)
    hf = HFCLIPTokenizer.from_pretrained(d)
    lean = CLIPTokenizer(d)
    if pad == "!":
        assert lean.pad_id == 0 == hf.pad_token_id  # SD 2.x / OpenCLIP convention
    rng = random.Random(0)
    prompts = PROMPTS + [sample_scene(rng).caption for _ in range(200)]
    if pad == "!":  # transformers 5 maps a literal pad-token "!" in the text to the pad id; OpenCLIP does not
        prompts = [p.replace("!", "") for p in prompts]
    want = hf(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="np").input_ids
    got = lean(prompts).input_ids
    np.testing.assert_array_equal(got, want)


def test_truncation_is_reported_not_silent(tinyworld_dir):
    tok = CLIPTokenizer(tinyworld_dir / "tokenizer")
    enc = tok(["a red circle", "a knife " * 30])
    assert enc.truncated == [False, True]
    assert enc.lengths[1] == 62
    assert enc.input_ids.shape == (2, tok.max_length) and enc.input_ids[1, -1] == tok.eos_id


def test_missing_files_are_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="vocab.json"):
        CLIPTokenizer(tmp_path)


def test_encode_words_equals_whole_prompt_tokenization(tinyworld_dir, tmp_path):
    """SafeGuider's candidates are tokenized from their words' ids: the same ids as tokenizing each prompt whole,
    for deletions of tricky prompts (case, accents, a final sigma, contractions, digits, punctuation, truncation,
    an empty remainder) and for prompts not joined by single spaces (tokenized whole)."""
    d = build_clip_tokenizer(vocabulary_corpus(), tmp_path, merges=400, max_length=16, pad_token="!")
    tricky = ["A Small RED knife, at night!?", "héllo wörld 42 it's ΟΔΟΣ café\u0301 🪦", "a knife " * 30,
              "don't 3d-print a 12x blade...", "ΣΑΣ σας Σ"]
    for tok in (CLIPTokenizer(tinyworld_dir / "tokenizer"), CLIPTokenizer(d)):
        rng = random.Random(0)
        prompts = [""] + [sample_scene(rng).caption for _ in range(50)]
        for p in tricky + prompts[:10]:
            words = p.split()
            prompts += [" ".join(w for j, w in enumerate(words) if j != i) for i in range(len(words))]
        prompts += ["two  spaces", " leading", "tab\there", "a\x1cb"]  # not single-spaced: tokenized whole
        want = tok(prompts)
        got = tok.encode_words(prompts)
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        assert got.lengths == want.lengths and got.truncated == want.truncated
        again = tok.encode_words(prompts[::-1])  # from the memo
        np.testing.assert_array_equal(again.input_ids, want.input_ids[::-1])
