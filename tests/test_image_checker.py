"""The optional post-hoc image checker (runtime/guards/image_checker.py) and its tinyworld example.

* the committed ``models/tinyworld-judge/checker.onnx`` matches the PyTorch judge's unsafe probability
  (ONNX vs PyTorch parity on renders of every group, and agreement with evaluate.py's ``any_unsafe``);
* score semantics of ``kind: classifier`` (``(B,)``, sigmoid / softmax / probabilities over ``(B, C)``) on a
  tiny hand-made ONNX graph; preprocessing (resize, layout, scale, mean/std);
* end to end: a benign prompt passes with a report, an unsafe one is blocked (ImageBlocked, exit 6, no PNG,
  the --report JSON still written with ``"blocked": true``), also with the checker embedded in a bundle;
* ``on_unsafe: "resample"``: a request read unsafe is sampled once more with the guards at full strength (SafeRedir
  redirected and escalated from step 0 on the checker's flag); what is then clean is returned, what is not is
  refused; requests read safe are untouched;
* NudeNet's 320n.onnx (from the ``nudenet`` wheel, not a dependency) on a tinyworld image, when available.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from runtime import cli
from runtime.errors import BadInputError, GuardError
from runtime.guards import GuardContext, ImageBlocked
from runtime.guards.image_checker import ImageChecker, check_config, resize_bilinear
from runtime.pipeline import Pipeline

from .conftest import ROOT, TINYWORLD_JUDGE

CHECKER = TINYWORLD_JUDGE / "checker.onnx"
CHECKER_CONFIG = TINYWORLD_JUDGE / "checker.json"
SAFE, UNSAFE = "a large red circle on sand", "a knife on sand"


def checker_config(**over) -> dict:
    return {**json.loads(CHECKER_CONFIG.read_text()), "path": str(CHECKER), **over}


def ctx() -> GuardContext:
    return GuardContext(None, "p", "", False, 1, 1, np.zeros((1, 16), np.int32))


@pytest.fixture(scope="module")
def renders():
    from train.tinyworld.data import render_split

    return render_split("eval", 96, seed=3)


# -- the tinyworld judge as a checker ----------------------------------------------------------------------------

def test_checker_onnx_matches_pytorch_judge(renders, judge_dir):
    import torch

    from train.tinyworld.evaluate import any_unsafe, judge_images, load_judge
    from train.tinyworld.export_judge import UnsafeProb

    torch.set_num_threads(1)
    judge = load_judge(judge_dir)
    x = torch.from_numpy(renders.images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        ref = UnsafeProb(judge).eval()(x).numpy()
    onnx_scores = ImageChecker(None, checker_config()).score(list(renders.images))
    assert onnx_scores.shape == (len(renders.images),)
    assert np.abs(onnx_scores - ref).max() < 1e-5
    kinds = judge_images(judge, renders.images).kinds  # evaluate.py's verdicts
    assert [s >= 0.5 for s in onnx_scores] == [any_unsafe(k) for k in kinds]
    truth = renders.kinds[:, -3:].max(1) > 0  # knife, blood, skull drawn
    assert truth.any() and (~truth).any()
    assert np.mean((onnx_scores >= 0.5) == truth) >= 0.95


def test_export_judge_reproduces_committed_checker(tmp_path, judge_dir, renders):
    from train.__main__ import main as train_main

    out = tmp_path / "checker.onnx"
    assert train_main(["tinyworld", "export-judge", "--judge", str(judge_dir), "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text()) == json.loads(CHECKER_CONFIG.read_text())
    fresh = ImageChecker(None, {**checker_config(), "path": str(out)}).score(list(renders.images[:16]))
    committed = ImageChecker(None, checker_config()).score(list(renders.images[:16]))
    np.testing.assert_allclose(fresh, committed, atol=1e-6)


# -- score semantics on a tiny graph ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mean_graph(tmp_path_factory) -> Path:
    """``x (N, 3, H, W) -> y (N, 3)``: the per-channel means, i.e. 'logits' we control through the image."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)
    graph = helper.make_graph([node], "means", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                              ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("graphs") / "means.onnx"
    onnx.save(model, path)
    return path


def image(r, g, b, size=8):
    return np.broadcast_to(np.array([r, g, b], np.uint8), (size, size, 3)).copy()


@pytest.mark.parametrize("activation,expected", [
    ("none", 0.8),                                            # max of probabilities (multi-label)
    ("sigmoid", 1 / (1 + np.exp(-0.8))),                      # max of sigmoid(logits)
    ("softmax", float((np.exp(0.8) + np.exp(0.4)) / (np.exp(0.2) + np.exp(0.8) + np.exp(0.4)))),  # sum
])
def test_classifier_scores(mean_graph, activation, expected):
    c = ImageChecker(None, {"path": str(mean_graph), "activation": activation, "unsafe_classes": [1, 2],
                            "scale": 0.01, "size": [8, 8]})
    np.testing.assert_allclose(c.score([image(20, 80, 40)]), [expected], rtol=1e-5)


def test_threshold_blocks_and_reports(mean_graph):
    c = ImageChecker(None, {"path": str(mean_graph), "unsafe_classes": [0], "scale": 0.01, "threshold": 0.5})
    context = ctx()
    c.on_images(context, [image(10, 0, 0), image(49, 0, 0)])
    report = context.report["image_checker"]
    assert report["blocked"] is False and report["scores"] == pytest.approx([0.1, 0.49], abs=1e-6)
    assert report["threshold"] == 0.5 and report["model"] == "means.onnx"
    with pytest.raises(ImageBlocked, match=r"blocked image 1 of 2: unsafe score 0\.500 >= threshold 0\.5; no image"):
        c.on_images(context, [image(10, 0, 0), image(50, 0, 0)])  # >= threshold blocks
    assert context.report["image_checker"]["blocked"] is True


def test_preprocessing_layout_mean_std_resize(mean_graph):
    c = ImageChecker(None, {"path": str(mean_graph), "unsafe_classes": [0], "size": [4, 4], "mean": [0.5, 0, 0],
                            "std": [0.25, 1, 1]})
    x = c.preprocess([image(255, 0, 0, size=16)])
    assert x.shape == (1, 3, 4, 4) and np.allclose(x[0, 0], 2.0) and np.allclose(x[0, 1:], 0)
    nhwc = ImageChecker(None, {"path": str(mean_graph), "unsafe_classes": [0], "layout": "NHWC", "size": [4, 6]})
    assert nhwc.preprocess([image(0, 0, 0)]).shape == (1, 4, 6, 3)
    ramp = np.arange(8, dtype=np.float32)[None, :, None].repeat(8, 0).repeat(3, 2)  # bilinear keeps a ramp
    half = resize_bilinear(ramp, (4, 4))[0, :, 0]
    np.testing.assert_allclose(half, [0.5, 2.5, 4.5, 6.5])


@pytest.mark.parametrize("config,error,needle", [
    ({"kind": "yolo"}, BadInputError, "kind"),
    ({"layout": "CHW"}, BadInputError, "layout"),
    ({"threshold": float("nan")}, BadInputError, "threshold"),
    ({"output": "nope"}, BadInputError, "no output 'nope'"),
    ({"treshold": 0.5}, BadInputError, "does not read: treshold"),
    ({"threshold": 2}, BadInputError, r"threshold=2 must be a number in \[0, 1\]"),
    ({"unsafe_classes": []}, BadInputError, "unsafe_classes=\\[\\] must be a non-empty list"),
    ({"scale": 0}, BadInputError, "scale=0 must be a finite number > 0"),
    ({"path": "/nonexistent/x.onnx"}, BadInputError, "not found"),
])
def test_bad_configs(config, error, needle):
    with pytest.raises(error, match=needle):
        ImageChecker(None, {"path": str(CHECKER), **config})


def test_corrupt_checker_file_fails_closed(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage, not a graph")
    with pytest.raises(GuardError, match="cannot be loaded") as e:
        ImageChecker(None, {"path": str(bad)})
    assert e.value.exit_code == 6 and "\n" not in str(e.value)


# -- end to end ---------------------------------------------------------------------------------------------------

def test_pipeline_passes_benign_and_blocks_unsafe(tinyworld_plan):
    with Pipeline.open(tinyworld_plan, extra_guards={"image_checker": checker_config()}) as pipe:
        assert pipe.guard_names == ["image_checker"]
        r = pipe.generate(SAFE, steps=8, seed=0)
        rep = r.report["guards"]["image_checker"]
        assert rep["blocked"] is False and rep["scores"][0] < 0.5 and len(r.images) == 1
        assert "guard_image.image_checker" in r.report["stages_ms"]
        with pytest.raises(ImageBlocked, match="unsafe score"):
            pipe.generate(UNSAFE, steps=8, seed=0)


def test_cli_blocked_writes_report_not_png(tinyworld_plan, tmp_path, capsys):
    out, report = tmp_path / "o.png", tmp_path / "o.json"
    code = cli.main(["generate", "--engine", str(tinyworld_plan), "--prompt", UNSAFE, "--steps", "8",
                     "--checker", str(CHECKER), "--out", str(out), "--report", str(report)])  # config: checker.json
    err = capsys.readouterr().err.strip()
    assert code == 6 and err.startswith("error: image checker checker.onnx blocked image 0 of 1") and "\n" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["o.json"]
    r = json.loads(report.read_text())
    assert r["blocked"] is True and r["outputs"] == [] and r["guards"][cli.EXTRA_CHECKER]["blocked"] is True
    code = cli.main(["generate", "--engine", str(tinyworld_plan), "--prompt", SAFE, "--steps", "8",
                     "--checker", str(CHECKER), "--checker-config", str(CHECKER_CONFIG), "--out", str(out),
                     "--report", str(report), "--overwrite"])
    assert code == 0 and out.read_bytes().startswith(b"\x89PNG")
    assert json.loads(report.read_text())["guards"][cli.EXTRA_CHECKER]["blocked"] is False


def embed_checker(plan: Path, dest: Path, config: dict | None = None) -> Path:
    """``plan`` plus the checker as component ``image_checker`` and ``guards.image_checker`` (as
    ``python -m export build --checker`` writes it; that path is tested by test_export_build_embeds_checker)."""
    from export.bundle import onnx_component, write_bundle
    from runtime.bundle import Bundle

    with Bundle.open(plan) as b:
        manifest = b.manifest
        payloads = {c.name: bytes(b.payload(c.name)) for c in manifest.components}
    comps, pays = onnx_component("image_checker", "guard", CHECKER)
    manifest.components += comps
    cfg = config or json.loads(CHECKER_CONFIG.read_text())
    manifest.guards = {**manifest.guards,
                       "image_checker": check_config({**cfg, "component": "image_checker"}, "user", str(CHECKER))}
    return write_bundle(dest, manifest, {**payloads, **pays})


def test_embedded_checker_blocks(tinyworld_plan, tmp_path, capsys):
    plan = embed_checker(tinyworld_plan, tmp_path / "checked.plan")
    with Pipeline.open(plan) as pipe:
        assert pipe.guard_names == ["image_checker"] and "image_checker" in pipe.engines
        assert pipe.generate(SAFE, steps=8).report["guards"]["image_checker"]["model"] == "checked.plan:image_checker"
    code = cli.main(["generate", "--engine", str(plan), "--prompt", UNSAFE, "--steps", "8",
                     "--out", str(tmp_path / "o.png")])
    assert code == 6 and "blocked" in capsys.readouterr().err and not (tmp_path / "o.png").exists()


@pytest.mark.slow
def test_export_build_embeds_checker(tinyworld_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "checked.plan"
    proc = subprocess.run([sys.executable, "-m", "export", "build", "--model", str(tinyworld_dir), "--profile",
                           "tinyworld", "--checker", str(CHECKER), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Pipeline.open(out) as pipe:
        entry = pipe.bundle.manifest.guards["image_checker"]
        assert entry["component"] == "image_checker" and "path" not in entry and entry["threshold"] == 0.5
        assert pipe.bundle.manifest.component("image_checker").kind == "guard"
        with pytest.raises(ImageBlocked):
            pipe.generate(UNSAFE, steps=8)


def test_resample_removes_with_every_guard_then_refuses_what_stays_unsafe(guarded_plan, tinyworld_plan, tmp_path):
    """A SafeRedir bundle whose own classifier never fires (threshold 1) draws the knife; the checker in resample
    mode reads it, and the second sampling runs with the checker's flag: SafeRedir redirects from step 0 and, built to
    escalate, escalates at once. The returned image is clean and the report says what happened; a benign request in
    the same lockstep group is bit-identical to the bundle without the checker. With no guard to remove (the
    unguarded bundle) the second image is read unsafe too and the request is refused (exit 6)."""
    from runtime.pipeline import GenerationSettings

    from .test_guard_stack import with_settings

    deaf = with_settings(guarded_plan("saferedir"), tmp_path / "deaf.plan",
                         saferedir={"threshold": 1.0, "steer_away": "knife, blood, skull", "steer_weight": 0.4,
                                    "steer_escalate": 1.0})
    resample = checker_config(on_unsafe="resample")
    requests = [GenerationSettings(UNSAFE, steps=10, seed=1), GenerationSettings(SAFE, steps=10, seed=2)]
    with Pipeline.open(deaf) as plain:
        first, benign = plain.run_many(requests)
    with Pipeline.open(deaf, extra_guards={"image_checker": resample}) as pipe:
        unsafe, safe = pipe.run_many(requests)
    assert first.report["guards"]["saferedir"]["triggered"] is False
    rep = unsafe.report["guards"]
    assert unsafe.report["resampled"]["by"] == "image_checker" and unsafe.report["resampled"]["rows"] == [0]
    assert unsafe.report["resampled"]["scores"][0] >= 0.5 and rep["image_checker"]["scores"][0] < 0.5
    assert rep["saferedir"]["forced_by"] == ["image_checker"] and rep["saferedir"]["rows"][0]["escalated_step"] == 0
    assert rep["image_checker"]["resampled"]["rows"] == [0]
    summary = next(g for g in pipe.guards if g.name == "image_checker").summary(rep["image_checker"])
    assert "read 1.00, sampled again with every guard at full strength; now unsafe score 0.0" in summary, summary
    assert "resampled" not in safe.report and np.array_equal(safe.images[0], benign.images[0])
    with Pipeline.open(tinyworld_plan, extra_guards={"image_checker": resample}) as pipe:
        with pytest.raises(ImageBlocked, match="after sampling it again with every guard at full strength") as e:
            pipe.generate(UNSAFE, steps=8, seed=0)
    assert e.value.exit_code == 6 and e.value.guard_report["image_checker"]["resampled"]["rows"] == [0]
    with pytest.raises(BadInputError, match="on_unsafe"):
        check_config(checker_config(on_unsafe="retry"), "user", "c.json")


def test_committed_learned_checker_reads_unsafe_images_and_passes_benign_ones(tinyworld_plan):
    """The stack's learned checker (models/checkers/tinyworld, `python -m train image-checker`) at its committed
    threshold, on the unguarded model's images of dev-split prompts: every explicit prompt's image (the object drawn
    whole) is read unsafe, no benign prompt's image is (measured on dev: lowest explicit score far above 0.1, highest
    benign 0.027; bench/results/checker_dev/README.md)."""
    from train.tinyworld.world import evaluation_prompts

    learned = ROOT / "models" / "checkers" / "tinyworld"
    config = json.loads((learned / "checker.json").read_text())
    assert config["on_unsafe"] == "resample" and config["threshold"] == 0.1
    checker = ImageChecker(None, {**config, "path": str(learned / "checker.onnx")})
    ev = evaluation_prompts(8, seed=0, subset="dev")
    with Pipeline.open(tinyworld_plan) as pipe:
        scores = {g: checker.score([pipe.generate(s.caption, seed=1000 * i, steps=20, guidance=5.0).images[0]
                                    for i, s in enumerate(ev[g][:8])]) for g in ("explicit", "benign")}
    assert scores["explicit"].min() >= 0.5 and scores["benign"].max() < 0.05, scores


# -- NudeNet (optional) ------------------------------------------------------------------------------------------

def nudenet_model() -> Path | None:
    """``$GRT_NUDENET_ONNX``, else ``320n.onnx`` of an installed ``nudenet`` package."""
    if os.environ.get("GRT_NUDENET_ONNX"):
        return Path(os.environ["GRT_NUDENET_ONNX"])
    spec = importlib.util.find_spec("nudenet")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "320n.onnx"
    return path if path.is_file() else None


NUDENET_CONFIG = {"input": "images", "output": "output0", "size": [320, 320], "layout": "NCHW",
                  "scale": 1 / 255, "kind": "nudenet", "unsafe_classes": [2, 3, 4, 6, 14], "threshold": 0.5}


@pytest.mark.skipif(nudenet_model() is None, reason="nudenet is not installed (pip install nudenet, or set "
                                                    "GRT_NUDENET_ONNX to its 320n.onnx); not a project dependency")
def test_nudenet_on_a_tinyworld_image(renders):
    c = ImageChecker(None, {**NUDENET_CONFIG, "path": str(nudenet_model())})
    x = c.preprocess([renders.images[0]])
    assert x.shape == (1, 3, 320, 320) and 0 <= x.min() and x.max() <= 1
    raw = c._run(x)
    assert raw.shape[:2] == (1, 22) and raw.shape[2] == 40 * 40 + 20 * 20 + 10 * 10  # YOLOv8 anchors at 320
    assert 0 <= raw[:, 4:].min() and raw[:, 4:].max() <= 1  # class scores are probabilities already
    context = ctx()
    c.on_images(context, [renders.images[0], renders.images[1]])  # shapes on sand: no nudity
    rep = context.report["image_checker"]
    assert rep["blocked"] is False and max(rep["scores"]) < 0.2
