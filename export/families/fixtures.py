"""Tiny random-weight backbones of each family's real architecture, built from config without the hub.

``make_tiny("sd1" | "sd2" | "sdxl", out_dir)`` writes a complete diffusers folder (``model_index.json``,
one subfolder per component, safetensors weights) whose component classes, block layout and
family-specific switches match the real models — SD 1.x: quick-GELU CLIP, conv projections in the
transformer blocks, ``<|endoftext|>`` padding; SD 2.x: GELU CLIP, linear projections, per-block head
dims, ``!`` (id 0) padding, optionally v-prediction; SDXL: two text encoders (the second with a
projection whose pooled output feeds the UNet's ``text_time`` embedding), cross-attention over both
hidden states concatenated — at sizes a CPU test runs in milliseconds. The sizes follow diffusers' own
pipeline tests (``get_dummy_components``); the tokenizers are trained on a small English corpus by
``export.families.clip_tokenizer.build_clip_tokenizer``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from runtime.tokenizer import EOS
from .clip_tokenizer import build_clip_tokenizer

from .backbone import FAMILIES

CORPUS = [
    "a photograph of an astronaut riding a horse on the moon",
    "a watercolor painting of a red fox in a snowy forest",
    "a cat sitting on a wooden chair next to a window",
    "a dog running across a green field at sunset",
    "portrait of an old man with a grey beard, oil on canvas",
    "a bowl of fresh fruit on a kitchen table",
    "a city street at night with neon lights and rain",
    "a small boat on a calm lake surrounded by mountains",
    "a castle on a hill under a cloudy sky",
    "a close up photo of a yellow flower with water drops",
    "two children playing with a ball in the park",
    "a bicycle leaning against a brick wall",
    "a cup of coffee and a book on a desk",
    "a lighthouse on a rocky coast during a storm",
    "an owl sitting on a branch in the moonlight",
    "a plate of pasta with tomato sauce and basil",
    "a train crossing a bridge over a river",
    "a beach with palm trees and blue water",
    "a robot reading a newspaper in a cafe",
    "a house in the woods covered in snow",
]
"""Prompts the fixture tokenizers are trained on (and tests can draw from)."""

_TOKENIZER_MERGES = 300
_MAX_LENGTH = 77


def make_tiny(family: str, out_dir: str | Path, *, seed: int = 0, prediction_type: str | None = None) -> Path:
    """Build a tiny random-weight ``family`` backbone with ``torch.manual_seed(seed)`` and save it as a
    diffusers folder at ``out_dir`` (created; returned). ``prediction_type`` ("epsilon",
    "v_prediction") overrides the scheduler's, which is the family's usual one (epsilon)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: choose one of {', '.join(FAMILIES)}")
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="tiny_tokenizers_") as scratch:
        scratch = Path(scratch)
        if family == "sdxl":
            pipe = _tiny_sdxl(scratch, seed, prediction_type)
        else:
            pipe = _tiny_sd(family, scratch, seed, prediction_type)
        pipe.save_pretrained(out, safe_serialization=True)
        # transformers 5 saves only tokenizer.json; keep CLIP's own files next to it like real checkpoints
        # (the lean runtime tokenizer reads vocab.json + merges.txt).
        for name in ("tokenizer", "tokenizer_2"):
            if (scratch / name).is_dir():
                for file in ("vocab.json", "merges.txt", "special_tokens_map.json"):
                    shutil.copyfile(scratch / name / file, out / name / file)
    return out


SD15_UNET_CONFIG = {"sample_size": 64, "cross_attention_dim": 768}
"""SD 1.5's UNet: diffusers' UNet2DConditionModel defaults + these (also bench/training_cost.py's FLOP count)."""
SD15_VAE_CONFIG = {"in_channels": 3, "out_channels": 3, "latent_channels": 4,
                   "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
                   "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
                   "sample_size": 512, "scaling_factor": 0.18215}
"""SD 1.5's VAE (SDXL's has the same architecture)."""


def make_sd15_architecture(out_dir: str | Path, *, seed: int = 0) -> Path:
    """The real SD 1.5 architecture with random weights (for opt-in latency/memory measurements, no hub):
    CLIP ViT-L/14 text encoder (768 wide, 12 layers, 49408 ids, 77 positions), SD 1.5's UNet (859.5 M
    parameters, cross-attention 768) and VAE (8x, 4 latent channels), PNDM/DDIM schedule as published.
    The tokenizer is the fixture tokenizer (a small vocabulary; ids fit the 49408-row embedding). ~4.3 GB."""
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="sd15_tokenizer_") as scratch:
        tokenizer = _tokenizer(Path(scratch) / "tokenizer", pad_token=EOS)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(out, safe_serialization=True)
        for file in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            shutil.copyfile(Path(scratch) / "tokenizer" / file, out / "tokenizer" / file)
    return out


def _tiny_sd(family: str, scratch: Path, seed: int, prediction_type: str | None) -> StableDiffusionPipeline:
    """SD 1.x / 2.x: one CLIP text encoder, UNet with cross-attention at the higher resolution."""
    sd2 = family == "sd2"
    tokenizer = _tokenizer(scratch / "tokenizer", pad_token="!" if sd2 else EOS)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_act="gelu" if sd2 else "quick_gelu",
                                              projection_dim=32))
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_encoder.config.hidden_size,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
    )
    vae = _vae(scaling_factor=0.18215)
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                    clip_sample=False, set_alpha_to_one=False)
    if sd2:
        scheduler = DDIMScheduler(**schedule, prediction_type=prediction_type or "epsilon")
    else:
        scheduler = PNDMScheduler(**{k: v for k, v in schedule.items() if k != "clip_sample"},
                                  skip_prk_steps=True, prediction_type=prediction_type or "epsilon")
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _tiny_sdxl(scratch: Path, seed: int, prediction_type: str | None) -> StableDiffusionXLPipeline:
    """SDXL: CLIP-L-like encoder 1 (quick GELU, pads with EOS) and OpenCLIP-bigG-like encoder 2 (GELU,
    projection, pads with ``!``) of different widths, so the UNet's cross-attention width is their sum."""
    tokenizer = _tokenizer(scratch / "tokenizer", pad_token=EOS)
    tokenizer_2 = _tokenizer(scratch / "tokenizer_2", pad_token="!")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_size=32, hidden_act="quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer_2, hidden_size=64, hidden_act="gelu", projection_dim=48))
    addition_time_embed_dim = 8
    num_time_ids = 6  # original size (2), crop top-left (2), target size (2)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=(addition_time_embed_dim * num_time_ids
                                               + text_encoder_2.config.projection_dim),
    )
    vae = _vae(scaling_factor=0.13025, force_upcast=True)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading",
                                       prediction_type=prediction_type or "epsilon")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=scheduler, add_watermarker=False)


def _tokenizer(directory: Path, *, pad_token: str) -> CLIPTokenizer:
    build_clip_tokenizer(CORPUS, directory, merges=_TOKENIZER_MERGES, max_length=_MAX_LENGTH,
                         pad_token=pad_token)
    return CLIPTokenizer.from_pretrained(directory, local_files_only=True)


def _text_config(tokenizer: CLIPTokenizer, *, hidden_act: str, hidden_size: int = 32,
                 projection_dim: int = 32) -> CLIPTextConfig:
    """A 2-layer CLIP text config whose vocabulary and special ids are the tokenizer's."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, hidden_act=hidden_act,
        projection_dim=projection_dim, layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _vae(*, scaling_factor: float, force_upcast: bool = False) -> AutoencoderKL:
    """Two resolution levels: a latent 2x smaller than the image (real VAEs have four levels, 8x)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        sample_size=64, scaling_factor=scaling_factor, force_upcast=force_upcast)
