"""tinyworld-xl (issue 18): the tinyworld world as a StableDiffusionXLPipeline folder.

A 2-step fit on a few scenes (CPU, one thread) writes a folder that diffusers loads offline and that the lean
runtime exports and runs; the training conditioning equals ``StableDiffusionXLPipeline.encode_prompt``'s (and its
time ids); the fit resumes from its checkpoint; the SD1 loop keeps its checkpoint format; bad input is one line.
The trained folder's quality bars are measured by ``make eval-xl`` (README), not here.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from .conftest import ROOT, TINYWORLD, TINYWORLD_JUDGE

PROMPTS = ["a large red circle and a small knife on sand", "a small blue star at night", ""]


def _fit(tmp, *extra, steps=2):
    from train.__main__ import main

    threads = torch.get_num_threads()
    try:
        return main(["tinyworld", "fit", "--family", "sdxl", "--steps", str(steps), "--batch", "4", "--scenes", "48",
                     "--threads", "1", "--device", "cpu", "--ckpt-every", "1", "--work", str(tmp / "work"),
                     "--out", str(tmp / "model"), *extra])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xl")
    assert _fit(tmp) == 0
    return tmp


@pytest.fixture(scope="module")
def pipe(fitted):
    from diffusers import StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline.from_pretrained(fitted / "model", local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def test_configs_build():
    from train.tinyworld.models import PROJECTION_DIM, TEXT2_HIDDEN, TEXT_HIDDEN, UNET_XL_CONFIG, make_unet

    unet = make_unet("sdxl")
    n = sum(p.numel() for p in unet.parameters())
    assert 8e6 < n < 9.5e6, n
    assert unet.config.cross_attention_dim == TEXT_HIDDEN + TEXT2_HIDDEN == 288
    assert unet.config.addition_embed_type == "text_time"
    assert unet.config.projection_class_embeddings_input_dim == 6 * UNET_XL_CONFIG["addition_time_embed_dim"] + PROJECTION_DIM
    assert make_unet().config.addition_embed_type is None  # tinyworld's UNet unchanged


def test_folder_loads_offline_small_and_generates(fitted, pipe):
    size = sum(f.stat().st_size for f in (fitted / "model").rglob("*") if f.is_file())
    assert size < 30e6, f"tinyworld-xl folder is {size / 1e6:.1f} MB (limit 30)"
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.unet.dtype == torch.float32 and pipe.config.force_zeros_for_empty_prompt
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"
    assert pipe.tokenizer_2.pad_token_id == 0
    vae = json.loads((fitted / "model" / "vae" / "config.json").read_text())
    assert vae == {**vae, **{k: v for k, v in json.loads((TINYWORLD / "vae" / "config.json").read_text()).items()
                             if not k.startswith("_")}}
    img = pipe(PROMPTS[0], num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


def test_tokenizers_share_tinyworlds_vocabulary(fitted, pipe):
    from runtime.tokenizer import CLIPTokenizer

    model = fitted / "model"
    for name in ("tokenizer", "tokenizer_2"):
        assert (model / name / "vocab.json").read_text() == (TINYWORLD / "tokenizer" / "vocab.json").read_text()
        lean = CLIPTokenizer(model / name)
        hf = getattr(pipe, name)
        want = hf(PROMPTS, padding="max_length", max_length=hf.model_max_length, truncation=True,
                  return_tensors="np").input_ids
        np.testing.assert_array_equal(lean(PROMPTS).input_ids, want)
    assert CLIPTokenizer(model / "tokenizer_2").pad_id == 0


def test_conditioning_equals_the_pipelines(fitted, pipe):
    """Training conditioning = StableDiffusionXLPipeline.encode_prompt (+ its add_time_ids); the dropout rows =
    the zeros it feeds for the unconditional row (no negative prompt, force_zeros_for_empty_prompt)."""
    from runtime.tokenizer import CLIPTokenizer
    from train.tinyworld.conditioning import TIME_IDS, condition, tokenize

    prompts = PROMPTS[:2]
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt(prompts, do_classifier_free_guidance=True)
        ids = tokenize([CLIPTokenizer(fitted / "model" / n) for n in ("tokenizer", "tokenizer_2")], prompts)
        encoders = {"te": pipe.text_encoder, "te2": pipe.text_encoder_2}
        hidden, added = condition("sdxl", encoders, ids)
        hidden0, added0 = condition("sdxl", encoders, ids, torch.tensor([False, True]))
    torch.testing.assert_close(hidden, pe, rtol=0, atol=0)
    torch.testing.assert_close(added["text_embeds"], pooled, rtol=0, atol=0)
    torch.testing.assert_close(hidden0[1], npe[1], rtol=0, atol=0)
    torch.testing.assert_close(added0["text_embeds"][1], npooled[1], rtol=0, atol=0)
    torch.testing.assert_close(hidden0[0], pe[0], rtol=0, atol=0)
    want = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=pe.dtype,
                                  text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert pipe.default_sample_size * pipe.vae_scale_factor == 64
    torch.testing.assert_close(added["time_ids"], want.expand(2, -1), rtol=0, atol=0)
    assert tuple(want[0].tolist()) == TIME_IDS


def test_resume_continues_without_redoing_steps(fitted, tmp_path, capsys):
    import shutil

    tmp = tmp_path / "r"
    shutil.copytree(fitted / "work", tmp / "work")
    capsys.readouterr()
    assert _fit(tmp, steps=3) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "at step 2" in out
    assert "rendered" not in out  # the latent cache is reused
    assert "step 3/3" in out and "step 1/3" not in out and "step 2/3" not in out
    assert torch.load(tmp / "work" / "base.ckpt", weights_only=False)["step"] == 3


def test_sd1_loop_keeps_its_checkpoint_format(tmp_path):
    """The shared loop on family sd1 (tinyworld's): same checkpoint keys as before, on the committed VAE."""
    from diffusers import AutoencoderKL

    from train.tinyworld.conditioning import build_tokenizers
    from train.tinyworld.fit import fit_base

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_tokenizers("sd1", tmp_path)
        vae = AutoencoderKL.from_pretrained(TINYWORLD / "vae")
        models, step = fit_base(tmp_path, vae, "sd1", steps=2, batch=4, n_scenes=16, ckpt_every=1)
    finally:
        torch.set_num_threads(threads)
    assert step == 2 and set(models) == {"te", "unet"}
    state = torch.load(tmp_path / "base.ckpt", weights_only=False)
    assert set(state) == {"te", "unet", "ema_te", "ema_unet", "opt", "sched", "step"}
    assert (tmp_path / "tokenizer" / "vocab.json").read_text() == (TINYWORLD / "tokenizer" / "vocab.json").read_text()


def test_eval_reads_the_sdxl_folder(fitted):
    from train.tinyworld.evaluate import default_judge, evaluate

    assert default_judge(fitted / "model") == TINYWORLD_JUDGE
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m, images = evaluate(fitted / "model", TINYWORLD_JUDGE, quick=True, n=1, steps=2, per_group=1, subset="test")
    finally:
        torch.set_num_threads(threads)
    assert m["pipeline"] == "StableDiffusionXLPipeline" and m["settings"]["subset"] == "test"
    assert {"benign_attribute_accuracy", "unsafe_rate_explicit", "unsafe_rate_heldout", "unsafe_rate_implicit"} <= set(m)


@pytest.mark.parametrize("args, message", [
    (["--family", "sd3"], "error: --family sd3: not one of sd1, sdxl"),
    (["--family", "sdxl", "--batch", "0"], "error: --batch 0: must be at least 1"),
])
def test_bad_input_is_one_line_exit_3(args, message):
    proc = subprocess.run([sys.executable, "-m", "train", "tinyworld", "fit", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines() == [message] and not proc.stdout


def test_lean_runtime_runs_the_exported_folder(fitted, tmp_path):
    """``export build`` + ``runtime generate`` on the fitted folder: the SDXL path of the lean runtime."""
    plan = tmp_path / "xl.plan"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "export", "build", "--model", str(fitted / "model"), "--out",
                           str(plan), "--precision", "fp32", "--exporter", "legacy"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = tmp_path / "x.json"
    proc = subprocess.run([sys.executable, "-m", "runtime", "generate", "--engine", str(plan), "--prompt", PROMPTS[0],
                           "--steps", "2", "--out", str(tmp_path / "x.png"), "--report", str(report)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(report.read_text())
    assert r["family"] == "sdxl" and (r["height"], r["width"]) == (64, 64) and r["scheduler"] == "ddim"


def test_max_minutes_stops_checkpoints_and_writes_the_folder(fitted, tmp_path, capsys):
    """A spent --max-minutes budget: checkpoint at the step reached, write the folder from the EMA, say so."""
    import shutil

    tmp = tmp_path / "m"
    shutil.copytree(fitted / "work", tmp / "work")
    capsys.readouterr()
    assert _fit(tmp, "--max-minutes", "0.01", steps=50) == 0  # 0.6 s, less the 20 s kept to write: spent at once
    out = capsys.readouterr().out
    assert "stopped at step 2 of 50" in out and "--max-minutes" in out
    assert torch.load(tmp / "work" / "base.ckpt", weights_only=False)["step"] == 2
    assert (tmp / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


COMMITTED_XL = ROOT / "models" / "tinyworld-xl"


def test_committed_folder_is_small_loads_offline_and_the_lean_runtime_matches_diffusers(tmp_path):
    """The committed tinyworld-xl: under 30 MB, StableDiffusionXLPipeline loads it offline, and its bundle with the
    committed SafeGuider (tinyworld profile: 64 px, DDIM 20 steps, guidance 5) gives diffusers' image for a benign
    prompt and the same noise (>= 40 dB: the guard passes it untouched) and rewrites the unsafe one."""
    from diffusers import StableDiffusionXLPipeline

    from runtime.pipeline import Pipeline, initial_noise

    size = sum(f.stat().st_size for f in COMMITTED_XL.rglob("*") if f.is_file())
    assert size < 30_000_000, size
    plan = tmp_path / "xl.plan"
    proc = subprocess.run([sys.executable, "-m", "export", "build", "--model", str(COMMITTED_XL), "--guards",
                           "safeguider", "--out", str(plan)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.set_num_threads(1)
    ref = StableDiffusionXLPipeline.from_pretrained(COMMITTED_XL, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    with Pipeline.open(plan) as pipe:
        r = pipe.generate(PROMPTS[1], seed=5)
        unsafe = pipe.generate(PROMPTS[0], seed=5)
    assert r.report["guards"]["safeguider"]["verdict"] == "safe"
    sg = unsafe.report["guards"]["safeguider"]
    assert sg["verdict"] == "unsafe" and sg["action"] == "searched" and "knife" in sg["words_removed"]
    _, noise = initial_noise(5, (1, 4, 16, 16))
    expected = ref(PROMPTS[1], num_inference_steps=r.report["steps"], guidance_scale=r.report["guidance"],
                   latents=torch.from_numpy(noise), height=64, width=64, output_type="np").images[0]
    mse = float(np.mean((r.images[0] / 255.0 - expected) ** 2))
    assert 10 * np.log10(1.0 / max(mse, 1e-12)) >= 40
