"""SDXL bundles in the lean runtime: two tokenizers, two text stages, ``text_embeds``/``time_ids``, parity with
diffusers' StableDiffusionXLPipeline (DDIM and Euler, with and without a negative prompt, the
``force_zeros_for_empty_prompt`` default), per-tokenizer truncation, and the CLI staying lean.

The bundle is built once per session from a tiny random-weight SDXL (``export.families.make_tiny``) with the real
``python -m export build`` CLI, FP32 and the legacy exporter (same graph contract, ~7x faster to export here than
dynamo; the exporters themselves are compared in tests/test_export_graphs.py).
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from runtime.errors import BundleError
from runtime.pipeline import Pipeline, _check_family, initial_noise

from .conftest import ROOT
from .test_generate import run_cli, stderr_lines

PROMPT = "a cat sitting on a wooden chair next to a window"
NEGATIVE = "a dog running across a green field"
STEPS, GUIDANCE, SEED, SHAPE = 8, 5.0, 3, (1, 4, 32, 32)  # tiny SDXL: VAE factor 2, 64x64 images


@pytest.fixture(scope="session")
def sdxl_model(tmp_path_factory):
    from export.families import make_tiny

    return make_tiny("sdxl", tmp_path_factory.mktemp("sdxl") / "tiny")


@pytest.fixture(scope="session")
def sdxl_plan(sdxl_model):
    out = sdxl_model.parent / "sdxl.plan"
    proc = subprocess.run([sys.executable, "-m", "export", "build", "--model", str(sdxl_model), "--out", str(out),
                           "--precision", "fp32", "--exporter", "legacy"],  # 64x64: the tiny SDXL's own size
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def pipe(sdxl_plan):
    with Pipeline.open(sdxl_plan) as p:
        yield p


@pytest.fixture(scope="module")
def reference_pipe(sdxl_model):
    import torch
    from diffusers import StableDiffusionXLPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny UNet is ~8x slower on a shared, oversubscribed CPU with many threads
    ref = StableDiffusionXLPipeline.from_pretrained(sdxl_model, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    yield ref
    torch.set_num_threads(threads)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def _reference(reference_pipe, pipe, scheduler, negative_prompt):
    import diffusers
    import torch

    classes = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler}
    reference_pipe.scheduler = classes[scheduler].from_config(pipe.scheduler_config)
    _, noise = initial_noise(SEED, SHAPE)  # unit noise: diffusers multiplies latents= by init_noise_sigma
    return reference_pipe(PROMPT, negative_prompt=negative_prompt, num_inference_steps=STEPS,
                          guidance_scale=GUIDANCE, latents=torch.from_numpy(noise), height=64, width=64,
                          output_type="np").images[0]


# -- parity with diffusers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("negative", ["", NEGATIVE], ids=["no-negative", "negative"])
def test_matches_diffusers(scheduler, negative, pipe, reference_pipe):
    """Empty negative prompt = diffusers' ``negative_prompt=None``: zero uncond embeddings (force_zeros)."""
    ref = _reference(reference_pipe, pipe, scheduler, negative or None)
    r = pipe.generate(PROMPT, negative_prompt=negative, steps=STEPS, guidance=GUIDANCE, seed=SEED, scheduler=scheduler)
    psnr = _psnr(r.images[0] / 255.0, ref)
    print(f"PSNR lean vs diffusers SDXL, {scheduler}, negative={negative!r}: {psnr:.2f} dB")
    assert psnr >= 40, f"{scheduler}, negative={negative!r}: PSNR {psnr:.1f} dB < 40 dB"
    assert r.report["family"] == "sdxl"


def test_force_zeros_for_empty_prompt(pipe, reference_pipe):
    """The default zeroes the uncond rows; switched off, the empty negative prompt is encoded like diffusers'
    ``negative_prompt=""`` - and the two images differ, so the parity test above does tell them apart."""
    assert pipe.force_zeros_for_empty_prompt is True  # no manifest key -> SDXL's default
    text = pipe._encode_text([tok(["", PROMPT]) for _, _, tok in pipe.tokenizers], True, "")
    assert set(text) == {"hidden", "eos", "hidden_2", "eos_2", "pooled_2"}
    for key in ("hidden", "hidden_2", "pooled_2"):
        assert not text[key][0].any() and text[key][1].any()
    feeds = pipe._conditioning(text, 2, 64, 48)
    assert feeds["encoder_hidden_states"].shape == (4, 77, 96) and feeds["text_embeds"].shape == (4, 48)
    assert not feeds["encoder_hidden_states"][:2].any() and not feeds["text_embeds"][:2].any()
    np.testing.assert_array_equal(feeds["time_ids"], np.tile([64, 48, 0, 0, 64, 48], (4, 1)).astype(np.float32))

    ref = _reference(reference_pipe, pipe, "ddim", "")
    zeros = pipe.generate(PROMPT, steps=STEPS, guidance=GUIDANCE, seed=SEED, scheduler="ddim").images[0]
    pipe.force_zeros_for_empty_prompt = False
    try:
        encoded = pipe.generate(PROMPT, steps=STEPS, guidance=GUIDANCE, seed=SEED, scheduler="ddim").images[0]
    finally:
        pipe.force_zeros_for_empty_prompt = True
    assert _psnr(encoded / 255.0, ref) >= 40
    assert _psnr(zeros / 255.0, ref) < 30


def test_tokenizers_match_transformers(pipe, sdxl_model):
    """Both lean tokenizers equal transformers' on the folder's tokenizers; the second pads with id 0. A literal
    ``!`` is the one difference: transformers 5 maps it to the pad id 0 in ``tokenizer_2``, the lean tokenizer
    keeps OpenCLIP's ``!</w>`` token (see runtime/pipeline.py's docstring)."""
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    assert [(name, graph) for name, graph, _ in pipe.tokenizers] == [("tokenizer", "text_encoder"),
                                                                     ("tokenizer_2", "text_encoder_2")]
    prompts = ["", PROMPT, NEGATIVE, "A  Castle, on a HILL?", "a " + "bowl of fresh fruit " * 20]
    for name, _, lean in pipe.tokenizers:
        hf = HFCLIPTokenizer.from_pretrained(sdxl_model / name)
        want = hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
        np.testing.assert_array_equal(lean(prompts).input_ids, want)
        bang_hf = hf("a cat!").input_ids
        bang_lean = lean.tokenize("a cat!")
        if name == "tokenizer":
            assert lean.pad_id == lean.eos_id and bang_lean == bang_hf
        else:
            assert lean.pad_id == 0 and bang_hf[-2] == 0 and bang_lean[-2] == lean.vocab["!</w>"]
            assert bang_lean[:-2] == bang_hf[:-2]


def test_truncation_is_reported_per_tokenizer(pipe):
    long = "a " + "bowl of fresh fruit " * 20
    r = pipe.generate(long, negative_prompt=NEGATIVE, steps=1)
    assert r.report["truncated"] == {"negative_prompt": False, "prompt": True}
    assert r.report["truncated_by_tokenizer"] == {name: {"negative_prompt": False, "prompt": True}
                                                  for name in ("tokenizer", "tokenizer_2")}
    assert len(r.report["warnings"]) == 2
    assert all("77-token limit" in w for w in r.report["warnings"])
    assert "(tokenizer)" in r.report["warnings"][0] and "(tokenizer_2)" in r.report["warnings"][1]

    r = pipe.generate(PROMPT, guidance=1.0, steps=1)  # cond rows only: no uncond half to zero
    assert r.report["truncated_by_tokenizer"]["tokenizer_2"] == {"prompt": False} and not r.report["warnings"]
    assert r.images[0].shape == (64, 64, 3)


# -- the CLI stays lean -----------------------------------------------------------------------------------------


def test_generate_cli_runs_sdxl_without_heavy_imports(sdxl_plan, tmp_path):
    png, report = tmp_path / "x.png", tmp_path / "x.json"
    proc = run_cli("generate", "--engine", str(sdxl_plan), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                   "--steps", "4", "--batch", "2", "--out", str(png), "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    heavy = [line for line in proc.stderr.splitlines() if line.startswith("HEAVY=")]
    assert heavy == ["HEAVY="], f"the runtime child imported heavy modules: {heavy}"
    assert not any("Traceback" in line for line in stderr_lines(proc))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-0.png", "x-1.png", "x.json"]
    r = json.loads(report.read_text())
    assert r["family"] == "sdxl" and r["batch"] == 2 and len(r["stages_ms"]["denoise_steps"]) == 4
    assert set(r["truncated_by_tokenizer"]) == {"tokenizer", "tokenizer_2"}


# -- incomplete SDXL bundles ------------------------------------------------------------------------------------


def _manifest(denoise_inputs, tokenizers=2, pooled=True, time_ids=6):
    spec = lambda name, shape=("N",): SimpleNamespace(name=name, shape=list(shape))  # noqa: E731
    comps = {
        "text_encoder": SimpleNamespace(outputs=[spec("hidden"), spec("eos")]),
        "text_encoder_2": SimpleNamespace(outputs=[spec("hidden"), spec("eos")] + ([spec("pooled")] if pooled else [])),
        "denoise": SimpleNamespace(inputs=[spec(n, ("N", time_ids) if n == "time_ids" else ("N",))
                                           for n in denoise_inputs]),
        "vae_decoder": SimpleNamespace(),
    }
    return SimpleNamespace(family="sdxl", tokenizers=[{}] * tokenizers, component=comps.__getitem__)


@pytest.mark.parametrize("kwargs, message", [
    (dict(denoise_inputs=("sample", "timestep", "encoder_hidden_states", "text_embeds")), "lacks input(s) time_ids"),
    (dict(denoise_inputs=("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"), tokenizers=1),
     "1 tokenizer entries"),
    (dict(denoise_inputs=("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"), pooled=False),
     "text_encoder_2 lacks output(s) pooled"),
    (dict(denoise_inputs=("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"), time_ids=5),
     "a refiner"),
])
def test_incomplete_sdxl_bundle_is_refused_clearly(kwargs, message):
    bundle = SimpleNamespace(manifest=_manifest(**kwargs), path="x.plan")
    with pytest.raises(BundleError, match="not a complete SDXL bundle") as e:
        _check_family(bundle)
    assert message in str(e.value) and "python -m export build" in str(e.value)


def test_complete_sdxl_manifest_passes(sdxl_plan):
    from runtime.bundle import Bundle

    with Bundle.open(sdxl_plan) as b:
        _check_family(b)
        assert [t["encoder"] for t in b.manifest.tokenizers] == ["text_encoder", "text_encoder_2"]
        assert [t["pad_id"] for t in b.manifest.tokenizers] == [b.manifest.tokenizers[0]["eos_id"], 0]
