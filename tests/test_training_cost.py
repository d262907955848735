"""bench/training_cost.py: the meta-device FLOP count equals the count on real weights, and the recipe's image /
UNet-call counts equal the hand count. No timing assertions."""

import torch

from bench import training_cost as tc


def test_meta_count_equals_cpu_count_on_tinyworld_unet():
    torch.set_num_threads(1)
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    cfg = tc.arches()["tinyworld"]["unet"]
    meta = tc._meta_unet(cfg)
    cpu = UNet2DConditionModel.from_config(cfg).eval()
    cpu.set_attn_processor(AttnProcessor())
    n = tc.arches()["tinyworld"]["text"][0]["max_position_embeddings"]
    meta_flops = tc.unet_forward_flops(meta, 1, n)
    assert meta_flops == tc.unet_forward_flops(cpu, 1, n, device="cpu") > 0
    assert tc.unet_forward_flops(meta, 2, n) == 2 * meta_flops  # CFG batch 2 = 2 batch-1 calls


def test_recipe_counts_by_hand():
    costs = {"unet_forward": 10, "vae": {"decode": 3, "encode": 1, "latent": [4, 2, 2]}}
    r = {"pairs": 3, "candidates": 2, "benign": 5, "steps": 4, "fewshot": 0, "safeguider_prompts": 0}
    d = tc.data_step(costs, r, image=8)
    assert d["images"] == 3 * (1 + 2) + 5 == 14
    assert d["unet_calls"] == 2 * 4 * 14 == 112          # CFG: 2 batch-1 forwards per sampling step
    assert d["flops"] == 112 * 10 + 14 * 3
    traj = 4 * 4 * 2 * 2 * 2                              # S x C x h x w x float16
    assert d["disk_model_bytes"] == 3 * (2 * 64 * 3 + 64 + traj) + 5 * (64 * 3 + traj)
