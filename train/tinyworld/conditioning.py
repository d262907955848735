"""What the UNet is conditioned on, per family, exactly as the diffusers pipeline computes it at inference.

Training and evaluation go through :func:`condition`, so the trained model sees the conditioning that
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (and the lean runtime, which matches them) feed it:

* ``sd1`` (tinyworld): the text encoder's last hidden state. The unconditional row of classifier-free guidance
  is the encoded empty prompt, so caption dropout replaces the tokens by the empty prompt's.
* ``sdxl`` (tinyworld-xl), as ``StableDiffusionXLPipeline.encode_prompt``: ``hidden_states[-2]`` (penultimate
  layer) of both encoders side by side; ``text_embeds`` = encoder 2's pooled projection; ``time_ids`` =
  (original h, w, crop top, left, target h, w) = (64, 64, 0, 0, 64, 64) for tinyworld's 64 px images. With no
  negative prompt the pipeline (``force_zeros_for_empty_prompt``) and the lean runtime feed zeros for the
  unconditional row, so caption dropout zeroes both the hidden states and the pooled embedding.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .models import FAMILIES, MAX_LENGTH, text_config, text_config_2

IMAGE_SIZE = 64
TIME_IDS = (IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE)
TOKENIZERS = {"sd1": ("tokenizer",), "sdxl": ("tokenizer", "tokenizer_2")}
PAD = {"tokenizer": None, "tokenizer_2": "!"}  # None: the CLIP default <|endoftext|>; "!" (id 0) as SDXL's 2nd


def build_tokenizers(family: str, work: Path) -> list[Path]:
    """The family's tokenizer folders under ``work`` (one vocabulary, trained on the world's corpus: the ids
    are a pure function of it, so they equal the committed tinyworld tokenizer's), built when missing."""
    from export.families.clip_tokenizer import build_clip_tokenizer
    from runtime.tokenizer import EOS

    from .world import vocabulary_corpus

    dirs = []
    for name in TOKENIZERS[family]:
        d = work / name
        if not (d / "vocab.json").exists():
            tmp = work / (name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            build_clip_tokenizer(vocabulary_corpus(), tmp, merges=400, max_length=MAX_LENGTH,
                                 pad_token=PAD[name] or EOS)
            tmp.rename(d)
        dirs.append(d)
    return dirs


def tokenize(tokenizers, captions: list[str]) -> torch.Tensor:
    """(B, n_tokenizers, MAX_LENGTH) int64 ids; ``tokenizers``: lean :class:`runtime.tokenizer.CLIPTokenizer`s."""
    return torch.stack([torch.from_numpy(t(captions).input_ids).long() for t in tokenizers], 1)


def make_text_encoders(family: str, tokenizers) -> dict[str, torch.nn.Module]:
    """Fresh text encoders named as the pipeline folder names them (``te`` = text_encoder, ``te2``)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    t = tokenizers[0]
    encoders = {"te": CLIPTextModel(text_config(len(t.vocab), t.bos_id, t.eos_id, t.pad_id))}
    if family == "sdxl":
        t2 = tokenizers[1]
        encoders["te2"] = CLIPTextModelWithProjection(text_config_2(len(t2.vocab), t2.bos_id, t2.eos_id, t2.pad_id))
    return encoders


def condition(family: str, encoders: dict, ids: torch.Tensor, drop: torch.Tensor | None = None,
              empty_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, dict | None]:
    """``(encoder_hidden_states, added_cond_kwargs)`` for UNet2DConditionModel. ``ids``: (B, n, L) from
    :func:`tokenize`; ``drop``: (B,) bool, rows that get the unconditional conditioning (caption dropout);
    ``empty_ids``: (n, L) ids of the empty prompt (sd1 only)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (one of {', '.join(FAMILIES)})")
    if family == "sd1":
        tokens = ids[:, 0]
        if drop is not None and drop.any():
            tokens = tokens.clone()
            tokens[drop] = empty_ids[0].to(tokens.device)
        return encoders["te"](tokens).last_hidden_state, None
    out1 = encoders["te"](ids[:, 0], output_hidden_states=True)
    out2 = encoders["te2"](ids[:, 1], output_hidden_states=True)
    hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], -1)
    pooled = out2.text_embeds
    if drop is not None:
        keep = (~drop).to(hidden.dtype)
        hidden, pooled = hidden * keep[:, None, None], pooled * keep[:, None]
    time_ids = torch.tensor([TIME_IDS], dtype=hidden.dtype, device=hidden.device).expand(len(hidden), -1)
    return hidden, {"text_embeds": pooled, "time_ids": time_ids}
