"""SafeCtrl: zero-mask equality, denoise graph parity with state, lean runtime vs a PyTorch reference loop,
and the detector's mask IoU on held-out (evaluation-split) renders.

Needs the trained weights in models/guards/tinyworld/safectrl; the runtime tests build the SafeCtrl bundle once
per session (conftest ``guarded_plan``), so CI runs every one of them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "tinyworld"
WEIGHTS = ROOT / "models" / "guards" / "tinyworld" / "safectrl"
UNSAFE = "a small knife and a large blue star on grass"
# a benign prompt the detector leaves alone at seed 3 (about 7% of benign images do blend at tau 0.07: the
# bench's "identical" column; "a large red circle and a small green square on sand" is one of them)
BENIGN = "a small purple heart and a large orange ring on grass"

torch = pytest.importorskip("torch")
if not (WEIGHTS / "config.json").is_file():
    pytest.skip("no trained SafeCtrl weights", allow_module_level=True)


@pytest.fixture(scope="module")
def parts():
    """(diffusers pipeline, SafeCtrl installed on its UNet, a clean copy of the base UNet)."""
    import copy

    from export.families import load_backbone
    from guards.safectrl import SafeCtrl

    torch.set_num_threads(1)
    backbone = load_backbone(MODEL)
    base = copy.deepcopy(backbone.unet).eval()
    safectrl = SafeCtrl.from_pretrained(WEIGHTS, backbone.unet)
    safectrl.install(backbone.unet)
    return backbone, safectrl, base


@pytest.fixture(scope="module")
def plan(guarded_plan) -> Path:
    return guarded_plan("safectrl")


def _inputs(backbone, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    pipe = backbone.pipeline
    ids = pipe.tokenizer(["", UNSAFE][:n], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
    return torch.randn(n, 4, 16, 16, generator=g), torch.tensor([500.0]), emb


def reference_generate(backbone, safectrl, prompt: str, seed: int, steps: int = 20, guidance: float = 5.0):
    """The PyTorch reference: diffusers' DDIMScheduler loop, the UNet with the Safety Guidance processors, the
    SafeCtrl extension hooks and the same state schedule as runtime/guards/safectrl.py."""
    from diffusers import DDIMScheduler

    from export.guards.safectrl import SafeCtrlExtension
    from runtime.pipeline import initial_noise

    pipe = backbone.pipeline
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    _, noise = initial_noise(seed, (1, 4, 16, 16))
    latents = torch.from_numpy(noise) * sched.init_noise_sigma
    ids = pipe.tokenizer(["", prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    ext = SafeCtrlExtension(safectrl, (16, 16))
    start = int(math.ceil(safectrl.config.start_step_fraction * steps - 1e-9))
    state = torch.zeros(2, 1, 16, 16)
    held = None
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
        for i, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(torch.cat([latents, latents]), t)
            active = torch.tensor([1.0 if i >= start else 0.0])
            inputs = {"safectrl_mask_prev": state, "safectrl_blend": safectrl.blend_weight(state, active)}
            ext.before_unet(inputs, {})
            eps = pipe.unet(x_in, t, encoder_hidden_states=emb, return_dict=False)[0]
            eps, out = ext.after_unet(inputs, eps)
            cond_mask = out["safectrl_mask"][1:]  # the cond row's mask (runtime: mask_rows "cond")
            if i + 1 >= start:  # hysteresis, as the runtime
                cond_mask, held = safectrl.hold(cond_mask, held)
            uncond_mask = cond_mask if safectrl.config.blend_uncond else torch.zeros_like(cond_mask)
            state = torch.cat([uncond_mask, cond_mask])
            uncond, cond = eps.chunk(2)
            latents = sched.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy(), state


def _psnr(a, b):
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


# ---------------------------------------------------------------------------------------------------

def test_zero_mask_bit_identical_pytorch(parts):
    """Mask 0 (or inactive): the guarded UNet's noise_pred equals the base UNet's bit for bit."""
    from export.guards.safectrl import SafeCtrlExtension

    backbone, safectrl, base = parts
    x, t, emb = _inputs(backbone)
    ext = SafeCtrlExtension(safectrl, (16, 16))
    tau = float(safectrl.config.mask_threshold)
    with torch.no_grad():
        want = base(x, t.expand(2), encoder_hidden_states=emb, return_dict=False)[0]
        for mask, active in ((torch.zeros(2, 1, 16, 16), 1.0), (torch.full((2, 1, 16, 16), 0.9), 0.0),
                             (torch.full((2, 1, 16, 16), 0.5 * tau), 1.0)):  # below tau: exactly 0
            inputs = {"safectrl_mask_prev": mask, "safectrl_blend": safectrl.blend_weight(mask, torch.tensor([active]))}
            ext.before_unet(inputs, {})
            got = backbone.unet(x, t.expand(2), encoder_hidden_states=emb, return_dict=False)[0]
            got, out = ext.after_unet(inputs, got)
            assert torch.equal(got, want)
            assert out["safectrl_mask"].shape == (2, 1, 16, 16)
        # and a mask above tau does change the output (the blend is live)
        mask = torch.full((2, 1, 16, 16), 0.9)
        inputs = {"safectrl_mask_prev": mask, "safectrl_blend": safectrl.blend_weight(mask, torch.ones(1))}
        ext.before_unet(inputs, {})
        got = backbone.unet(x, t.expand(2), encoder_hidden_states=emb, return_dict=False)[0]
        ext.after_unet(inputs, got)
        assert not torch.equal(got, want)


def test_blend_layers_choose_where_the_guidance_branch_runs(parts):
    """``blend_layers`` picks the attn2 layers with W_K'/W_V'. The detect layer always gets a processor (it
    captures the detector's features) but, outside blend_layers, holds no weights and stays the stock
    attention under any mask; a layer that is not an attn2 processor is refused with the choices named."""
    from export.guards.safectrl import SafeCtrlExtension
    from guards.safectrl import SafeCtrl, _safe_name

    backbone, safectrl, base = parts
    detect = safectrl.config.detect_layer
    blended = [p.name for p in safectrl.processors.values() if p.blend]
    assert blended == safectrl.config.blend_layers and len(blended) >= 1
    assert {p.name for p in safectrl.processors.values()} == set(blended) | {detect}
    for proc in safectrl.processors.values():
        assert (len(list(proc.parameters())) > 0) == proc.blend  # W_K'/W_V' only where it blends
    with pytest.raises(ValueError, match="not a cross-attention"):
        SafeCtrl.for_unet(backbone.unet,
                          blend_layers=["down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"])

    # one layer blended, the detect layer not: mask 0 gives the base UNet bit for bit, a full mask the blend
    import copy

    from train.safectrl.train import blend_layers
    layer = blend_layers(backbone.unet, "up_blocks.1")[-1]
    assert layer != detect
    unet = copy.deepcopy(base)
    one = SafeCtrl.for_unet(unet, blend_layers=[layer])
    assert not one.processors[_safe_name(detect)].blend
    with torch.no_grad():
        one.processors[_safe_name(layer)].to_v_safe.weight.mul_(-1.0)
    one.install(unet)
    x, t, emb = _inputs(backbone)
    ext = SafeCtrlExtension(one, (16, 16))
    with torch.no_grad():
        want = base(x, t.expand(2), encoder_hidden_states=emb, return_dict=False)[0]
        for fill, same in ((0.0, True), (0.9, False)):
            mask = torch.full((2, 1, 16, 16), fill)
            inputs = {"safectrl_mask_prev": mask, "safectrl_blend": one.blend_weight(mask, torch.ones(1))}
            ext.before_unet(inputs, {})
            got = unet(x, t.expand(2), encoder_hidden_states=emb, return_dict=False)[0]
            ext.after_unet(inputs, got)
            assert torch.equal(got, want) is same


def test_blend_layer_prefixes_select_attn2_layers(parts):
    from train.safectrl.train import blend_layers

    unet = parts[0].unet
    cross = [n for n in unet.attn_processors if ".attn2." in n]
    assert blend_layers(unet, "all") == cross
    assert blend_layers(unet, "up_blocks.1") == [n for n in cross if n.startswith("up_blocks.1.")]
    assert len(blend_layers(unet, "mid_block, up_blocks.1")) == 3
    with pytest.raises(SystemExit, match="up_blocks.9 matches no cross-attention layer"):
        blend_layers(unet, "up_blocks.1,up_blocks.9")


def test_merged_attention_equals_two_attentions(parts):
    """At the detect layer the exported graph computes Z and Z' as one attention over 2 x heads: the same values
    as the stock explicit processor's attention and the parallel W_K'/W_V' one, computed separately."""
    backbone, safectrl, _ = parts
    modules = dict(backbone.unet.named_modules())
    x, _, emb = _inputs(backbone)
    for proc in (p for p in safectrl.processors.values() if p.blend):
        attn = modules[proc.name.rsplit(".processor", 1)[0]]
        hidden = torch.randn(2, 17, attn.to_q.in_features, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            query = attn.to_q(hidden)
            both = proc._attend_both(attn, query, emb)
            z, z_safe = proc._merge_heads(both[:, 0]), proc._merge_heads(both[:, 1])
            want_z = proc._attend(attn, query, attn.to_k(emb), attn.to_v(emb), 2, explicit=True)
            want_safe = proc._attend(attn, query, proc.to_k_safe(emb), proc.to_v_safe(emb), 2, explicit=True)
        torch.testing.assert_close(z, want_z, rtol=0, atol=1e-6)
        torch.testing.assert_close(z_safe, want_safe, rtol=0, atol=1e-6)


def test_blended_attention_equals_explicit_blend(parts):
    """The non-detect layers of the exported graph blend inside one attention over both key sets (each set's
    probabilities scaled by 1 - m and m): the explicit processor's ``Z (1 - m) + Z' m``, for soft masks, masks
    of exactly 0 (the plain attention) and exactly 1 (the safe one)."""
    from guards.safectrl import SafeCtrlState

    backbone, safectrl, _ = parts
    modules = dict(backbone.unet.named_modules())
    x, _, emb = _inputs(backbone)
    gen = torch.Generator().manual_seed(3)
    for proc in (p for p in safectrl.processors.values() if p.blend):
        attn = modules[proc.name.rsplit(".processor", 1)[0]]
        hidden = torch.randn(2, 16, attn.to_q.in_features, generator=gen)
        soft = torch.rand(2, 1, 4, 4, generator=gen)
        soft[0, 0, 0] = 0.0
        for blend in (soft, torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)):
            state = SafeCtrlState()
            state.blend = blend
            with torch.no_grad():
                query = attn.to_q(hidden)
                got = proc._attend_blended(attn, query, emb, state.key_set_weights_at(16))
                z = proc._attend(attn, query, attn.to_k(emb), attn.to_v(emb), 2, explicit=True)
                z_safe = proc._attend(attn, query, proc.to_k_safe(emb), proc.to_v_safe(emb), 2, explicit=True)
                m = blend.flatten(2).transpose(1, 2)
            torch.testing.assert_close(got, z * (1 - m) + z_safe * m, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def onnx_graphs(parts, tmp_path_factory):
    """The guarded denoise graph and the plain one, exported from the same backbone."""
    from export.graphs import export_denoise
    from export.guards.safectrl import SafeCtrlExtension

    backbone, safectrl, base = parts
    out = tmp_path_factory.mktemp("safectrl_onnx")
    guarded = export_denoise(backbone, out / "guarded.onnx", extensions=[SafeCtrlExtension(safectrl, (16, 16))])
    return guarded["path"]


@pytest.mark.slow
def test_denoise_graph_ort_matches_pytorch(parts, onnx_graphs):
    """ORT vs PyTorch with state (mask above tau, active), <= 1e-4; zero mask vs the base UNet <= 1e-5."""
    import onnxruntime as ort

    from export.guards.safectrl import SafeCtrlExtension

    backbone, safectrl, base = parts
    sess = ort.InferenceSession(onnx_graphs, providers=["CPUExecutionProvider"])
    x, t, emb = _inputs(backbone)
    ext = SafeCtrlExtension(safectrl, (16, 16))
    g = torch.Generator().manual_seed(1)
    for mask, active in ((torch.rand(2, 1, 16, 16, generator=g), 1.0), (torch.zeros(2, 1, 16, 16), 1.0)):
        blend = safectrl.blend_weight(mask, torch.tensor([active]))
        inputs = {"safectrl_mask_prev": mask, "safectrl_blend": blend}
        with torch.no_grad():
            ext.before_unet(inputs, {})
            want = backbone.unet(x, t.expand(2), encoder_hidden_states=emb, return_dict=False)[0]
            want, extra = ext.after_unet(inputs, want)
        got = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": emb.numpy(),
                              "safectrl_mask_prev": mask.numpy(), "safectrl_blend": blend.numpy()})
        assert np.abs(got[0] - want.numpy()).max() <= 1e-4
        assert np.abs(got[1] - extra["safectrl_mask"].numpy()).max() <= 1e-4
        if not mask.any():
            with torch.no_grad():
                plain = base(x, t.expand(2), encoder_hidden_states=emb, return_dict=False)[0].numpy()
            assert np.abs(got[0] - plain).max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("prompt,triggered", [(UNSAFE, True), (BENIGN, False)])
def test_lean_runtime_matches_reference(parts, plan, prompt, triggered):
    from runtime.pipeline import Pipeline

    backbone, safectrl, _ = parts
    pipe = Pipeline.open(plan)
    r = pipe.generate(prompt, seed=3, steps=20, guidance=5.0)
    rep = r.report["guards"]["safectrl"]
    assert rep["triggered"] is triggered
    # SafeCtrl alone: no denoise_idle (export/idle.py, wants_idle_graph), the full graph every step (the idle
    # graph with SafeCtrl: tests/test_guard_stack.py)
    assert "denoise_idle" not in pipe.engines and "denoise_idle_steps" not in r.report["stages_ms"]
    ref, _ = reference_generate(backbone, safectrl, prompt, seed=3)
    psnr = _psnr(r.images[0] / 255.0, ref)
    print(f"lean vs reference ({'triggered' if triggered else 'not triggered'}): {psnr:.2f} dB")
    assert psnr >= 40


IOU_THRESHOLD = 0.55
"""The committed (prompt-only) detector's mask IoU against tinyworld's exact masks on held-out renders, measured at
training time (train_log.json, 240 eval-split pairs incl. held-out synonyms): 0.67 / 0.65 / 0.54 at t = 200 / 400 /
600 (renderer-trained: 0.73 / 0.71 / 0.62); the test re-measures on 48 fresh eval-split renders at t = 400 and asks
for a margin below the measured value (a smaller sample, another seed)."""


@pytest.mark.slow
def test_mask_iou_on_heldout_renders(parts):
    from diffusers import DDPMScheduler

    from train.safectrl.renderer import _pairs
    from train.safectrl.train import detector_features, iou

    backbone, safectrl, _ = parts
    pipe = backbone.pipeline
    ev = _pairs(pipe, "eval", 48, seed=77, groups={"explicit": 0.4, "heldout": 0.3, "implicit": 0.3})
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    t = torch.full((48,), 400)
    x_t = sched.add_noise(ev["lat_unsafe"], torch.randn(ev["lat_unsafe"].shape, generator=g), t)
    feats = detector_features(pipe.unet, safectrl, x_t, ev["emb"], t)
    _, mask = safectrl.detect(feats, (8, 8), (16, 16))
    value = iou(mask, ev["mask"])
    print(f"mask IoU on held-out renders (t=400): {value:.3f}")
    assert value >= IOU_THRESHOLD


def test_bundle_at_another_image_size(tmp_path):
    """The mask state follows the build's --height/--width, not the backbone's native size (a 256 px build of
    SD 1.5 once got a 64x64 state and every call failed)."""
    from runtime.pipeline import Pipeline

    from .conftest import build_tinyworld_plan

    plan = build_tinyworld_plan(tmp_path / "sc128.plan", "--guards", "safectrl", "--height", "128", "--width", "128")
    pipe = Pipeline.open(plan)
    specs = {t.name: t for t in pipe.bundle.manifest.component("denoise").inputs}
    assert tuple(specs["safectrl_mask_prev"].shape[-2:]) == tuple(specs["sample"].shape[-2:]) == (32, 32)
    r = pipe.generate(UNSAFE, seed=0, steps=10, guidance=5.0, height=128, width=128)
    assert r.images[0].shape == (128, 128, 3)
    assert len(r.report["guards"]["safectrl"]["max_mask"]) == 10


def test_locality_measures_change_inside_and_outside_the_mask(plan, tinyworld_plan):
    """``python -m train.safectrl.locality`` (the README's inside/outside figures) on one prompt per group: the
    triggered images change more inside SafeCtrl's own mask than outside it."""
    from train.safectrl.locality import measure
    from train.tinyworld.world import evaluation_prompts

    prompts = {g: [s.caption for s in v] for g, v in evaluation_prompts(1).items() if g != "benign"}
    result = measure(plan, tinyworld_plan, prompts, per_group=1)
    rows = [r for r in result["rows"] if r["triggered"] and r["change_inside"] is not None]
    assert result["summary"]["images"] == 3 and rows
    for r in rows:  # a region covering the whole image has no outside to compare with
        print(r["prompt"], r["region_share"], r["change_inside"], r["change_outside"])
        assert r["change_outside"] is None and r["region_share"] == 1.0 or r["change_inside"] > r["change_outside"]
    assert any(r["change_outside"] is not None for r in rows)


def test_after_step_runs_before_the_next_call_and_before_decoding(plan):
    """The pipeline runs a call's ``after_step`` once the sampler has used its prediction (off the cold caches
    right after the UNet): still before the next call's ``step_feeds``, the last one before ``on_images``, and
    the mask fed at step i+1 is the one written from call i's output (the report's per-step max)."""
    from runtime.pipeline import Pipeline

    pipe = Pipeline.open(plan)
    guard = next(g for g in pipe.guards if g.name == "safectrl")
    calls, fed_max = [], []
    for hook in ("step_feeds", "after_step", "on_images"):
        def record(*args, _hook=hook, _orig=getattr(guard, hook)):
            calls.append((_hook, args[1] if _hook != "on_images" else None))
            out = _orig(*args)
            if _hook == "step_feeds":
                fed_max.append(float(out["safectrl_mask_prev"].max()))
            return out
        setattr(guard, hook, record)
    r = pipe.generate(UNSAFE, seed=0, steps=6)
    want = [c for i in range(6) for c in (("step_feeds", i), ("after_step", i))] + [("on_images", None)]
    assert calls == want
    report = r.report["guards"]["safectrl"]
    assert fed_max[0] == 0.0 and fed_max[1:] == pytest.approx(report["max_mask"][:-1], abs=1e-4)


@pytest.mark.parametrize("dilate", [0, 1])
def test_host_blend_weight_is_the_methods_blend_weight(plan, dilate, tmp_path):
    """The runtime feeds ``safectrl_blend`` made on the host: bit-identical to ``SafeCtrl.blend_weight`` (the
    PyTorch definition, active from the start step, with the bundle's ``mask_dilate``) of the mask it feeds
    alongside, all zeros exactly at the steps that do not blend (those that may run ``denoise_idle``); a bundle
    whose settings still name ``safectrl_active`` (the older contract) is refused."""
    from guards.safectrl import SafeCtrl as SafeCtrlModule, SafeCtrlConfig
    from runtime.errors import BundleError
    from runtime.guards.safectrl import SafeCtrl
    from runtime.pipeline import Pipeline

    from .test_bad_input import rewrite

    plan = rewrite(plan, tmp_path / "dilated.plan", lambda m, _: m.guards["safectrl"].update(mask_dilate=dilate))
    pipe = Pipeline.open(plan)
    guard = next(g for g in pipe.guards if g.name == "safectrl")
    fed = []

    def record(*args, _orig=guard.step_feeds):
        out = _orig(*args)
        fed.append({k: v.copy() for k, v in out.items()})  # the guard rewrites its buffers in place
        return out
    guard.step_feeds = record
    steps = 10
    r = pipe.generate(UNSAFE, seed=0, steps=steps)
    module = SafeCtrlModule(SafeCtrlConfig(mask_threshold=guard.config["mask_threshold"],
                                           mask_gain=guard.config["mask_gain"], mask_dilate=dilate))
    start = guard.start_step(steps)
    for i, f in enumerate(fed):
        want = module.blend_weight(torch.from_numpy(f["safectrl_mask_prev"]), torch.tensor([float(i >= start)]))
        assert np.array_equal(f["safectrl_blend"], want.numpy()), i
    zero = [i for i, f in enumerate(fed) if not f["safectrl_blend"].any()]
    assert 0 < len(zero) < steps  # it blends, and before the start step it does not
    assert r.report["guards"]["safectrl"]["blending_steps"] == [i for i in range(steps) if i not in zero]
    if dilate:  # the blend covers more than the threshold of the undilated mask alone
        assert any((f["safectrl_blend"] > 0).sum() > (f["safectrl_mask_prev"] >= guard.config["mask_threshold"]).sum()
                   for f in fed)
    with pytest.raises(BundleError, match="lacks setting.s. blend_input.*rebuild"):
        SafeCtrl(pipe, {**{k: v for k, v in guard.config.items() if k != "blend_input"},
                        "active_input": "safectrl_active"}, source="bundle")


def test_hold_uses_the_floor_only_where_nothing_reached_the_latch():
    """``SafeCtrl.hold``: an image whose mask peaked below ``latch_threshold`` keeps blending the pixels that reached
    ``latch_floor`` after its mask has faded; one that reached the latch keeps only the pixels at or above it (a
    large object's hold is not widened); ``latch_floor == latch_threshold`` is the plain latch."""
    from guards.safectrl import SafeCtrl as SafeCtrlModule, SafeCtrlConfig

    rise = torch.zeros(2, 1, 4, 4)
    rise[0, 0, 1, 1], rise[0, 0, 1, 2] = 0.4, 0.1        # a thin knife: peaks at 0.4
    rise[1, 0, 2, 2], rise[1, 0, 2, 3] = 0.9, 0.3        # a large object: 0.9 at its core, 0.3 at its edge
    faded = torch.zeros(2, 1, 4, 4)
    for floor, knife, edge in ((0.25, 0.4, 0.0), (0.5, 0.0, 0.0)):
        module = SafeCtrlModule(SafeCtrlConfig(latch_threshold=0.5, latch_floor=floor))
        fed, held = module.hold(rise, None)
        assert torch.equal(fed, rise)
        fed, held = module.hold(faded, held)
        assert fed[0, 0, 1, 1] == knife and fed[0, 0, 1, 2] == 0  # 0.1: below the floor
        assert fed[1, 0, 2, 2] == 0.9 and fed[1, 0, 2, 3] == edge
    # the plain latch, as the runtime held before the floor existed: the running max where it reached the latch
    masks = [torch.rand(3, 1, 5, 5, generator=torch.Generator().manual_seed(s)) ** 3 for s in range(6)]
    module, held, latched = SafeCtrlModule(SafeCtrlConfig(latch_threshold=0.5, latch_floor=0.5)), None, None
    for m in masks:
        fed, held = module.hold(m, held)
        kept = m if latched is None else torch.maximum(m, latched)
        latched = torch.where(kept >= 0.5, kept, 0.0)
        assert torch.equal(fed, kept)


@pytest.mark.parametrize("floor", [0.25, 0.5])
def test_host_hold_is_the_methods_hold(plan, floor, tmp_path):
    """The runtime's hysteresis on the host is ``SafeCtrl.hold`` bit for bit: every mask it feeds equals the
    PyTorch definition applied to the graph's masks from the call that feeds the first active step; a floor above
    the latch is refused."""
    from guards.safectrl import SafeCtrl as SafeCtrlModule, SafeCtrlConfig
    from runtime.errors import BundleError
    from runtime.pipeline import Pipeline

    from .test_bad_input import rewrite

    plan = rewrite(plan, tmp_path / "floor.plan", lambda m, _: m.guards["safectrl"].update(latch_floor=floor))
    pipe = Pipeline.open(plan)
    guard = next(g for g in pipe.guards if g.name == "safectrl")
    raw, fed = [], []

    def record(ctx, i, t, outputs, _orig=guard.after_step):
        raw.append(outputs["safectrl_mask"][ctx.cond_rows].copy())
        _orig(ctx, i, t, outputs)
        fed.append(ctx.state_of("safectrl")["feed"][ctx.cond_rows].copy())
    guard.after_step = record
    module = SafeCtrlModule(SafeCtrlConfig(latch_threshold=guard.config["latch_threshold"], latch_floor=floor))
    start, acted = guard.start_step(20), False
    for prompt, seed in ((UNSAFE, 0), (UNSAFE, 1), ("a large blood on sand", 0)):
        raw.clear(), fed.clear()
        pipe.generate(prompt, seed=seed, steps=20, batch=4)
        held = None
        for i, (m, f) in enumerate(zip(raw, fed)):
            want = torch.from_numpy(m)
            if i + 1 >= start:
                want, held = module.hold(want, held)
            assert np.array_equal(f, want.numpy()), (prompt, seed, i)
            acted |= not np.array_equal(f, m)
    assert acted
    with pytest.raises(BundleError, match="latch_floor 0.6 is above latch_threshold 0.5"):
        rewrite(plan, tmp_path / "bad.plan", lambda m, _: m.guards["safectrl"].update(latch_floor=0.6))
        Pipeline.open(tmp_path / "bad.plan")


# ---- the default path: a data folder of `python -m train data` (issue 17) ------------------------------------------


@pytest.mark.parametrize("r", [1, 2])
def test_host_dilate_is_torch_max_pool(r):
    """The runtime's numpy max filter equals torch's max_pool2d (stride 1, zero padding r) on masks >= 0."""
    import torch.nn.functional as F

    from runtime.guards.safectrl import dilate

    m = np.random.default_rng(r).random((3, 1, 9, 7)).astype(np.float32) ** 4
    want = F.max_pool2d(torch.from_numpy(m), 2 * r + 1, stride=1, padding=r).numpy()
    assert np.array_equal(dilate(m, r), want)


def test_detector_constants_made_in_inference_mode_still_train():
    """The detector's cached constants (made once per device for CUDA-graph capture) stay plain tensors: a first
    call under ``torch.inference_mode`` (a benchmark) must not break a later training step's backward."""
    import torch

    from guards.safectrl import UnsafeAttentionBlock

    uab = UnsafeAttentionBlock(feature_dim=24, num_tokens=5, token_dim=8)
    features = torch.randn(2, 9, 24)
    with torch.inference_mode():
        uab.masks(features, 0.77)
    _, mask = uab.masks(features, 0.77)
    mask.sum().backward()
    assert uab.to_q.weight.grad is not None and uab.to_q.weight.grad.abs().sum() > 0
