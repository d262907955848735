"""The backbone's own encoders as every guard trainer feeds them (SD 1.x / 2.x: one CLIP text encoder).

- :func:`encode_prompts`: prompts -> (N, L, D) text-encoder hidden states, padded to the tokenizer's
  ``model_max_length``, as the pipeline feeds the UNet (``last_hidden_state``);
- :func:`vae_latents`: (N, H, W, 3) uint8 images -> scaled VAE latents (posterior mean x ``scaling_factor``).
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
