"""Backbone -> the ONNX graphs of DESIGN.md section 4: text stage(s), denoise step, VAE decoder.

One function per graph; each writes ``out_path`` (plus ``<name>.onnx.data`` when the weights pass 2 GB)
and returns a JSON-ready spec::

    {"name", "path", "inputs": [{"name", "shape", "dtype"}], "outputs": [...], "opset",
     "external_data": "<file name>" | None, "exporter", "family", "export_seconds", "metadata": {...}}

Shapes hold ints for static dims and strings for symbolic ones; the same strings are written as the
ONNX ``dim_param`` of the graph's inputs and outputs:

- ``B``: prompts (text stage, VAE decoder); ``N``: UNet batch, 2B under classifier-free guidance;
- ``h``, ``w``: latent height/width (only with ``dynamic_hw=True``); ``H``, ``W``: image height/width
  (= vae_scale_factor * h); ``h/2``, ``h/4``...: the levels of the UNet (ControlNet residual inputs).

Contracts (each graph equals its PyTorch reference to ~1e-6 in ONNX Runtime; tests/test_export_graphs.py):

- text stage, one graph per text encoder (``text_encoder``, ``text_encoder_2``):
  ``input_ids (B, L) int32`` -> ``hidden (B, L, D)`` exactly what the diffusers pipeline feeds the UNet for
  that encoder with ``clip_skip=None`` (SD 1.x/2.x: ``last_hidden_state``; SDXL: ``hidden_states[-2]`` of
  both encoders, not final-layer-normed), ``eos (B, D)`` the final-layer-normed hidden state at the FIRST
  ``eos_id`` of each row (SD 2.x pads with id 0, SD 1.x pads with EOS: first EOS is right for both; a row
  without any EOS gives position 0), and for SDXL's second encoder ``pooled (B, P)`` (its
  ``text_embeds``). ``L`` is symbolic, at most that tokenizer's max length (77 for real CLIP, 16 for
  tinyworld): the pipeline feeds full-length rows; SafeGuider's search feeds rows cut after their EOS.
- denoise step: ``sample (N, C, h, w)``, ``timestep (1,) float32`` (one timestep for the whole batch,
  broadcast inside; integer DDPM timesteps up to 1000 and Euler's fractional ones are exact enough in
  float32, and the UNet's sinusoidal projection casts to float32 anyway), ``encoder_hidden_states
  (N, L, D)`` (SDXL: both encoders' ``hidden`` concatenated on the last axis), SDXL also ``text_embeds
  (N, P)`` and ``time_ids (N, 6)`` -> ``noise_pred (N, C, h, w)``: the UNet output as the pipeline calls
  it (before guidance, before the scheduler). Extension points for guards: ``DenoiseStep``.
- VAE decoder: ``latent (B, C, h, w)`` as the sampler produces it (scaled) -> ``image (B, 3, H, W)``
  float32 in [0, 1]: un-scaling (``/ scaling_factor``, or SDXL-style ``latents_mean/std`` when the VAE
  config has them), ``vae.decode``, then ``(x / 2 + 0.5).clamp(0, 1)`` (diffusers' postprocess).

Exporters (measured, see export/EXPORTERS.md): ``exporter="dynamo"`` (``torch.onnx.export(dynamo=True)``,
the default) or ``exporter="legacy"`` (TorchScript-based, deprecated by PyTorch). Both give the same
contract; the spec records which one made a graph. Export temporarily switches the attention to the
plain (non-SDPA) processors / CLIP ``eager`` attention, which have an explicit Softmax the FP16
conversion can keep in FP32, and restores the modules' processors and training flags afterwards.

Every graph carries ONNX metadata (``grt.*`` keys): family, graph kind, exporter, and ``grt.fp16``
(``allowed`` or the reason FP16 is refused, e.g. SDXL's VAE), which ``export.fp16`` honours.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import onnx
import torch
from torch import nn

from guards.skips import residual_shapes  # noqa: F401  (the denoise graph's residual inputs; re-exported)

OPSET = 18
"""Default ONNX opset: >= 17 (LayerNormalization), accepted by ONNX Runtime and by TensorRT 10/11's parser."""

EXPORTERS = ("dynamo", "legacy")
DEFAULT_EXPORTER = "dynamo"
"""Chosen by measurement (export/EXPORTERS.md): same parity, single external-data file above 2 GB, symbolic
H/W with divisibility constraints, not deprecated."""

EXTERNAL_DATA_THRESHOLD = 1_800_000_000
"""Weights above this many bytes go to one external file ``<name>.onnx.data`` (protobuf's limit is 2 GiB)."""

Progress = Callable[[str], None]
"""Optional callback: receives short one-line status messages ("denoise: exporting (dynamo)" ...)."""



class ExportError(RuntimeError):
    """A graph that cannot be exported; the message names the graph and what to change."""


# ---------------------------------------------------------------------------------------------------
# I/O description
# ---------------------------------------------------------------------------------------------------

Dim = int | str
"""A static size, or a symbolic one: "B", "N", "h", "w", "H", "W", or a UNet level "h/2", "w/4"."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def _concrete(shape: Sequence[Dim], sizes: dict[str, int]) -> tuple[int, ...]:
    """The dummy size of each dim: ints as they are, symbols looked up in ``sizes`` ("h/2" = sizes["h"]//2)."""
    out = []
    for dim in shape:
        if isinstance(dim, int):
            out.append(dim)
        else:
            base, _, div = dim.partition("/")
            out.append(sizes[base] // int(div or 1))
    return tuple(out)


# ---------------------------------------------------------------------------------------------------
# Modules: text stage, denoise step, VAE decode
# ---------------------------------------------------------------------------------------------------

class TextHead(nn.Module):
    """A guard head fused into a text-stage graph (SafeGuider's classifier): it sees the stage's ``hidden``
    and ``eos`` and returns ``{output name: tensor}`` for the ``outputs`` it declares (symbols ``B``, ``L``)."""

    outputs: tuple[TensorSpec, ...] = ()

    def forward(self, hidden: torch.Tensor, eos: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class TextStage(nn.Module):
    """One CLIP text encoder as the pipeline uses it: int32 ids -> (hidden, eos[, pooled][, head outputs])."""

    def __init__(self, encoder: nn.Module, *, eos_id: int, penultimate: bool, pooled: bool,
                 heads: Sequence[TextHead] = ()):
        super().__init__()
        self.encoder = encoder
        self.eos_id = int(eos_id)
        self.penultimate = penultimate
        self.pooled = pooled
        self.heads = nn.ModuleList(heads)

    def forward(self, input_ids: torch.Tensor):
        ids = input_ids.to(torch.int64)
        out = self.encoder(ids, output_hidden_states=self.penultimate, return_dict=True)
        last = out.last_hidden_state  # final-layer-normed
        hidden = out.hidden_states[-2] if self.penultimate else last
        first_eos = (ids == self.eos_id).to(torch.int32).argmax(dim=-1)  # first max = first EOS
        eos = torch.gather(last, 1, first_eos[:, None, None].expand(-1, 1, last.shape[-1])).squeeze(1)
        outs = (hidden, eos, out.text_embeds) if self.pooled else (hidden, eos)
        for head in self.heads:
            extra = head(hidden, eos)
            outs += tuple(extra[spec.name] for spec in head.outputs)
        return outs


class DenoiseExtension(nn.Module):
    """Extension point for a guard fused into the denoise graph (SafePatch, SafeCtrl, ...).

    Subclass, declare ``inputs`` / ``outputs`` (``TensorSpec`` with the symbols of the module docstring;
    inputs get dummy values of that shape, float32 ``randn`` unless ``dummy`` is overridden), and implement
    one or both hooks. Extensions run in order; each sees every graph input by name.

    - ``before_unet(inputs, unet_kwargs)`` returns updates to the UNet call's keyword arguments, e.g.
      ``down_block_additional_residuals`` / ``mid_block_additional_residual`` (a ControlNet-style branch:
      add to any already present), ``encoder_hidden_states`` (SafeRedir-style redirected embeddings) or
      ``cross_attention_kwargs`` (per-call tensors for custom attention processors installed on the UNet,
      e.g. SafeCtrl's previous smoothed mask).
    - ``after_unet(inputs, noise_pred)`` returns ``(noise_pred, {output_name: tensor})``: the (possibly
      modified) prediction and the extension's extra outputs (new guard state, masks, logits).
    """

    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()

    def dummy(self, spec: TensorSpec, shape: tuple[int, ...]) -> torch.Tensor:
        return _dummy_tensor(spec.dtype, shape)

    def before_unet(self, inputs: dict[str, torch.Tensor], unet_kwargs: dict[str, Any]) -> dict[str, Any]:
        return {}

    def after_unet(self, inputs: dict[str, torch.Tensor], noise_pred: torch.Tensor
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return noise_pred, {}


class DenoiseStep(nn.Module):
    """The UNet call of one sampling step, as a graph: ``forward(*inputs)`` in ``input_specs`` order.

    Extension points: ``residual_inputs=True`` adds ControlNet-style inputs ``down_residual_{i}``
    (shapes of the UNet's skip connections, ``residual_shapes``) and ``mid_residual``, added to the UNet's
    skips exactly like diffusers' ControlNet (zeros = the plain UNet); ``extensions`` adds guard modules
    (``DenoiseExtension``) with their own inputs, UNet-call hooks and outputs. Off by default.
    """

    def __init__(self, unet: nn.Module, *, sdxl: bool, text_length: int, latent_channels: int,
                 spatial: tuple[Dim, Dim], num_time_ids: int | None = None, pooled_dim: int | None = None,
                 residual_inputs: bool = False, extensions: Sequence[DenoiseExtension] = ()):
        super().__init__()
        self.unet = unet
        self.sdxl = sdxl
        self.residual_inputs = residual_inputs
        self.extensions = nn.ModuleList(extensions)
        h, w = spatial
        cross = unet.config.cross_attention_dim
        specs = [TensorSpec("sample", ("N", latent_channels, h, w)), TensorSpec("timestep", (1,)),
                 TensorSpec("encoder_hidden_states", ("N", text_length, cross))]
        if sdxl:
            specs += [TensorSpec("text_embeds", ("N", pooled_dim)), TensorSpec("time_ids", ("N", num_time_ids))]
        self.num_down_residuals = 0
        if residual_inputs:
            down, mid = residual_shapes(unet.config, h, w)
            self.num_down_residuals = len(down)
            specs += [TensorSpec(f"down_residual_{i}", ("N", *shape)) for i, shape in enumerate(down)]
            specs.append(TensorSpec("mid_residual", ("N", *mid)))
        for ext in self.extensions:
            specs += list(ext.inputs)
        self.input_specs = tuple(specs)
        self.output_specs = (TensorSpec("noise_pred", ("N", latent_channels, h, w)),
                             *[spec for ext in self.extensions for spec in ext.outputs])
        names = [spec.name for spec in (*self.input_specs, *self.output_specs)]
        if len(set(names)) != len(names):
            raise ExportError(f"denoise graph: duplicate input/output names {sorted(names)} (rename the "
                              f"extension's inputs/outputs)")

    def forward(self, *tensors: torch.Tensor):
        inputs = dict(zip((spec.name for spec in self.input_specs), tensors))
        sample = inputs["sample"]
        kwargs: dict[str, Any] = {"encoder_hidden_states": inputs["encoder_hidden_states"]}
        if self.sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
        if self.residual_inputs:
            kwargs["down_block_additional_residuals"] = tuple(
                inputs[f"down_residual_{i}"] for i in range(self.num_down_residuals))
            kwargs["mid_block_additional_residual"] = inputs["mid_residual"]
        for ext in self.extensions:
            kwargs.update(ext.before_unet(inputs, kwargs))
        timestep = inputs["timestep"].expand(sample.shape[0])
        noise_pred = self.unet(sample, timestep, return_dict=False, **kwargs)[0]
        extra: dict[str, torch.Tensor] = {}
        for ext in self.extensions:
            noise_pred, out = ext.after_unet(inputs, noise_pred)
            extra.update(out)
        return (noise_pred, *[extra[spec.name] for spec in self.output_specs[1:]])


class VaeDecode(nn.Module):
    """Scaled latent -> image in [0, 1], as the pipeline's decode + postprocess."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        config = vae.config
        self.scaling_factor = float(config.scaling_factor)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        self.has_mean_std = mean is not None and std is not None
        if self.has_mean_std:
            c = config.latent_channels
            self.register_buffer("latents_mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
            self.register_buffer("latents_std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if self.has_mean_std:  # SDXL pipeline: latents * std / scaling_factor + mean
            latents = latent * self.latents_std / self.scaling_factor + self.latents_mean
        else:
            latents = latent / self.scaling_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)


# ---------------------------------------------------------------------------------------------------
# Public export functions
# ---------------------------------------------------------------------------------------------------

def export_text_encoder(backbone, index: int, out_path: str | Path, *, batch: int = 2,
                        heads: Sequence[TextHead] = (), exporter: str = DEFAULT_EXPORTER, opset: int = OPSET,
                        progress: Progress | None = None) -> dict:
    """Export text encoder ``index`` (0, or 1 for SDXL's second) of ``backbone`` as its text-stage graph,
    with the guard ``heads`` fused in (their outputs follow ``hidden``, ``eos`` and ``pooled``)."""
    specs = backbone.text_encoders
    if not 0 <= index < len(specs):
        raise ExportError(f"text encoder index {index} out of range: {backbone.family} has {len(specs)}")
    spec = specs[index]
    encoder = getattr(backbone.pipeline, spec.name)
    sdxl = backbone.family == "sdxl"
    pooled = sdxl and spec.projection_dim is not None and hasattr(encoder, "text_projection")
    module = TextStage(encoder, eos_id=spec.eos_id, penultimate=sdxl, pooled=pooled, heads=heads)
    length = spec.max_length
    # L is symbolic (at most the tokenizer's max length): the pipeline always feeds full-length rows, and a
    # caller that only needs ``eos`` (SafeGuider's search) may feed rows cut after their EOS (causal attention:
    # the EOS state does not depend on the padding after it)
    inputs = (TensorSpec("input_ids", ("B", "L"), "int32"),)
    outputs = [TensorSpec("hidden", ("B", "L", spec.hidden_size)), TensorSpec("eos", ("B", spec.hidden_size))]
    if pooled:
        outputs.append(TensorSpec("pooled", ("B", spec.projection_dim)))
    outputs += [o for head in heads for o in head.outputs]
    args = (dummy_input_ids(spec, batch),)
    metadata = {"graph": "text", "encoder": spec.name, "eos_id": str(spec.eos_id), "pad_id": str(spec.pad_id),
                "hidden_layer": "penultimate" if sdxl else "last", "fp16": "allowed"}
    return _export_graph(backbone, spec.name, module, args, inputs, tuple(outputs), out_path,
                         sizes={"B": batch, "L": length}, exporter=exporter, opset=opset, metadata=metadata,
                         progress=progress, limits={"L": length})


def export_denoise(backbone, out_path: str | Path, *, height: int | None = None, width: int | None = None,
                   dynamic_hw: bool = False, batch: int = 2, residual_inputs: bool = False,
                   extensions: Sequence[DenoiseExtension] = (), exporter: str = DEFAULT_EXPORTER,
                   opset: int = OPSET, progress: Progress | None = None, name: str = "denoise") -> dict:
    """Export the denoise step (UNet call, plus optional guard extensions) of ``backbone`` as graph ``name``
    (``denoise``; ``denoise_idle`` for a guarded bundle's idle variant, see ``export/idle.py``).

    ``height``/``width`` are image pixels (default: the backbone's image size) and must be multiples of
    ``vae_scale_factor * 2**(UNet levels - 1)``; with ``dynamic_hw`` they only size the dummy input and the
    graph takes any such multiple. ``batch`` is the dummy N (>= 2 so the axis stays dynamic)."""
    unet = backbone.unet
    h, w = _latent_size(backbone, height, width, multiple=unet_multiple(unet))
    sdxl = backbone.family == "sdxl"
    lengths = {spec.max_length for spec in backbone.text_encoders}
    if len(lengths) != 1:
        raise ExportError(f"denoise graph: the text encoders' max lengths differ ({sorted(lengths)}); the "
                          f"concatenated encoder_hidden_states need one length")
    module = DenoiseStep(unet, sdxl=sdxl, text_length=lengths.pop(), latent_channels=backbone.latent_channels,
                         spatial=("h", "w") if dynamic_hw else (h, w), num_time_ids=backbone.num_time_ids,
                         pooled_dim=backbone.pooled_dim, residual_inputs=residual_inputs, extensions=extensions)
    sizes = {"N": batch, "h": h, "w": w}
    extra_dummies = {spec.name: ext.dummy(spec, _concrete(spec.shape, sizes))
                     for ext in module.extensions for spec in ext.inputs}
    args = tuple(extra_dummies[s.name] if s.name in extra_dummies else _denoise_dummy(s, sizes, backbone)
                 for s in module.input_specs)
    metadata = {"graph": name, "timestep": "(1,) float32, broadcast to N",
                "latent_multiple": str(unet_multiple(unet)), "fp16": "allowed",
                "residual_inputs": str(residual_inputs).lower(),
                "extensions": ",".join(type(ext).__name__ for ext in module.extensions)}
    return _export_graph(backbone, name, module, args, module.input_specs, module.output_specs, out_path,
                         sizes=sizes, exporter=exporter, opset=opset, metadata=metadata, progress=progress,
                         multiples={"h": unet_multiple(unet), "w": unet_multiple(unet)})


def export_vae_decoder(backbone, out_path: str | Path, *, height: int | None = None, width: int | None = None,
                       dynamic_hw: bool = False, batch: int = 2, exporter: str = DEFAULT_EXPORTER,
                       opset: int = OPSET, progress: Progress | None = None) -> dict:
    """Export latent (scaled) -> image in [0, 1]. SDXL's VAE is marked FP32-only (it overflows in FP16)."""
    h, w = _latent_size(backbone, height, width, multiple=1)
    f = backbone.vae_scale_factor
    c = backbone.latent_channels
    if dynamic_hw:
        inputs = (TensorSpec("latent", ("B", c, "h", "w")),)
        outputs = (TensorSpec("image", ("B", 3, "H", "W")),)
    else:
        inputs = (TensorSpec("latent", ("B", c, h, w)),)
        outputs = (TensorSpec("image", ("B", 3, h * f, w * f)),)
    generator = torch.Generator().manual_seed(0)
    args = (torch.randn(batch, c, h, w, generator=generator),)
    fp16 = ("refused: SDXL's VAE overflows in FP16 (keep it FP32)" if backbone.family == "sdxl" else "allowed")
    metadata = {"graph": "vae_decoder", "vae_scale_factor": str(f),
                "vae_scaling_factor": repr(backbone.vae_scaling_factor), "fp16": fp16}
    return _export_graph(backbone, "vae_decoder", VaeDecode(backbone.vae), args, inputs, outputs, out_path,
                         sizes={"B": batch, "h": h, "w": w}, exporter=exporter, opset=opset, metadata=metadata,
                         progress=progress)


def export_all(backbone, out_dir: str | Path, *, height: int | None = None, width: int | None = None,
               dynamic_hw: bool = False, text_heads: Sequence[TextHead] = (), residual_inputs: bool = False,
               extensions: Sequence[DenoiseExtension] = (), exporter: str = DEFAULT_EXPORTER, opset: int = OPSET,
               progress: Progress | None = None) -> list[dict]:
    """Every graph of ``backbone`` into ``out_dir`` (``<name>.onnx``); returns the specs in pipeline order.

    Guards: ``text_heads`` go into the first text encoder's graph; ``residual_inputs`` / ``extensions`` into
    the denoise graph (see :class:`DenoiseStep`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(exporter=exporter, opset=opset, progress=progress)
    specs = [export_text_encoder(backbone, i, out / f"{enc.name}.onnx", heads=text_heads if i == 0 else (),
                                 **common)
             for i, enc in enumerate(backbone.text_encoders)]
    specs.append(export_denoise(backbone, out / "denoise.onnx", height=height, width=width,
                                dynamic_hw=dynamic_hw, residual_inputs=residual_inputs, extensions=extensions,
                                **common))
    specs.append(export_vae_decoder(backbone, out / "vae_decoder.onnx", height=height, width=width,
                                    dynamic_hw=dynamic_hw, **common))
    return specs


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------

def unet_multiple(unet) -> int:
    """Latent sides must be multiples of this: 2 ** (number of downsamplings)."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


def dummy_input_ids(spec, batch: int, *, seed: int = 0) -> torch.Tensor:
    """(batch, L) int32 ids shaped like a tokenizer's: BOS, tokens, EOS at a different place per row, then
    the pad id (which is the EOS for SD 1.x, id 0 for SD 2.x)."""
    generator = torch.Generator().manual_seed(seed)
    length = spec.max_length
    special = {spec.bos_id, spec.eos_id, spec.pad_id}
    ordinary = torch.tensor([i for i in range(min(spec.vocab_size, 4096)) if i not in special], dtype=torch.int32)
    ids = torch.full((batch, length), spec.pad_id, dtype=torch.int32)
    for row in range(batch):
        end = 1 + (3 + 5 * row) % max(1, length - 2)  # EOS position, 1 .. L-2
        pick = torch.randint(0, len(ordinary), (end - 1,), generator=generator)
        ids[row, 0] = spec.bos_id
        ids[row, 1:end] = ordinary[pick]
        ids[row, end] = spec.eos_id
    return ids


def _dummy_tensor(dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if dtype.startswith("int"):
        return torch.zeros(shape, dtype=getattr(torch, dtype))
    return torch.randn(shape, generator=generator, dtype=getattr(torch, dtype))


def _denoise_dummy(spec: TensorSpec, sizes: dict[str, int], backbone) -> torch.Tensor:
    shape = _concrete(spec.shape, sizes)
    if spec.name == "timestep":
        return torch.tensor([500.0])
    if spec.name == "time_ids":
        h, w = sizes["h"] * backbone.vae_scale_factor, sizes["w"] * backbone.vae_scale_factor
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(shape[0], -1).contiguous()
    return _dummy_tensor(spec.dtype, shape)


def _latent_size(backbone, height: int | None, width: int | None, *, multiple: int) -> tuple[int, int]:
    f = backbone.vae_scale_factor
    height = backbone.image_size if height is None else int(height)
    width = backbone.image_size if width is None else int(width)
    step = f * multiple
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % step:
            raise ExportError(f"{name}={value} is not a positive multiple of {step} (VAE factor {f} x UNet "
                              f"downsampling {multiple}); pick e.g. {max(step, round(value / step) * step)}")
    return height // f, width // f


@contextlib.contextmanager
def _export_mode(*modules: nn.Module):
    """Eval mode, plain attention processors (diffusers) and eager attention (transformers) for export;
    everything restored afterwards. Custom (guard) processors are left in place."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    saved_training = [(m, m.training) for module in modules for m in module.modules()]
    saved_processors, saved_attn_impl, covered = [], [], set()
    for module in modules:
        for sub in module.modules():
            if id(sub) in covered:  # inside a model already handled (its attn_processors include this one's)
                continue
            if hasattr(sub, "attn_processors") and hasattr(sub, "set_attn_processor"):
                covered.update(id(m) for m in sub.modules())
                processors = dict(sub.attn_processors)  # set_attn_processor empties the dict it gets
                saved_processors.append((sub, dict(processors)))
                if any(type(p) is AttnProcessor2_0 for p in processors.values()):
                    sub.set_attn_processor({name: AttnProcessor() if type(p) is AttnProcessor2_0 else p
                                            for name, p in processors.items()})
            config = getattr(sub, "config", None)
            if hasattr(config, "_attn_implementation") and hasattr(sub, "set_attn_implementation"):
                saved_attn_impl.append((sub, config._attn_implementation))
    for sub, _ in saved_attn_impl:
        sub.set_attn_implementation("eager")
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in saved_training:
            m.training = training
        for sub, processors in reversed(saved_processors):
            sub.set_attn_processor(dict(processors))
        for sub, impl in reversed(saved_attn_impl):
            with contextlib.suppress(Exception):
                sub.set_attn_implementation(impl)


def _param_bytes(module: nn.Module) -> int:
    seen = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def _export_graph(backbone, name: str, module: nn.Module, args: tuple, inputs: Sequence[TensorSpec],
                  outputs: Sequence[TensorSpec], out_path: str | Path, *, sizes: dict[str, int], exporter: str,
                  opset: int, metadata: dict[str, str], progress: Progress | None,
                  multiples: dict[str, int] | None = None, limits: dict[str, int] | None = None) -> dict:
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r} (use one of {', '.join(EXPORTERS)})")
    if opset < 17:
        raise ExportError(f"opset {opset} is too old: the graphs need >= 17 (LayerNormalization)")
    if sizes.get("B", 2) < 2 or sizes.get("N", 2) < 2:
        raise ExportError(f"{name}: the dummy batch must be >= 2 or the exporter fixes the batch axis to 1")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    external = _param_bytes(module) > EXTERNAL_DATA_THRESHOLD
    data_name = out_path.name + ".data" if external else None
    for stale in (out_path, out_path.with_name(out_path.name + ".data")):
        stale.unlink(missing_ok=True)
    say = progress or (lambda message: None)
    say(f"{name}: exporting ({exporter}, opset {opset})")
    start = time.perf_counter()
    with _export_mode(module), torch.no_grad():
        if exporter == "dynamo":
            _export_dynamo(module, args, out_path, inputs, outputs, opset, external, multiples or {}, limits or {})
        else:
            _export_legacy(module, args, out_path, inputs, outputs, opset, external)
    seconds = time.perf_counter() - start
    _finish(out_path, inputs, outputs, {"family": backbone.family, "exporter": exporter, **metadata})
    say(f"{name}: exported in {seconds:.1f} s -> {out_path}")
    return {"name": name, "path": str(out_path), "inputs": [s.as_dict() for s in inputs],
            "outputs": [s.as_dict() for s in outputs], "opset": opset, "external_data": data_name,
            "exporter": exporter, "family": backbone.family, "export_seconds": round(seconds, 3),
            "metadata": {k: str(v) for k, v in metadata.items()}}


def _symbols(specs: Sequence[TensorSpec]) -> dict[str, dict[int, str]]:
    return {s.name: {axis: dim for axis, dim in enumerate(s.shape) if isinstance(dim, str)} for s in specs}


def _export_dynamo(module, args, out_path: Path, inputs, outputs, opset, external, multiples, limits):
    from torch.export import Dim

    dims: dict[str, Any] = {}

    def dim(symbol: str):
        base, _, div = symbol.partition("/")
        div = int(div or 1)
        mult = multiples.get(base, 1)
        if base not in dims:
            dims[base] = Dim(f"{base}_{mult}" if mult > 1 else base, min=1, max=limits.get(base, 1 << 16))
        if mult % div:
            raise ExportError(f"dynamic dim {symbol}: {base} is a multiple of {mult}, not of {div}")
        coeff = mult // div
        return dims[base] if coeff == 1 else coeff * dims[base]

    dynamic_shapes = tuple({axis: dim(sym) for axis, sym in _symbols([spec])[spec.name].items()} or None
                           for spec in inputs)
    try:
        program = torch.onnx.export(module, args, None, dynamo=True, input_names=[s.name for s in inputs],
                                    output_names=[s.name for s in outputs], opset_version=opset,
                                    dynamic_shapes=(dynamic_shapes,) if _is_varargs(module) else dynamic_shapes,
                                    optimize=True, verbose=False)
    except Exception as exc:
        raise ExportError(f"dynamo export of {type(module).__name__} failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:300] if str(exc) else ''}); try exporter='legacy'") from exc
    program.save(str(out_path), external_data=external)


def _is_varargs(module: nn.Module) -> bool:
    import inspect

    parameters = inspect.signature(module.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)


def _export_legacy(module, args, out_path: Path, inputs, outputs, opset, external):
    dynamic_axes = {name: axes for name, axes in _symbols([*inputs, *outputs]).items() if axes}
    with tempfile.TemporaryDirectory(prefix=".export_", dir=out_path.parent) as scratch:
        tmp = Path(scratch) / out_path.name
        try:
            torch.onnx.export(module, args, str(tmp), dynamo=False, input_names=[s.name for s in inputs],
                              output_names=[s.name for s in outputs], dynamic_axes=dynamic_axes,
                              opset_version=opset, do_constant_folding=True)
        except Exception as exc:
            raise ExportError(f"legacy export of {type(module).__name__} failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300] if str(exc) else ''}); try exporter='dynamo'") from exc
        if external:  # the legacy exporter writes one file per tensor above 2 GB: gather them into one
            model = onnx.load(str(tmp), load_external_data=True)
            onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=out_path.name + ".data", size_threshold=1024)
        else:
            shutil.move(str(tmp), out_path)


def _finish(path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], metadata: dict[str, str]):
    """Write the spec's dim names onto the graph's inputs/outputs and the ``grt.*`` metadata (weights untouched)."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    for values, specs in ((graph.input, inputs), (graph.output, outputs)):
        by_name = {v.name: v for v in values}
        for spec in specs:
            if spec.name not in by_name:
                raise ExportError(f"exported graph {path.name} lacks {spec.name!r} (has {sorted(by_name)})")
            dims = by_name[spec.name].type.tensor_type.shape.dim
            if len(dims) != len(spec.shape):
                raise ExportError(f"{path.name}: {spec.name} has rank {len(dims)}, expected {len(spec.shape)}")
            for axis, (d, want) in enumerate(zip(dims, spec.shape)):
                if isinstance(want, int):
                    if d.HasField("dim_value") and d.dim_value != want:
                        raise ExportError(f"{path.name}: {spec.name} axis {axis} has size {d.dim_value} where "
                                          f"{want} was expected")
                    d.dim_value = want
                else:
                    if values is graph.input and d.HasField("dim_value"):
                        raise ExportError(f"{path.name}: the exporter fixed {spec.name} axis {axis} to "
                                          f"{d.dim_value} where {want!r} should stay symbolic (a dummy size of 1 "
                                          f"specialises an axis: use >= 2)")
                    d.dim_param = want
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"grt.{key}", str(value)
    onnx.save_model(model, str(path))
