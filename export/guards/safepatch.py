"""SafePatch in the bundle: the gate (``guards/safepatch.py``) as a text head, the patch as its own graph.

No duplicated UNet weights: the denoise graph gets residual inputs (``residual_inputs=True``; zeros = the plain
UNet) and the patch is the graph ``safepatch``: ``sample (N,C,h,w), timestep (1,), encoder_hidden_states
(N,L,D), instruction (N,L,D)`` -> ``down_residual_0..k, mid_residual`` (the names of the denoise graph's
residual inputs). The gate adds ``<gate_output> (B, K+1)`` to the text stage: probabilities over ``("none",
*categories)``; the runtime (``runtime/guards/safepatch.py``) runs the patch graph only when it fires, and the
plain ``denoise_idle`` graph otherwise (``export/idle.py``).

SDXL (``guards/safepatch.py``: the clone takes the UNet's ``text_time`` conditioning; text = both encoders side
by side): the ``safepatch`` graph also takes ``text_embeds (N, P)`` and ``time_ids (N, 6)``, fed exactly as the
denoise graph gets them, and ``instruction`` is ``(N, L, cross_attention_dim)`` (both text stages' ``hidden`` of
the instruction, concatenated). The gate reads both text stages, so it is not a text-stage head but its own
graph ``safepatch_gate``: ``hidden (B, L, D)`` (``hidden`` and ``hidden_2`` concatenated) and ``eos (B, D)``
(``eos`` and ``eos_2`` concatenated) -> ``<gate_output> (B, K+1)``; the manifest entry names it ``gate_graph``.

Weights made for another backbone (SD 1.x weights into an SDXL bundle, or the reverse, or another UNet) are
refused by :func:`prepare` in one line (BadInputError, exit 3) naming the hidden sizes and UNet configs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from torch import nn

from export.graphs import TensorSpec, TextHead, _concrete, _export_graph, _latent_size, residual_shapes, unet_multiple
from guards.safepatch import SafePatch, SafePatchConfig, SafePatchGate, load, text_dim
from guards.storage import load_folder
from runtime.errors import BadInputError

from . import GuardParts

GRAPH = "safepatch"
GATE_GRAPH = "safepatch_gate"  # SDXL only: the gate over both text stages (module docstring)
UNET_KEYS = ("in_channels", "block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim",
             "transformer_layers_per_block", "attention_head_dim", "addition_embed_type",
             "projection_class_embeddings_input_dim")
"""The UNet config keys the encoder clone's shapes depend on: weights whose clone differs here do not fit."""


class SafePatchGateHead(TextHead):
    """Fused into the text stage: ``hidden, eos`` -> ``<gate_output> (B, K+1)``."""

    def __init__(self, gate: SafePatchGate, output: str, classes: int):
        super().__init__()
        self.gate = gate
        self.outputs = (TensorSpec(output, ("B", classes)),)

    def forward(self, hidden: torch.Tensor, eos: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.outputs[0].name: self.gate(hidden, eos)}


class PatchGraph(nn.Module):
    """The patch with positional inputs for export: SDXL's ``text_embeds``, ``time_ids`` become its
    ``added_cond_kwargs``."""

    def __init__(self, patch: SafePatch):
        super().__init__()
        self.patch = patch

    def forward(self, sample, timestep, encoder_hidden_states, instruction, text_embeds=None, time_ids=None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.patch(sample, timestep, encoder_hidden_states, instruction, added_cond_kwargs=added)


def patch_specs(backbone, spatial) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    unet = backbone.unet
    h, w = spatial
    length = backbone.text_encoders[0].max_length
    cross = unet.config.cross_attention_dim
    inputs = (TensorSpec("sample", ("N", backbone.latent_channels, h, w)), TensorSpec("timestep", (1,)),
              TensorSpec("encoder_hidden_states", ("N", length, cross)),
              TensorSpec("instruction", ("N", length, text_dim(backbone))))
    if backbone.family == "sdxl":  # the denoise graph's SDXL inputs, same names and shapes
        inputs += (TensorSpec("text_embeds", ("N", backbone.pooled_dim)),
                   TensorSpec("time_ids", ("N", backbone.num_time_ids)))
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
    f = backbone.vae_scale_factor

    def dummy(spec):
        if spec.name == "timestep":
            return torch.tensor([500.0])
        if spec.name == "time_ids":
            return torch.tensor([[h * f, w * f, 0, 0, h * f, w * f]], dtype=torch.float32).expand(batch, -1).contiguous()
        return torch.randn(_concrete(spec.shape, sizes), generator=g)

    args = tuple(dummy(spec) for spec in inputs)
    metadata = {"graph": GRAPH, "fp16": "allowed", "params": str(patch.num_parameters())}
    multiple = unet_multiple(backbone.unet)
    module = PatchGraph(patch.eval()) if backbone.family == "sdxl" else patch.eval()  # SD 1.x: the graph as before
    return _export_graph(backbone, GRAPH, module, args, inputs, outputs, out_path, sizes=sizes,
                         exporter=exporter, opset=opset, metadata=metadata, progress=progress,
                         multiples={"h": multiple, "w": multiple})


def export_gate(backbone, gate: SafePatchGate, output: str, classes: int, out_path: Path, *, batch: int = 2,
                exporter: str = "dynamo", opset: int = 18, progress=None, **_) -> dict:
    """SDXL: the ``safepatch_gate`` graph (module docstring)."""
    dim, length = text_dim(backbone), backbone.text_encoders[0].max_length
    inputs = (TensorSpec("hidden", ("B", "L", dim)), TensorSpec("eos", ("B", dim)))
    outputs = (TensorSpec(output, ("B", classes)),)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(batch, length, dim, generator=g), torch.randn(batch, dim, generator=g))
    metadata = {"graph": GATE_GRAPH, "fp16": "allowed"}
    return _export_graph(backbone, GATE_GRAPH, gate.eval(), args, inputs, outputs, out_path,
                         sizes={"B": batch, "L": length}, exporter=exporter, opset=opset, metadata=metadata,
                         progress=progress, limits={"L": length})


def _describe(unet_config: dict, dim: int) -> str:
    kind = "SDXL text_time" if unet_config.get("addition_embed_type") == "text_time" else "no added conditioning"
    return (f"hidden size {dim} (UNet cross_attention_dim {unet_config.get('cross_attention_dim')}, "
            f"block_out_channels {list(unet_config.get('block_out_channels') or [])}, {kind})")


def check_fits(backbone, weights_dir: Path, config: SafePatchConfig) -> None:
    """One-line BadInputError when the weights were made for another backbone (SD 1.x weights into an SDXL
    bundle or the reverse, another UNet): their text width and encoder clone must be this backbone's."""
    unet_cfg = {k: v for k, v in dict(backbone.unet.config).items() if not k.startswith("_")}

    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    differ = [k for k in UNET_KEYS if norm(config.unet_config.get(k)) != norm(unet_cfg.get(k))]
    if differ or int(config.text_dim) != text_dim(backbone):
        raise BadInputError(
            f"--guards safepatch: the weights in {weights_dir} were trained for {_describe(config.unet_config, config.text_dim)}"
            f", the {backbone.family} backbone has {_describe(unet_cfg, text_dim(backbone))}"
            f"{' (UNet config differs in ' + ', '.join(differ) + ')' if differ else ''}: train SafePatch for this "
            "backbone (`python -m train safepatch --model ...`)")


def prepare(backbone, weights_dir: Path, image_hw: tuple[int, int] | None = None) -> GuardParts:
    config, _ = load_folder(weights_dir, SafePatchConfig)
    check_fits(backbone, weights_dir, config)  # before building modules: a clear line, not a shape error
    patch, gate, config = load(weights_dir)
    unet_params = sum(p.numel() for p in backbone.unet.parameters())
    classes = len(config.categories) + 1

    def graph(out_dir: Path, common: dict) -> dict:
        return export_patch(backbone, patch, Path(out_dir) / f"{GRAPH}.onnx", **common)

    manifest = {"graph": GRAPH, **config.runtime(), "patch_params": patch.num_parameters(), "unet_params": unet_params}
    if backbone.family == "sdxl":  # the gate reads both text stages: its own graph (module docstring)
        def gate_graph(out_dir: Path, common: dict) -> dict:
            return export_gate(backbone, gate, config.gate_output, classes, Path(out_dir) / f"{GATE_GRAPH}.onnx",
                               **common)

        return GuardParts(residual_inputs=True, graphs=[graph, gate_graph], config={**manifest, "gate_graph": GATE_GRAPH},
                          idle_graph=True, acts_on_flags=True)
    head = SafePatchGateHead(gate, config.gate_output, classes)
    return GuardParts(text_heads=[head], residual_inputs=True, graphs=[graph], config=manifest, idle_graph=True,
                      acts_on_flags=True)
