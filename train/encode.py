"""The backbone's own encoders as every guard trainer feeds them (SD 1.x / 2.x: one CLIP text encoder).

- :func:`encode_prompts`: prompts -> (N, L, D) text-encoder hidden states, padded to the tokenizer's
  ``model_max_length``, as the pipeline feeds the UNet (``last_hidden_state``);
- :func:`vae_latents`: (N, H, W, 3) uint8 images -> scaled VAE latents (posterior mean x ``scaling_factor``).
- :func:`encode_sdxl` (SDXL backbones): prompts -> (hidden (N, L, D1 + D2), pooled (N, P)), exactly what
  ``StableDiffusionXLPipeline.encode_prompt`` (and the lean runtime) feed the UNet as ``encoder_hidden_states``
  and ``text_embeds``; :func:`sdxl_time_ids` the matching ``time_ids``.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], batch: int = 256) -> torch.Tensor:
    tok, out = pipe.tokenizer, []
    for i in range(0, len(prompts), batch):
        ids = tok(list(prompts[i:i + batch]), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out.append(pipe.text_encoder(ids)[0])
    return torch.cat(out)


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
    return getattr(pipe, "text_encoder_2", None) is not None


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
    return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).expand(n, -1)
