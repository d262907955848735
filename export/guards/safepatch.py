"""SafePatch ("Beyond the Safety Tax"): a gated, instruction-aware ControlNet-style patch on the UNet's skips.

Two modules, saved together as ``config.json`` + ``model.safetensors`` (keys ``patch.*`` and ``gate.*``):

- :class:`SafePatch`: a trainable clone of the UNet encoder (``conv_in``, time embedding, down blocks, mid
  block), initialised from the frozen UNet, whose skip features go through zero-initialised 1x1 convolutions
  to residuals with exactly the shapes of :func:`export.graphs.residual_shapes` (down residuals + mid).
  *Instruction-aware spatial projection*: the safety instruction ("remove the knife"), encoded by the SAME
  frozen text encoder (hidden states), is cross-attended onto the noisy latent (queries from a conv of the
  latent, keys/values from the instruction tokens); the result, a spatial guidance map, goes through a
  zero-initialised conv and is added to the clone's ``conv_in`` output (like ControlNet's conditioning
  embedding). Untrained, every residual is exactly 0: the patched UNet equals the base UNet bit for bit.
- :class:`SafePatchGate`: a :class:`~export.graphs.TextHead` on the prompt's EOS embedding, fused into the
  text-stage graph: output ``safepatch_gate (B, K+1)``, probabilities over ``("none", *categories)``. The
  runtime runs the patch only when ``1 - p(none) >= threshold``, with the argmax category's instruction.

Bundle layout (no duplicated UNet weights): the denoise graph gets residual inputs (``residual_inputs=True``;
zeros = the plain UNet) and the patch is its own graph ``safepatch``:
``sample (N,C,h,w), timestep (1,), encoder_hidden_states (N,L,D), instruction (N,L,D)`` ->
``down_residual_0..k, mid_residual`` (the names of the denoise graph's residual inputs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from export.graphs import TensorSpec, TextHead, _concrete, _export_graph, _latent_size, residual_shapes, unet_multiple

from . import GuardParts

NAME = "safepatch"
CATEGORIES = ("weapon", "gore", "shocking")
INSTRUCTIONS = {"weapon": "remove the knife", "gore": "remove the blood", "shocking": "remove the skull"}
GATE_OUTPUT = "safepatch_gate"
DEFAULT_THRESHOLD = 0.5


class SafePatchGate(TextHead):
    """Prompt tokens -> probabilities over ``("none", *categories)``.

    A token-level detector, max-pooled over the prompt (an unsafe word anywhere fires it), concatenated with a
    projection of the EOS embedding, then SiLU-Linear and softmax. Measured on held-back guard-split prompts:
    an EOS-only MLP fired on 10-18% of benign prompts (single-object captions), this head on 1.6%."""

    outputs = (TensorSpec(GATE_OUTPUT, ("B", len(CATEGORIES) + 1)),)

    def __init__(self, dim: int, hidden: int = 128, classes: int = len(CATEGORIES) + 1):
        super().__init__()
        self.token = nn.Linear(dim, hidden)
        self.eos = nn.Linear(dim, hidden)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(2 * hidden, classes))

    def logits(self, hidden: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        pooled = self.token(hidden).amax(dim=1)
        return self.out(torch.cat([pooled, self.eos(eos)], dim=-1))

    def forward(self, hidden: torch.Tensor, eos: torch.Tensor) -> dict[str, torch.Tensor]:
        return {GATE_OUTPUT: torch.softmax(self.logits(hidden, eos), dim=-1)}


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

    def __init__(self, unet_config: dict, text_dim: int, proj_dim: int = 64):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.config = {"unet_config": {k: v for k, v in dict(unet_config).items() if not k.startswith("_")},
                       "text_dim": int(text_dim), "proj_dim": int(proj_dim)}
        base = UNet2DConditionModel.from_config(self.config["unet_config"])
        self.conv_in, self.time_proj, self.time_embedding = base.conv_in, base.time_proj, base.time_embedding
        self.down_blocks, self.mid_block = base.down_blocks, base.mid_block
        del base
        cfg = self.config["unet_config"]
        down, mid = residual_shapes(_Cfg(cfg), 8, 8)
        self.zero_convs = nn.ModuleList(_zero(nn.Conv2d(c, c, 1)) for c, _, _ in down)
        self.mid_zero_conv = _zero(nn.Conv2d(mid[0], mid[0], 1))
        self.projection = InstructionProjection(cfg["in_channels"], text_dim, proj_dim, cfg["block_out_channels"][0])

    @classmethod
    def from_unet(cls, unet, text_dim: int, proj_dim: int = 64) -> SafePatch:
        """A patch whose encoder clone starts from ``unet``'s weights (zero convs: exact no-op)."""
        patch = cls(dict(unet.config), text_dim, proj_dim)
        for name in ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block"):
            getattr(patch, name).load_state_dict(getattr(unet, name).state_dict())
        return patch

    def forward(self, sample, timestep, encoder_hidden_states, instruction):
        timesteps = timestep.reshape(-1).to(sample.dtype).expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype))
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


class _Cfg:
    def __init__(self, d: dict):
        self.__dict__.update(d)


# ---- saving / loading ----------------------------------------------------------------------------------

def save(patch: SafePatch, gate: SafePatchGate, out_dir: Path, extra: dict | None = None, fp16: bool | None = None):
    """``config.json`` + ``model.safetensors`` (FP16 storage when the FP32 weights pass 10 MB)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {f"patch.{k}": v for k, v in patch.state_dict().items()}
    state |= {f"gate.{k}": v for k, v in gate.state_dict().items()}
    nbytes = sum(v.numel() * 4 for v in state.values())
    fp16 = nbytes > 10_000_000 if fp16 is None else fp16
    state = {k: (v.half() if fp16 and v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(state, str(out_dir / "model.safetensors"))
    config = {"_class_name": "SafePatch", **patch.config, "gate_hidden": gate.token.out_features,
              "categories": list(CATEGORIES), "instructions": dict(INSTRUCTIONS), "gate_output": GATE_OUTPUT,
              "threshold": DEFAULT_THRESHOLD, "storage_dtype": "float16" if fp16 else "float32", **(extra or {})}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load(weights_dir: Path) -> tuple[SafePatch, SafePatchGate, dict]:
    from safetensors.torch import load_file

    weights_dir = Path(weights_dir)
    config = json.loads((weights_dir / "config.json").read_text())
    patch = SafePatch(config["unet_config"], config["text_dim"], config["proj_dim"])
    gate = SafePatchGate(config["text_dim"], config["gate_hidden"], len(config["categories"]) + 1)
    state = {k: v.float() for k, v in load_file(str(weights_dir / "model.safetensors")).items()}
    patch.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("patch.")})
    gate.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("gate.")})
    return patch.eval(), gate.eval(), config


# ---- export ----------------------------------------------------------------------------------------------

def patch_specs(backbone, spatial) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    unet = backbone.unet
    h, w = spatial
    length = backbone.text_encoders[0].max_length
    cross = unet.config.cross_attention_dim
    inputs = (TensorSpec("sample", ("N", backbone.latent_channels, h, w)), TensorSpec("timestep", (1,)),
              TensorSpec("encoder_hidden_states", ("N", length, cross)),
              TensorSpec("instruction", ("N", length, backbone.text_encoders[0].hidden_size)))
    down, mid = residual_shapes(unet.config, h, w)
    outputs = (*[TensorSpec(f"down_residual_{i}", ("N", *s)) for i, s in enumerate(down)],
               TensorSpec("mid_residual", ("N", *mid)))
    return inputs, outputs


def export_patch(backbone, patch: SafePatch, out_path: Path, *, height=None, width=None, dynamic_hw=False,
                 batch: int = 2, exporter: str = "dynamo", opset: int = 18, progress=None) -> dict:
    """The ``safepatch`` graph (see the module docstring)."""
    h, w = _latent_size(backbone, height, width, multiple=unet_multiple(backbone.unet))
    inputs, outputs = patch_specs(backbone, ("h", "w") if dynamic_hw else (h, w))
    sizes = {"N": batch, "h": h, "w": w}
    g = torch.Generator().manual_seed(0)
    args = tuple(torch.tensor([500.0]) if s.name == "timestep" else torch.randn(_concrete(s.shape, sizes), generator=g)
                 for s in inputs)
    metadata = {"graph": NAME, "fp16": "allowed", "params": str(patch.num_parameters())}
    multiple = unet_multiple(backbone.unet)
    return _export_graph(backbone, NAME, patch.eval(), args, inputs, outputs, out_path, sizes=sizes,
                         exporter=exporter, opset=opset, metadata=metadata, progress=progress,
                         multiples={"h": multiple, "w": multiple})


def prepare(backbone, weights_dir: Path, image_hw: tuple[int, int] | None = None) -> GuardParts:
    patch, gate, config = load(weights_dir)
    unet_params = sum(p.numel() for p in backbone.unet.parameters())

    def graph(out_dir: Path, common: dict) -> dict:
        return export_patch(backbone, patch, Path(out_dir) / f"{NAME}.onnx", **common)

    manifest = {"graph": NAME, "gate_output": config.get("gate_output", GATE_OUTPUT),
                "categories": config["categories"], "threshold": float(config.get("threshold", DEFAULT_THRESHOLD)),
                "instructions": config["instructions"], "apply_uncond": False,
                "patch_params": patch.num_parameters(), "unet_params": unet_params}
    return GuardParts(text_heads=[gate], residual_inputs=True, graphs=[graph], config=manifest, idle_graph=True)
