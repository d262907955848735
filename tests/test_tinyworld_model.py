"""The committed tinyworld model and judge: loadable offline by diffusers, small, consistent, accurate."""

import json

import numpy as np
import torch

from runtime.tokenizer import CLIPTokenizer
from train.tinyworld.data import render_split
from train.tinyworld.evaluate import judge_images, load_judge
from train.tinyworld.fit import judge_metrics


def test_folder_is_small(tinyworld_dir, judge_dir):
    size = sum(f.stat().st_size for d in (tinyworld_dir, judge_dir) for f in d.rglob("*") if f.is_file())
    assert size <= 30 * 2**20, f"{size / 2**20:.1f} MiB"


def test_stable_diffusion_pipeline_loads_offline_and_renders(tinyworld_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tinyworld_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == torch.float32
    out = pipe("a large red circle on sand", num_inference_steps=3, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all() and out.std() > 0.01


def test_text_encoder_ids_match_tokenizer(tinyworld_dir):
    tok = CLIPTokenizer(tinyworld_dir / "tokenizer")
    cfg = json.loads((tinyworld_dir / "text_encoder" / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert cfg["max_position_embeddings"] == tok.max_length == 16
    assert cfg["vocab_size"] == len(tok.vocab)
    vae = json.loads((tinyworld_dir / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] != 0.18215, "latent scaling factor must be measured, not SD's default"


def test_judge_accuracy_on_heldout_renders(judge_dir):
    judge = load_judge(judge_dir)
    renders = render_split("eval", 400, seed=101)  # evaluation split, seeds never used in training
    m = judge_metrics(judge, renders)
    assert m["object_accuracy"] >= 0.98, m
    assert m["unsafe_accuracy"] >= 0.98, m
    assert m["colour_accuracy"] >= 0.95, m
    v = judge_images(judge, renders.images[:8])
    assert v.features.shape[0] == 8 and np.isfinite(v.features).all()
