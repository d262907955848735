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

Sizes come from the backbone: ``hidden_size`` D and ``max_length`` L of the (first) text encoder, the UNet's
``latent_channels``; nothing assumes 768 / 77. Config-driven (``config.json`` + ``model.safetensors``).

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
    RUNTIME_KEYS = ("check_every", "first_check", "threshold", "alpha")

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

    # -- parts -----------------------------------------------------------------------------------------
    def classify(self, latent: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """(B, 2) logits {safe, unsafe}."""
        b = latent.shape[0]
        t = timestep.reshape(-1).to(torch.float32).expand(b) if timestep.numel() == 1 else timestep.reshape(b)
        joint = self.latent_encoder(latent) + self.time_mlp(timestep_embedding(t, self.config.width).to(latent.dtype))
        tokens = self.token_proj(prompt_embeds) + self.position[:, : prompt_embeds.shape[1]]
        attended = self.cls_attn(joint[:, None], tokens)[:, 0]
        return self.classifier(torch.cat([joint, attended], dim=-1))

    def redirect(self, prompt_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(redirected (B, L, D), mask (B, L), scale (B, L))."""
        c = self.config
        h = self.gen_proj(prompt_embeds) + self.gen_position[:, : prompt_embeds.shape[1]]
        context = self.gen_attn(self.gen_pool.expand(h.shape[0], -1, -1), h)          # (B, 1, W)
        h = self.gen_mlp(torch.cat([h, context.expand(-1, h.shape[1], -1)], dim=-1))
        delta = self.delta_up(self.delta_down(h))
        mask = torch.sigmoid(self.mask_head(h))[..., 0]
        scale = c.max_scale * torch.sigmoid(self.scale_head(h))[..., 0]
        direction = delta / (delta.norm(dim=-1, keepdim=True) + c.eps)
        norm = prompt_embeds.norm(dim=-1, keepdim=True)
        redirected = prompt_embeds + (scale * c.alpha * mask)[..., None] * direction * norm
        return redirected, mask, scale

    CLASSIFIER_PREFIXES = ("latent_encoder.", "time_mlp.", "token_proj.", "position", "cls_attn.", "classifier.")

    def forward(self, latent: torch.Tensor | None, timestep: torch.Tensor | None, prompt_embeds: torch.Tensor,
                part: str = "all"):
        """``part``: "all" (the graph), "classify" (logits only) or "redirect" (the generator's three outputs)."""
        if part == "classify":
            return self.classify(latent, timestep, prompt_embeds)
        if part == "redirect":
            return self.redirect(prompt_embeds)
        logits = self.classify(latent, timestep, prompt_embeds)
        redirected, mask, scale = self.redirect(prompt_embeds)
        return logits, redirected, mask, scale

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
        """Sized from ``backbone`` (text width, prompt length, latent channels); ``settings``: other fields."""
        spec = backbone.text_encoders[0]
        return cls(SafeRedirConfig.from_dict({"hidden_size": backbone.cross_attention_dim,
                                              "max_length": spec.max_length,
                                              "latent_channels": backbone.latent_channels, **settings}))


CONFIG = SafeRedirConfig
