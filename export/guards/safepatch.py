"""SafePatch in the bundle: the gate (``guards/safepatch.py``) as a text head, the patch as its own graph.

No duplicated UNet weights: the denoise graph gets residual inputs (``residual_inputs=True``; zeros = the plain
UNet) and the patch is the graph ``safepatch``: ``sample (N,C,h,w), timestep (1,), encoder_hidden_states
(N,L,D), instruction (N,L,D)`` -> ``down_residual_0..k, mid_residual`` (the names of the denoise graph's
residual inputs). The gate adds ``<gate_output> (B, K+1)`` to the text stage: probabilities over ``("none",
*categories)``; the runtime (``runtime/guards/safepatch.py``) runs the patch graph only when it fires, and the
plain ``denoise_idle`` graph otherwise (``export/idle.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from export.graphs import TensorSpec, TextHead, _concrete, _export_graph, _latent_size, residual_shapes, unet_multiple
from guards.safepatch import SafePatch, SafePatchGate, load

from . import GuardParts

GRAPH = "safepatch"


class SafePatchGateHead(TextHead):
    """Fused into the text stage: ``hidden, eos`` -> ``<gate_output> (B, K+1)``."""

    def __init__(self, gate: SafePatchGate, output: str, classes: int):
        super().__init__()
        self.gate = gate
        self.outputs = (TensorSpec(output, ("B", classes)),)

    def forward(self, hidden: torch.Tensor, eos: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.outputs[0].name: self.gate(hidden, eos)}


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
    metadata = {"graph": GRAPH, "fp16": "allowed", "params": str(patch.num_parameters())}
    multiple = unet_multiple(backbone.unet)
    return _export_graph(backbone, GRAPH, patch.eval(), args, inputs, outputs, out_path, sizes=sizes,
                         exporter=exporter, opset=opset, metadata=metadata, progress=progress,
                         multiples={"h": multiple, "w": multiple})


def prepare(backbone, weights_dir: Path, image_hw: tuple[int, int] | None = None) -> GuardParts:
    patch, gate, config = load(weights_dir)
    unet_params = sum(p.numel() for p in backbone.unet.parameters())

    def graph(out_dir: Path, common: dict) -> dict:
        return export_patch(backbone, patch, Path(out_dir) / f"{GRAPH}.onnx", **common)

    head = SafePatchGateHead(gate, config.gate_output, len(config.categories) + 1)
    manifest = {"graph": GRAPH, **config.runtime(), "patch_params": patch.num_parameters(), "unet_params": unet_params}
    return GuardParts(text_heads=[head], residual_inputs=True, graphs=[graph], config=manifest, idle_graph=True,
                      acts_on_flags=True)
