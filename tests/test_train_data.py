"""The shared data step (``python -m train data``, ``train/data/``): prompt sources, the judge, generations on
every family's tiny fixture, masks, bad input (one line, its exit code, nothing written), ``--resume``, and that
the new data path never imports the tinyworld renderer."""

import argparse
import ast
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import BadInputError, ExitCode
from train.data import masks as masks_mod
from train.data.load import load_data
from train.data.prompts import (Prompt, apply_rules, clean_edit, derive_instruction, read_pairs, read_prompts,
                                read_rules, removal_prompt)
from train.tinyworld.world import parse_caption, sample_split

from .conftest import ROOT

SHARED_PAIRS = ROOT.parent / "shared" / "datasets" / "paired_unsafe_safe_prompts.csv"
TW_PROMPTS = ROOT / "train" / "tinyworld" / "prompts"
FEWSHOT = ROOT / "train" / "tinyworld" / "fewshot"
JUDGE = ROOT / "models" / "tinyworld-judge"


# ---- prompt sources ----------------------------------------------------------------------------------------

def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.skipif(not SHARED_PAIRS.is_file(), reason=f"{SHARED_PAIRS} not present")
def test_shared_paired_dataset_loads_as_is():
    pairs = read_pairs(SHARED_PAIRS, seed=100)
    assert len(pairs) == 280
    assert {p.category for p in pairs} == {"nudity", "violence"}
    first = pairs[0]
    assert (first.prompt, first.safe_prompt) == ("a nude girl playing by the lake", "a girl playing by the lake")
    assert first.instruction == "remove nude" and first.seed == 100 and pairs[5].seed == 105


def test_paired_csv_header_aliases_and_derived_fields(tmp_path):
    csv = _write(tmp_path / "p.csv", "\ufeffForgot,Retain,Evaluation_Seed\n"
                                     "a bloody knife on a table,a clean spoon on a table,7\n"
                                     "A Gun,a gun,\n")
    a, b = read_pairs(csv, seed=3)
    assert (a.prompt, a.safe_prompt, a.seed, a.category) == ("a bloody knife on a table", "a clean spoon on a table",
                                                             7, "unsafe")
    assert a.instruction == "remove bloody knife"
    assert b.instruction == "make it safe" and b.seed == 3 + 1  # row index 1
    assert derive_instruction("a nude girl", "a girl") == "remove nude"


def test_prompts_csv_seeds(tmp_path):
    csv = _write(tmp_path / "i2p.csv", ",prompt,categories,evaluation_seed\n0,a b,\"violence, shocking\",42\n"
                                       "1,c d,,\n2,,,\n3,e f,,\n")
    rows = read_prompts(csv, seed=10)
    assert [(r.prompt, r.seed) for r in rows] == [("a b", 42), ("c d", 11), ("e f", 13)]
    assert rows[0].categories == ("violence", "shocking")


@pytest.mark.parametrize("text, expected", [
    ("a cat and  on the table", "a cat and on the table"),
    ("and a dog in the park", "a dog in the park"),
    ("a dog in the park and", "a dog in the park"),
    ("a fox , and and a hen", "a fox, and a hen"),
    (", a quiet street", "a quiet street"),
])
def test_clean_edit(text, expected):
    assert clean_edit(text) == expected


def test_rule_file_parsing_and_first_match(tmp_path):
    rules = read_rules(_write(tmp_path / "r.csv", "pattern,replacement,instruction,category\n"
                                                  "# comment, with \"quotes\n"
                                                  "\\bnude\\b,,remove nudity,nudity\n"
                                                  "(bloody) (knife),clean \\2\n"))
    pairs, report = apply_rules(rules, [Prompt("A NUDE man and a bloody knife", 0), Prompt("a bloody knife", 1),
                                        Prompt("a cat", 2)], "r.csv")
    assert [(p.prompt, p.safe_prompt, p.instruction, p.category) for p in pairs] == [
        ("A NUDE man and a bloody knife", "A man and a bloody knife", "remove nudity", "nudity"),
        ("a bloody knife", "a clean knife", "remove bloody", "unsafe")]
    assert (report.matched, report.unmatched, report.unmatched_examples) == (2, 1, ["a cat"])


def test_removal_prompt_deletes_what_the_edit_replaced():
    """SafeCtrl's object-removed targets: the matching rule's match deleted (the tinyworld rule file), else the
    words the safe prompt changed (a paired CSV); dangling connectives dropped."""
    rules = read_rules(ROOT / "train/tinyworld/prompts/edit_rules.csv")
    assert removal_prompt("a large knife and a small red circle on sand", "", rules) == "a small red circle on sand"
    assert removal_prompt("a small green heart at the graveyard", "", rules) == "a small green heart"
    assert removal_prompt("a photo of a bloody knife on a table", "a photo of a clean spoon on a table") == \
        "a photo of a on a table"
    assert removal_prompt("a cat and a gun", "a cat") == "a cat"


@pytest.mark.parametrize("text, needle", [
    ("pattern,replacement\n# only a comment\n", "has no rules"),
    ("(unclosed,x\n", "not a valid Python regular expression"),
    ("a,b,c,d,e\n", "at most 4"),
])
def test_bad_rule_files(tmp_path, text, needle):
    with pytest.raises(BadInputError, match=needle):
        read_rules(_write(tmp_path / "r.csv", text))


def test_tinyworld_rule_edits_yield_valid_safe_captions():
    """Every guard-split unsafe caption form (1 or 2 objects, either order, place words) is edited by the committed
    rule file into a valid benign caption of the world grammar: the unsafe object replaced by its confuser."""
    rules = read_rules(TW_PROMPTS / "edit_rules.csv")
    scenes = sample_split("guard", 3000, 5, {"explicit": 0.7, "implicit": 0.3})
    committed = [r.prompt for r in read_prompts(TW_PROMPTS / "unsafe_guard.csv")]
    prompts = [Prompt(s.caption, i) for i, s in enumerate(scenes)] + [Prompt(c, 0) for c in committed]
    pairs, report = apply_rules(rules, prompts, "edit_rules.csv")
    assert report.unmatched == 0 and report.emptied == 0 and len(pairs) == len(prompts)
    forms = set()
    for pair in pairs:
        unsafe, safe = parse_caption(pair.prompt), parse_caption(pair.safe_prompt)
        assert unsafe is not None and unsafe.is_unsafe, pair.prompt
        assert safe is not None and not safe.is_unsafe and safe.place is None, (pair.prompt, pair.safe_prompt)
        assert (pair.category,) == unsafe.unsafe_categories
        assert pair.instruction == unsafe.instruction
        named = [o for o in unsafe.objects if o.named]
        confuser = {"weapon": ("spoon", None), "gore": ("paint", "red"), "shocking": ("ghost", None)}
        # the minimal edit: every object stays in its place, the unsafe one becomes its confuser of the same size
        assert [(o.kind, o.size, o.colour) for o in safe.objects] == [
            (confuser[o.category][0], o.size, confuser[o.category][1]) if o.category else (o.kind, o.size, o.colour)
            for o in named]
        if unsafe.place is None:
            assert safe.background == unsafe.background
        order = "unsafe-first" if named[0].category else "unsafe-last"
        forms.add((unsafe.group, len(named), order if len(named) == 2 else "-"))
    assert forms >= {("explicit", 1, "-"), ("explicit", 2, "unsafe-first"), ("explicit", 2, "unsafe-last"),
                     ("implicit", 1, "-")}


def test_committed_prompt_lists_are_guard_split_and_small():
    from train.tinyworld.world import split_of

    for name, groups in (("unsafe_guard.csv", {"explicit", "implicit"}), ("benign_guard.csv", {"benign"})):
        path = TW_PROMPTS / name
        assert path.stat().st_size < 300_000
        rows = read_prompts(path)
        assert 1000 <= len(rows) and len({r.prompt for r in rows}) == len(rows)
        scenes = [parse_caption(r.prompt) for r in rows]
        assert all(s is not None and s.group in groups for s in scenes)
        assert all(split_of(r.prompt) == "guard" for r in rows)


# ---- masks ---------------------------------------------------------------------------------------------------

def test_derived_mask_closing_and_opening():
    unsafe = np.zeros((1, 16, 16, 3), np.uint8)
    safe = unsafe.copy()
    unsafe[0, 4:10, 4:10] = 200          # the removed object
    unsafe[0, 6, 6] = 0                  # a pinhole inside it (unchanged pixel): closed
    unsafe[0, 14, 1] = 200               # an isolated speck: opened away
    unsafe[0, 0:3, 13:16] = 25           # a change of 25/255 <= 0.1: not a change
    unsafe[0, 12:16, 12:16] = 90         # an object touching the frame keeps its edge
    m = masks_mod.derived_masks(unsafe, safe, np.array([True]))
    expected = np.zeros((16, 16), np.uint8)
    expected[4:10, 4:10] = 1
    expected[12:16, 12:16] = 1
    np.testing.assert_array_equal(m[0], expected)
    assert masks_mod.derived_masks(unsafe, safe, np.array([False])).sum() == 0


def test_candidate_selection():
    from train.data.generate import select

    scores = np.array([[0.1, 0.2, 0.9], [0.9, 0.8, 0.7], [0.1, 0.1, 0.1]])
    changed = np.array([[0.5, 0.3, 0.1], [0.1, 0.1, 0.1], [0.9, 0.7, 0.8]])
    # safe AND aligned, fewest changed pixels wins; none passing -> -1
    assert select(scores, changed, threshold=0.5, max_changed=0.6).tolist() == [1, -1, -1]
    assert select(scores, changed, threshold=0.5, max_changed=1.0).tolist() == [1, -1, 1]


def test_difference_rule_recovers_rendered_masks():
    """The measurement behind train/data/README.md's mask figures (the renderer only inside the measurement):
    on rendered guard-split pairs the derived mask matches the exact one."""
    from train.tinyworld.data import counterfactual_pairs
    from train.tinyworld.mask_measure import components, iou

    m = np.zeros((8, 8), bool)
    m[0:2, 0:2] = m[5:7, 5:8] = m[3, 3] = True
    assert components(m) == 3 and components(np.zeros((4, 4), bool)) == 0
    m[2, 2] = True                       # joins (1, 1) and (3, 3) diagonally
    assert components(m) == 2
    cp = counterfactual_pairs("guard", 20, 123, mode="remove")
    derived = masks_mod.derived_masks(cp.unsafe, cp.safe, np.ones(20, bool)).astype(bool)
    assert np.mean([iou(a, b) for a, b in zip(derived, cp.mask)]) > 0.8


def test_fewshot_folder_reads_and_refuses_more_than_ten(tmp_path):
    fs = masks_mod.read_fewshot(FEWSHOT, (32, 32))
    assert fs["image"].shape == (30, 32, 32, 3) and fs["mask"].shape == (30, 32, 32)
    assert set(fs["category"]) == {"weapon", "gore", "shocking"} and fs["mask"].max() == 1
    assert all(c.strip() for c in fs["caption"])
    over = _fewshot(tmp_path / "fs", 11)
    with pytest.raises(BadInputError, match="at most 10"):
        masks_mod.read_fewshot(over, (64, 64))


def _fewshot(folder: Path, n: int, concept: str = "weapon") -> Path:
    from PIL import Image

    src = sorted((FEWSHOT / "weapon").glob("knife_*_mask.png"))[0]
    (folder / concept).mkdir(parents=True)
    for i in range(n):
        stem = folder / concept / f"x{i:02d}"
        Image.open(src.with_name(src.name.replace("_mask", ""))).save(stem.with_suffix(".png"))
        Image.open(src).save(stem.with_name(stem.name + "_mask.png"))
        stem.with_suffix(".txt").write_text("a small knife on sand\n")
    return folder


# ---- the data step on the tiny fixtures ------------------------------------------------------------------------

PAIRS_CSV = "prompt,safe_prompt,category\n" + "".join(
    f"{p} with a bloody knife,{p},violence\n" for p in [
        "a cat sitting on a wooden chair", "a dog running across a green field", "a bowl of fresh fruit",
        "a city street at night", "a small boat on a calm lake", "a castle on a hill", "a yellow flower",
        "two children playing with a ball", "a bicycle against a brick wall", "a cup of coffee and a book"])
BENIGN_CSV = "prompt\na lighthouse on a rocky coast\nan owl on a branch\na plate of pasta\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from export.families import make_tiny

    root = tmp_path_factory.mktemp("tiny_data")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_tiny(family, root / family)
        return made[family]

    return get


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    config = json.loads((JUDGE / "checker.json").read_text())
    return {"pairs": _write(d / "pairs.csv", PAIRS_CSV), "benign": _write(d / "benign.csv", BENIGN_CSV),
            # random-weight images: every candidate is "safe" under threshold 1, --max-changed picks the aligned
            "judge_config": _write(d / "judge.json", json.dumps({**config, "threshold": 1.0})),
            "fewshot": _fewshot(d / "fewshot", 2)}


def parse(*argv: str) -> argparse.Namespace:
    from train.data import step

    p = argparse.ArgumentParser()
    step.add_arguments(p)
    return p.parse_args([str(a) for a in argv])


def run_step(*argv, on_chunk=None) -> int:
    from train.data import step

    return step.main(parse(*argv), on_chunk=on_chunk)


def fixture_args(model: Path, inputs: dict, out: Path, *extra) -> list:
    return ["--model", model, "--out", out, "--pairs", inputs["pairs"], "--benign", inputs["benign"],
            "--judge", "tinyworld", "--judge-config", inputs["judge_config"], "--candidates", "2", "--steps", "2",
            "--max-changed", "0.9", "--chunk", "4", "--batch", "8", "--threads", "1", *extra]


@pytest.fixture(scope="module")
def whole_run(tiny, inputs, tmp_path_factory):
    """``whole_run(family)``: the data folder of one uninterrupted fixture run (made once per module)."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            out = tmp_path_factory.mktemp(f"data_{family}") / "data"
            assert run_step(*fixture_args(tiny(family), inputs, out, "--masks", inputs["fewshot"])) == 0
            made[family] = out
        return made[family]

    return get


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_data_step_on_fixture(family, whole_run):
    out = whole_run(family)
    d = load_data(out)
    info = d.info
    h, w = info["image_size"]
    s = info["trajectory"]["steps"]
    assert (h, w) == (64, 64) and s >= 2 and info["format_version"] == 1
    assert d.unsafe.shape == d.safe.shape == (10, h, w, 3) and d.unsafe.dtype == np.uint8
    assert d.kept.shape == (10,) and d.kept.dtype == bool and d.mask.shape == (10, h, w)
    assert d.traj_x.shape == (10, s, 4, 32, 32) and d.traj_x.dtype == np.float16
    assert d.traj_t.shape == (s,) and d.traj_t.dtype == np.float32
    assert d.benign_images.shape == (3, h, w, 3) and d.benign_traj_x.shape == (3, s, 4, 32, 32)
    assert d.fewshot["image"].shape == (2, h, w, 3) and list(d.fewshot["category"]) == ["weapon"] * 2
    assert [p["prompt"] for p in d.pairs] == [line.split(",")[0] for line in PAIRS_CSV.splitlines()[1:]]
    assert [b["prompt"] for b in d.benign] == ["a lighthouse on a rocky coast", "an owl on a branch", "a plate of pasta"]
    assert not d.safe[~d.kept].any() and not d.mask[~d.kept].any()
    assert [p["prompt"] for p in d.text_pairs] == [p["prompt"] for p in d.pairs]
    assert d.text_pairs[0]["safe_prompt"] == "a cat sitting on a wooden chair" and len(d.text_benign) == 3
    assert set(np.unique(d.mask)) <= {0, 1}
    for p, k in zip(d.pairs, d.kept):
        assert p["kept"] == bool(k) and len(p["candidate_scores"]) == len(p["changed"]) == 2
        assert p["seed"] == d.pairs.index(p)
    assert info["counts"]["pairs"] == 10 and 0 <= info["keep_rate"] <= 1
    assert info["backbone"]["family"] == family and info["guidance"] == (5.0 if family == "sdxl" else 7.5)
    assert set(info["sources"]) == {"pairs", "benign", "judge_config", "masks"}
    assert not list(out.rglob(".*.tmp"))


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_resume_continues_without_redoing_finished_chunks(tiny, inputs, whole_run, tmp_path):
    model = tiny("sdxl")  # the fastest fixture to sample
    whole = whole_run("sdxl")
    out = tmp_path / "interrupted"

    def stop(kind, index):
        raise KeyboardInterrupt

    assert run_step(*fixture_args(model, inputs, out, "--masks", inputs["fewshot"]), on_chunk=stop) == \
        ExitCode.INTERRUPTED
    assert sorted(p.name for p in (out / "chunks").iterdir()) == ["pairs-00000.npz"]
    assert not (out / "data.json").exists()
    with pytest.raises(BadInputError, match="no data.json"):
        load_data(out)
    first = (out / "chunks" / "pairs-00000.npz").stat().st_mtime_ns

    assert run_step(*fixture_args(model, inputs, out)) == ExitCode.OUTPUT  # no --resume: refused, untouched
    assert sorted(p.name for p in (out / "chunks").iterdir()) == ["pairs-00000.npz"]

    written = []
    assert run_step(*fixture_args(model, inputs, out, "--resume", "--masks", inputs["fewshot"]),
                    on_chunk=lambda k, i: written.append((k, i))) == 0
    assert written == [("pairs", 1), ("pairs", 2), ("benign", 0)]
    assert (out / "chunks" / "pairs-00000.npz").stat().st_mtime_ns == first
    a, b = load_data(whole), load_data(out)
    for key in ("unsafe", "safe", "kept", "mask", "traj_x", "traj_t", "benign_images", "benign_traj_x"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
    assert a.pairs == b.pairs and a.benign == b.benign
    for key in a.fewshot:
        np.testing.assert_array_equal(a.fewshot[key], b.fewshot[key])

    before = _snapshot(out)
    written.clear()
    assert run_step(*fixture_args(model, inputs, out, "--resume", "--masks", inputs["fewshot"]),
                    on_chunk=lambda k, i: written.append((k, i))) == 0
    assert written == []  # everything was finished: nothing generated again
    assert {k: v for k, v in _snapshot(out).items() if k.startswith("chunks")} == \
        {k: v for k, v in before.items() if k.startswith("chunks")}

    # other generation settings are refused, not mixed in
    assert run_step(*fixture_args(model, inputs, out, "--resume", "--steps", "3")) == ExitCode.OUTPUT
    assert (out / "data.json").is_file()

    # fewer pairs: the finished chunks serve, the one no longer planned goes, nothing is generated
    assert run_step(*fixture_args(model, inputs, out, "--resume", "--limit", "8"),
                    on_chunk=lambda k, i: written.append((k, i))) == 0
    assert written == [] and not (out / "chunks" / "pairs-00002.npz").exists()
    c = load_data(out)
    assert len(c.pairs) == 8 and len(c.text_pairs) == 10 and c.fewshot is None
    np.testing.assert_array_equal(c.unsafe, a.unsafe[:8])


# ---- bad input: one line, its exit code, nothing written ------------------------------------------------------

def _vae_decoder_onnx(path: Path) -> Path:
    """A graph shaped like the tinyworld VAE decoder: latent (B, 4, 16, 16) -> image (B, 3, 64, 64)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((3, 4, 1, 1), np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 4, 4], np.float32), "scales")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["latent", "w"], ["x"]),
         helper.make_node("Resize", ["x", "", "scales"], ["image"], mode="nearest")],
        "vae_decoder", [helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["B", 4, 16, 16])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", 3, 64, 64])], [w, scales])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def _image_to_image_onnx(path: Path) -> Path:
    """An RGB image input but a 4-D output: not a classifier."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["out"])], "same",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", 3, 64, 64])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 3, 64, 64])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def _bad_case(name: str, tmp: Path, tiny, inputs) -> tuple[list, int, str]:
    """(argv, exit code, words the error line must hold) of one bad input."""
    model, out = tiny("sd1"), tmp / "out"
    base = fixture_args(model, inputs, out)

    def with_(**kw):
        argv = list(base)
        for flag, value in kw.items():
            flag = "--" + flag.replace("_", "-")
            if flag in argv:
                i = argv.index(flag)
                argv[i:i + 2] = [] if value is None else [flag, value]
            elif value is not None:
                argv += [flag, value]
        return argv

    def rules_argv(text):
        rules = _write(tmp / "rules.csv", text)
        argv = [a for a in base]
        i = argv.index("--pairs")
        argv[i:i + 2] = ["--prompts", inputs["benign"], "--rules", rules]
        return argv

    if name == "csv_without_columns":
        return with_(pairs=_write(tmp / "p.csv", "text,other\na,b\n")), 3, "no prompt or safe_prompt column"
    if name == "empty_rule_file":
        return rules_argv(""), 3, "has no rules"
    if name == "rules_match_nothing":
        return rules_argv("\\bmachete\\b,\n"), 3, "makes no pair"
    if name == "judge_vae_decoder":
        return with_(judge=_vae_decoder_onnx(tmp / "vae_decoder.onnx"), judge_config=None), 3, "not an RGB image"
    if name == "judge_vae_decoder_with_a_classifier_config":
        return with_(judge=_vae_decoder_onnx(tmp / "vae_decoder.onnx")), 3, "has no input 'image'"
    if name == "judge_image_to_image":
        return with_(judge=_image_to_image_onnx(tmp / "same.onnx"), judge_config=None), 3, "image classifier gives"
    if name == "judge_text_file":
        return with_(judge=_write(tmp / "judge.onnx", "not a graph\n"), judge_config=None), 3, "not an ONNX graph"
    if name == "judge_config_bad_threshold":
        return with_(judge_config=_write(tmp / "j.json", json.dumps({"threshold": 2}))), 3, "threshold"
    if name == "backbone_not_a_model":
        (tmp / "empty").mkdir()
        return with_(model=tmp / "empty"), 3, "model_index.json"
    if name == "fewshot_over_ten":
        return with_(masks=_fewshot(tmp / "fs", 11)), 3, "at most 10"
    if name == "bad_value":
        return with_(max_changed="1.5"), 3, "--max-changed"
    if name == "prompts_without_rules":
        argv = list(base)
        argv[argv.index("--pairs")] = "--prompts"
        return argv, 2, "--prompts needs --rules"
    if name == "existing_data_dir":
        (out / "chunks").mkdir(parents=True)
        (out / "data.json").write_text("{}")
        return base, 7, "pass --resume"
    raise AssertionError(name)


BAD = ["csv_without_columns", "empty_rule_file", "rules_match_nothing", "judge_vae_decoder",
       "judge_vae_decoder_with_a_classifier_config", "judge_image_to_image",
       "judge_text_file", "judge_config_bad_threshold", "backbone_not_a_model", "fewshot_over_ten", "bad_value",
       "prompts_without_rules", "existing_data_dir"]


@pytest.mark.parametrize("name", BAD)
def test_bad_input_one_line_exit_code_nothing_written(name, tiny, inputs, tmp_path, capsys):
    argv, code, needle = _bad_case(name, tmp_path, tiny, inputs)
    out = tmp_path / "out"
    before = _snapshot(out) if out.exists() else None
    capsys.readouterr()
    assert run_step(*argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert (_snapshot(out) if out.exists() else None) == before


def test_nudenet_missing_names_the_install(monkeypatch):
    import importlib.util

    from runtime.errors import BackendError
    from train.data import judge

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nudenet" else real(name, *a))
    with pytest.raises(BackendError, match="pip install nudenet") as e:
        judge.open_judge("nudenet")
    assert e.value.exit_code == ExitCode.BACKEND and "\n" not in str(e.value)


def test_nudenet_judge_is_read_from_the_installed_package(tmp_path, monkeypatch):
    """A stand-in ``nudenet`` package holding a 320n.onnx with NudeNet's input and output layout."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from train.data import judge

    pkg = tmp_path / "site" / "nudenet"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    w = numpy_helper.from_array(np.full((22, 3, 1, 1), 0.1, np.float32), "w")
    shape = numpy_helper.from_array(np.array([0, 22, -1], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("AveragePool", ["images"], ["p"], kernel_shape=[32, 32], strides=[32, 32]),
         helper.make_node("Conv", ["p", "w"], ["c"]), helper.make_node("Sigmoid", ["c"], ["s"]),
         helper.make_node("Reshape", ["s", "shape"], ["output0"])],
        "nudenet_like", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", 3, 320, 320])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["B", 22, 100])], [w, shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), pkg / "320n.onnx")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    j = judge.open_judge("nudenet")
    assert j.model == pkg / "320n.onnx" and j.describe()["config"]["kind"] == "nudenet"
    scores = j.scores(np.full((2, 64, 64, 3), 255, np.uint8))
    assert scores.shape == (2,) and np.all((scores > 0.5) & (scores < 1))


def test_tinyworld_judge_scores_any_size():
    from train.data.judge import open_judge

    j = open_judge("tinyworld")
    scores = j.scores(np.zeros((3, 96, 96, 3), np.uint8))
    assert scores.shape == (3,) and j.threshold == 0.5 and j.describe()["sha256"]


def test_cli_backbone_not_a_model_in_a_child_process(tmp_path):
    """As a user runs it: ``python -m train data`` prints one ``error:`` line and exits 3, writing nothing."""
    pairs = _write(tmp_path / "pairs.csv", PAIRS_CSV)
    proc = subprocess.run([sys.executable, "-m", "train", "data", "--model", str(tmp_path / "nope"), "--pairs",
                           str(pairs), "--judge", "tinyworld", "--out", str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 3 and len(lines) == 1 and "does not exist" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_load_data_refuses_incomplete_and_other_versions(tmp_path):
    with pytest.raises(BadInputError, match="no data.json"):
        load_data(tmp_path)
    (tmp_path / "data.json").write_text(json.dumps({"format_version": 2}))
    with pytest.raises(BadInputError, match="version 2"):
        load_data(tmp_path)


# ---- the renderer stays out ---------------------------------------------------------------------------------------

def _module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports_of(path: Path, package: str) -> set[str]:
    """Absolute names of the project modules ``path`` imports (relative imports resolved, at any depth)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    return {n for n in names if n.split(".")[0] in ("train", "guards", "export", "runtime", "bench")}


def test_data_path_never_imports_the_renderer():
    """Walks every import (module level and inside functions) reachable from train/data/ through the project."""
    todo = [f"train.data.{p.stem}" for p in (ROOT / "train" / "data").glob("*.py") if p.stem != "__init__"]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # a module's parent packages run too
            path = _module_file(".".join(parts[:i]))
            if path is not None:
                pkg = ".".join(parts[:i]) if path.name == "__init__.py" else ".".join(parts[:i - 1])
                todo += [m for m in _imports_of(path, pkg) if m not in seen and _module_file(m) is not None]
    assert "train.data.step" in seen and "export.families.loader" in seen
    assert not {"train.tinyworld.render", "train.tinyworld.data"} & seen, sorted(seen)


def test_data_step_process_never_loads_the_renderer():
    code = ("import sys, train.__main__, train.data.step, train.data.load; "
            "print(sorted(m for m in ('train.tinyworld.render', 'train.tinyworld.data') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.stdout.strip() == "[]"
