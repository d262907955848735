"""SafePatch ("Beyond the Safety Tax"): a gated, instruction-aware ControlNet-style patch on the UNet's skips.

Two modules, saved together as ``config.json`` + ``model.safetensors`` (keys ``patch.*`` and ``gate.*``):

- :class:`SafePatch`: a trainable clone of the UNet encoder (``conv_in``, time embedding, down blocks, mid
  block), initialised from the frozen UNet, whose skip features go through zero-initialised 1x1 convolutions
  to residuals with exactly the shapes of :func:`guards.skips.residual_shapes` (down residuals + mid).
  *Instruction-aware spatial projection*: the safety instruction ("remove the knife"), encoded by the SAME
  frozen text encoder (hidden states), is cross-attended onto the noisy latent (queries from a conv of the
  latent, keys/values from the instruction tokens); the result, a spatial guidance map, goes through a
  zero-initialised conv and is added to the clone's ``conv_in`` output (like ControlNet's conditioning
  embedding). Untrained, every residual is exactly 0: the patched UNet equals the base UNet bit for bit.
- :class:`SafePatchGate`: the prompt gate on the text stage's hidden states and EOS embedding: probabilities
  over ``("none", *categories)``. The runtime runs the patch only when ``1 - p(none) >= threshold``, with the
  argmax category's instruction.

In the bundle (``export/guards/safepatch.py``) the gate is a head of the text stage and the patch its own
graph feeding the denoise graph's residual inputs (no duplicated UNet weights).

**SDXL** (a UNet with ``addition_embed_type="text_time"``): the clone also copies ``add_time_proj`` /
``add_embedding`` and takes the UNet's ``added_cond_kwargs`` (``text_embeds``, ``time_ids``), as diffusers' SDXL
ControlNet does. The text the patch and the gate read is what the UNet itself cross-attends to: both text
encoders' ``hidden_states[-2]`` side by side, ``text_dim = cross_attention_dim`` (2048 on real SDXL; see
:func:`text_dim`). The instruction is encoded the same way (both text stages, concatenated). The gate reads those
concatenated token states and the two encoders' EOS embeddings concatenated (768 + 1280 = 2048 on real SDXL, the
same width): why not one encoder's alone: the UNet is conditioned on both, and an unsafe word the first encoder
represents weakly can still steer the image through the second (the bigger one on real SDXL); why EOS rather than
the projected ``pooled`` output: EOS is what the SD 1.x gate reads (the same head shape on every family) and it
carries the first encoder too. On SDXL the gate therefore cannot be a head of ONE text stage: in the bundle it
is its own small graph run on the two stages' outputs (``export/guards/safepatch.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from . import CATEGORIES
from .config import GuardConfig
from .skips import residual_shapes
from .storage import load_folder, save_folder

INSTRUCTIONS = {"weapon": "remove the knife", "gore": "remove the blood", "shocking": "remove the skull"}


@dataclass(kw_only=True)
class SafePatchConfig(GuardConfig):
    NAME = "safepatch"
    RUNTIME_KEYS = ("gate_output", "categories", "threshold", "instructions", "apply_uncond", "yield_to_redirect")

    unet_config: dict                             # the backbone UNet's config (the encoder clone's architecture)
    text_dim: int                                 # the text encoder's width (instruction tokens, gate input)
    proj_dim: int = 64                            # instruction projection width
    gate_hidden: int = 128
    categories: list = field(default_factory=lambda: list(CATEGORIES))
    instructions: dict = field(default_factory=lambda: dict(INSTRUCTIONS))   # category -> safety instruction
    gate_output: str = "safepatch_gate"           # the gate's output in the text stage
    threshold: float = 0.5                        # run the patch when 1 - p(none) >= this (training calibrates it)
    apply_uncond: bool = False                    # CFG: patch the unconditional row too
    yield_to_redirect: bool = False               # in a stack: leave a row SafeRedir redirected to the redirect
    storage_dtype: str = "float32"                # how model.safetensors stores the weights (set by save)
    trained_steps: int = 0

    @property
    def text_time(self) -> bool:
        """The cloned UNet is SDXL-style (``text_time`` added conditioning; text = both encoders concatenated)."""
        return self.unet_config.get("addition_embed_type") == "text_time"

    @classmethod
    def for_unet(cls, unet, text_dim: int, **settings) -> "SafePatchConfig":
        return cls.from_dict({"unet_config": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
                              "text_dim": int(text_dim), **settings})


def text_dim(backbone) -> int:
    """The width of the text SafePatch reads on ``backbone``: the first text encoder's hidden size (SD 1.x / 2.x),
    SDXL's ``cross_attention_dim`` (both encoders' hidden states side by side, module docstring)."""
    if getattr(backbone.unet.config, "addition_embed_type", None) == "text_time":
        return int(backbone.unet.config.cross_attention_dim)
    return int(backbone.text_encoders[0].hidden_size)


class SafePatchGate(nn.Module):
    """Prompt tokens -> probabilities over ``("none", *categories)``.

    A token-level detector, max-pooled over the prompt (an unsafe word anywhere fires it), concatenated with a
    projection of the EOS embedding, then SiLU-Linear and softmax. Why not EOS alone: it fired on far more
    benign prompts (bench/results/design_measurements.md, "SafePatch gate")."""

    def __init__(self, config: SafePatchConfig):
        super().__init__()
        dim, hidden = config.text_dim, config.gate_hidden
        self.token = nn.Linear(dim, hidden)
        self.eos = nn.Linear(dim, hidden)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(2 * hidden, len(config.categories) + 1))

    def logits(self, hidden: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        pooled = self.token(hidden).amax(dim=1)
        return self.out(torch.cat([pooled, self.eos(eos)], dim=-1))

    def forward(self, hidden: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(hidden, eos), dim=-1)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class InstructionProjection(nn.Module):
    """Noisy latent x instruction tokens -> spatial guidance map (N, out_channels, h, w), zero at init.

    Queries: a 3x3 conv of the latent; keys/values: linear maps of the instruction's hidden states; one
    softmax cross-attention per position; then conv -> SiLU -> zero-initialised 3x3 conv."""

    def __init__(self, latent_channels: int, text_dim: int, dim: int, out_channels: int):
        super().__init__()
        self.dim = dim
        self.q = nn.Conv2d(latent_channels, dim, 3, padding=1)
        self.k = nn.Linear(text_dim, dim)
        self.v = nn.Linear(text_dim, dim)
        self.mix = nn.Conv2d(dim + latent_channels, dim, 3, padding=1)
        self.out = _zero(nn.Conv2d(dim, out_channels, 3, padding=1))

    def guidance_map(self, sample: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
        n, _, h, w = sample.shape
        q = self.q(sample).flatten(2).transpose(1, 2)                        # (N, hw, d)
        k, v = self.k(instruction), self.v(instruction)                      # (N, L, d)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.dim), dim=-1)
        g = (attn @ v).transpose(1, 2).reshape(n, self.dim, h, w)            # (N, d, h, w)
        return nn.functional.silu(self.mix(torch.cat([g, sample], dim=1)))

    def forward(self, sample: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
        return self.out(self.guidance_map(sample, instruction))


class SafePatch(nn.Module):
    """The patch: ``forward(sample, timestep, encoder_hidden_states, instruction)`` -> (down residuals..., mid)."""

    def __init__(self, config: SafePatchConfig):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.config = config
        cfg = config.unet_config
        base = UNet2DConditionModel.from_config(cfg)
        self.conv_in, self.time_proj, self.time_embedding = base.conv_in, base.time_proj, base.time_embedding
        self.down_blocks, self.mid_block = base.down_blocks, base.mid_block
        # SDXL: the clone reads the same pooled-text + size conditioning as the UNet (diffusers' SDXL ControlNet)
        self.text_time = cfg.get("addition_embed_type") == "text_time"
        if self.text_time:
            self.add_time_proj, self.add_embedding = base.add_time_proj, base.add_embedding
        elif cfg.get("addition_embed_type") is not None or cfg.get("class_embed_type") is not None:
            raise ValueError("SafePatch clones UNets without extra embeddings or with SDXL's text_time one, not "
                             f"addition_embed_type={cfg.get('addition_embed_type')!r} / "
                             f"class_embed_type={cfg.get('class_embed_type')!r}")
        del base
        down, mid = residual_shapes(SimpleNamespace(**cfg), 8, 8)
        self.zero_convs = nn.ModuleList(_zero(nn.Conv2d(c, c, 1)) for c, _, _ in down)
        self.mid_zero_conv = _zero(nn.Conv2d(mid[0], mid[0], 1))
        self.projection = InstructionProjection(cfg["in_channels"], config.text_dim, config.proj_dim,
                                                cfg["block_out_channels"][0])

    @classmethod
    def from_unet(cls, unet, config: SafePatchConfig) -> SafePatch:
        """A patch whose encoder clone starts from ``unet``'s weights (zero convs: exact no-op)."""
        patch = cls(config)
        names = ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block")
        for name in names + (("add_time_proj", "add_embedding") if patch.text_time else ()):
            getattr(patch, name).load_state_dict(getattr(unet, name).state_dict())
        return patch

    def forward(self, sample, timestep, encoder_hidden_states, instruction, added_cond_kwargs=None):
        """``added_cond_kwargs``: SDXL's ``{"text_embeds", "time_ids"}``, exactly as the UNet gets them."""
        timesteps = timestep.reshape(-1).to(sample.dtype).expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype))
        if self.text_time:
            if added_cond_kwargs is None:
                raise ValueError("SafePatch on an SDXL UNet needs added_cond_kwargs (text_embeds, time_ids)")
            text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
            time_embeds = self.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
            emb = emb + self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
        h = self.conv_in(sample) + self.projection(sample, instruction)
        skips = [h]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h, res = block(hidden_states=h, temb=emb)
            skips += list(res)
        h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
        return (*[conv(s) for conv, s in zip(self.zero_convs, skips)], self.mid_zero_conv(h))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def save(patch: SafePatch, gate: SafePatchGate, out_dir: Path, config: SafePatchConfig | None = None,
         fp16: bool | None = None) -> None:
    """``config.json`` (``config``, default the patch's) + ``model.safetensors`` (FP16 storage when the FP32
    weights pass 10 MB)."""
    state = {f"patch.{k}": v for k, v in patch.state_dict().items()}
    state |= {f"gate.{k}": v for k, v in gate.state_dict().items()}
    nbytes = sum(v.numel() * 4 for v in state.values())
    fp16 = nbytes > 10_000_000 if fp16 is None else fp16
    state = {k: (v.half() if fp16 and v.is_floating_point() else v) for k, v in state.items()}
    config = (config or patch.config).replace(storage_dtype="float16" if fp16 else "float32")
    save_folder(out_dir, config, state)


def load(weights_dir: Path) -> tuple[SafePatch, SafePatchGate, SafePatchConfig]:
    config, state = load_folder(weights_dir, SafePatchConfig)
    patch, gate = SafePatch(config), SafePatchGate(config)
    state = {k: v.float() for k, v in state.items()}
    patch.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("patch.")})
    gate.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("gate.")})
    return patch.eval(), gate.eval(), config


CONFIG = SafePatchConfig
