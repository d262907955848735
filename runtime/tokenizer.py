"""CLIP tokenization with HF ``tokenizers`` only (no transformers): the lean runtime's tokenizer.

Loads a CLIP-layout ``vocab.json`` + ``merges.txt`` and reproduces ``transformers.CLIPTokenizer``:
NFC + whitespace collapse + lowercase, CLIP's split regex, byte-level BPE with the ``</w>`` suffix,
``<|startoftext|> ... <|endoftext|>``, padded to the model's max length with the pad token (SD 1.x and
tinyworld pad with ``<|endoftext|>``, SD 2.x's OpenCLIP tokenizer pads with ``!`` = id 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class TokenizerError(ValueError):
    pass


def clip_pipeline(model: models.Model, bos_id: int, eos_id: int) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` with CLIP's normaliser, pre-tokeniser, decoder and post-processor."""
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(
        (EOS, eos_id), (BOS, bos_id), trim_offsets=False, add_prefix_space=False)
    return tok


@dataclass
class Encoding:
    input_ids: np.ndarray   # (B, max_length) int32
    truncated: list[bool]   # per prompt: did it exceed max_length?
    lengths: list[int]      # per prompt: tokens before padding/truncation, specials included


class CLIPTokenizer:
    """``CLIPTokenizer(dir)`` reads ``vocab.json``, ``merges.txt`` and (optionally) ``tokenizer_config.json``."""

    def __init__(self, directory: str | Path, max_length: int | None = None, pad_token: str | None = None):
        d = Path(directory)
        vocab_file, merges_file = d / "vocab.json", d / "merges.txt"
        for f in (vocab_file, merges_file):
            if not f.is_file():
                raise TokenizerError(f"tokenizer file missing: {f} (a CLIP tokenizer folder needs vocab.json and merges.txt)")
        cfg = {}
        if (d / "tokenizer_config.json").is_file():
            cfg = json.loads((d / "tokenizer_config.json").read_text())
        self.vocab: dict[str, int] = json.loads(vocab_file.read_text(encoding="utf-8"))
        lines = merges_file.read_text(encoding="utf-8").splitlines()
        merges = [tuple(m.split()) for m in lines if m and not m.startswith("#version")]
        for special in (BOS, EOS):
            if special not in self.vocab:
                raise TokenizerError(f"{vocab_file} has no {special!r}: not a CLIP vocabulary")
        self.bos_id, self.eos_id = self.vocab[BOS], self.vocab[EOS]
        self.max_length = int(max_length or cfg.get("model_max_length", 77))
        if self.max_length > 100_000:  # transformers' "no limit" sentinel
            self.max_length = 77
        pad = pad_token or cfg.get("pad_token") or EOS
        if isinstance(pad, dict):
            pad = pad.get("content", EOS)
        if pad not in self.vocab:
            raise TokenizerError(f"pad token {pad!r} is not in {vocab_file}")
        self.pad_id = self.vocab[pad]
        self._word_ids: dict[str, list[int]] = {}  # encode_words' memo
        bpe = models.BPE(vocab=self.vocab, merges=merges, continuing_subword_prefix="",
                         end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS)
        self._tok = clip_pipeline(bpe, self.bos_id, self.eos_id)

    def tokenize(self, text: str) -> list[int]:
        """Ids with BOS/EOS, untruncated."""
        return self._tok.encode(text).ids

    def __call__(self, prompts: list[str] | str) -> Encoding:
        if isinstance(prompts, str):
            prompts = [prompts]
        batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)(list(prompts))  # one Rust call
        return self._pack([e.ids for e in batch])

    def encode_words(self, prompts: list[str]) -> Encoding:
        """``self(prompts)`` for prompts whose words are joined by single spaces (SafeGuider's deletion candidates),
        from each word's ids, tokenized once and kept: CLIP's normaliser and split never cross whitespace, so such a
        prompt is BOS + its words' ids + EOS. Any other prompt is tokenized whole."""
        if len(self._word_ids) > 100_000:  # a long-running server meets an unbounded vocabulary
            self._word_ids = {}
        memo = self._word_ids
        spaced = [p.split() if p == " ".join(p.split()) else None for p in prompts]
        words = {w: memo.get(w) for ws in spaced if ws for w in ws}
        if new := [w for w, ids in words.items() if ids is None]:
            encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
            found = dict(zip(new, (e.ids for e in encode(new, add_special_tokens=False))))
            words.update(found)
            memo.update(found)
        return self._pack([[self.bos_id, *(i for w in ws for i in words[w]), self.eos_id] if ws is not None
                           else self.tokenize(p) for p, ws in zip(prompts, spaced)])

    def _pack(self, id_lists: list[list[int]]) -> Encoding:
        """Ids with BOS/EOS -> the padded (or truncated, EOS kept last) batch."""
        L = self.max_length
        ids = np.full((len(id_lists), L), self.pad_id, np.int32)
        truncated, lengths = [], []
        for i, t in enumerate(id_lists):
            lengths.append(len(t))
            truncated.append(len(t) > L)
            if len(t) > L:
                t = t[: L - 1] + [self.eos_id]
            ids[i, : len(t)] = t
        return Encoding(ids, truncated, lengths)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids if i not in (self.bos_id, self.eos_id, self.pad_id)])
