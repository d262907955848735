"""The prompt-only recipe end to end on the tiny random-weight fixtures (issue 17): the data step from a 10-row
paired CSV -> each guard trainer a few steps on that folder -> ``export build --guards`` packs the weights -> the
lean runtime generates with them. SDXL: the data step runs (tests/test_train_data.py); every guard trains on it
(tests/test_sdxl_unet_guards.py). Also: the trainers' material path never imports the renderer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import ExitCode
from train.data.load import load_data

from .test_train_data import _fewshot, _imports_of, _module_file, fixture_args, inputs, run_step, tiny  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ("saferedir", "safepatch", "safectrl")
FEW_STEPS = {
    "saferedir": ["--cls-steps", "4", "--gen-steps", "2", "--text-prompts", "8", "--batch", "8", "--gen-batch", "2"],
    "safepatch": ["--steps", "2", "--batch-size", "4"],
    "safectrl": ["--stage1-steps", "4", "--stage2-steps", "2", "--stage1-batch", "8", "--stage2-batch", "2"],
}
"""A few steps each: the point is the wiring (material -> weights -> bundle -> image), not the quality."""


def train(guard: str, model: Path, data: Path, out: Path, work: Path, *extra: str) -> int:
    from train.__main__ import main

    cache = ["--work" if guard == "safectrl" else "--cache", str(work / guard)]
    return main([guard, "--model", str(model), "--data", str(data), "--out", str(out), "--seed", "0",
                 *cache, *FEW_STEPS[guard], *extra])


def _paint_derived_masks(folder: Path) -> None:
    """A random-weight backbone draws the unsafe and the safe prompt alike, so the data step derives empty masks;
    paint one box per kept pair (what a pair that differs there gives) so SafeCtrl's pair positives are exercised."""
    for chunk in sorted((folder / "chunks").glob("pairs-*.npz")):
        with np.load(chunk) as f:
            arrays = dict(f)
        h, w = arrays["mask"].shape[-2:]
        arrays["mask"][arrays["kept"], h // 4:h // 2, w // 4:w // 2] = 1
        np.savez(chunk, **arrays)


@pytest.fixture(scope="module")
def fixture_data(tiny, inputs, tmp_path_factory):  # noqa: F811
    """``fixture_data(family)`` -> (model folder, data folder): the data step run once per family; the few-shot
    concept is the pairs' category ("violence"), so SafeCtrl's kept pairs add detector positives."""
    made: dict[str, tuple[Path, Path]] = {}
    fewshot = _fewshot(tmp_path_factory.mktemp("fewshot_violence"), 2, "violence")

    def get(family: str) -> tuple[Path, Path]:
        if family not in made:
            out = tmp_path_factory.mktemp(f"prompt_only_{family}") / "data"
            assert run_step(*fixture_args(tiny(family), inputs, out, "--masks", fewshot)) == 0
            _paint_derived_masks(out)
            made[family] = (tiny(family), out)
        return made[family]

    return get


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_prompt_only_training_builds_and_generates(family, fixture_data, tmp_path):
    model, data = fixture_data(family)
    guard_root = tmp_path / "guards"
    for guard in TRAINED:
        assert train(guard, model, data, guard_root / model.name / guard, tmp_path / "work") == 0, guard
        log = json.loads((guard_root / model.name / guard / "train_log.json").read_text())
        assert data.name in json.dumps(log) and load_data(data).sha256 in json.dumps(log), \
            f"{guard}'s train_log.json does not name its data folder"
    # SafeCtrl (default --detector-masks fewshot+refined): the detector's categories are the few-shot set's; a first
    # detector on the 2 few-shot images (+ mirrors), then also every kept pair whose derived mask it responds in,
    # with that mask cut to its response; stage 2 blends by the final detector's own mask
    log = json.loads((guard_root / model.name / "safectrl" / "train_log.json").read_text())
    refined, derived = log["refined"], _derived_positives(data)
    assert log["data"]["categories"] == ["violence"] and refined["fewshot_counts"]["positive_images"] == 4
    assert 1 <= refined["pairs_kept"] <= derived and log["counts"]["positive_images"] == 4 + refined["pairs_kept"]
    assert 0 < refined["area_refined"] <= refined["area_derived"]
    assert log["stage2_mask"]["kind"] == "detector" and log["counts"]["dpo_pairs"] >= 1
    # the learned image checker (issue 20) from the same folder, embedded beside the guards
    from train.__main__ import main

    checker, judged = tmp_path / "checker", _judged_unsafe(data, tmp_path / "judged")
    assert main(["image-checker", "--data", str(judged), "--out", str(checker), "--steps", "3", "--batch-size", "8"]) == 0
    config = json.loads((checker / "config.json").read_text())
    assert config["categories"] == ["violence"] and config["data_sha256"] == load_data(judged).sha256
    assert json.loads((checker / "checker.json").read_text())["on_unsafe"] == "resample"
    # three steps learn nothing: threshold 1 (never reached) keeps the wiring check independent of its scores
    passing = tmp_path / "passing.json"
    passing.write_text(json.dumps({**json.loads((checker / "checker.json").read_text()), "threshold": 1.0}))
    plan = tmp_path / "guarded.plan"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    build = subprocess.run([sys.executable, "-m", "export", "build", "--model", str(model), "--guards",
                            ",".join(TRAINED), "--guard-dir", str(guard_root), "--checker", str(checker / "checker.onnx"),
                            "--checker-config", str(passing), "--out", str(plan)],
                           cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    png = tmp_path / "out.png"
    gen = subprocess.run([sys.executable, "-m", "runtime", "generate", "--engine", str(plan), "--prompt",
                          "a cat sitting on a wooden chair with a bloody knife", "--steps", "3", "--out", str(png),
                          "--report", str(png.with_suffix(".json"))],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    report = json.loads(png.with_suffix(".json").read_text())
    assert png.stat().st_size > 0 and list(report["guards"]) == [*TRAINED, "image_checker"]
    assert len(report["guards"]["image_checker"]["scores"]) == 1


def _judged_unsafe(data: Path, dest: Path) -> Path:
    """A copy of the fixture's data folder whose judge threshold is 0: the fixture judge (threshold 1, so that every
    candidate is kept) then counts every unsafe prompt's image as unsafe, the checker's positives."""
    shutil.copytree(data, dest)
    info = json.loads((dest / "data.json").read_text())
    info["judge"]["threshold"] = 0.0
    (dest / "data.json").write_text(json.dumps(info))
    return dest


def test_image_checker_graph_matches_its_network_and_refuses_bad_input(fixture_data, tmp_path, capsys):
    """The exported checker.onnx computes the trained network's max sigmoid (ONNX Runtime vs PyTorch); a folder that is
    not a data folder, or a blend share out of range, is one error line, exit 3, nothing written."""
    import onnxruntime as ort
    import torch

    from train.__main__ import main
    from train.image_checker.model import Checker, CheckerConfig, save

    _, data = fixture_data("sd1")
    torch.manual_seed(0)
    net = Checker(CheckerConfig(categories=["a", "b"], image_size=32, width=8)).eval()
    save(net, tmp_path / "ck", {})
    x = torch.rand(3, 3, 32, 32)
    got = ort.InferenceSession(str(tmp_path / "ck" / "checker.onnx")).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        want = net(x).sigmoid().amax(1).numpy()
    assert got.shape == (3,) and np.allclose(got, want, atol=1e-5)
    for args, needle in ((["--data", str(tmp_path)], "no data.json"),
                         (["--data", str(data)], "called none of its unsafe prompts' images unsafe"),
                         (["--data", str(data), "--blend-share", "1.5"], "--blend-share 1.5")):
        assert main(["image-checker", *args, "--out", str(tmp_path / "out")]) == ExitCode.BAD_INPUT
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("error: ") and needle in line, line
    assert not (tmp_path / "out").exists()


def test_image_checker_learns_from_several_folders(fixture_data, tmp_path, capsys):
    """``--data A B``: one checker from both folders' examples (twice the training set of one folder, both folders
    named in config.json); a folder of other concepts is one error line, exit 3, nothing written."""
    from train.__main__ import main

    _, data = fixture_data("sd1")
    a, b = _judged_unsafe(data, tmp_path / "a"), _judged_unsafe(data, tmp_path / "b")
    few = ["--steps", "3", "--batch-size", "8"]
    assert main(["image-checker", "--data", str(a), "--out", str(tmp_path / "one"), *few]) == 0
    assert main(["image-checker", "--data", str(a), str(b), "--out", str(tmp_path / "two"), *few]) == 0
    one, two = (json.loads((tmp_path / n / "config.json").read_text()) for n in ("one", "two"))
    assert two["data"] == [str(a), str(b)] and two["data_sha256"] == [load_data(a).sha256, load_data(b).sha256]
    assert two["metrics"]["train_examples"] == 2 * one["metrics"]["train_examples"] > 0
    other = tmp_path / "other"
    shutil.copytree(a, other)
    pairs = other / "pairs.jsonl"
    pairs.write_text(pairs.read_text().replace('"violence"', '"nudity"'))
    assert main(["image-checker", "--data", str(a), str(other), "--out", str(tmp_path / "bad"), *few]) == ExitCode.BAD_INPUT
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: --data ") and "same concepts" in line, line
    assert not (tmp_path / "bad").exists()


def _derived_positives(data: Path) -> int:
    d = load_data(data)
    return sum(1 for p, k, m in zip(d.pairs, d.kept, d.mask) if k and p["category"] == "violence" and m.any())


def test_safectrl_derived_positives(fixture_data, tmp_path):
    """``--detector-masks fewshot+derived``: the few-shot images (+ mirrors) and every kept pair with a non-empty
    derived mask, with that mask, in one detector; no refinement pass."""
    model, data = fixture_data("sd1")
    out = tmp_path / "safectrl"
    assert train("safectrl", model, data, out, tmp_path / "work", "--detector-masks", "fewshot+derived") == 0
    log = json.loads((out / "train_log.json").read_text())
    assert "refined" not in log and log["counts"]["positive_images"] == 4 + _derived_positives(data) > 4


def test_safectrl_removed_targets(fixture_data, tmp_path):
    """``--stage2-target removed``: stage 2 prefers the unsafe image inpainted by the backbone inside the dilated
    derived mask, bit-identical to the unsafe latent outside it; only the judge-kept targets train."""
    import torch

    from train.data.removal import inpaint_region

    model, data = fixture_data("sd1")
    out, work = tmp_path / "safectrl", tmp_path / "work"
    assert train("safectrl", model, data, out, work, "--stage2-target", "removed") == 0
    log = json.loads((out / "train_log.json").read_text())
    info = log["stage2_target"]
    assert info["kind"] == "removed" and info["removal_prompts"] == "words the safe prompt changed"
    assert 1 <= info["kept"] == log["counts"]["dpo_pairs"] <= info["pairs"] == len(load_data(data).pairs) - \
        sum(1 for k in load_data(data).kept if not k)
    wdir = next((work / "safectrl").iterdir())
    removed = torch.load(wdir / "stage2_removed.pt", weights_only=False)
    pairs = torch.load(wdir / "data.pt", weights_only=False)["pairs"]
    region = inpaint_region(pairs["mask_derived"])
    assert 0 < float(region.mean()) < 1
    assert torch.equal(removed["lat"] * (1 - region), pairs["lat_unsafe"] * (1 - region))
    assert not torch.equal(removed["lat"] * region, pairs["lat_unsafe"] * region)


def test_safepatch_removed_targets(fixture_data, tmp_path):
    """``--target removed``: the unsafe triplets learn toward the unsafe image inpainted where the object is (its
    latent bit-identical to the unsafe image's outside the dilated derived mask); benign rows are unchanged."""
    import torch

    from train.data.removal import inpaint_region
    from train.encode import vae_latents

    model, data = fixture_data("sd1")
    out, work = tmp_path / "safepatch", tmp_path / "work"
    assert train("safepatch", model, data, out, work, "--target", "removed") == 0
    assert json.loads((out / "config.json").read_text())["training"]["target"] == "removed"
    removed = torch.load(next((work / "safepatch").glob("*_removed.pt")), weights_only=False)
    aligned_dir = tmp_path / "aligned"
    assert train("safepatch", model, data, tmp_path / "out_aligned", aligned_dir) == 0
    aligned = torch.load(next((aligned_dir / "safepatch").glob("*.pt")), weights_only=False)
    d = load_data(data)
    kept = np.flatnonzero(d.kept)
    n = int((removed["kind"] == 0).sum())
    assert n == len(kept) and torch.equal(removed["latent"][n:], aligned["latent"][n:])  # fixture judge keeps all
    region = inpaint_region(torch.nn.functional.adaptive_avg_pool2d(
        torch.from_numpy(d.mask[kept[:n]]).float()[:, None], d.traj_x.shape[-2:]))
    from export.families import load_backbone

    unsafe = vae_latents(load_backbone(model).pipeline.vae, d.unsafe[kept[:n]])
    assert torch.equal(removed["latent"][:n] * (1 - region), unsafe * (1 - region))
    assert not torch.equal(removed["latent"][:n], aligned["latent"][:n])


def test_saferedir_adversarial_variants(fixture_data, tmp_path):
    """``--adversarial N``: up to N attack-style variants of each pair's unsafe prompt, never the prompt itself, cached
    beside the material and counted in the train log; stage 2 trains on them (the weights differ from a plain run's)."""
    from safetensors.numpy import load_file

    model, data = fixture_data("sd1")
    work = tmp_path / "work"
    assert train("saferedir", model, data, tmp_path / "adv", work, "--adversarial", "2") == 0
    assert train("saferedir", model, data, tmp_path / "plain", tmp_path / "work_plain") == 0
    with np.load(next((work / "saferedir").glob("adversarial_*.npz"))) as f:
        prompts, pair = list(f["prompt"]), f["pair"]
    material = load_data(data)
    kept = [p["prompt"] for p, k in zip(material.pairs, material.kept) if k]
    assert 0 < len(prompts) <= 2 * len(kept) and all(v != kept[k] for v, k in zip(prompts, pair))
    log = json.loads((tmp_path / "adv" / "train_log.json").read_text())
    assert log["metrics"]["adversarial_variants"] == len(prompts)
    adv, plain = load_file(tmp_path / "adv" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert any(not np.array_equal(adv[k], plain[k]) for k in adv)


def test_saferedir_adversarial_cache_is_per_backbone(fixture_data, tmp_path):
    """The same prompts under another backbone's text encoder are other rows: one cache keeps both, never mixed.
    SDXL's variants carry their pooled embeddings too, and its stage 2 trains on them."""
    from safetensors.numpy import load_file

    work = tmp_path / "work"
    for family in ("sd1", "sd2", "sdxl"):
        model, data = fixture_data(family)
        assert train("saferedir", model, data, tmp_path / family, work, "--adversarial", "2") == 0
    files = sorted((work / "saferedir").glob("adversarial_*.npz"), key=lambda f: f.stat().st_mtime)
    assert len(files) == 3
    arrays = [dict(np.load(f)) for f in files]
    for a, b in zip(arrays, arrays[1:]):
        assert list(a["prompt"]) == list(b["prompt"])  # the same variants ...
        assert a["emb"].shape != b["emb"].shape or not np.array_equal(a["emb"], b["emb"])  # ... each encoder's rows
    xl = arrays[2]
    assert "pooled" in xl and len(xl["pooled"]) == len(xl["pair"]) and "pooled" not in arrays[0]
    model, data = fixture_data("sdxl")
    assert train("saferedir", model, data, tmp_path / "sdxl_plain", tmp_path / "work_plain") == 0
    adv, plain = load_file(tmp_path / "sdxl" / "model.safetensors"), load_file(tmp_path / "sdxl_plain" / "model.safetensors")
    assert any(not np.array_equal(adv[k], plain[k]) for k in adv)


@pytest.mark.parametrize("guard", TRAINED)
def test_data_folder_of_another_backbone_is_refused(guard, fixture_data, tmp_path, capsys):
    model, _ = fixture_data("sd1")
    _, data_sd2 = fixture_data("sd2")
    assert train(guard, model, data_sd2, tmp_path / "out", tmp_path / "work") == ExitCode.BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "rerun `python -m train data" in err[-1], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("guard", TRAINED)
def test_not_a_data_folder_is_refused_in_one_line(guard, tmp_path, capsys):
    assert train(guard, ROOT / "models" / "tinyworld", tmp_path, tmp_path / "out", tmp_path / "work") == \
        ExitCode.BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "no data.json" in err[-1], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("guard", TRAINED)
def test_data_folder_without_a_kept_pair_is_refused(guard, fixture_data, tmp_path, capsys):
    model, data = fixture_data("sd1")
    bare = tmp_path / "bare"
    shutil.copytree(data, bare)
    for chunk in (bare / "chunks").glob("pairs-*.npz"):
        with np.load(chunk) as f:
            arrays = dict(f)
        arrays["kept"][:] = False
        np.savez(chunk, **arrays)
    assert train(guard, model, bare, tmp_path / "out", tmp_path / "work") == ExitCode.BAD_INPUT
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "no kept pair" in line and str(bare) in line, line
    assert not (tmp_path / "out").exists()


def test_safectrl_needs_the_fewshot_masks(fixture_data, tmp_path, capsys):
    model, data = fixture_data("sd1")
    bare = tmp_path / "bare"
    shutil.copytree(data, bare)
    (bare / "fewshot.npz").unlink()
    assert train("safectrl", model, bare, tmp_path / "out", tmp_path / "work") == ExitCode.BAD_INPUT
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "--masks" in line and "derived" in line


@pytest.mark.parametrize("guard", TRAINED)
def test_trainers_need_exactly_one_source(guard, tmp_path, capsys):
    from train.__main__ import main

    for extra in ([], ["--data", str(tmp_path), "--renderer"]):
        with pytest.raises(SystemExit) as e:
            main([guard, "--model", str(ROOT / "models" / "tinyworld"), "--out", str(tmp_path / "o"), *extra])
        assert e.value.code == 2
        assert "--data" in capsys.readouterr().err


@pytest.mark.parametrize("guard", TRAINED)
def test_material_path_never_imports_the_renderer(guard):
    """Static walk of every import (also inside functions) from the trainer's modules; ``train/<guard>/renderer.py``
    (what ``--renderer`` imports) is the only door to the renderer and is not entered, nor is SafeRedir's
    ``adversarial.py`` (``--adversarial``: tinyworld's attack-style edits, an option off by default)."""
    todo = [f"train.{guard}.{m}" for m in ("cli", "data", "train") if _module_file(f"train.{guard}.{m}") is not None]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name in (f"train.{guard}.renderer", f"train.{guard}.adversarial"):  # the opt-in doors
            continue
        seen.add(name)
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            path = _module_file(".".join(parts[:i]))
            if path is not None:
                pkg = ".".join(parts[:i]) if path.name == "__init__.py" else ".".join(parts[:i - 1])
                todo += [m for m in _imports_of(path, pkg) if m not in seen and _module_file(m) is not None]
    assert f"train.{guard}.train" in seen and "train.data.load" in seen
    assert not {"train.tinyworld.render", "train.tinyworld.data", "train.tinyworld.world"} & seen, sorted(seen)


def test_saferedir_adversarial_with_the_renderer_is_refused_before_the_data_step(tmp_path, capsys):
    """``--adversarial`` edits tinyworld's --data prompts; with ``--renderer`` it is refused once the backbone is
    known, before the renderer draws any trajectory (nothing cached, nothing written)."""
    from train.__main__ import main

    code = main(["saferedir", "--model", str(ROOT / "models" / "tinyworld"), "--renderer", "--adversarial", "2",
                 "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    assert code == ExitCode.BAD_INPUT
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "drop --adversarial" in line, line
    assert not (tmp_path / "out").exists() and not any((tmp_path / "cache").rglob("*.npz"))
