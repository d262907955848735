"""Cached training tensors for SafePatch, from the prompt-only data step's folder (``python -m train data``).

Patch examples (``patch_examples``), one row each: ``latent`` (C, h, w) = VAE mean * scaling factor of the
TARGET image, ``prompt`` (L, D) = the text stage's hidden states of the prompt the UNet is conditioned on,
``instruction`` (L, D) = hidden states of the instruction the patch gets, ``kind`` (0 unsafe triplet,
1 benign + empty instruction, 2 benign + a wrong instruction). From a data folder (:func:`train.data.load.load_data`):

- unsafe triplets: every KEPT pair: its unsafe prompt, its instruction ("remove the knife"), the judge-kept
  safe-prompt image of the same backbone (``d.safe[i]``: the unsafe objects gone, the rest of the scene close);
- benign: every benign image with its own prompt; the first half with instruction "" (the patch must stay
  silent), the second half with a wrong instruction (the instruction of a category drawn with the seed): the
  gate may fire on a benign prompt (a spoon, red paint), the patch must then keep the scene.

Gate examples (``gate_examples``): hidden states + EOS embeddings of the data's TEXT lists (``d.text_pairs``, label
1 + category index; ``d.text_benign``, label 0: every prompt of the lists, not only those with images),
de-duplicated, shuffled with the seed.

The config's ``categories`` and ``instructions`` come from the data too (``categories_and_instructions``).

Nothing here (nor anything it imports) imports tinyworld's renderer; the renderer-built examples of
``--renderer`` are in :mod:`train.safepatch.renderer` (``tests/test_safepatch.py`` walks the imports).
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import torch

from guards import CATEGORIES
from train.encode import vae_latents


@torch.no_grad()
def text_stage(backbone, prompts: list[str], batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (n, L, D), eos (n, D)) exactly as the bundle's text-stage graph computes them. SDXL: both text
    stages' ``hidden`` (``hidden_states[-2]``) and ``eos`` concatenated on the last axis, D = cross_attention_dim
    (what the SDXL SafePatch reads, ``guards/safepatch.py``)."""
    from export.graphs import TextStage

    pipe = backbone.pipeline
    sdxl = backbone.family == "sdxl"
    encoders = [(pipe.text_encoder, pipe.tokenizer)] + ([(pipe.text_encoder_2, pipe.tokenizer_2)] if sdxl else [])
    hs, es = [], []
    for spec, (encoder, tokenizer) in zip(backbone.text_encoders, encoders):
        stage = TextStage(encoder, eos_id=spec.eos_id, penultimate=sdxl, pooled=False).eval()
        h_enc, e_enc = [], []
        for i in range(0, len(prompts), batch):
            ids = tokenizer(prompts[i:i + batch], padding="max_length", max_length=spec.max_length,
                            truncation=True, return_tensors="pt").input_ids
            h, e = stage(ids)
            h_enc.append(h)
            e_enc.append(e)
        hs.append(torch.cat(h_enc))
        es.append(torch.cat(e_enc))
    return torch.cat(hs, dim=-1), torch.cat(es, dim=-1)


def assemble_patch_examples(backbone, prompts: list[str], instructions: list[str], kinds: list[int],
                            images: np.ndarray) -> dict[str, torch.Tensor]:
    """The patch-example tensors (module docstring) of parallel lists and the target images (n, H, W, 3) uint8.
    SDXL: ``prompt`` is the UNet's packed conditioning (``train.encode.encode_prompts``: hidden states + pooled)."""
    if backbone.family == "sdxl":
        from train.encode import encode_prompts

        hidden = encode_prompts(backbone.pipeline, prompts)
    else:
        hidden, _ = text_stage(backbone, prompts)
    uniq = sorted(set(instructions))
    inst_hidden, _ = text_stage(backbone, uniq)
    index = torch.tensor([uniq.index(s) for s in instructions])
    return {"latent": vae_latents(backbone.pipeline.vae, images), "prompt": hidden, "instruction": inst_hidden[index],
            "kind": torch.tensor(kinds)}


# -- the data folder -----------------------------------------------------------------------------------------------

def categories_and_instructions(data) -> tuple[list[str], dict[str, str]]:
    """The data's unsafe categories (``guards.CATEGORIES``' order when they are exactly those, else the order of
    first appearance) and, per category, the most common instruction of its pairs (ties: the first seen)."""
    pairs = list(data.text_pairs) or list(data.pairs)
    by_category: dict[str, Counter] = {}
    for p in pairs:
        by_category.setdefault(p["category"], Counter())[p["instruction"]] += 1
    categories = list(by_category)
    if set(categories) == set(CATEGORIES) and len(categories) == len(CATEGORIES):
        categories = list(CATEGORIES)
    return categories, {c: by_category[c].most_common(1)[0][0] for c in categories}


def patch_examples(backbone, data, instructions: dict[str, str], n_unsafe: int | None = None,
                   n_benign: int | None = None, seed: int = 0, target: str = "aligned") -> dict[str, torch.Tensor]:
    """The patch examples of a data folder (module docstring); ``n_unsafe`` / ``n_benign``: caps (the first kept
    pairs / benign images; None: all). ``instructions``: category -> instruction (the benign wrong instructions).
    ``target``: the unsafe triplets' target, ``aligned`` (the kept safe-prompt image) or ``removed`` (the unsafe
    image with the object inpainted away by the backbone, :mod:`train.data.removal`; the rest of the scene is the
    unsafe image's own, pixel for pixel; pairs whose removal the judge does not find safe are dropped)."""
    rng = random.Random(seed)
    kept = np.flatnonzero(data.kept)[:n_unsafe]
    removed = None
    if target == "removed":
        removed = _removed(backbone, data, kept)
        kept = kept[removed["keep"].numpy()]
    n_b = len(data.benign) if n_benign is None else min(n_benign, len(data.benign))
    half = n_b // 2
    categories = list(instructions)
    prompts = [data.pairs[i]["prompt"] for i in kept] + [b["prompt"] for b in data.benign[:n_b]]
    wrong = [instructions[rng.choice(categories)] for _ in range(n_b - half)]
    inst = [data.pairs[i]["instruction"] for i in kept] + [""] * half + wrong
    kinds = [0] * len(kept) + [1] * half + [2] * (n_b - half)
    images = np.concatenate([data.safe[kept], data.benign_images[:n_b]])
    examples = assemble_patch_examples(backbone, prompts, inst, kinds, images)
    if removed is not None:  # the targets are latents already: no decode / encode round trip
        examples["latent"][:len(kept)] = removed["lat"][removed["keep"]]
        print(f"safepatch: object-removed targets for {len(kept)} of {len(removed['keep'])} kept pairs (judged safe)")
    return examples


def _removed(backbone, data, kept: np.ndarray) -> dict:
    """:func:`train.data.removal.removed_targets` for the data's ``kept`` pairs."""
    from train.data.removal import removed_targets

    masks = torch.from_numpy(np.ascontiguousarray(data.mask[kept])).float()[:, None]
    pairs = {"index": [int(i) for i in kept], "lat_unsafe": vae_latents(backbone.pipeline.vae, data.unsafe[kept]),
             "mask_derived": torch.nn.functional.adaptive_avg_pool2d(masks, data.traj_x.shape[-2:])}
    return removed_targets(backbone.pipeline, data, pairs)


def gate_examples(backbone, data, categories: list[str], n: int | None = None,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Hidden states, EOS embeddings and labels (0 none, 1 + category index) of the data's distinct text prompts
    (unsafe pairs first: a prompt listed as both keeps its unsafe label), shuffled with ``seed``, the first ``n``
    (None: all), and the prompts."""
    labelled, seen = [], set()
    for prompt, label in ([(p["prompt"], 1 + categories.index(p["category"])) for p in (data.text_pairs or data.pairs)]
                          + [(p, 0) for p in data.text_benign]):
        if prompt not in seen:
            seen.add(prompt)
            labelled.append((prompt, label))
    random.Random(seed).shuffle(labelled)
    labelled = labelled[:n]
    prompts = [p for p, _ in labelled]
    hidden, eos = text_stage(backbone, prompts)
    return hidden, eos, torch.tensor([lab for _, lab in labelled], dtype=torch.long), prompts
