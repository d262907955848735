"""Build a CLIP-format byte-level BPE tokenizer from a corpus, without the hub.

The trainer's token ids differ from process to process but its merges do not, so the vocabulary is
written in CLIP's own layout — the 256 byte symbols, the same with ``</w>``, one entry per merge in
order, then the two specials — which makes the ids a pure function of the corpus.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import models, trainers
from tokenizers.pre_tokenizers import ByteLevel

from runtime.tokenizer import BOS, EOS, clip_pipeline


def build_clip_tokenizer(corpus: list[str], out_dir: str | Path, *, merges: int = 600,
                         max_length: int = 77, pad_token: str = EOS) -> Path:
    """Train BPE merges on ``corpus`` with CLIP's rules and write vocab.json, merges.txt and
    tokenizer_config.json to ``out_dir``. ``pad_token`` is ``<|endoftext|>`` (SD 1.x) or ``!`` (SD 2.x)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(ByteLevel.alphabet(), key=lambda c: _BYTE_ORDER[c])
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) * 2 + merges, special_tokens=[],
                                  initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False)
    tok = clip_pipeline(models.BPE(end_of_word_suffix="</w>"), 0, 0)
    tok.post_processor = None
    tok.train_from_iterator(corpus, trainer=trainer)
    learned = json.loads(tok.to_str())["model"]["merges"]
    learned = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in learned]

    vocab_list = alphabet + [a + "</w>" for a in alphabet]
    seen = set(vocab_list)
    kept = []
    for a, b in learned:
        if a not in seen or b not in seen or a + b in seen:
            continue  # only merges that build on symbols already present, each token once
        kept.append((a, b))
        vocab_list.append(a + b)
        seen.add(a + b)
    vocab_list += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in kept) + "\n",
                                    encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": BOS,
              "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token, "do_lower_case": True,
              "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}, indent=2))
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character table (its order is CLIP's vocabulary order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_ORDER = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
