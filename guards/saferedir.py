"""SafeRedir (arXiv 2601.08623): latent-aware safety classifier + token-level prompt-embedding redirection.

What the paper and its public inference code (github.com/ryliu68/SafeRedir, MIT, as summarised in
``../shared/DESIGN.md`` section 7 and the paper's abstract, arXiv 2601.08623v2) describe, and what this module
matches. The repository's source itself was not reachable from this offline workspace (the code index holds no
copy), so layer widths and the check interval are ours; the structure is the published one:

- **latent-aware multimodal classifier**: a conv encoder of the noisy latent ``x_t`` plus a sinusoidal
  timestep embedding form one joint query, which cross-attends over the prompt tokens; an MLP maps
  ``[joint, attended]`` to ``{safe, unsafe}`` logits (index 1 = unsafe);
- **token-level delta generator**: per token a low-rank head (``D -> width -> rank -> D``) gives a delta
  direction, a token-mask predictor gives ``mask in (0, 1)`` and an adaptive-scale predictor gives
  ``scale in (0, max_scale)``; ``redirected = e + scale * alpha * mask * normalize(delta) * |e|`` per token
  (``|e|`` the token's L2 norm), so the step is relative to each token's own magnitude. The generator reads
  the prompt tokens and a pooled prompt context (attention-pooled), not the latent: the redirection is
  computed once, at detection, and should not depend on which step detected.

Sizes come from the backbone: ``hidden_size`` D = the UNet's cross-attention width, ``max_length`` L of the
(first) text encoder, the UNet's ``latent_channels``; nothing assumes 768 / 77. Config-driven (``config.json`` +
``model.safetensors``).

SDXL (our extension; the paper's code targets SD 1.x): the UNet is conditioned on two things, the token
embeddings (both encoders' penultimate hidden states side by side, D = 2048 on SDXL base) and the pooled
``text_embeds`` of encoder 2 (P = 1280) that enter through ``text_time`` (added to the timestep embedding, so it
steers every block). Redirecting only the tokens would leave the unsafe prompt's pooled vector in place, so
both are redirected, with the minimum added: ``pooled_dim`` P set makes a **pooled head** that reads the
generator's attention-pooled prompt context (the same one the token deltas see) and the pooled vector itself,
and gives one low-rank delta, mask and scale for the pooled vector, applied in the same relative form:
``pooled' = p + scale_p * alpha * mask_p * normalize(delta_p) * |p|``. It is trained in stage 2 with the token
deltas (the UNet sees both redirected; identity and sparsity terms include it). The classifier still reads the
latent and the token embeddings only (they already hold encoder 2's per-token states). ``pooled_dim`` None
(SD 1.x / 2.x) builds exactly the modules and graph it always did.

Run time (``runtime/guards/saferedir.py``, settings in :class:`SafeRedirConfig`): from step ``first_check`` on,
every ``check_every`` steps until it fires, the ``redirect`` graph (``export/guards/saferedir.py``) runs on the
conditional latent and prompt rows; unsafe probability ``softmax(logits)[1] >= threshold`` triggers and from
then on the conditional rows are the ``redirected`` ones computed at detection. Training (our design, the
authors did not publish it): ``train/saferedir/README.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import GuardConfig
from .storage import load_folder, save_folder


@dataclass(kw_only=True)
class SafeRedirConfig(GuardConfig):
    NAME = "saferedir"
    RUNTIME_KEYS = ("check_every", "first_check", "threshold", "alpha", "steer_away", "steer_weight",
                    "steer_escalate", "escalate_threshold", "escalate_patch")

    hidden_size: int            # D: text encoder width (the UNet's cross-attention width)
    max_length: int             # L: prompt tokens
    latent_channels: int
    width: int = 128            # internal feature width
    heads: int = 4
    rank: int = 16              # low-rank delta head
    alpha: float = 1.0          # global redirection strength
    max_scale: float = 2.0      # adaptive scale s in (0, max_scale)
    eps: float = 1e-6
    check_every: int = 5        # run time: check the latent every N steps ...
    first_check: int = 0        # ... from this step on
    threshold: float = 0.5      # run time: unsafe probability that triggers
    pooled_dim: int | None = None  # SDXL: P, width of the pooled text_embeds also redirected; None = no pooled head
    steer_away: str | None = None  # run time (our extension): a fired row's negative prompt moves to this text; None = off
    steer_weight: float = 1.0      # ... this share of the way (1 = the text as the negative prompt)
    steer_escalate: float | None = None  # ... and this share once a later check still reads the redirected row unsafe
    escalate_threshold: float = 0.05  # ... that check's unsafe probability (under the redirected embedding)
    escalate_patch: bool = False  # ... and an escalated row is patched again by a SafePatch yielding to redirects

    @classmethod
    def upgrade(cls, data: dict) -> dict:
        """The first layout kept the run-time settings in a nested ``runtime`` object."""
        data = super().upgrade(data)
        return {**{k: v for k, v in data.items() if k != "runtime"}, **data.get("runtime", {})}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of float timesteps ``t`` (N,) -> (N, dim) (cos, sin halves, as diffusers' UNet)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class LatentEncoder(nn.Module):
    """Conv encoder of the noisy latent: 3 convs (stride 1, 2, 2), SiLU, global mean -> (B, width)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, width // 2, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(2, 3))


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, Q, W) over tokens (B, L, W); explicit softmax (exports plainly)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, nq, w = query.shape
        hd = w // self.heads
        q = self.q(query).reshape(b, nq, self.heads, hd).transpose(1, 2)
        k = self.k(tokens).reshape(b, -1, self.heads, hd).transpose(1, 2)
        v = self.v(tokens).reshape(b, -1, self.heads, hd).transpose(1, 2)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, nq, w))


class SafeRedir(nn.Module):
    """Classifier + token-level delta generator (see the module docstring)."""

    def __init__(self, config: SafeRedirConfig):
        super().__init__()
        self.config = config
        c = config
        d, w = c.hidden_size, c.width
        # classifier
        self.latent_encoder = LatentEncoder(c.latent_channels, w)
        self.time_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.token_proj = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, w))
        self.position = nn.Parameter(torch.zeros(1, c.max_length, w))
        self.cls_attn = CrossAttention(w, c.heads)
        self.classifier = nn.Sequential(nn.Linear(2 * w, w), nn.SiLU(), nn.Linear(w, 2))
        # delta generator (prompt-only: computed once at detection)
        self.gen_proj = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, w))
        self.gen_position = nn.Parameter(torch.zeros(1, c.max_length, w))
        self.gen_pool = nn.Parameter(torch.zeros(1, 1, w))
        self.gen_attn = CrossAttention(w, c.heads)
        self.gen_mlp = nn.Sequential(nn.Linear(2 * w, w), nn.SiLU(), nn.Linear(w, w), nn.SiLU())
        self.delta_down = nn.Linear(w, c.rank)
        self.delta_up = nn.Linear(c.rank, d)
        self.mask_head = nn.Linear(w, 1)
        self.scale_head = nn.Linear(w, 1)
        nn.init.zeros_(self.mask_head.bias)   # mask 0.5 at init: the diffusion loss sees the redirection from step 0
        if c.pooled_dim:  # SDXL: the pooled head (module docstring)
            p = c.pooled_dim
            self.pool_proj = nn.Sequential(nn.LayerNorm(p), nn.Linear(p, w))
            self.pool_mlp = nn.Sequential(nn.Linear(2 * w, w), nn.SiLU(), nn.Linear(w, w), nn.SiLU())
            self.pool_down = nn.Linear(w, c.rank)
            self.pool_up = nn.Linear(c.rank, p)
            self.pool_mask_head = nn.Linear(w, 1)
            self.pool_scale_head = nn.Linear(w, 1)
            nn.init.zeros_(self.pool_mask_head.bias)

    # -- parts -----------------------------------------------------------------------------------------
    def classify(self, latent: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """(B, 2) logits {safe, unsafe}."""
        b = latent.shape[0]
        t = timestep.reshape(-1).to(torch.float32).expand(b) if timestep.numel() == 1 else timestep.reshape(b)
        joint = self.latent_encoder(latent) + self.time_mlp(timestep_embedding(t, self.config.width).to(latent.dtype))
        tokens = self.token_proj(prompt_embeds) + self.position[:, : prompt_embeds.shape[1]]
        attended = self.cls_attn(joint[:, None], tokens)[:, 0]
        return self.classifier(torch.cat([joint, attended], dim=-1))

    def redirect(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """(redirected (B, L, D), mask (B, L), scale (B, L)); with the pooled head (SDXL) and ``pooled (B, P)``
        also (redirected_pooled (B, P), pooled_mask (B,), pooled_scale (B,))."""
        c = self.config
        h = self.gen_proj(prompt_embeds) + self.gen_position[:, : prompt_embeds.shape[1]]
        context = self.gen_attn(self.gen_pool.expand(h.shape[0], -1, -1), h)          # (B, 1, W)
        h = self.gen_mlp(torch.cat([h, context.expand(-1, h.shape[1], -1)], dim=-1))
        delta = self.delta_up(self.delta_down(h))
        mask = torch.sigmoid(self.mask_head(h))[..., 0]
        scale = c.max_scale * torch.sigmoid(self.scale_head(h))[..., 0]
        redirected = self._step(prompt_embeds, delta, mask, scale)
        if not c.pooled_dim:
            return redirected, mask, scale
        if pooled is None:
            raise ValueError("saferedir: this model redirects the pooled embedding too (pooled_dim set): pass pooled")
        hp = self.pool_mlp(torch.cat([context[:, 0], self.pool_proj(pooled)], dim=-1))  # (B, W)
        p_mask = torch.sigmoid(self.pool_mask_head(hp))[..., 0]
        p_scale = c.max_scale * torch.sigmoid(self.pool_scale_head(hp))[..., 0]
        p_red = self._step(pooled, self.pool_up(self.pool_down(hp)), p_mask, p_scale)
        return redirected, mask, scale, p_red, p_mask, p_scale

    def _step(self, e: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``e + scale * alpha * mask * normalize(delta) * |e|`` along the last axis."""
        c = self.config
        direction = delta / (delta.norm(dim=-1, keepdim=True) + c.eps)
        norm = e.norm(dim=-1, keepdim=True)
        return e + (scale * c.alpha * mask)[..., None] * direction * norm

    CLASSIFIER_PREFIXES = ("latent_encoder.", "time_mlp.", "token_proj.", "position", "cls_attn.", "classifier.")

    def forward(self, latent: torch.Tensor | None, timestep: torch.Tensor | None, prompt_embeds: torch.Tensor,
                pooled: torch.Tensor | None = None, part: str = "all"):
        """``part``: "all" (the graph), "classify" (logits only) or "redirect" (the generator's outputs);
        ``pooled``: SDXL's pooled embedding (models with the pooled head only)."""
        if part == "classify":
            return self.classify(latent, timestep, prompt_embeds)
        if part == "redirect":
            return self.redirect(prompt_embeds, pooled)
        logits = self.classify(latent, timestep, prompt_embeds)
        return (logits, *self.redirect(prompt_embeds, pooled))

    # -- persistence -----------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        save_folder(folder, self.config, self.state_dict())

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "SafeRedir":
        config, state = load_folder(folder, SafeRedirConfig)
        model = cls(config)
        model.load_state_dict(state)
        return model.eval()

    @classmethod
    def for_backbone(cls, backbone, **settings) -> "SafeRedir":
        """Sized from ``backbone`` (text width, prompt length, latent channels; SDXL: the pooled width too);
        ``settings``: other fields."""
        spec = backbone.text_encoders[0]
        pooled = {"pooled_dim": backbone.pooled_dim} if backbone.pooled_dim else {}
        return cls(SafeRedirConfig.from_dict({"hidden_size": backbone.cross_attention_dim,
                                              "max_length": spec.max_length,
                                              "latent_channels": backbone.latent_channels, **pooled, **settings}))


CONFIG = SafeRedirConfig
