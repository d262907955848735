"""SafeRedir losses (our design; the authors did not publish training code). See README.md for the rationale.

Stage 1, classifier: ``classifier_loss`` = cross-entropy of ``{safe, unsafe}`` logits on trajectory latents.
Stage 2, delta generator (classifier frozen):

    L = w_dm  * || eps_unet(z_t^safe, t, redirect(e_unsafe)) - eps ||^2                (diffusion loss)
      + w_kd  * || eps_unet(z_t^safe, t, redirect(e_unsafe)) - eps_unet(z_t^safe, t, e_cf) ||^2  (teacher)
      + w_id  * || redirect(e_benign) - e_benign ||^2 / mean |e_benign|^2          (identity on benign)
      + w_mask_benign * mean(mask(e_benign))                                         (closed on benign)
      + w_mask * mean(mask(e_unsafe)) + w_scale * mean(scale(e_unsafe)^2)            (sparsity, magnitude)

with ``z_t^safe = sqrt(abar_t) z0_safe + sqrt(1 - abar_t) eps`` the noised latent of the SAFE counterfactual
render, ``e_cf`` the embedding of the counterfactual caption (a variance-reducing teacher for the same
target: what the frozen model predicts when asked for the safe scene by name).

SDXL (``added`` given: the generator's outputs then carry the pooled head's too): every UNet call gets
``added_cond_kwargs`` = the redirected pooled embedding (the teacher: the counterfactual's) and ``time_ids``;
the identity term adds the same relative error of the benign pooled embedding, and the pooled masks join the
token masks (one more "token" per prompt) in the two mask terms.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def classifier_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    loss = F.cross_entropy(logits, labels)
    acc = (logits.argmax(-1) == labels).float().mean()
    return loss, {"ce": loss.item(), "acc": acc.item()}


def noised(z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    abar = alphas_cumprod[t].to(z0.dtype)[:, None, None, None]
    return abar.sqrt() * z0 + (1 - abar).sqrt() * noise


def _relative(red: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return (red - e).pow(2).sum(-1).mean() / e.pow(2).sum(-1).mean()


def redirect_loss(unet, out_unsafe, out_benign, e_benign, z0, e_cf, alphas_cumprod, generator,
                  w: dict, added: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Stage-2 loss; ``out_*`` = (redirected, mask, scale) of the generator on unsafe / benign prompts. SDXL:
    ``out_*`` also hold (redirected_pooled, pooled_mask, pooled_scale) and ``added`` = ``{"time_ids": (b, 6),
    "pooled_benign": (b, P), "pooled_cf": (b, P)}`` (module docstring)."""
    red_u, mask_u, scale_u = out_unsafe[:3]
    red_b, mask_b, _ = out_benign[:3]
    b = z0.shape[0]
    t = torch.randint(0, alphas_cumprod.shape[0], (b,), generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    z_t = noised(z0, noise, t, alphas_cumprod)
    cond_u = cond_cf = {}
    if added is not None:
        cond_u = {"added_cond_kwargs": {"text_embeds": out_unsafe[3], "time_ids": added["time_ids"]}}
        cond_cf = {"added_cond_kwargs": {"text_embeds": added["pooled_cf"], "time_ids": added["time_ids"]}}
        mask_u = torch.cat([mask_u, out_unsafe[4][:, None]], dim=1)
        mask_b = torch.cat([mask_b, out_benign[4][:, None]], dim=1)
        scale_u = torch.cat([scale_u, out_unsafe[5][:, None]], dim=1)
    eps_hat = unet(z_t, t, encoder_hidden_states=red_u, **cond_u).sample
    dm = F.mse_loss(eps_hat, noise)
    terms = {"dm": dm}
    if w.get("kd", 0) > 0:
        with torch.no_grad():
            teacher = unet(z_t, t, encoder_hidden_states=e_cf, **cond_cf).sample
        terms["kd"] = F.mse_loss(eps_hat, teacher)
    terms["id"] = _relative(red_b, e_benign)
    if added is not None:
        terms["id"] = terms["id"] + _relative(out_benign[3], added["pooled_benign"])
    terms["mask_benign"] = mask_b.mean()
    terms["mask"] = mask_u.mean()
    terms["scale"] = scale_u.pow(2).mean()
    loss = sum(w.get(k, 0.0) * v for k, v in terms.items())
    return loss, {k: v.item() for k, v in terms.items()}
