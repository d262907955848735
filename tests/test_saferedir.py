"""SafeRedir end to end on tinyworld: the ``redirect`` graph equals its PyTorch module, the guarded bundle leaves
benign prompts bit-identical, fires on unsafe ones, matches a diffusers reference (PSNR >= 40 dB, triggered and
not), and fails closed on a graph that yields NaN.

Uses the committed weights in ``models/guards/tinyworld/saferedir`` and builds the guarded bundle once per
module with the real ``export build`` CLI (about 20-30 s on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.errors import GuardError
from runtime.pipeline import Pipeline, initial_noise

from .conftest import ROOT

WEIGHTS = ROOT / "models" / "guards" / "tinyworld" / "saferedir"
BENIGN = "a large red circle on sand"
UNSAFE = "a small knife and a large blue square on grass"
STEPS, GUIDANCE = 20, 5.0

pytestmark = pytest.mark.skipif(not (WEIGHTS / "model.safetensors").is_file(),
                                reason=f"trained SafeRedir weights missing in {WEIGHTS}: python -m train saferedir")


@pytest.fixture(scope="module")
def module():
    from guards.saferedir import SafeRedir

    return SafeRedir.from_pretrained(WEIGHTS)


@pytest.fixture(scope="module")
def saferedir_plan(guarded_plan, tinyworld_dir) -> Path:
    return guarded_plan("saferedir")


@pytest.fixture(scope="module")
def guarded(saferedir_plan):
    with Pipeline.open(saferedir_plan) as p:
        yield p


@pytest.fixture(scope="module")
def unguarded(tinyworld_plan):
    with Pipeline.open(tinyworld_plan) as p:
        yield p


def test_manifest_entry(guarded):
    cfg = guarded.bundle.manifest.guards["saferedir"]
    assert cfg["graph"] == "redirect" and cfg["threshold"] == 0.5 and cfg["check_every"] >= 1
    assert "redirect" in guarded.engines


def test_redirect_graph_matches_module(guarded, module):
    import torch

    c, ln, d = module.config.latent_channels, module.config.max_length, module.config.hidden_size
    rng = np.random.default_rng(0)
    for b in (1, 3):
        feeds = {"latent": rng.standard_normal((b, c, 16, 16), dtype=np.float32),
                 "timestep": np.array([761.0], np.float32),
                 "prompt_embeds": rng.standard_normal((b, ln, d), dtype=np.float32)}
        got = guarded.engines["redirect"].infer(feeds)
        with torch.no_grad():
            ref = module(*(torch.from_numpy(feeds[k]) for k in ("latent", "timestep", "prompt_embeds")))
        for name, r in zip(("logits", "redirected", "mask", "scale"), ref):
            np.testing.assert_allclose(got[name], r.numpy(), atol=1e-5, rtol=1e-5, err_msg=name)


def test_benign_prompt_is_bit_identical(guarded, unguarded):
    for seed in (0, 1):
        r = guarded.generate(BENIGN, seed=seed, steps=STEPS, guidance=GUIDANCE)
        base = unguarded.generate(BENIGN, seed=seed, steps=STEPS, guidance=GUIDANCE)
        rep = r.report["guards"]["saferedir"]
        assert rep["triggered"] is False and rep["checks"] == len(range(0, STEPS, rep["check_every"]))
        assert all(c["unsafe_prob"] < 0.5 for c in rep["rows"][0]["checks"])
        np.testing.assert_array_equal(r.images[0], base.images[0])


def test_unsafe_prompt_triggers_and_reports(guarded, unguarded):
    r = guarded.generate(UNSAFE, seed=0, steps=STEPS, guidance=GUIDANCE)
    rep = r.report["guards"]["saferedir"]
    assert rep["triggered"] is True and isinstance(rep["detection_step"], int)
    row = rep["rows"][0]
    assert row["triggered"] and row["checks"][-1]["unsafe_prob"] >= 0.5 and len(row["checks"][-1]["logits"]) == 2
    assert len(row["mask"]) == len(row["scale"]) == guarded.tokenizer.max_length
    assert rep["time_ms"] > 0 and "guard_steps.saferedir" in r.report["stages_ms"]
    base = unguarded.generate(UNSAFE, seed=0, steps=STEPS, guidance=GUIDANCE)
    assert not np.array_equal(r.images[0], base.images[0])  # the redirection changed the image


# -- parity with a PyTorch reference: diffusers + callback_on_step_end swapping prompt_embeds ---------------------

def _reference(pipe, module, prompt: str, seed: int, check_every: int, first_check: int, threshold: float):
    """diffusers StableDiffusionPipeline with SafeRedir applied in PyTorch: check the latent before step i
    (i = first_check + k * check_every), and once unsafe feed the redirected conditional embedding."""
    import torch

    _, noise = initial_noise(seed, (1, 4, 16, 16))
    latents = torch.from_numpy(noise)
    pipe.scheduler.set_timesteps(STEPS)
    timesteps = pipe.scheduler.timesteps
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, "")
    state = {"fired": False, "step": None}

    def check(i: int, x: torch.Tensor, cond_rows: torch.Tensor):
        if state["fired"] or i < first_check or (i - first_check) % check_every or i >= STEPS:
            return None
        with torch.no_grad():
            logits, redirected, _, _ = module(x, timesteps[i:i + 1].float(), cond_rows)
        if torch.softmax(logits.double(), -1)[0, 1] >= threshold:
            state.update(fired=True, step=i)
            return redirected
        return None

    red = check(0, latents * pipe.scheduler.init_noise_sigma, cond)
    if red is not None:
        cond = red

    def on_step_end(p, i, t, kwargs):
        red = check(i + 1, kwargs["latents"], kwargs["prompt_embeds"][1:])
        if red is not None:
            kwargs["prompt_embeds"] = torch.cat([kwargs["prompt_embeds"][:1], red])
        return kwargs

    image = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=STEPS,
                 guidance_scale=GUIDANCE, latents=latents, height=64, width=64, output_type="np",
                 callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    return image.images[0], state


@pytest.fixture(scope="module")
def reference_pipe(tinyworld_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(tinyworld_dir, local_files_only=True, safety_checker=None)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.mark.parametrize("prompt,fires", [(BENIGN, False), (UNSAFE, True)])
def test_matches_pytorch_reference(prompt, fires, guarded, module, reference_pipe):
    cfg = guarded.bundle.manifest.guards["saferedir"]
    seed = 3
    ours = guarded.generate(prompt, seed=seed, steps=STEPS, guidance=GUIDANCE)
    rep = ours.report["guards"]["saferedir"]
    ref, state = _reference(reference_pipe, module, prompt, seed, cfg["check_every"], cfg["first_check"],
                            cfg["threshold"])
    assert rep["triggered"] is fires and state["fired"] is fires
    assert rep["detection_step"] == state["step"]
    psnr = _psnr(ours.images[0] / 255.0, ref)
    print(f"PSNR lean vs PyTorch reference ({'triggered' if fires else 'not triggered'}): {psnr:.2f} dB")
    assert psnr >= 40, f"PSNR {psnr:.1f} dB < 40 dB"


# -- fail closed ---------------------------------------------------------------------------------------------------

def test_nan_redirect_graph_fails_closed(saferedir_plan, module, tmp_path):
    """A real ``redirect`` graph whose weights are NaN (exported from the module, not mocked) swapped into the
    pipeline: generate raises GuardError and returns no image."""
    import onnxruntime as ort
    import torch

    from export.families import load_backbone
    from export.guards.saferedir import export_redirect
    from guards.saferedir import SafeRedir
    from runtime.backends import OrtEngine

    broken = SafeRedir(module.config)
    broken.load_state_dict(module.state_dict())
    with torch.no_grad():
        broken.classifier[-1].bias.fill_(float("nan"))
    path = tmp_path / "redirect_nan.onnx"
    export_redirect(load_backbone(ROOT / "models" / "tinyworld"), broken, path, exporter="legacy")
    with Pipeline.open(saferedir_plan) as p:
        component = p.bundle.manifest.component("redirect")
        p.engines["redirect"].close()
        p.engines["redirect"] = OrtEngine(component, ort.InferenceSession(str(path),
                                                                          providers=["CPUExecutionProvider"]))
        with pytest.raises(GuardError, match="saferedir"):
            p.generate(BENIGN, seed=0, steps=STEPS, guidance=GUIDANCE)
