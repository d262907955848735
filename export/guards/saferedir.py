"""SafeRedir in the bundle: the module (``guards/saferedir.py``) as a graph of its own, ``redirect``.

Graph ``redirect`` (kind ``guard``): ``latent (B, C, h, w)``, ``timestep (1,)``, ``prompt_embeds (B, L, D)`` ->
``logits (B, 2)``, ``redirected (B, L, D)``, ``mask (B, L)``, ``scale (B, L)``; B dynamic, h/w static at the
bundle's size (or dynamic with ``dynamic_hw``; the conv encoder ends in a global mean). The runtime half (when
to check, when to switch the conditional rows) is ``runtime/guards/saferedir.py``.

SDXL (weights with ``pooled_dim``, ``guards/saferedir.py``): the graph also takes ``pooled (B, P)`` (the
conditional rows' ``text_embeds``) and gives ``redirected_pooled (B, P)``; the runtime reads the graph's
inputs to know (no new manifest key). :func:`prepare` refuses, in one line, weights trained for another
hidden size, prompt length, latent width or pooled width than the backbone's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from guards.saferedir import SafeRedir
from runtime.errors import BadInputError

from . import GuardParts

GRAPH = "redirect"


class RedirectGraph(nn.Module):
    """The ``redirect`` graph: the module's forward with the graph's output names."""

    def __init__(self, model: SafeRedir):
        super().__init__()
        self.model = model

    def forward(self, latent, timestep, prompt_embeds):
        return self.model(latent, timestep, prompt_embeds)


class RedirectGraphXL(RedirectGraph):
    """SDXL: the pooled embedding in, its redirection out (after the SD 1.x outputs)."""

    def forward(self, latent, timestep, prompt_embeds, pooled):
        logits, redirected, mask, scale, redirected_pooled, _, _ = self.model(latent, timestep, prompt_embeds, pooled)
        return logits, redirected, mask, scale, redirected_pooled


def export_redirect(backbone, model: SafeRedir, out_path: str | Path, *, height: int | None = None,
                    width: int | None = None, dynamic_hw: bool = False, batch: int = 2, exporter: str | None = None,
                    opset: int | None = None, progress=None) -> dict:
    from export.graphs import DEFAULT_EXPORTER, OPSET, TensorSpec, _export_graph, _latent_size

    h, w = _latent_size(backbone, height, width, multiple=1)
    c, ln, d = model.config.latent_channels, model.config.max_length, model.config.hidden_size
    spatial = ("h", "w") if dynamic_hw else (h, w)
    inputs = (TensorSpec("latent", ("B", c, *spatial)), TensorSpec("timestep", (1,)),
              TensorSpec("prompt_embeds", ("B", ln, d)))
    outputs = (TensorSpec("logits", ("B", 2)), TensorSpec("redirected", ("B", ln, d)),
               TensorSpec("mask", ("B", ln)), TensorSpec("scale", ("B", ln)))
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(batch, c, h, w, generator=g), torch.tensor([500.0]),
            torch.randn(batch, ln, d, generator=g))
    module = RedirectGraph(model)
    if p := model.config.pooled_dim:
        inputs += (TensorSpec("pooled", ("B", p)),)
        outputs += (TensorSpec("redirected_pooled", ("B", p)),)
        args += (torch.randn(batch, p, generator=g),)
        module = RedirectGraphXL(model)
    metadata = {"graph": GRAPH, "guard": "saferedir", "fp16": "allowed"}
    return _export_graph(backbone, GRAPH, module.eval(), args, inputs, outputs, out_path,
                         sizes={"B": batch, "h": h, "w": w}, exporter=exporter or DEFAULT_EXPORTER,
                         opset=opset or OPSET, metadata=metadata, progress=progress)


def prepare(backbone, weights_dir: Path, image_hw: tuple[int, int] | None = None) -> GuardParts:
    model = SafeRedir.from_pretrained(weights_dir)
    c, spec = model.config, backbone.text_encoders[0]
    if (c.hidden_size, c.max_length, c.latent_channels, c.pooled_dim) != (
            backbone.cross_attention_dim, spec.max_length, backbone.latent_channels, backbone.pooled_dim):
        raise BadInputError(f"--guards saferedir: the weights in {weights_dir} take hidden size {c.hidden_size} "
                            f"(L={c.max_length}, C={c.latent_channels}, pooled {c.pooled_dim or 'none'}) but the "
                            f"{backbone.family} backbone{' ' + backbone.source if backbone.source else ''} has hidden "
                            f"size {backbone.cross_attention_dim} (L={spec.max_length}, C={backbone.latent_channels}, "
                            f"pooled {backbone.pooled_dim or 'none'}): train them for this backbone (`python -m train "
                            f"saferedir --model ... --out {weights_dir}`)")

    def graph(out_dir: Path, common: dict) -> dict:
        return export_redirect(backbone, model, Path(out_dir) / f"{GRAPH}.onnx", height=common.get("height"),
                               width=common.get("width"), dynamic_hw=bool(common.get("dynamic_hw")),
                               exporter=common.get("exporter"), opset=common.get("opset"),
                               progress=common.get("progress"))

    return GuardParts(graphs=[graph], config={"graph": GRAPH, **c.runtime()}, acts_on_flags=True)
