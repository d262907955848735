"""SafePatch end to end on tinyworld: zero-init equalities (PyTorch bit-exact, ONNX Runtime), patch graph parity,
the gated bundle (benign prompts bit-identical to the unguarded bundle, the patch graph never run; unsafe
prompts patched), lean runtime vs a PyTorch reference (explicit DDIM loop with diffusers' scheduler, the gate
and the patch in PyTorch), triggered and not.

Needs the trained weights in models/guards/tinyworld/safepatch (``python -m train safepatch``)."""


import numpy as np
import pytest

from runtime.pipeline import Pipeline, initial_noise

from .conftest import ROOT

WEIGHTS = ROOT / "models" / "guards" / "tinyworld" / "safepatch"
BENIGN = "a large red circle on sand"
UNSAFE = "a large red circle and a small knife on sand"


@pytest.fixture(scope="session")
def safepatch_plan(guarded_plan, tinyworld_dir):
    assert (WEIGHTS / "model.safetensors").is_file(), f"train first: python -m train safepatch --out {WEIGHTS}"
    return guarded_plan("safepatch")


@pytest.fixture(scope="module")
def gpipe(safepatch_plan):
    with Pipeline.open(safepatch_plan) as p:
        yield p


@pytest.fixture(scope="module")
def base_pipe(tinyworld_plan):
    with Pipeline.open(tinyworld_plan) as p:
        yield p


@pytest.fixture(scope="module")
def torch_parts(tinyworld_dir):
    import torch

    from export.families import load_backbone
    from guards.safepatch import load

    torch.set_num_threads(1)
    bb = load_backbone(tinyworld_dir)
    patch, gate, config = load(WEIGHTS)
    return bb, patch, gate, config


def _inputs(n=2, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 16, 16, generator=g), torch.tensor([641.0]), torch.randn(n, 16, 128, generator=g),
            torch.randn(n, 16, 128, generator=g))


# -- zero init ---------------------------------------------------------------------------------------------------

def test_untrained_patch_is_bit_identical_in_pytorch(torch_parts):
    import torch

    from export.graphs import residual_shapes
    from guards.safepatch import SafePatch, SafePatchConfig

    bb = torch_parts[0]
    unet = bb.unet
    patch = SafePatch.from_unet(unet, SafePatchConfig.for_unet(unet, 128)).eval()
    x, t, c, s = _inputs()
    with torch.no_grad():
        res = patch(x, t, c, s)
        down, mid = residual_shapes(unet.config, 16, 16)
        assert [tuple(r.shape[1:]) for r in res] == [*down, mid]
        assert all(torch.count_nonzero(r) == 0 for r in res)
        base = unet(x, t.expand(2), c).sample
        patched = unet(x, t.expand(2), c, down_block_additional_residuals=res[:-1],
                       mid_block_additional_residual=res[-1]).sample
    assert torch.equal(base, patched)


def test_zero_residuals_in_onnxruntime(gpipe, base_pipe, torch_parts, tmp_path):
    """Denoise graph with zero residuals vs the plain denoise graph (ORT), and the untrained patch graph = 0."""
    from export.guards.safepatch import export_patch
    from guards.safepatch import SafePatch, SafePatchConfig

    bb = torch_parts[0]
    x, t, c, s = (a.numpy() for a in _inputs())
    guard = next(g for g in gpipe.guards if g.name == "safepatch")
    feeds = {"sample": x, "timestep": t, "encoder_hidden_states": c}
    plain = base_pipe.engines["denoise"].infer(feeds)["noise_pred"]
    zero = gpipe.engines["denoise"].infer({**feeds, **guard.zero_feeds(2, 16, 16)})["noise_pred"]
    diff = float(np.abs(plain - zero).max())
    print(f"denoise with zero residuals vs plain denoise (ORT): max |diff| {diff:.3g}, "
          f"bit-identical {np.array_equal(plain, zero)}")
    assert diff <= 1e-5

    import onnxruntime as ort

    untrained = SafePatch.from_unet(bb.unet, SafePatchConfig.for_unet(bb.unet, 128))
    path = export_patch(bb, untrained, tmp_path / "safepatch.onnx")["path"]
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"sample": x, "timestep": t, "encoder_hidden_states": c, "instruction": s})
    assert all(not np.any(o) for o in outs)


# -- parity ------------------------------------------------------------------------------------------------------

def test_patch_graph_matches_pytorch(gpipe, torch_parts):
    import torch

    _, patch, _, _ = torch_parts
    x, t, c, s = _inputs(seed=3)
    with torch.no_grad():
        ref = patch(x, t, c, s)
    out = gpipe.engines["safepatch"].infer({"sample": x.numpy(), "timestep": t.numpy(),
                                            "encoder_hidden_states": c.numpy(), "instruction": s.numpy()})
    names = [f"down_residual_{i}" for i in range(len(ref) - 1)] + ["mid_residual"]
    err = max(float(np.abs(out[n] - r.numpy()).max()) for n, r in zip(names, ref))
    scale = max(float(r.abs().max()) for r in ref)
    print(f"patch graph ORT vs PyTorch: max |diff| {err:.3g} (max |residual| {scale:.3g})")
    assert scale > 0 and err <= 1e-4


def test_gate_head_matches_pytorch(gpipe, torch_parts):
    import torch

    from export.graphs import TextStage
    from export.guards.safepatch import SafePatchGateHead

    bb, _, gate, config = torch_parts
    spec = bb.text_encoders[0]
    head = SafePatchGateHead(gate, config.gate_output, len(config.categories) + 1)
    stage = TextStage(bb.pipeline.text_encoder, eos_id=spec.eos_id, penultimate=False, pooled=False, heads=[head])
    ids = gpipe.tokenizer([BENIGN, UNSAFE]).input_ids
    with torch.no_grad():
        ref = stage.eval()(torch.from_numpy(ids))[2].numpy()
    out = gpipe.engines["text_encoder"].infer({"input_ids": ids})["safepatch_gate"]
    assert np.abs(out - ref).max() <= 1e-5


# -- gating ------------------------------------------------------------------------------------------------------

def test_benign_prompt_is_gated_off_and_bit_identical(gpipe, base_pipe):
    r = gpipe.generate(BENIGN, seed=3, steps=20, guidance=5.0)
    base = base_pipe.generate(BENIGN, seed=3, steps=20, guidance=5.0)
    rep = r.report["guards"]["safepatch"]
    assert rep["active"] is False and rep["steps_patched"] == 0
    assert r.report["stages_ms"]["denoise_idle_steps"] == list(range(20))  # the residual-free graph every step
    assert np.array_equal(r.images[0], base.images[0])


def test_gated_off_guard_has_no_step_work(gpipe):
    """Gated off, SafePatch puts its zero residuals into the call's constant feeds before the loop and asks for
    no step hooks; active, it asks for them (the patch graph runs every step)."""
    from runtime.guards import GuardContext

    guard = next(g for g in gpipe.guards if g.name == "safepatch")
    for prompt, active in ((BENIGN, False), (UNSAFE, True)):
        enc = gpipe.tokenizer(["", prompt])
        ctx = GuardContext(gpipe, prompt, "", True, 1, 20, enc.input_ids)
        ctx.text = gpipe._encode_text([enc], True, "")
        guard.on_text(ctx)
        ctx.feeds = {}
        assert guard.prepare_steps(ctx, (1, 4, 16, 16)) is active
        if active:
            assert ctx.feeds == {}
        else:
            assert sorted(ctx.feeds) == sorted(t.name for t in guard.residuals)
            assert all(v.shape[0] == 2 and not v.any() for v in ctx.feeds.values())


def test_a_redirected_row_is_left_to_the_redirect_when_built_to_yield(gpipe):
    """Redirected rows (runtime/guards/__init__.py): with ``yield_to_redirect: true`` a row SafeRedir redirected
    gets zero residuals, the other rows exactly what they get alone, and once every row is redirected the patch
    graph does not run; with ``false`` (the default) the redirected row is patched as any other."""
    from runtime.guards import GuardContext

    bundled = next(g for g in gpipe.guards if g.name == "safepatch")
    assert bundled.config["yield_to_redirect"] is False  # the default
    yielding = type(bundled)(gpipe, {**bundled.config, "yield_to_redirect": True}, source="bundle")
    enc = gpipe.tokenizer(["", UNSAFE])
    x = np.random.default_rng(0).standard_normal((2, 4, 16, 16), dtype=np.float32)

    def residuals(guard, redirected):
        ctx = GuardContext(gpipe, UNSAFE, "", True, 2, 20, enc.input_ids)
        ctx.text = gpipe._encode_text([enc], True, "")
        guard.on_text(ctx)
        ctx.feeds = {"encoder_hidden_states": np.repeat(ctx.text["hidden"], 2, axis=0)}  # [uncond x 2; cond x 2]
        ctx.redirected.update(redirected)
        assert guard.prepare_steps(ctx, x.shape)
        return guard.step_feeds(ctx, 0, np.float32(500.0), x), ctx.report["safepatch"]

    alone, rep = residuals(yielding, set())
    assert rep["steps_patched"] == 1 and rep["steps_yielded"] == 0
    assert all(np.any(alone[t.name][3]) for t in yielding.residuals)  # the patch acts on the conditional rows
    one, rep = residuals(yielding, {1})
    assert rep["rows_yielded"] == [1] and rep["steps_patched"] == 1
    for t in yielding.residuals:
        assert np.array_equal(one[t.name][:3], alone[t.name][:3]) and not one[t.name][3].any()
    both, rep = residuals(yielding, {0, 1})
    assert rep["steps_patched"] == 0 and rep["steps_yielded"] == 1
    assert all(not both[t.name].any() for t in yielding.residuals)
    kept, rep = residuals(bundled, {0, 1})
    assert rep["steps_patched"] == 1 and rep["rows_yielded"] == []
    assert all(np.array_equal(kept[t.name], alone[t.name]) for t in bundled.residuals)


def test_idle_graph_is_the_plain_unet_over_the_same_weights(gpipe, base_pipe):
    """``denoise_idle`` (export/idle.py) takes the plain UNet's inputs, keeps no weights of its own (every
    initializer references the full graph's data file), and computes what the full graph computes with zero
    residuals, and what the unguarded bundle's denoise graph computes."""
    m = gpipe.bundle.manifest
    full, idle = m.component("denoise"), m.component("denoise_idle")
    assert idle.external_data == full.external_data == "denoise.data"
    assert [t.name for t in idle.inputs] == [t.name for t in base_pipe.bundle.manifest.component("denoise").inputs]
    shared = idle.extra["shared_weights"]
    data = m.component("denoise.data").size
    print(f"denoise_idle: {idle.size / 2**20:.2f} MiB graph, {shared}; shared data file {data / 2**20:.1f} MiB")
    assert shared["own"] == 0 and shared["shared_bytes"] > 0.9 * data and idle.size < 0.2 * data
    x, t, c, _ = (a.numpy() for a in _inputs(seed=5))
    feeds = {"sample": x, "timestep": t, "encoder_hidden_states": c}
    guard = next(g for g in gpipe.guards if g.name == "safepatch")
    got = gpipe.engines["denoise_idle"].infer(feeds)["noise_pred"]
    zero = gpipe.engines["denoise"].infer({**feeds, **guard.zero_feeds(2, 16, 16)})["noise_pred"]
    plain = base_pipe.engines["denoise"].infer(feeds)["noise_pred"]
    assert np.array_equal(got, plain)
    assert np.abs(got - zero).max() <= 1e-5


def test_unsafe_prompt_activates_the_patch(gpipe, base_pipe):
    r = gpipe.generate(UNSAFE, seed=3, steps=20, guidance=5.0)
    rep = r.report["guards"]["safepatch"]
    assert rep["active"] is True and rep["category"] == "weapon"
    assert rep["instruction"] == "remove the knife" and rep["steps_patched"] == 20 and rep["time_ms"] > 0
    assert r.report["stages_ms"]["denoise_idle_steps"] == []  # nonzero residuals: the full graph every step
    assert not np.array_equal(r.images[0], base_pipe.generate(UNSAFE, seed=3, steps=20, guidance=5.0).images[0])


# -- lean runtime vs PyTorch reference ---------------------------------------------------------------------------

def _reference(torch_parts, prompt: str, seed: int, steps: int = 20, guidance: float = 5.0):
    """Diffusers' DDIMScheduler loop on the UNet, with the gate and the patch in PyTorch (cond rows only)."""
    import diffusers
    import torch

    bb, patch, gate, config = torch_parts
    pipe = bb.pipeline
    spec = bb.text_encoders[0]

    def encode(texts):
        ids = pipe.tokenizer(texts, padding="max_length", max_length=spec.max_length, truncation=True,
                             return_tensors="pt").input_ids
        out = pipe.text_encoder(ids, return_dict=True).last_hidden_state
        first = (ids == spec.eos_id).int().argmax(-1)
        return out, out[torch.arange(len(texts)), first]

    with torch.no_grad():
        hidden, eos = encode(["", prompt])
        probs = gate(hidden, eos)[1]
        active = float(1 - probs[0]) >= config.threshold
        inst = None
        if active:
            category = config.categories[int(probs[1:].argmax())]
            inst = encode([config.instructions[category]])[0]
        sched = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(steps)
        _, noise = initial_noise(seed, (1, 4, 16, 16))
        x = torch.from_numpy(noise) * sched.init_noise_sigma
        for t in sched.timesteps:
            xin = torch.cat([x, x])
            kwargs = {}
            if active:
                res = patch(x, t.float().reshape(1), hidden[1:], inst)
                kwargs = {"down_block_additional_residuals": tuple(torch.cat([torch.zeros_like(r), r]) for r in res[:-1]),
                          "mid_block_additional_residual": torch.cat([torch.zeros_like(res[-1]), res[-1]])}
            out = bb.unet(xin, t, hidden, **kwargs).sample
            u, c = out.chunk(2)
            x = sched.step(u + guidance * (c - u), t, x).prev_sample
        image = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
        return ((image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()), active


@pytest.mark.slow
@pytest.mark.parametrize("prompt,active", [(BENIGN, False), (UNSAFE, True)])
def test_lean_matches_pytorch_reference(gpipe, torch_parts, prompt, active):
    ref, ref_active = _reference(torch_parts, prompt, seed=5)
    r = gpipe.generate(prompt, seed=5, steps=20, guidance=5.0)
    assert ref_active is active and r.report["guards"]["safepatch"]["active"] is active
    mse = float(np.mean((r.images[0] / 255.0 - ref) ** 2))
    psnr = 10 * np.log10(1.0 / max(mse, 1e-12))
    print(f"PSNR lean vs PyTorch reference, {'triggered' if active else 'gated off'}: {psnr:.2f} dB")
    assert psnr >= 40


def _tiny_sdxl_unet():
    """The tiny SDXL fixture's UNet architecture (text_time conditioning, depth 2), random weights."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, layers_per_block=2, block_out_channels=(32, 64), transformer_layers_per_block=(1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=96,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 48,
    ).eval()


def test_sdxl_patch_is_a_zero_init_clone_fed_the_text_time_conditioning():
    """On an SDXL UNet the untrained patch adds exact zeros, and its encoder clone computes the UNet's own mid-block
    features from the same text_time conditioning (identity zero-convs expose them: the add embedding is wired)."""
    import torch

    from guards.safepatch import SafePatch, SafePatchConfig

    unet = _tiny_sdxl_unet()
    patch = SafePatch.from_unet(unet, SafePatchConfig.for_unet(unet, 96)).eval()
    g = torch.Generator().manual_seed(1)
    x, t, c = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([641.0]), torch.randn(2, 7, 96, generator=g)
    s = torch.randn(2, 5, 96, generator=g)
    added = {"text_embeds": torch.randn(2, 48, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    seen = {}
    hook = unet.mid_block.register_forward_hook(lambda m, i, o: seen.__setitem__("mid", o))
    with torch.no_grad():
        res = patch(x, t, c, s, added_cond_kwargs=added)
        assert all(torch.count_nonzero(r) == 0 for r in res)
        base = unet(x, t.expand(2), c, added_cond_kwargs=added).sample
        patched = unet(x, t.expand(2), c, added_cond_kwargs=added, down_block_additional_residuals=res[:-1],
                       mid_block_additional_residual=res[-1]).sample
        assert torch.equal(base, patched)
        torch.nn.init.dirac_(patch.mid_zero_conv.weight)
        mid = patch(x, t, c, s, added_cond_kwargs=added)[-1]
    hook.remove()
    assert torch.allclose(mid, seen["mid"], atol=1e-5)
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        patch(x, t, c, s)
