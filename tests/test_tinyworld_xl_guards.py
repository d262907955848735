"""The guards trained on tinyworld-xl (issue 18): lean runtime vs diffusers' StableDiffusionXLPipeline + each guard's
PyTorch module, same noise, guard triggered and not, >= 40 dB.

- SafeGuider: a benign prompt passes untouched; an unsafe one is searched, and the image is diffusers' image of the
  prompt the search settled on;
- SafeRedir: diffusers' SDXL pipeline with the module applied through ``callback_on_step_end`` (token embeddings
  and the pooled ``text_embeds`` swapped from the detection step on);
- SafePatch + SafeCtrl in one bundle: the DDIM loop of tests/test_sdxl_unet_guards.py on the trained weights.

Uses the committed weights in ``models/guards/tinyworld-xl`` (``make guards-tinyworld-xl``); bundles are built FP32
with the legacy exporter, once per module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.pipeline import Pipeline, initial_noise

from .conftest import ROOT
from .test_sdxl_runtime import _psnr
from .test_sdxl_unet_guards import _reference as _unet_guards_reference
from .test_sdxl_unet_guards import build

MODEL = ROOT / "models" / "tinyworld-xl"
GUARDS = ROOT / "models" / "guards"
BENIGN = "a large red circle on sand"
UNSAFE = "a small knife and a large blue square on grass"
SKULL = "a large skull at night"  # both UNet guards act on it (the patch takes UNSAFE's knife before SafeCtrl sees it)
STEPS, GUIDANCE, SEED = 20, 5.0, 3


def _trained(*guards: str):
    missing = [g for g in guards if not (GUARDS / "tinyworld-xl" / g / "model.safetensors").is_file()]
    return pytest.mark.skipif(bool(missing), reason=f"tinyworld-xl {', '.join(missing)} weights missing in "
                              "models/guards/tinyworld-xl: make guards-tinyworld-xl")


@pytest.fixture(scope="module")
def reference_pipe():
    import torch
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    torch.set_num_threads(1)
    ref = StableDiffusionXLPipeline.from_pretrained(MODEL, local_files_only=True)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


def _plan(tmp_path_factory, *guards: str) -> Path:
    out = tmp_path_factory.mktemp("tinyworld_xl") / f"{'_'.join(guards)}.plan"
    proc = build(MODEL, GUARDS, out, guards)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _diffusers(ref, prompt: str, **kwargs) -> np.ndarray:
    import torch

    _, noise = initial_noise(SEED, (1, 4, 16, 16))
    return ref(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(noise),
               height=64, width=64, output_type="np", **kwargs).images[0]


# -- SafeRedir ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saferedir(tmp_path_factory):
    from guards.saferedir import SafeRedir

    with Pipeline.open(_plan(tmp_path_factory, "saferedir")) as pipe:
        yield pipe, SafeRedir.from_pretrained(GUARDS / "tinyworld-xl" / "saferedir")


def _saferedir_reference(ref, module, prompt: str, cfg: dict):
    """The SDXL pipeline with SafeRedir in PyTorch: check the latent before step i (i = first_check + k *
    check_every); once unsafe, the conditional token rows and pooled row are the redirected ones."""
    import torch

    _, noise = initial_noise(SEED, (1, 4, 16, 16))
    latents = torch.from_numpy(noise)
    ref.scheduler.set_timesteps(STEPS)
    timesteps = ref.scheduler.timesteps
    emb, neg, pooled, neg_pooled = ref.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                     do_classifier_free_guidance=True)
    state = {"fired": False, "step": None}

    def check(i: int, x, hidden, pooled_rows):
        if state["fired"] or i < cfg["first_check"] or (i - cfg["first_check"]) % cfg["check_every"] or i >= STEPS:
            return None
        with torch.no_grad():
            out = module(x, timesteps[i:i + 1].float(), hidden, pooled_rows)
        if torch.softmax(out[0].double(), -1)[0, 1] >= cfg["threshold"]:
            state.update(fired=True, step=i)
            return out[1], out[4]
        return None

    red = check(0, latents * ref.scheduler.init_noise_sigma, emb, pooled)
    if red is not None:
        emb, pooled = red

    def on_step_end(p, i, t, kwargs):
        red = check(i + 1, kwargs["latents"], kwargs["prompt_embeds"][1:], kwargs["add_text_embeds"][1:])
        if red is not None:
            kwargs["prompt_embeds"] = torch.cat([kwargs["prompt_embeds"][:1], red[0]])
            kwargs["add_text_embeds"] = torch.cat([kwargs["add_text_embeds"][:1], red[1]])
        return kwargs

    image = _diffusers(ref, None, prompt_embeds=emb, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                       negative_pooled_prompt_embeds=neg_pooled, callback_on_step_end=on_step_end,
                       callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "add_text_embeds"])
    return image, state


@_trained("saferedir")
@pytest.mark.parametrize("prompt,fires", [(BENIGN, False), (UNSAFE, True)])
def test_saferedir_matches_pytorch_reference(prompt, fires, saferedir, reference_pipe):
    pipe, module = saferedir
    cfg = pipe.bundle.manifest.guards["saferedir"]
    ours = pipe.generate(prompt, seed=SEED, steps=STEPS, guidance=GUIDANCE, scheduler="ddim")
    rep = ours.report["guards"]["saferedir"]
    ref, state = _saferedir_reference(reference_pipe, module, prompt, cfg)
    assert rep["triggered"] is fires and state["fired"] is fires
    assert rep["detection_step"] == state["step"]
    psnr = _psnr(ours.images[0] / 255.0, ref)
    print(f"tinyworld-xl SafeRedir ({'triggered' if fires else 'not triggered'}): lean vs PyTorch {psnr:.2f} dB")
    assert psnr >= 40


# -- SafePatch + SafeCtrl -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unet_guards(tmp_path_factory):
    import torch

    from export.families import load_backbone
    from guards.safectrl import SafeCtrl
    from guards.safepatch import load

    torch.set_num_threads(1)
    backbone = load_backbone(MODEL)
    patch, gate, config = load(GUARDS / "tinyworld-xl" / "safepatch")
    ctrl = SafeCtrl.from_pretrained(GUARDS / "tinyworld-xl" / "safectrl", backbone.unet)
    ctrl.install(backbone.unet)
    with Pipeline.open(_plan(tmp_path_factory, "safepatch", "safectrl")) as pipe:
        yield pipe, (backbone, patch, gate, config, ctrl)


@_trained("safepatch", "safectrl")
@pytest.mark.parametrize("prompt,fires", [(BENIGN, False), (SKULL, True)])
def test_safepatch_and_safectrl_match_pytorch_reference(prompt, fires, unet_guards, reference_pipe):
    pipe, parts = unet_guards
    r = pipe.generate(prompt, steps=STEPS, guidance=GUIDANCE, seed=SEED, scheduler="ddim")
    rep = r.report["guards"]
    assert rep["safepatch"]["active"] is fires and rep["safectrl"]["triggered"] is fires
    ref, gate_fired = _unet_guards_reference(*parts, pipe.scheduler_config, prompt, steps=STEPS, guidance=GUIDANCE,
                                             seed=SEED, latent=16, size=64)
    assert gate_fired is fires
    psnr = _psnr(r.images[0] / 255.0, ref)
    plain = _psnr(r.images[0] / 255.0, _diffusers(reference_pipe, prompt))
    print(f"tinyworld-xl SafePatch + SafeCtrl ({'triggered' if fires else 'not triggered'}): lean vs PyTorch "
          f"{psnr:.2f} dB, vs unguarded diffusers {plain:.2f} dB")
    assert psnr >= 40
    if fires:
        assert plain < psnr - 10  # the guards changed the image far more than export and runtime differ


# -- SafeGuider -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def safeguider(tmp_path_factory):
    with Pipeline.open(_plan(tmp_path_factory, "safeguider")) as pipe:
        yield pipe


@_trained("safeguider")
@pytest.mark.parametrize("prompt,fires", [(BENIGN, False), (UNSAFE, True)])
def test_safeguider_matches_diffusers_on_the_prompt_it_settles_on(prompt, fires, safeguider, reference_pipe):
    r = safeguider.generate(prompt, steps=STEPS, guidance=GUIDANCE, seed=SEED, scheduler="ddim")
    rep = r.report["guards"]["safeguider"]
    assert (rep["verdict"] == "unsafe") is fires
    final = rep.get("final_prompt", prompt)
    assert (final != prompt) is fires and "knife" not in final
    psnr = _psnr(r.images[0] / 255.0, _diffusers(reference_pipe, final))
    print(f"tinyworld-xl SafeGuider ({'searched: ' + repr(final) if fires else 'passed'}): lean vs diffusers "
          f"{psnr:.2f} dB")
    assert psnr >= 40
