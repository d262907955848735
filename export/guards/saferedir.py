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

Bundle graph ``redirect`` (kind ``guard``): ``latent (B, C, h, w)``, ``timestep (1,)``, ``prompt_embeds
(B, L, D)`` -> ``logits (B, 2)``, ``redirected (B, L, D)``, ``mask (B, L)``, ``scale (B, L)``; B dynamic, h/w
static at the bundle's size (or dynamic with ``dynamic_hw``; the conv encoder ends in a global mean).

Runtime (``runtime/guards/saferedir.py``): from step ``first_check`` on, every ``check_every`` steps until it
fires, the graph runs on the conditional latent and the conditional prompt rows; unsafe probability
``softmax(logits)[1] >= threshold`` triggers and from then on the conditional rows are the ``redirected``
ones computed at detection (not recomputed). Training (our design, the authors did not publish it) is
documented in ``train/saferedir/README.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DEFAULT_RUNTIME = {"graph": "redirect", "check_every": 5, "first_check": 0, "threshold": 0.5}


class SafeRedirConfig(dict):
    """Plain-dict config; keys documented in :meth:`SafeRedir.default_config`."""


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

    @staticmethod
    def default_config(hidden_size: int, max_length: int, latent_channels: int) -> dict:
        return {"hidden_size": hidden_size,      # D: text encoder width (the UNet's cross-attention width)
                "max_length": max_length,        # L: prompt tokens
                "latent_channels": latent_channels,
                "width": 128,                    # internal feature width
                "heads": 4,
                "rank": 16,                      # low-rank delta head
                "alpha": 1.0,                    # global redirection strength
                "max_scale": 2.0,                # adaptive scale s in (0, max_scale)
                "eps": 1e-6}

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        c = self.config
        d, w = c["hidden_size"], c["width"]
        # classifier
        self.latent_encoder = LatentEncoder(c["latent_channels"], w)
        self.time_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.token_proj = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, w))
        self.position = nn.Parameter(torch.zeros(1, c["max_length"], w))
        self.cls_attn = CrossAttention(w, c["heads"])
        self.classifier = nn.Sequential(nn.Linear(2 * w, w), nn.SiLU(), nn.Linear(w, 2))
        # delta generator (prompt-only: computed once at detection)
        self.gen_proj = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, w))
        self.gen_position = nn.Parameter(torch.zeros(1, c["max_length"], w))
        self.gen_pool = nn.Parameter(torch.zeros(1, 1, w))
        self.gen_attn = CrossAttention(w, c["heads"])
        self.gen_mlp = nn.Sequential(nn.Linear(2 * w, w), nn.SiLU(), nn.Linear(w, w), nn.SiLU())
        self.delta_down = nn.Linear(w, c["rank"])
        self.delta_up = nn.Linear(c["rank"], d)
        self.mask_head = nn.Linear(w, 1)
        self.scale_head = nn.Linear(w, 1)
        nn.init.zeros_(self.mask_head.bias)   # mask 0.5 at init: the diffusion loss sees the redirection from step 0

    # -- parts -----------------------------------------------------------------------------------------
    def classify(self, latent: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """(B, 2) logits {safe, unsafe}."""
        b = latent.shape[0]
        t = timestep.reshape(-1).to(torch.float32).expand(b) if timestep.numel() == 1 else timestep.reshape(b)
        joint = self.latent_encoder(latent) + self.time_mlp(timestep_embedding(t, self.config["width"]))
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
        scale = c["max_scale"] * torch.sigmoid(self.scale_head(h))[..., 0]
        direction = delta / (delta.norm(dim=-1, keepdim=True) + c["eps"])
        norm = prompt_embeds.norm(dim=-1, keepdim=True)
        redirected = prompt_embeds + (scale * c["alpha"] * mask)[..., None] * direction * norm
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
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(folder / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "SafeRedir":
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / CONFIG_NAME).read_text())
        model = cls({k: v for k, v in config.items() if not k.startswith("runtime")})
        model.config = {k: v for k, v in config.items()}
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        return model.eval()

    @classmethod
    def for_backbone(cls, backbone, **overrides) -> "SafeRedir":
        spec = backbone.text_encoders[0]
        config = cls.default_config(backbone.cross_attention_dim, spec.max_length, backbone.latent_channels)
        return cls({**config, **overrides})


class RedirectGraph(nn.Module):
    """The ``redirect`` graph: the module's forward with the graph's output names."""

    def __init__(self, model: SafeRedir):
        super().__init__()
        self.model = model

    def forward(self, latent, timestep, prompt_embeds):
        return self.model(latent, timestep, prompt_embeds)


def export_redirect(backbone, model: SafeRedir, out_path: str | Path, *, height: int | None = None,
                    width: int | None = None, dynamic_hw: bool = False, batch: int = 2, exporter: str | None = None,
                    opset: int | None = None, progress=None) -> dict:
    from export.graphs import DEFAULT_EXPORTER, OPSET, TensorSpec, _export_graph, _latent_size

    h, w = _latent_size(backbone, height, width, multiple=1)
    c, ln, d = model.config["latent_channels"], model.config["max_length"], model.config["hidden_size"]
    spatial = ("h", "w") if dynamic_hw else (h, w)
    inputs = (TensorSpec("latent", ("B", c, *spatial)), TensorSpec("timestep", (1,)),
              TensorSpec("prompt_embeds", ("B", ln, d)))
    outputs = (TensorSpec("logits", ("B", 2)), TensorSpec("redirected", ("B", ln, d)),
               TensorSpec("mask", ("B", ln)), TensorSpec("scale", ("B", ln)))
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(batch, c, h, w, generator=g), torch.tensor([500.0]),
            torch.randn(batch, ln, d, generator=g))
    metadata = {"graph": "redirect", "guard": "saferedir", "fp16": "allowed"}
    return _export_graph(backbone, "redirect", RedirectGraph(model).eval(), args, inputs, outputs, out_path,
                         sizes={"B": batch, "h": h, "w": w}, exporter=exporter or DEFAULT_EXPORTER,
                         opset=opset or OPSET, metadata=metadata, progress=progress)


def prepare(backbone, weights_dir: Path, image_hw: tuple[int, int] | None = None):
    from . import GuardParts

    model = SafeRedir.from_pretrained(weights_dir)
    spec = backbone.text_encoders[0]
    if (model.config["hidden_size"], model.config["max_length"], model.config["latent_channels"]) != (
            backbone.cross_attention_dim, spec.max_length, backbone.latent_channels):
        from runtime.errors import BadInputError

        raise BadInputError(f"saferedir weights in {weights_dir} were trained for D={model.config['hidden_size']}, "
                            f"L={model.config['max_length']}, C={model.config['latent_channels']}, not this backbone "
                            f"(D={backbone.cross_attention_dim}, L={spec.max_length}, C={backbone.latent_channels})")

    def graph(out_dir: Path, common: dict) -> dict:
        return export_redirect(backbone, model, Path(out_dir) / "redirect.onnx", height=common.get("height"),
                               width=common.get("width"), dynamic_hw=bool(common.get("dynamic_hw")),
                               exporter=common.get("exporter"), opset=common.get("opset"),
                               progress=common.get("progress"))

    runtime = {**DEFAULT_RUNTIME, **model.config.get("runtime", {})}
    return GuardParts(graphs=[graph], config={**runtime, "alpha": model.config["alpha"]})
