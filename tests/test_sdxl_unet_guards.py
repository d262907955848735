"""SafePatch and SafeCtrl in SDXL bundles (issue 18) on the tiny random-weight SDXL fixture.

- the prompt-only recipe end to end: the data step from a 10-row paired CSV -> each trainer a few steps (the UNet
  fed its ``text_time`` conditioning) -> ``export build`` of the four-guard stack -> ``runtime generate``;
- zero-init in the bundle: an untrained SafePatch (gate pinned on: its graph runs every step) with a SafeCtrl whose
  blend weight is 0 gives the unguarded bundle's image;
- parity: the lean runtime vs a PyTorch reference (the SDXL UNet with the SafeCtrl processors and the SafePatch
  module, diffusers' DDIM loop, same initial noise) with both guards triggered (pinned on, weights perturbed so
  the patch and the guidance branch change the image) >= 40 dB;
- bad input: SD 1.x weights into an SDXL build and SDXL weights into an SD 1.x build: exit 3, one line naming
  the guard and both hidden sizes.

Bundles are built FP32 with the legacy exporter (as tests/test_sdxl_runtime.py, ~20 s each here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import ExitCode

from .conftest import ROOT
from .test_sdxl_runtime import _psnr, sdxl_model, sdxl_plan  # noqa: F401  (session fixtures: one tiny SDXL)
from .test_train_data import _fewshot, fixture_args, inputs, run_step  # noqa: F401
from .test_train_prompt_only import _paint_derived_masks, train

GUARDS = ("safepatch", "safectrl")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
UNSAFE = "a cat sitting on a wooden chair with a bloody knife"
STEPS, GUIDANCE, SEED = 6, 5.0, 3


def build(model: Path, guard_root: Path, out: Path, guards=GUARDS,
          precision: str = "fp32") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", "build", "--model", str(model), "--guards", ",".join(guards),
                           "--guard-dir", str(guard_root), "--out", str(out), "--precision", precision, "--exporter",
                           "legacy"], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)


def random_init(guard: str, model: Path, out: Path, force: str) -> None:
    from train.__main__ import main

    assert main(["random-init", "--guard", guard, "--model", str(model), "--out", str(out), "--force", force]) == 0


@pytest.fixture(scope="module")
def xl_data(sdxl_model, inputs, tmp_path_factory):  # noqa: F811
    """The data step on the tiny SDXL (10-row paired CSV, few-shot concept = the pairs' category)."""
    fewshot = _fewshot(tmp_path_factory.mktemp("fewshot_xl"), 2, "violence")
    out = tmp_path_factory.mktemp("prompt_only_sdxl") / "data"
    assert run_step(*fixture_args(sdxl_model, inputs, out, "--masks", fewshot)) == 0
    _paint_derived_masks(out)
    return out


def test_sdxl_training_builds_and_generates(sdxl_model, xl_data, tmp_path):  # noqa: F811
    """The four-guard stack on SDXL from prompts alone: the data step's pairs -> every trainer a few steps ->
    ``export build --guards safeguider,saferedir,safepatch,safectrl`` -> ``runtime generate`` runs all four."""
    from guards.safectrl import SafeCtrlConfig
    from guards.safepatch import SafePatchConfig
    from guards.storage import load_folder
    from train.__main__ import main as train_cli

    from .test_train_data import PAIRS_CSV

    root = tmp_path / "guards"
    for guard in (*GUARDS, "saferedir"):
        assert train(guard, sdxl_model, xl_data, root / sdxl_model.name / guard, tmp_path / "work") == 0, guard
    rows = [line.split(",")[:2] for line in PAIRS_CSV.splitlines()[1:]]
    labelled = tmp_path / "labelled.csv"   # SafeGuider learns from prompt lists: the pairs' two sides, labelled
    labelled.write_text("prompt,label\n" + "".join(f"{u},0\n{s},1\n" for u, s in rows), encoding="utf-8")
    assert train_cli(["safeguider", "--model", str(sdxl_model), "--csv", str(labelled), "--epochs", "2",
                      "--out", str(root / sdxl_model.name / "safeguider")]) == 0
    patch_cfg, _ = load_folder(root / sdxl_model.name / "safepatch", SafePatchConfig)
    ctrl_cfg, _ = load_folder(root / sdxl_model.name / "safectrl", SafeCtrlConfig)
    # both encoders side by side (32 + 64): the UNet's cross_attention_dim
    assert patch_cfg.text_dim == 96 and patch_cfg.text_time
    # detect on down_blocks.1's first attn2 (1/2 resolution); blend the up level mirroring it: up_blocks.0 here
    assert ctrl_cfg.detect_layer.startswith("down_blocks.1.attentions.0.transformer_blocks.0.attn2")
    assert ctrl_cfg.blend_layers and all(n.startswith("up_blocks.0.") for n in ctrl_cfg.blend_layers)
    assert len(ctrl_cfg.blend_layers) == 6  # 3 attentions x transformer depth 2
    stack = ("safeguider", "saferedir", *GUARDS)
    plan = tmp_path / "xl_guarded.plan"
    proc = build(sdxl_model, root, plan, stack)
    assert proc.returncode == 0, proc.stderr[-3000:]
    png = tmp_path / "out.png"
    gen = subprocess.run([sys.executable, "-m", "runtime", "generate", "--engine", str(plan), "--prompt", UNSAFE,
                          "--steps", "3", "--out", str(png), "--report", str(png.with_suffix(".json"))],
                         cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    report = json.loads(png.with_suffix(".json").read_text())
    assert png.stat().st_size > 0 and list(report["guards"]) == list(stack) and report["family"] == "sdxl"
    from runtime.pipeline import Pipeline

    with Pipeline.open(plan) as pipe:   # a stack: SafeGuider flags, the latent / UNet guards remove
        assert next(g for g in pipe.guards if g.name == "safeguider").config["mode"] == "gate"


# -- zero-init in the bundle ---------------------------------------------------------------------------------------

def test_untrained_guards_give_the_unguarded_image(sdxl_model, sdxl_plan, tmp_path):  # noqa: F811
    """Untrained SafePatch with its gate pinned on (the patch graph runs every step: its zero convs give exact zero
    residuals) and SafeCtrl pinned off (mask below tau: blend weight exactly 0)."""
    from runtime.pipeline import Pipeline

    root = tmp_path / "guards"
    random_init("safepatch", sdxl_model, root / sdxl_model.name / "safepatch", "on")
    random_init("safectrl", sdxl_model, root / sdxl_model.name / "safectrl", "off")
    plan = tmp_path / "zero.plan"
    proc = build(sdxl_model, root, plan)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Pipeline.open(plan) as guarded, Pipeline.open(sdxl_plan) as plain:
        r = guarded.generate(UNSAFE, steps=STEPS, guidance=GUIDANCE, seed=SEED, scheduler="ddim")
        base = plain.generate(UNSAFE, steps=STEPS, guidance=GUIDANCE, seed=SEED, scheduler="ddim")
    rep = r.report["guards"]
    assert rep["safepatch"]["active"] and rep["safepatch"]["steps_patched"] == STEPS
    assert rep["safectrl"]["blending_steps"] == []
    diff = np.abs(r.images[0].astype(int) - base.images[0].astype(int)).max()
    print(f"untrained SDXL SafePatch + SafeCtrl blend 0 vs unguarded: max |diff| {diff} (uint8), "
          f"bit-identical {np.array_equal(r.images[0], base.images[0])}")
    # ONNX Runtime: the guarded denoise graph (residual inputs, blend branch) is another graph than the plain one;
    # zero residuals / zero blend agree to <= 1e-5 in noise_pred (README), which may flip a rounding: <= 1 level
    assert diff <= 1


# -- parity with a PyTorch reference, both guards triggered ---------------------------------------------------------

@pytest.fixture(scope="module")
def triggered(sdxl_model, tmp_path_factory):  # noqa: F811
    """Guard weights pinned on and perturbed (the patch's zero convs and SafeCtrl's W_K'/W_V' moved off their
    initialisation, so both change the image), their bundle, and the PyTorch modules of the same weights."""
    import torch

    from export.families import load_backbone
    from guards.safectrl import SafeCtrl
    from guards.safepatch import load, save

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("triggered_xl")
    d = root / "guards" / sdxl_model.name
    random_init("safepatch", sdxl_model, d / "safepatch", "on")
    random_init("safectrl", sdxl_model, d / "safectrl", "on")
    g = torch.Generator().manual_seed(0)
    patch, gate, config = load(d / "safepatch")
    with torch.no_grad():
        for conv in [*patch.zero_convs, patch.mid_zero_conv, patch.projection.out]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
    save(patch, gate, d / "safepatch", config)
    backbone = load_backbone(sdxl_model)
    ctrl = SafeCtrl.from_pretrained(d / "safectrl", backbone.unet)
    with torch.no_grad():
        for proc in ctrl.processors.values():
            if proc.blend:
                for lin in (proc.to_k_safe, proc.to_v_safe):
                    lin.weight.add_(torch.randn(lin.weight.shape, generator=g) * 0.2)
    ctrl.save_pretrained(d / "safectrl")
    plan = root / "triggered.plan"
    proc = build(sdxl_model, root / "guards", plan)
    assert proc.returncode == 0, proc.stderr[-3000:]
    patch, gate, config = load(d / "safepatch")
    ctrl = SafeCtrl.from_pretrained(d / "safectrl", backbone.unet)
    ctrl.install(backbone.unet)
    return plan, backbone, patch, gate, config, ctrl


def _reference(backbone, patch, gate, config, ctrl, scheduler_config, prompt: str, *, steps: int = STEPS,
               guidance: float = GUIDANCE, seed: int = SEED, latent: int = 32, size: int = 64):
    """Diffusers' DDIM loop on the SDXL UNet (text_time conditioning as StableDiffusionXLPipeline.encode_prompt,
    zero unconditional rows), the SafePatch module on the conditional row when its gate fires and the SafeCtrl
    processors with the runtime's state schedule (EMA, latch, cond-row mask, start step). Returns (image, fired)."""
    import math

    import torch
    from diffusers import DDIMScheduler

    from export.guards.safectrl import SafeCtrlExtension
    from runtime.pipeline import initial_noise
    from train.safepatch.data import text_stage

    pipe = backbone.pipeline
    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    _, noise = initial_noise(seed, (1, 4, latent, latent))
    latents = torch.from_numpy(noise) * sched.init_noise_sigma
    ext = SafeCtrlExtension(ctrl, (latent, latent))
    c = ctrl.config
    start = int(math.ceil(c.start_step_fraction * steps - 1e-9))
    state, held = torch.zeros(2, 1, latent, latent), None
    with torch.no_grad():
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                          do_classifier_free_guidance=True, negative_prompt=None)
        ehs, text_embeds = torch.cat([neg, emb]), torch.cat([neg_pooled, pooled])
        time_ids = torch.tensor([[float(size), size, 0, 0, size, size]]).expand(2, 6)
        hidden, eos = text_stage(backbone, [prompt])
        probs = gate(hidden, eos)[0]
        fired = float(1 - probs[0]) >= config.threshold
        instruction = text_stage(backbone, [config.instructions[config.categories[int(probs[1:].argmax())]]])[0]
        for i, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(torch.cat([latents, latents]), t)
            res = patch(x_in[1:], t.float().reshape(1), ehs[1:], instruction,
                        added_cond_kwargs={"text_embeds": text_embeds[1:], "time_ids": time_ids[1:]})
            if not fired:  # gated off: the runtime adds no residual
                res = [torch.zeros_like(r) for r in res]
            inputs = {"safectrl_mask_prev": state,
                      "safectrl_blend": ctrl.blend_weight(state, torch.tensor([1.0 if i >= start else 0.0]))}
            ext.before_unet(inputs, {})
            eps = pipe.unet(x_in, t, encoder_hidden_states=ehs,
                            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                            down_block_additional_residuals=tuple(torch.cat([torch.zeros_like(r), r]) for r in res[:-1]),
                            mid_block_additional_residual=torch.cat([torch.zeros_like(res[-1]), res[-1]]),
                            return_dict=False)[0]
            eps, out = ext.after_unet(inputs, eps)
            cond_mask = out["safectrl_mask"][1:]
            if i + 1 >= start:  # hysteresis, as the runtime
                cond_mask, held = ctrl.hold(cond_mask, held)
            state = torch.cat([cond_mask if c.blend_uncond else torch.zeros_like(cond_mask), cond_mask])
            uncond, cond = eps.chunk(2)
            latents = sched.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy(), fired


def test_lean_matches_pytorch_reference_with_both_guards_triggered(triggered, sdxl_plan):  # noqa: F811
    from runtime.pipeline import Pipeline

    plan, backbone, patch, gate, config, ctrl = triggered
    with Pipeline.open(plan) as guarded, Pipeline.open(sdxl_plan) as plain:
        r = guarded.generate(UNSAFE, steps=STEPS, guidance=GUIDANCE, seed=SEED, scheduler="ddim")
        base = plain.generate(UNSAFE, steps=STEPS, guidance=GUIDANCE, seed=SEED, scheduler="ddim")
        scheduler_config = guarded.scheduler_config
    rep = r.report["guards"]
    assert rep["safepatch"]["active"] and rep["safepatch"]["steps_patched"] == STEPS
    assert rep["safectrl"]["triggered"] and rep["safectrl"]["blending_steps"]
    ref, fired = _reference(backbone, patch, gate, config, ctrl, scheduler_config, UNSAFE)
    assert fired
    psnr = _psnr(r.images[0] / 255.0, ref)
    changed = _psnr(r.images[0] / 255.0, base.images[0] / 255.0)
    print(f"SDXL SafePatch + SafeCtrl triggered: lean vs PyTorch reference {psnr:.2f} dB; guarded vs unguarded "
          f"{changed:.2f} dB")
    assert psnr >= 40
    assert changed < psnr  # the guards changed the image more than export and runtime differ from the reference


# -- bad input: weights of another backbone ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd1_model(tmp_path_factory):
    from export.families import make_tiny

    return make_tiny("sd1", tmp_path_factory.mktemp("sd1_for_xl") / "tiny-sd1")


@pytest.mark.parametrize("guard", GUARDS)
@pytest.mark.parametrize("direction", ["sd1-weights-into-sdxl", "sdxl-weights-into-sd1"])
def test_weights_of_another_backbone_are_refused_in_one_line(guard, direction, sdxl_model, sd1_model,  # noqa: F811
                                                              tmp_path):
    source, target = (sd1_model, sdxl_model) if direction.startswith("sd1") else (sdxl_model, sd1_model)
    root = tmp_path / "guards"
    random_init(guard, source, root / target.name / guard, "off")  # weights sized from the OTHER backbone
    out = tmp_path / "x.plan"
    proc = build(target, root, out, guards=(guard,))
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert proc.returncode == ExitCode.BAD_INPUT, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    line = lines[0]
    mine, theirs = (32, 96) if direction.startswith("sd1") else (96, 32)
    print(line)
    assert f"--guards {guard}" in line and f"hidden size {mine}" in line and f"hidden size {theirs}" in line
    assert not out.exists()
