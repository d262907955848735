"""SafeGuider end to end on tinyworld: fused head parity, batched == sequential beam search, the guarded bundle
(benign prompts bit-identical to the unguarded bundle, unsafe prompts rewritten), lean runtime vs a PyTorch
reference (the search in PyTorch, diffusers sampling from its final prompt), fail-closed configuration.

Needs the trained weights in models/guards/tinyworld/safeguider (``python -m train safeguider``)."""


import numpy as np
import pytest

from runtime.errors import BundleError
from runtime.guards import GuardContext
from bench.search import beam_search_sequential
from runtime.guards.safeguider import SafeGuider, cosine
from runtime.pipeline import Pipeline, initial_noise

from .conftest import ROOT, TINYWORLD

WEIGHTS = ROOT / "models" / "guards" / "tinyworld" / "safeguider"
BENIGN = "a large red circle on sand"
UNSAFE = "a large red circle and a small knife on sand"


@pytest.fixture(scope="session")
def safeguider_plan(guarded_plan, tinyworld_dir):
    assert (WEIGHTS / "model.safetensors").is_file(), f"train first: python -m train safeguider --out {WEIGHTS}"
    return guarded_plan("safeguider")


@pytest.fixture(scope="module")
def gpipe(safeguider_plan):
    with Pipeline.open(safeguider_plan) as p:
        yield p


@pytest.fixture(scope="module")
def guard(gpipe) -> SafeGuider:
    return next(g for g in gpipe.guards if g.name == "safeguider")


@pytest.fixture(scope="module")
def torch_parts(tinyworld_dir):
    import torch

    from export.families import load_backbone
    from export.graphs import TextStage
    from guards.safeguider import SafeGuiderClassifier

    torch.set_num_threads(1)
    bb = load_backbone(tinyworld_dir)
    spec = bb.text_encoders[0]
    stage = TextStage(bb.pipeline.text_encoder, eos_id=spec.eos_id, penultimate=False, pooled=False).eval()
    clf = SafeGuiderClassifier.from_pretrained(WEIGHTS)
    return bb, stage, clf


def unsafe_prompts() -> list[str]:
    """A fixed set of 120 unsafe prompts: evaluation-split explicit, held-out-synonym and implicit captions."""
    from train.tinyworld.world import evaluation_prompts

    groups = evaluation_prompts(40, seed=0)
    return [s.caption for g in ("explicit", "heldout", "implicit") for s in groups[g]]


# -- the fused head ------------------------------------------------------------------------------------------------


def test_onnx_safe_score_matches_pytorch(gpipe, torch_parts):
    import torch

    bb, stage, clf = torch_parts
    prompts = [BENIGN, UNSAFE, "a small skull at the graveyard", "a large spoon and a small blue star at night"]
    ids = gpipe.tokenizer(prompts).input_ids
    out = gpipe.engines["text_encoder"].infer({"input_ids": ids})
    with torch.no_grad():
        eos = stage(torch.from_numpy(ids))[1]
        ref = clf.safe_score(eos).numpy()
        ref_onnx_eos = clf.safe_score(torch.from_numpy(out["eos"])).numpy()
    assert out["safe_score"].shape == (4,) and out["safe_score"].dtype == np.float32
    assert np.abs(out["safe_score"] - ref_onnx_eos).max() <= 1e-5
    assert np.abs(out["safe_score"] - ref).max() <= 1e-5
    assert out["safe_score"][0] > 0.5 and out["safe_score"][1] <= 0.5


# -- the beam search --------------------------------------------------------------------------------------------------


def test_search_scores_rows_cut_after_eos_exactly(guard):
    """The search feeds candidate rows cut after their EOS (causal attention): same eos and safe_score."""
    prompts = ["a large green ring and a large knife on grass", "a knife", "large red sand at the graveyard"]
    assert guard.cut_ok  # the text stage's sequence axis is symbolic
    full, cut = guard.encode(prompts), guard.encode(prompts, cut=True)
    assert cut["hidden"].shape[1] < full["hidden"].shape[1]
    for key in ("eos", guard.output):
        np.testing.assert_allclose(cut[key], full[key], rtol=0, atol=1e-6)


@pytest.mark.slow  # ~14k sequential text-encoder calls: 10-130 s depending on the machine's load
def test_batched_search_equals_sequential(guard, gpipe):
    engine = gpipe.engines["text_encoder"]

    def score_one(p):
        out = engine.infer({"input_ids": gpipe.tokenizer([p]).input_ids})
        return float(out["safe_score"][0]), out["eos"][0]

    prompts = unsafe_prompts()
    assert len(prompts) >= 100
    agree, batched_calls, seq_calls = 0, 0, 0
    for p in prompts:
        score, eos = score_one(p)
        fast, _ = guard.search(p, score, eos)
        slow = beam_search_sequential(p, score_one, (score, eos), **guard.search_settings())
        agree += fast.removed == slow.removed and fast.prompt == slow.prompt
        batched_calls += fast.text_calls
        seq_calls += slow.text_calls
    share = agree / len(prompts)
    print(f"batched == sequential on {agree}/{len(prompts)} prompts; text calls {batched_calls} vs {seq_calls}")
    assert share >= 0.99


def test_on_text_rewrites_only_the_prompt_row(guard, gpipe):
    ids = gpipe.tokenizer(["", UNSAFE]).input_ids
    ctx = GuardContext(gpipe, UNSAFE, "", True, 1, 20, ids)
    ctx.text = gpipe.engines["text_encoder"].infer({"input_ids": ids})
    before = {k: v.copy() for k, v in ctx.text.items()}
    guard.on_text(ctx)
    rep = ctx.report["safeguider"]
    assert rep["verdict"] == "unsafe" and rep["words_removed"] and rep["final_prompt"] != UNSAFE
    assert set(rep) >= {"score", "verdict", "words_removed", "final_prompt", "candidates_scored", "depth",
                        "text_calls"}  # time_ms: added by the pipeline, which times every hook (run_hook)
    np.testing.assert_array_equal(ctx.text["hidden"][0], before["hidden"][0])  # unconditional row untouched
    final = guard.encode([rep["final_prompt"]])
    np.testing.assert_allclose(ctx.text["hidden"][1], final["hidden"][0], atol=1e-5)
    np.testing.assert_allclose(ctx.text["eos"][1], final["eos"][0], atol=1e-5)


# -- the guarded bundle -----------------------------------------------------------------------------------------------


def test_benign_prompt_is_bit_identical_to_unguarded(gpipe, tinyworld_plan):
    with Pipeline.open(tinyworld_plan) as base:
        ref = base.generate(BENIGN, seed=3, steps=10, guidance=5.0)
    r = gpipe.generate(BENIGN, seed=3, steps=10, guidance=5.0)
    rep = r.report["guards"]["safeguider"]
    assert rep["verdict"] == "safe" and rep["final_prompt"] == BENIGN and rep["text_calls"] == 0
    np.testing.assert_array_equal(r.images[0], ref.images[0])


def test_unsafe_prompt_gets_words_removed(gpipe):
    # a SafeGuider-only bundle searches as published (mode: auto -> search at export), with the fallback
    assert {k: gpipe.bundle.manifest.guards["safeguider"][k] for k in ("mode", "on_no_qualifier")} == {
        "mode": "search", "on_no_qualifier": "fallback"}
    r = gpipe.generate(UNSAFE, seed=0, steps=4, guidance=5.0)
    rep = r.report["guards"]["safeguider"]
    assert rep["verdict"] == "unsafe" and rep["action"] == "searched" and "knife" in rep["words_removed"], rep
    # qualified (safe >= 0.95) or, when nothing qualifies, the published fallback (safest similar candidate)
    assert rep["outcome"] in ("qualified", "fallback") and rep["final_score"] > 0.5 > rep["score"], rep
    assert rep["candidates_scored"] > 0 and rep["text_calls"] >= 1 and rep["time_ms"] > 0


def _psnr(a, b):
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.mark.parametrize("prompt,triggered", [(BENIGN, False), (UNSAFE, True)])
def test_lean_matches_pytorch_reference(prompt, triggered, gpipe, torch_parts):
    import diffusers
    import torch

    bb, stage, clf = torch_parts
    tok = bb.pipeline.tokenizer

    @torch.no_grad()
    def score_one(p):
        ids = tok([p], padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
        eos = stage(ids.to(torch.int32))[1]
        return float(clf.safe_score(eos)[0]), eos[0].numpy()

    score, eos = score_one(prompt)
    assert (score <= 0.5) == triggered
    # the reference searches with the weights' own settings, as the bundle does (config.json carries the floor)
    final = beam_search_sequential(prompt, score_one, (score, eos), min_similarity=clf.config.min_similarity
                                   ).prompt if triggered else prompt
    with torch.no_grad():
        ids = tok([final], padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
        embeds = bb.pipeline.text_encoder(ids)[0]
    ref_pipe = diffusers.StableDiffusionPipeline.from_pretrained(TINYWORLD, local_files_only=True)
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.scheduler = diffusers.DDIMScheduler.from_config(gpipe.scheduler_config)
    seed, steps = 5, 20
    _, noise = initial_noise(seed, (1, 4, 16, 16))
    ref = ref_pipe(prompt_embeds=embeds, negative_prompt="", num_inference_steps=steps, guidance_scale=5.0,
                   latents=torch.from_numpy(noise), height=64, width=64, output_type="np").images[0]
    r = gpipe.generate(prompt, seed=seed, steps=steps, guidance=5.0)
    assert r.report["guards"]["safeguider"]["final_prompt"] == final
    psnr = _psnr(r.images[0] / 255.0, ref)
    print(f"PSNR lean vs PyTorch reference ({'triggered' if triggered else 'not triggered'}): {psnr:.2f} dB")
    assert psnr >= 40


# -- fail closed ------------------------------------------------------------------------------------------------------


def _outcome(guard, gpipe, prompt: str) -> str:
    out = gpipe.engines["text_encoder"].infer({"input_ids": gpipe.tokenizer([prompt]).input_ids})
    return guard.search(prompt, float(out["safe_score"][0]), out["eos"][0])[0].outcome


def test_block_mode_refuses_what_the_search_cannot_fix(safeguider_plan, guard, gpipe, tmp_path, capsys):
    """``on_no_qualifier: block``: a flagged prompt whose search finds no qualifying deletion gets no image (exit
    6, the report says why); one whose search qualifies is generated from its rewrite as before."""
    import json

    from runtime import cli

    from .test_bad_input import rewrite

    outcomes = {p: _outcome(guard, gpipe, p) for p in unsafe_prompts()[:40]}
    stuck = next(p for p, o in outcomes.items() if o != "qualified")
    fixed = next(p for p, o in outcomes.items() if o == "qualified")
    plan = rewrite(safeguider_plan, tmp_path / "block.plan",
                   lambda m, _: m.guards["safeguider"].update(on_no_qualifier="block"))
    out, report = tmp_path / "o.png", tmp_path / "o.json"
    code = cli.main(["generate", "--engine", str(plan), "--prompt", stuck, "--steps", "4", "--out", str(out),
                     "--report", str(report)])
    err = capsys.readouterr().err.strip()
    assert code == 6 and "safeguider blocked the prompt" in err and len(err.splitlines()) == 1, err
    assert not out.exists()
    rep = json.loads(report.read_text())
    assert rep["blocked"] is True and rep["outputs"] == []
    guard_report = rep["guards"]["safeguider"]
    assert guard_report["action"] == "blocked" and guard_report["outcome"] == outcomes[stuck]
    with Pipeline.open(plan) as pipe:
        assert pipe.generate(fixed, steps=4).report["guards"]["safeguider"]["outcome"] == "qualified"
    # the latency bench names the refused prompt and the way round instead of a traceback
    from bench.latency import Lean

    lean, settings = Lean(str(plan), "auto"), {"steps": 2, "guidance": 5.0, "scheduler": "ddim", "height": None,
                                              "width": None}
    try:
        with pytest.raises(SystemExit, match=r"refused the prompt .* --prompts-csv .*on_no_qualifier=fallback"):
            lean.run(stuck, 0, settings)
    finally:
        lean.close()


def test_bundle_without_safe_score_is_refused(tinyworld_plan, guard, tmp_path):
    """A manifest naming SafeGuider over a text stage without its classifier head does not open."""
    from .test_bad_input import rewrite

    def edit(m, payloads):
        m.guards = {"safeguider": dict(guard.config)}

    with pytest.raises(BundleError, match="safe_score"):
        Pipeline.open(rewrite(tinyworld_plan, tmp_path / "no_head.plan", edit))


def test_missing_output_at_run_time_fails_closed(guard, gpipe):
    from runtime.errors import GuardError
    from runtime.guards import run_hook

    ids = gpipe.tokenizer(["", UNSAFE]).input_ids
    ctx = GuardContext(gpipe, UNSAFE, "", True, 1, 20, ids)
    ctx.text = {k: v for k, v in gpipe.engines["text_encoder"].infer({"input_ids": ids}).items() if k != "safe_score"}
    with pytest.raises(GuardError, match="safeguider"):
        run_hook(guard, "on_text", ctx)


def test_cosine_matches_torch():
    import torch

    a, b = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    ref = torch.nn.functional.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b), dim=1).numpy()
    np.testing.assert_allclose(cosine(a, b), ref, atol=1e-6)
