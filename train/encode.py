"""The backbone's own encoders as every guard trainer feeds them (SD 1.x / 2.x: one CLIP text encoder; SDXL: two).

- :func:`encode_prompts`: prompts -> (N, L, D) text-encoder hidden states, padded to the tokenizer's
  ``model_max_length``, as the pipeline feeds the UNet (``last_hidden_state``). SDXL: the UNet's whole text
  conditioning packed in ONE tensor (N, L + 1, D), D = ``cross_attention_dim``: rows 0..L-1 are both encoders'
  ``hidden_states[-2]`` side by side (``StableDiffusionXLPipeline.encode_prompt``, what the bundle's denoise graph
  gets as ``encoder_hidden_states``), row L is the second encoder's pooled ``text_embeds`` zero-padded to D. Why
  packed: every trainer indexes, concatenates and caches "the prompt embedding" as one tensor; packing keeps that
  code the same for SD 1.x and SDXL, and :func:`unet_call` unpacks it where the UNet is called;
- :func:`split_conditioning`: packed conditioning -> ``encoder_hidden_states`` and SDXL's ``added_cond_kwargs``
  (``text_embeds``, ``time_ids = (H, W, 0, 0, H, W)`` of the latent's pixel size, as the runtime feeds them);
- :func:`unet_call`: ``unet`` itself for SD 1.x / 2.x; for SDXL a callable with the UNet's signature that unpacks;
- :func:`vae_latents`: (N, H, W, 3) uint8 images -> scaled VAE latents (posterior mean x ``scaling_factor``).
- :func:`encode_sdxl` (SDXL backbones): prompts -> (hidden (N, L, D1 + D2), pooled (N, P)), exactly what
  ``StableDiffusionXLPipeline.encode_prompt`` (and the lean runtime) feed the UNet as ``encoder_hidden_states``
  and ``text_embeds``; :func:`sdxl_time_ids` the matching ``time_ids``.
"""

from __future__ import annotations

import numpy as np
import torch


def is_text_time(unet) -> bool:
    """An SDXL-style UNet: ``added_cond_kwargs`` (``text_embeds``, ``time_ids``) on every call."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], batch: int = 256) -> torch.Tensor:
    if is_text_time(pipe.unet):
        return _encode_sdxl(pipe, prompts, batch)
    tok, out = pipe.tokenizer, []
    for i in range(0, len(prompts), batch):
        ids = tok(list(prompts[i:i + batch]), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out.append(pipe.text_encoder(ids)[0])
    return torch.cat(out)


def _encode_sdxl(pipe, prompts: list[str], batch: int) -> torch.Tensor:
    """:func:`encode_sdxl`'s hidden states and pooled embedding packed in one tensor (module docstring)."""
    cross = pipe.unet.config.cross_attention_dim
    if not prompts:
        return torch.zeros(0, pipe.tokenizer.model_max_length + 1, cross)
    hidden, pooled = encode_sdxl(pipe, prompts, batch)
    if pooled.shape[-1] > cross:
        raise ValueError(f"pooled text_embeds ({pooled.shape[-1]}) wider than cross_attention_dim ({cross})")
    row = torch.nn.functional.pad(pooled, (0, cross - pooled.shape[-1]))[:, None]
    return torch.cat([hidden, row], dim=1)


@torch.no_grad()
def empty_conditioning(pipe) -> torch.Tensor:
    """The conditioning of the CFG unconditional row with no negative prompt, (L, D) or SDXL's packed (L + 1, D):
    the empty prompt's encoding, or zeros where the pipeline has ``force_zeros_for_empty_prompt`` (SDXL; the
    runtime zeros those rows too)."""
    if is_text_time(pipe.unet) and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        return torch.zeros_like(encode_prompts(pipe, [""])[0])
    return encode_prompts(pipe, [""])[0]


def split_conditioning(unet, cond: torch.Tensor, sample: torch.Tensor, vae_scale_factor: int
                       ) -> tuple[torch.Tensor, dict | None]:
    """``(encoder_hidden_states, added_cond_kwargs)`` of :func:`encode_prompts`' output for ``unet``; SD 1.x / 2.x:
    ``(cond, None)``. ``time_ids`` from ``sample``'s latent size x ``vae_scale_factor`` (no crop)."""
    if not is_text_time(unet):
        return cond, None
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    h, w = sample.shape[-2] * vae_scale_factor, sample.shape[-1] * vae_scale_factor
    time_ids = _time_ids(h, w, cond.shape[0]).to(cond.device, cond.dtype)
    return cond[:, :-1], {"text_embeds": cond[:, -1, :pooled], "time_ids": time_ids}


def _time_ids(h: int, w: int, n: int) -> torch.Tensor:
    """(n, 6) SDXL ``time_ids`` = (h, w, 0, 0, h, w): original = target size, no crop, as the runtime feeds them."""
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(n, -1)


class _TextTimeCall:
    """The SDXL UNet called with packed conditioning (module docstring); every other argument passed through."""

    def __init__(self, unet, vae_scale_factor: int):
        self.unet, self.f = unet, int(vae_scale_factor)

    def __call__(self, sample, timestep, encoder_hidden_states, **kwargs):
        ehs, added = split_conditioning(self.unet, encoder_hidden_states, sample, self.f)
        return self.unet(sample, timestep, encoder_hidden_states=ehs, added_cond_kwargs=added, **kwargs)


def unet_call(pipe):
    """The callable a trainer calls the UNet with: ``pipe.unet`` (SD 1.x / 2.x) or, for SDXL, one that unpacks
    :func:`encode_prompts`' packed conditioning into ``encoder_hidden_states`` + ``added_cond_kwargs``."""
    if not is_text_time(pipe.unet):
        return pipe.unet
    return _TextTimeCall(pipe.unet, pipe.vae_scale_factor)


@torch.no_grad()
def vae_latents(vae, images: np.ndarray, batch: int = 128) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).permute(0, 3, 1, 2).float() / 255.0
        out.append(vae.encode(x * 2 - 1).latent_dist.mean)
    if not out:
        return torch.zeros(0, vae.config.latent_channels, 1, 1)
    return torch.cat(out) * vae.config.scaling_factor


# ---- SDXL (two text encoders; SafeRedir on sdxl_safe.plan) ---------------------------------------------------

def is_sdxl(pipe) -> bool:
    return is_text_time(pipe.unet)


@torch.no_grad()
def encode_sdxl(pipe, prompts: list[str], batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (N, L, D1 + D2), pooled (N, P)) float32: both encoders' penultimate hidden states side by side and
    encoder 2's pooled projection, through the pipeline's own ``encode_prompt`` (no CFG, clip_skip None)."""
    hidden, pooled = [], []
    for i in range(0, len(prompts), batch):
        h, _, p, _ = pipe.encode_prompt(list(prompts[i:i + batch]), device=pipe.unet.device, num_images_per_prompt=1,
                                        do_classifier_free_guidance=False)
        hidden.append(h.float())
        pooled.append(p.float())
    return torch.cat(hidden), torch.cat(pooled)


def sdxl_time_ids(pipe, n: int, size: int | None = None) -> torch.Tensor:
    """(n, 6) ``time_ids`` = (size, size, 0, 0, size, size): original = target size, no crop, as the runtime
    feeds at the backbone's own image size (``size`` pixels, default that)."""
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    return _time_ids(size, size, n)
