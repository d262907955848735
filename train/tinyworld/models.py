"""tinyworld's model configurations: VAE, text encoder, UNet, scheduler, and the judge classifier.

Sizes were chosen by measurement on a 2-core CPU (DESIGN.md section 6): a factor-4 VAE (16x16x4 latents
for 64x64 images) because an 8x8 latent could not keep round shapes apart; a UNet whose 16x16 level has
no attention (cheap) and whose 8x8 and 4x4 levels cross-attend to the prompt.
"""

from __future__ import annotations

import torch
from torch import nn

from .world import BACKGROUNDS, COLOURS, KINDS

MAX_LENGTH = 16  # tokenizer max length: longest caption is 13 tokens with BOS/EOS
TEXT_HIDDEN = 128
FAMILIES = ("sd1", "sdxl")  # tinyworld (StableDiffusionPipeline) and tinyworld-xl (StableDiffusionXLPipeline)

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(24, 48, 64), layers_per_block=1, norm_num_groups=8,
)

UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=32,
)

# tinyworld-xl: SDXL's structure at tinyworld's size. Encoder 1 is tinyworld's (128 wide, quick GELU, pads
# with EOS); encoder 2 is wider (160, GELU, pads with "!") with a projection whose pooled output feeds the
# UNet's text_time embedding together with the 6 size/crop time ids. Cross-attention sees both encoders'
# penultimate hidden states side by side (128 + 160 = 288 wide), as StableDiffusionXLPipeline feeds them.
TEXT2_HIDDEN = 160
PROJECTION_DIM = 128
ADD_TIME_DIM = 16
NUM_TIME_IDS = 6  # (original h, w, crop top, left, target h, w)

UNET_XL_CONFIG = dict(
    UNET_CONFIG, cross_attention_dim=TEXT_HIDDEN + TEXT2_HIDDEN, use_linear_projection=True,
    transformer_layers_per_block=(1, 1, 2),  # depth 2 at the 4x4 level and in the mid block, as SDXL's deep levels
    addition_embed_type="text_time", addition_time_embed_dim=ADD_TIME_DIM,
    projection_class_embeddings_input_dim=ADD_TIME_DIM * NUM_TIME_IDS + PROJECTION_DIM,
)

SCHEDULER_CONFIG = dict(  # Stable Diffusion's training noise schedule
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


def text_config(vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu", bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )


def text_config_2(vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    """tinyworld-xl's second text encoder (CLIPTextModelWithProjection): OpenCLIP-bigG-like GELU, projection."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT2_HIDDEN, intermediate_size=4 * TEXT2_HIDDEN,
        num_hidden_layers=4, num_attention_heads=5, max_position_embeddings=MAX_LENGTH, hidden_act="gelu",
        projection_dim=PROJECTION_DIM, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def make_unet(family: str = "sd1"):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**(UNET_XL_CONFIG if family == "sdxl" else UNET_CONFIG))


# ---- judge -----------------------------------------------------------------------------------------

JUDGE_HEADS = {"kinds": len(KINDS), "colours": len(COLOURS), "background": len(BACKGROUNDS)}


class Judge(nn.Module):
    """Small CNN over 64x64 RGB in [0, 1]: object kinds present (multi-label, includes the unsafe
    pictograms), colours present (multi-label), background (softmax). ``features`` is the pooled
    embedding used for judge-feature distances."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

        self.body = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w), block(4 * w, 4 * w))
        self.head = nn.Linear(8 * w, sum(JUDGE_HEADS.values()))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x * 2 - 1)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)

    def predict(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Logits per head, and the pooled features they came from."""
        f = self.features(x)
        return dict(zip(JUDGE_HEADS, self.head(f).split(list(JUDGE_HEADS.values()), 1))), f

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.predict(x)[0]
