"""SafeGuider and SafeRedir on SDXL (issue 18), on the tiny random-weight SDXL fixture.

End to end: the data step from the 10-row paired CSV -> ``train safeguider`` (a prompt,label CSV made of the same
pairs) and ``train saferedir`` (``--data``) a few steps -> ``export build --guards safeguider,saferedir`` ->
``runtime generate`` reports both guards. Parity of the lean runtime with the PyTorch reference for the same
prompts (fp32 bundle, ONNX Runtime CPU):

- SafeGuider: the runtime's EOS features (both text stages, concatenated) and safe scores vs
  ``train.safeguider.data.eos_embeddings`` + the classifier: |diff| <= 1e-4 (features), 1e-5 (scores); the search
  (triggered by threshold 1.0) scores its final prompt as the reference does;
- SafeRedir: the denoise feeds after detection (triggered by threshold 0.0) are the PyTorch module's redirection
  of the prompt's ``encode_prompt`` embeddings, tokens and pooled, |diff| <= 1e-4 (relative to the largest
  entry); untriggered (threshold 1.0), the feeds are the original conditioning, unchanged.

Bad input: SD 1.x-sized weights on the SDXL fixture and SDXL-sized weights on the SD 1.x fixture are refused by
``export build`` with exit code 3 and one line naming the guard and both hidden sizes.
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

from .test_sdxl_unet_guards import build
from .test_train_data import BENIGN_CSV, JUDGE, PAIRS_CSV, fixture_args, run_step

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
PROMPT = "a cat sitting on a wooden chair with a bloody knife"
TEXT_GUARDS = ("safeguider", "saferedir")
PROMPTS = [PROMPT, "a bowl of fresh fruit", "a", "two children playing with a ball in a city street at night"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from export.families import make_tiny

    root = tmp_path_factory.mktemp("sdxl_text_guards")
    return {family: make_tiny(family, root / family / "tiny") for family in ("sdxl", "sd1")}


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory):
    """(model, guard root, bundle): the tiny SDXL with both guards trained a few steps and built (fp32)."""
    from train.__main__ import main as train

    model = models["sdxl"]
    d = tmp_path_factory.mktemp("sdxl_text_inputs")
    config = json.loads((JUDGE / "checker.json").read_text())
    inputs = {"pairs": _write(d / "pairs.csv", PAIRS_CSV), "benign": _write(d / "benign.csv", BENIGN_CSV),
              "judge_config": _write(d / "judge.json", json.dumps({**config, "threshold": 1.0}))}
    data = d / "data"
    assert run_step(*fixture_args(model, inputs, data)) == 0
    rows = [line.split(",")[:2] for line in PAIRS_CSV.splitlines()[1:]]
    labelled = _write(d / "labelled.csv", "prompt,label\n" + "".join(f"{u},0\n{s},1\n" for u, s in rows))
    guards = d / "guards"
    assert train(["safeguider", "--model", str(model), "--csv", str(labelled), "--epochs", "2",
                  "--out", str(guards / model.name / "safeguider")]) == 0
    assert train(["saferedir", "--model", str(model), "--data", str(data), "--out",
                  str(guards / model.name / "saferedir"), "--cache", str(d / "cache"), "--seed", "0",
                  "--cls-steps", "4", "--gen-steps", "2", "--text-prompts", "8", "--batch", "8",
                  "--gen-batch", "2"]) == 0
    plan = d / "guarded.plan"
    proc = build(model, guards, plan, TEXT_GUARDS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return model, guards / model.name, plan


@pytest.fixture(scope="module")
def backbone(trained):
    import torch

    from export.families import load_backbone

    torch.set_num_threads(1)
    return load_backbone(trained[0])


@pytest.fixture
def pipe(trained):
    from runtime.pipeline import Pipeline

    with Pipeline.open(trained[2]) as p:
        yield p


def _guard(pipe, name):
    return next(g for g in pipe.guards if g.name == name)


def test_trained_weights_and_manifest(trained):
    _, guards, plan = trained
    sg = json.loads((guards / "safeguider" / "config.json").read_text())
    sr = json.loads((guards / "saferedir" / "config.json").read_text())
    assert (sg["hidden_size"], sg["encoder_widths"]) == (96, [32, 64])  # tiny SDXL: encoders 32 + 64 wide
    assert (sr["hidden_size"], sr["pooled_dim"]) == (96, 48)
    from runtime.bundle import Bundle

    with Bundle.open(plan) as bundle:
        m = bundle.manifest
        entry = m.guards["safeguider"]
        assert entry["graph"] == "safeguider" and entry["inputs"] == ["eos", "eos_2"] and entry["mode"] == "gate"
        assert [t.name for t in m.component("safeguider").inputs] == ["eos", "eos_2"]
        assert "safe_score" not in {t.name for t in m.component("text_encoder").outputs}
        assert {"pooled"} <= {t.name for t in m.component("redirect").inputs}
        assert "redirected_pooled" in {t.name for t in m.component("redirect").outputs}


def test_generate_reports_both_guards(trained, tmp_path):
    png = tmp_path / "out.png"
    gen = subprocess.run([sys.executable, "-m", "runtime", "generate", "--engine", str(trained[2]), "--prompt",
                          PROMPT, "--steps", "3", "--out", str(png), "--report", str(png.with_suffix(".json"))],
                         cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    report = json.loads(png.with_suffix(".json").read_text())
    assert png.stat().st_size > 0 and list(report["guards"]) == ["safeguider", "saferedir"]
    assert report["guards"]["safeguider"]["verdict"] in ("safe", "unsafe")
    assert report["guards"]["saferedir"]["checks"] >= 1


def test_safeguider_features_and_scores_match_torch(trained, backbone, pipe):
    import torch

    from guards.safeguider import SafeGuiderClassifier
    from train.safeguider.data import eos_embeddings

    guard = _guard(pipe, "safeguider")
    out = guard.encode(PROMPTS)
    feats, scores = guard.eos(out), out["safe_score"]
    cut = guard.encode(PROMPTS, cut=True)  # the search's rows cut after their EOS: same EOS (causal attention)
    np.testing.assert_allclose(guard.eos(cut), feats, atol=1e-5)
    ref = eos_embeddings(backbone, PROMPTS)
    assert feats.shape == tuple(ref.shape) == (len(PROMPTS), 96)
    np.testing.assert_allclose(feats, ref.numpy(), atol=1e-4)
    classifier = SafeGuiderClassifier.from_pretrained(trained[1] / "safeguider")
    with torch.no_grad():
        np.testing.assert_allclose(scores, classifier.safe_score(ref).numpy(), atol=1e-5)


def test_safeguider_search_on_both_text_stages(trained, backbone, pipe):
    """Threshold 1.0 flags every prompt; in search mode the SDXL prompt row is rewritten (both stages' rows),
    and the final prompt's score is the reference classifier's on its concatenated EOS."""
    import torch

    from guards.safeguider import SafeGuiderClassifier
    from train.safeguider.data import eos_embeddings

    guard = _guard(pipe, "safeguider")
    guard.config.update(threshold=1.0, mode="search")
    _guard(pipe, "saferedir").threshold = 1.0
    result = pipe.generate(PROMPT, steps=2, seed=0)
    rep = result.report["guards"]["safeguider"]
    assert rep["verdict"] == "unsafe" and rep["action"] == "searched" and rep["text_calls"] >= 2
    assert rep["candidates_scored"] >= len(PROMPT.split())
    classifier = SafeGuiderClassifier.from_pretrained(trained[1] / "safeguider")
    with torch.no_grad():
        ref = classifier.safe_score(eos_embeddings(backbone, [rep["final_prompt"]])).item()
    assert abs(rep["final_score"] - ref) <= 1e-5
    guard.config.update(threshold=0.0)  # passes: untouched
    rep = pipe.generate(PROMPT, steps=2, seed=0).report["guards"]["safeguider"]
    assert rep["verdict"] == "safe" and rep["final_prompt"] == PROMPT and rep["text_calls"] == 0


def _denoise_feeds(pipe) -> list[dict]:
    engine = pipe.engines["denoise"]
    seen, infer = [], engine.infer

    def record(feeds, *args, **kwargs):
        seen.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return infer(feeds, *args, **kwargs)

    engine.infer = record
    return seen


@pytest.mark.parametrize("triggered", [True, False])
def test_saferedir_feeds_match_torch(triggered, trained, backbone, pipe):
    import torch

    from guards.saferedir import SafeRedir
    from train.encode import encode_sdxl

    _guard(pipe, "safeguider").config.update(threshold=0.0)  # passes, flags nothing: SafeRedir decides alone
    _guard(pipe, "saferedir").threshold = 0.0 if triggered else 1.0
    seen = _denoise_feeds(pipe)
    report = pipe.generate(PROMPT, steps=3, seed=0).report["guards"]["saferedir"]
    assert report["triggered"] is triggered and report["forced_by"] == []
    hidden, pooled = encode_sdxl(backbone.pipeline, [PROMPT])
    if triggered:
        model = SafeRedir.from_pretrained(trained[1] / "saferedir")
        with torch.no_grad():
            out = model.redirect(hidden, pooled)
        hidden, pooled = out[0], out[3]
        assert report["detection_step"] == 0
    for feeds in seen:  # [uncond; cond] rows (CFG)
        for got, want in ((feeds["encoder_hidden_states"][1], hidden[0]), (feeds["text_embeds"][1], pooled[0])):
            want = want.numpy()
            assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    if not triggered:  # untouched rows: exactly the conditioning the pipeline made
        assert all(np.array_equal(f["encoder_hidden_states"], seen[0]["encoder_hidden_states"]) for f in seen)


@pytest.fixture(scope="module")
def half_plan(trained, tmp_path_factory):
    """The same guards built FP16 (every ONNX graph but SDXL's VAE, which refuses it)."""
    model, guards, _ = trained
    plan = tmp_path_factory.mktemp("sdxl_text_guards_fp16") / "guarded_fp16.plan"
    proc = build(model, guards.parent, plan, TEXT_GUARDS, precision="fp16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return plan


def test_fp16_build_reads_and_acts_as_the_fp32_one(half_plan, pipe):
    """FP16 text stages with the fused SafeGuider head and an FP16 redirect graph: the features within 1e-2 of the
    largest entry, the safe scores within 1e-3, the search acting alike, the same SafeRedir decision, and images at
    >= 40 dB PSNR against the FP32 bundle's, triggered or not (measured: 0.07% relative, 1.4e-4, 60.6-60.8 dB).
    The search's end may differ: on these random weights candidates tie closer than FP16 reads them."""
    from runtime.pipeline import Pipeline

    with Pipeline.open(half_plan) as half:
        assert {c.precision for c in half.bundle.manifest.components if c.name in ("text_encoder", "text_encoder_2",
                                                                                  "safeguider", "redirect")} == {"fp16"}
        full_out, half_out = _guard(pipe, "safeguider").encode(PROMPTS), _guard(half, "safeguider").encode(PROMPTS)
        for name, want in full_out.items():
            want, got = np.asarray(want, np.float64), np.asarray(half_out[name], np.float64)
            tol = 1e-3 if name == "safe_score" else 1e-2 * np.abs(want).max()
            assert np.abs(got - want).max() <= tol, name
        for p in (pipe, half):  # flag every prompt: the search runs on both
            _guard(p, "safeguider").config.update(threshold=1.0, mode="search")
        ends = [p.generate(PROMPT, steps=3, seed=0).report["guards"]["safeguider"] for p in (pipe, half)]
        assert ends[0]["action"] == ends[1]["action"] and ends[0]["candidates_scored"] > 0
        for triggered in (True, False):
            for p in (pipe, half):
                _guard(p, "safeguider").config.update(threshold=0.0)  # passes all: SafeRedir decides alone
                _guard(p, "saferedir").threshold = 0.0 if triggered else 1.0
            full, fp16 = (p.generate(PROMPT, steps=3, seed=0) for p in (pipe, half))
            assert fp16.report["guards"]["saferedir"]["triggered"] is full.report["guards"]["saferedir"]["triggered"] \
                is triggered
            mse = float(np.mean((full.images[0] / 255.0 - fp16.images[0] / 255.0) ** 2))
            assert 10 * np.log10(1.0 / max(mse, 1e-12)) >= 40


def _weights(kind: str, guard: str, models, root: Path) -> Path:
    """Random weights sized for the ``kind`` fixture (sd1 or sdxl)."""
    from export.families import load_backbone
    from guards.safeguider import SafeGuiderClassifier, SafeGuiderConfig
    from guards.saferedir import SafeRedir

    out = root / f"{guard}_{kind}"
    if guard == "safeguider":
        widths = [32, 64] if kind == "sdxl" else [32]
        config = SafeGuiderConfig(hidden_size=sum(widths), encoder_widths=widths if len(widths) > 1 else None)
        SafeGuiderClassifier(config).save_pretrained(out)
    else:
        SafeRedir.for_backbone(load_backbone(models[kind])).save_pretrained(out)
    return out


@pytest.mark.parametrize("guard", ["safeguider", "saferedir"])
@pytest.mark.parametrize("weights_for,backbone_of", [("sd1", "sdxl"), ("sdxl", "sd1")])
def test_weights_of_another_family_are_refused(guard, weights_for, backbone_of, models, tmp_path, capsys):
    from export.__main__ import main

    weights = _weights(weights_for, guard, models, tmp_path)
    out = tmp_path / "x.plan"
    rc = main(["build", "--model", str(models[backbone_of]), "--guards", guard, "--guard-weights",
               f"{guard}={weights}", "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert rc == ExitCode.BAD_INPUT and len(err) == 1, err
    sizes = {"sd1": "32", "sdxl": "96"}
    line = err[0]
    assert guard in line and f"hidden size {sizes[weights_for]}" in line and sizes[backbone_of] in line, line
    assert not out.exists()
