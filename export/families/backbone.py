"""``Backbone``: a loaded SD 1.x / SD 2.x / SDXL pipeline plus the facts later stages need about it.

Export and the runtime need more than the diffusers pipeline object: the width of each text encoder,
the tokenizer's special ids (SD 2.x pads with ``!`` = id 0, so "last non-pad token" is not the EOS),
SDXL's pooled width and number of time ids, the latent shape and scaling. ``Backbone.from_pipeline``
reads them once, checks they agree with each other, and ``describe`` turns them into a JSON report.

Family detection. The pipeline class separates SDXL (``StableDiffusionXLPipeline``) from SD 1.x/2.x
(``StableDiffusionPipeline``). SD 1.x and SD 2.x share a pipeline class and differ in three places,
each of which fine-tunes usually keep: the UNet's transformer blocks use linear instead of 1x1-conv
projections (``use_linear_projection``), the text encoder is OpenCLIP with GELU instead of OpenAI CLIP
with quick-GELU (``hidden_act``), and the tokenizer pads with ``!`` instead of ``<|endoftext|>``. A
pipeline is called SD 2.x when at least two of the three say so, SD 1.x otherwise. Pass ``family=`` to
override the guess for an SD pipeline (an SDXL pipeline is always ``sdxl``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

FAMILIES = ("sd1", "sd2", "sdxl")

PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": ("sd1", "sd2"),
    "StableDiffusionXLPipeline": ("sdxl",),
}
"""Supported pipeline classes (``_class_name`` in ``model_index.json``) and the families each can be."""

TEXT_ENCODER_PAIRS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


class BackboneError(ValueError):
    """A backbone that cannot be loaded or saved; the message is one line naming the input and the fix."""

    @staticmethod
    def reason(exc: BaseException, limit: int = 300) -> str:
        """The first line of a wrapped library exception, so no trace text reaches the message."""
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        text = lines[0] if lines else "no details"
        if len(text) > limit:
            text = text[: limit - 3] + "..."
        return f"{type(exc).__name__}: {text}"


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder and its tokenizer, as the text stage sees them."""

    name: str                   # pipeline attribute: "text_encoder" or "text_encoder_2"
    tokenizer_name: str         # "tokenizer" or "tokenizer_2"
    model_class: str            # CLIPTextModel, or CLIPTextModelWithProjection (SDXL's second encoder)
    hidden_size: int            # width of the hidden states the UNet cross-attends to
    num_layers: int
    hidden_act: str             # quick_gelu (OpenAI CLIP) or gelu (OpenCLIP)
    projection_dim: int | None  # width of the pooled ``text_embeds`` (with-projection models only)
    vocab_size: int
    max_length: int             # tokenizer model_max_length (77 for real CLIP)
    bos_id: int
    eos_id: int
    pad_id: int


@dataclass
class Backbone:
    """A diffusers pipeline of a supported family and its static description."""

    pipeline: DiffusionPipeline
    family: str                       # "sd1" | "sd2" | "sdxl"
    text_encoders: list[TextEncoderSpec]
    cross_attention_dim: int          # UNet encoder_hidden_states width (SDXL: both encoders concatenated)
    pooled_dim: int | None            # SDXL: width of the pooled text embedding fed to the UNet
    num_time_ids: int | None          # SDXL: length of ``time_ids`` (6: original size, crop, target size)
    latent_channels: int
    vae_scale_factor: int             # image size / latent size = 2 ** (VAE levels - 1)
    vae_scaling_factor: float         # latents = vae.encode(x).sample() * vae_scaling_factor
    prediction_type: str              # scheduler's: "epsilon" | "v_prediction" | "sample"
    sample_size: int                  # UNet's default latent size
    source: str | None = None         # where it was loaded from
    dtype: torch.dtype = field(default=torch.float32)

    @property
    def unet(self):
        return self.pipeline.unet

    @property
    def vae(self):
        return self.pipeline.vae

    @property
    def scheduler(self):
        return self.pipeline.scheduler

    @property
    def image_size(self) -> int:
        """The default image side in pixels."""
        return self.sample_size * self.vae_scale_factor

    @classmethod
    def from_pipeline(cls, pipeline: DiffusionPipeline, *, family: str | None = None,
                      source: str | Path | None = None) -> "Backbone":
        """Describe an already built pipeline; ``family`` overrides SD 1.x/2.x detection."""
        name = f"{source}" if source is not None else type(pipeline).__name__
        family = resolve_family(pipeline, family, name)
        text_encoders = [_text_encoder_spec(pipeline, enc, tok) for enc, tok in TEXT_ENCODER_PAIRS
                         if getattr(pipeline, enc, None) is not None]
        unet, vae = pipeline.unet, pipeline.vae
        expected_encoders = 2 if family == "sdxl" else 1
        if len(text_encoders) != expected_encoders:
            raise BackboneError(f"{name}: a {family} backbone needs {expected_encoders} text encoder(s), found "
                                f"{len(text_encoders)} (load the full base pipeline, not a refiner or a part)")
        cross = unet.config.cross_attention_dim
        widths = sum(spec.hidden_size for spec in text_encoders)
        if cross != widths:
            raise BackboneError(f"{name}: the UNet cross-attends to width {cross} but the text encoder(s) give "
                                f"{widths} (the components come from different models; use a matching set)")
        latent_channels = vae.config.latent_channels
        if unet.config.in_channels != latent_channels or unet.config.out_channels != latent_channels:
            raise BackboneError(f"{name}: the UNet takes {unet.config.in_channels} channels but the VAE makes "
                                f"{latent_channels} (inpainting/depth variants are not supported; use a "
                                f"text-to-image checkpoint)")
        pooled_dim = num_time_ids = None
        if family == "sdxl":
            pooled_dim = text_encoders[-1].projection_dim
            time_width = unet.config.projection_class_embeddings_input_dim - pooled_dim
            num_time_ids = time_width // unet.config.addition_time_embed_dim
        sample_size = unet.config.sample_size
        return cls(
            pipeline=pipeline, family=family, text_encoders=text_encoders, cross_attention_dim=cross,
            pooled_dim=pooled_dim, num_time_ids=num_time_ids, latent_channels=latent_channels,
            vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
            vae_scaling_factor=float(vae.config.scaling_factor),
            prediction_type=pipeline.scheduler.config.get("prediction_type", "epsilon"),
            sample_size=int(sample_size if isinstance(sample_size, int) else sample_size[0]),
            source=str(source) if source is not None else None, dtype=unet.dtype)


def detect_family(pipeline: DiffusionPipeline) -> str:
    """"sdxl" for an SDXL pipeline; for an SD pipeline the majority of the three SD 2.x signals."""
    if isinstance(pipeline, StableDiffusionXLPipeline):
        return "sdxl"
    return "sd2" if sum(sd2_signals(pipeline).values()) >= 2 else "sd1"


def sd2_signals(pipeline: DiffusionPipeline) -> dict[str, bool]:
    """The three SD 2.x markers of an SD pipeline (see the module docstring)."""
    tokenizer = getattr(pipeline, "tokenizer", None)
    text_encoder = getattr(pipeline, "text_encoder", None)
    return {
        "unet.use_linear_projection": bool(pipeline.unet.config.get("use_linear_projection", False)),
        "text_encoder.hidden_act=gelu": text_encoder is not None and text_encoder.config.hidden_act == "gelu",
        "tokenizer.pad_token=!": tokenizer is not None and tokenizer.pad_token == "!",
    }


def resolve_family(pipeline: DiffusionPipeline, family: str | None, name: str) -> str:
    """Check ``family`` against the pipeline class, or detect it."""
    allowed = _families_of(pipeline)
    if allowed is None:
        raise BackboneError(f"{name}: unsupported pipeline class {type(pipeline).__name__} (supported: "
                            f"{', '.join(PIPELINE_FAMILIES)})")
    if family is None:
        return detect_family(pipeline)
    if family not in FAMILIES:
        raise BackboneError(f"{name}: unknown family {family!r} (use one of {', '.join(FAMILIES)})")
    if family not in allowed:
        raise BackboneError(f"{name}: family={family!r} does not fit a {type(pipeline).__name__} (it can be "
                            f"{' or '.join(allowed)}; drop family= to detect it)")
    return family


def describe(backbone: Backbone) -> dict:
    """A JSON-serialisable report of the backbone (no tensors)."""
    pipeline = backbone.pipeline
    components = {name: (type(obj).__name__ if obj is not None else None)
                  for name, obj in sorted(pipeline.components.items())}
    parameters = {name: sum(p.numel() for p in obj.parameters())
                  for name, obj in sorted(pipeline.components.items()) if isinstance(obj, torch.nn.Module)}
    report = {
        "family": backbone.family,
        "pipeline": type(pipeline).__name__,
        "source": backbone.source,
        "dtype": str(backbone.dtype).removeprefix("torch."),
        "components": components,
        "parameters": parameters,
        "text_encoders": [asdict(spec) for spec in backbone.text_encoders],
        "cross_attention_dim": backbone.cross_attention_dim,
        "pooled_dim": backbone.pooled_dim,
        "num_time_ids": backbone.num_time_ids,
        "latent_channels": backbone.latent_channels,
        "vae_scale_factor": backbone.vae_scale_factor,
        "vae_scaling_factor": backbone.vae_scaling_factor,
        "prediction_type": backbone.prediction_type,
        "sample_size": backbone.sample_size,
        "image_size": backbone.image_size,
        "scheduler": type(backbone.scheduler).__name__,
    }
    if backbone.family != "sdxl":
        report["sd2_signals"] = sd2_signals(pipeline)
    return report


def _families_of(pipeline: DiffusionPipeline) -> tuple[str, ...] | None:
    # the exact class: img2img/inpaint subclasses take other inputs than the text-to-image graphs
    return PIPELINE_FAMILIES.get(type(pipeline).__name__)


def _text_encoder_spec(pipeline: DiffusionPipeline, encoder_name: str, tokenizer_name: str) -> TextEncoderSpec:
    encoder = getattr(pipeline, encoder_name)
    tokenizer = getattr(pipeline, tokenizer_name)
    config = encoder.config
    has_projection = hasattr(encoder, "text_projection")
    max_length = tokenizer.model_max_length
    if max_length > 100_000:  # transformers' "no limit" sentinel: fall back to the position table
        max_length = config.max_position_embeddings
    return TextEncoderSpec(
        name=encoder_name, tokenizer_name=tokenizer_name, model_class=type(encoder).__name__,
        hidden_size=config.hidden_size, num_layers=config.num_hidden_layers, hidden_act=config.hidden_act,
        projection_dim=config.projection_dim if has_projection else None, vocab_size=config.vocab_size,
        max_length=int(max_length), bos_id=int(tokenizer.bos_token_id), eos_id=int(tokenizer.eos_token_id),
        pad_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id))
