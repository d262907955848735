"""The bad-input catalogue of ``runtime generate``: every case, its exit code and its one-line message.

:data:`CASES` is the complete list (runtime/BAD_INPUT.md is its table; ``test_catalogue_doc_lists_every_case``
keeps the two in step; regenerate the table with ``GRT_BAD_INPUT_MD=runtime/BAD_INPUT.md pytest
tests/test_bad_input.py``). Every case asserts

* the exact documented exit code (runtime/errors.py),
* ONE stderr line ``error: <message>`` naming the input and the fix (the needles), no traceback,
* no partial files: the output folder holds exactly what it held before (an existing file keeps its bytes),
  no temporary file is left there or in the process's temporary folder.

The cases run in-process (``runtime.cli.main``); only Ctrl-C and the lean-import check run a child process.
Variant bundles (truncated, tampered, another format, SDXL, TensorRT for another GPU, a VAE that outputs NaN,
an embedded image checker) are written once per module from the session's tinyworld bundle.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from runtime import cli
from runtime.bundle import Bundle
from runtime.errors import ExitCode

from .conftest import ROOT, TINYWORLD_JUDGE
from .test_generate import RUNNER

PROMPT = "a large red circle on sand"
CHECKER = TINYWORLD_JUDGE / "checker.onnx"
DOC = ROOT / "runtime" / "BAD_INPUT.md"


@dataclass
class Case:
    name: str                       # what is wrong
    args: list[str]                 # appended to the base command line (a later option wins in argparse)
    code: int                       # the documented exit code
    needles: tuple[str, ...]        # the message names the input and the fix
    plan: str = "good"              # which bundle variant {plan} is
    setup: Callable[[Path], None] | None = None  # prepares the work folder before the snapshot
    creates: tuple[str, ...] = ()   # files an exit-0 case writes (relative to the work folder)
    xfail: str | None = None        # a known gap, with the change that closes it
    example: str = ""               # the command line shown in BAD_INPUT.md (default: from args)


def keep_existing(work: Path) -> None:
    (work / "o.png").write_bytes(b"keep me")


LONG = "a" * 10_001
CASES = [
    # -- prompts -------------------------------------------------------------------------------------------------
    Case("empty prompt (allowed: unconditional, as diffusers)", ["--prompt", ""], 0, (), creates=("o.png",)),
    Case("whitespace-only prompt (allowed)", ["--prompt", " \t "], 0, (), creates=("o.png",)),
    Case("huge prompt (10001 chars)", ["--prompt", LONG], 3, ("prompt is 10001 characters", "shorten"),
         example="--prompt <10001 x a>"),
    Case("non-UTF-8 prompt bytes", ["--prompt", "caf\udce9"], 3, ("prompt is not valid UTF-8", "pass UTF-8"),
         example="--prompt $'caf\\xe9'"),
    Case("NUL in prompt", ["--prompt", "a\x00b"], 3, ("prompt contains a NUL", "remove it"),
         example="--prompt 'a<NUL>b' (API; argv cannot hold NUL)"),
    Case("empty negative prompt (allowed)", ["--negative-prompt", ""], 0, (), creates=("o.png",)),
    Case("whitespace negative prompt (allowed)", ["--negative-prompt", "  "], 0, (), creates=("o.png",)),
    Case("huge negative prompt", ["--negative-prompt", LONG], 3, ("negative_prompt is 10001 characters",),
         example="--negative-prompt <10001 x a>"),
    Case("non-UTF-8 negative prompt", ["--negative-prompt", "\udcff"], 3, ("negative_prompt is not valid UTF-8",),
         example="--negative-prompt $'\\xff'"),
    Case("NUL in negative prompt", ["--negative-prompt", "x\x00"], 3, ("negative_prompt contains a NUL",),
         example="--negative-prompt 'x<NUL>' (API)"),
    # -- sizes ---------------------------------------------------------------------------------------------------
    Case("height not a multiple of 8", ["--height", "60"], 3, ("height 60", "must be 64", "--dynamic-hw")),
    Case("width not the static size", ["--width", "100"], 3, ("width 100", "must be 64")),
    Case("height zero", ["--height", "0"], 3, ("height 0",)),
    Case("width negative", ["--width", "-64"], 3, ("width -64",)),
    Case("height not an integer", ["--height", "64.5"], 2, ("--height", "invalid int value: '64.5'", "--help")),
    Case("width not a number", ["--width", "abc"], 2, ("--width", "invalid int value: 'abc'")),
    # -- steps / guidance / seed / batch ---------------------------------------------------------------------------
    Case("steps zero", ["--steps", "0"], 3, ("steps 0", "1..999")),
    Case("steps negative", ["--steps", "-3"], 3, ("steps -3", "1..999")),
    Case("steps absurd", ["--steps", "100000"], 3, ("steps 100000", "1..999")),
    Case("steps 1000 with ddim (timestep 1000 beyond the schedule)", ["--steps", "1000"], 3, ("steps 1000", "999")),
    Case("steps not an integer", ["--steps", "2.5"], 2, ("--steps", "invalid int value: '2.5'")),
    Case("guidance negative", ["--guidance", "-1"], 3, ("guidance -1.0", "finite number >= 0")),
    Case("guidance NaN", ["--guidance", "nan"], 3, ("guidance nan", "finite")),
    Case("guidance infinite", ["--guidance", "inf"], 3, ("guidance inf", "finite")),
    Case("seed -1 (allowed: a random seed, recorded)", ["--seed", "-1"], 0, (), creates=("o.png",)),
    Case("seed negative", ["--seed", "-2"], 3, ("seed -2", "-1..4294967295", "-1 for a random seed")),
    Case("seed too large", ["--seed", "4294967296"], 3, ("seed 4294967296", "-1..4294967295")),
    Case("batch zero", ["--batch", "0"], 3, ("batch 0", "1..4")),
    Case("batch too big", ["--batch", "99"], 3, ("batch 99", "1..4")),
    # -- sampler / backend ----------------------------------------------------------------------------------------
    Case("unknown scheduler", ["--scheduler", "plms"], 3, ("unknown scheduler 'plms'", "ddim")),
    Case("karras with ddim", ["--scheduler", "ddim", "--karras"], 3, ("karras", "'ddim'", "euler")),
    Case("unknown backend", ["--backend", "cuda"], 3, ("unknown backend 'cuda'", "onnxruntime")),
    Case("unknown option", ["--frobnicate"], 2, ("unrecognized arguments: --frobnicate", "--help")),
    # -- bundles --------------------------------------------------------------------------------------------------
    Case("missing bundle", [], 4, ("bundle not found", "export build"), plan="missing"),
    Case("a directory as bundle", [], 4, ("is a directory", "the .plan file itself"), plan="directory"),
    Case("empty file", [], 4, ("is not a bundle", "export build"), plan="empty"),
    Case("truncated bundle", [], 4, ("is truncated", "rebuild"), plan="truncated"),
    Case("one flipped payload byte (tampered)", [], 4, ("'denoise' fails its sha256 check", "tampered", "rebuild"),
         plan="flipped"),
    Case("wrong magic", [], 4, ("is not a bundle", "GRTPLAN"), plan="magic"),
    Case("newer format version", [], 4, ("format version 2", "upgrade the runtime"), plan="version"),
    Case("manifest hash mismatch", [], 4, ("manifest fails its sha256 check", "rebuild"), plan="manifest_hash"),
    Case("wrong family (labelled sdxl, SD 1.x structure)", [], 4, ("text_encoder_2", "rebuild"), plan="sdxl"),
    Case("unknown family", [], 4, ("family 'sd9'", "rebuild"), plan="unknown_family"),
    Case("TensorRT plan for another GPU / TensorRT version", [], 5, ("TensorRT",), plan="trt"),
    Case("TensorRT plan: message says rebuild", [], 5, ("8.6.1", "rebuild"), plan="trt"),
    # -- outputs --------------------------------------------------------------------------------------------------
    Case("output path under a regular file (unwritable)", ["--out", "{work}/keep.txt/x.png"], 7,
         ("--out", "keep.txt is not a folder")),
    Case("output path in /proc (unwritable)", ["--out", "/proc/grt-bad-input.png"], 7,
         ("--out /proc/grt-bad-input.png", "not writable")),
    Case("output is a directory", ["--out", "{work}"], 7, ("is a directory", "pass a file name")),
    Case("output folder missing (created)", ["--out", "{work}/new/sub/o.png"], 0, (), creates=("new/sub/o.png",)),
    Case("existing output without --overwrite", [], 7, ("exists", "--overwrite"), setup=keep_existing),
    Case("--report to an unwritable place (nothing written, no PNG)", ["--report", "{work}/keep.txt/r.json"], 7,
         ("--report", "keep.txt is not a folder")),
    Case("--report same file as --out", ["--report", "{work}/o.png"], 7, ("--report", "also an image output")),
    # -- graphs and guards ----------------------------------------------------------------------------------------
    Case("NaN from the VAE graph (unguarded bundle)", [], 5, ("'vae_decoder' output 'image'", "NaN/Inf",
                                                              "nothing was written"), plan="nan"),
    Case("NaN from the VAE graph (guarded bundle)", [], 6, ("'vae_decoder'", "NaN/Inf", "image_checker",
                                                            "nothing was written"), plan="nan_guarded"),
    Case("NaN from the image checker graph", ["--checker", "{nan_checker}"], 6,
         ("image checker nan_checker.onnx output 'y'", "NaN/Inf", "no image written")),
    Case("corrupt image checker file", ["--checker", "{work}/keep.txt"], 6,
         ("image checker", "keep.txt cannot be loaded", "valid .onnx")),
    Case("missing image checker file", ["--checker", "{work}/none.onnx"], 3, ("--checker", "not found")),
    Case("image checker config not JSON", ["--checker", str(CHECKER), "--checker-config", "{work}/keep.txt"], 3,
         ("--checker-config", "not readable JSON", "fix the file")),
    Case("image checker config key misspelt", ["--checker", str(CHECKER), "--checker-config", "{bad_config}"], 3,
         ("--checker-config", "bad_config.json", "does not read: treshold", "fix the config")),
    Case("image checker threshold out of range", ["--checker", str(CHECKER), "--checker-config", "{bad_threshold}"],
         3, ("bad_threshold.json", "threshold=2", "[0, 1]")),
    Case("image checker with no unsafe classes", ["--checker", str(CHECKER), "--checker-config",
                                                  "{no_classes}"], 3, ("no_classes.json", "unsafe_classes=[]",
                                                                       "non-empty")),
    Case("image checker config trying to name the graph", ["--checker", str(CHECKER), "--checker-config",
                                                           "{with_component}"], 3, ("'component'", "set by --checker")),
    Case("a permissive added checker cannot weaken the bundle's", ["--checker", str(CHECKER), "--checker-config",
                                                                  "{permissive}", "--prompt", "a knife on sand",
                                                                  "--steps", "8"], 6,
         ("checked.plan:image_checker blocked image 0 of 1", "threshold 0.5"), plan="checked"),
    Case("tampered bundle: a guard threshold out of range", [], 4,
         ("guard image_checker setting threshold=2", "[0, 1]", "tampered", "rebuild"), plan="tampered_threshold"),
    Case("tampered bundle: an empty class list", [], 4,
         ("guard image_checker setting unsafe_classes=[]", "tampered"), plan="tampered_classes"),
    Case("tampered bundle: a guard setting removed", [], 4, ("guard image_checker lacks setting(s) threshold",
                                                             "rebuild"), plan="tampered_missing"),
    Case("tampered bundle: a guard this runtime does not know", [], 4, ("does not know guard 'nsfw_filter'",
                                                                        "upgrade the runtime"), plan="unknown_guard"),
    Case("image checker blocks the image", ["--checker", str(CHECKER), "--prompt", "a knife on sand", "--steps", "8"], 6,
         ("blocked image 0 of 1", "threshold 0.5", "no image was written")),
    Case("SafeGuider refuses a prompt its search cannot fix (on_no_qualifier: block)",
         ["--prompt", "a small knife and a large skull on sand"], 6,
         ("safeguider blocked the prompt", "no deletion that qualifies", "no image written"), plan="blocking"),
]


# -- the variant bundles ------------------------------------------------------------------------------------------

def rewrite(plan: Path, dest: Path, mutate=None) -> Path:
    """``plan`` re-written to ``dest`` after ``mutate(manifest, payloads)`` (payloads: name -> bytes)."""
    from export.bundle import write_bundle

    with Bundle.open(plan) as b:
        manifest = b.manifest
        payloads = {c.name: bytes(b.payload(c.name)) for c in manifest.components}
    if mutate:
        mutate(manifest, payloads)
    return write_bundle(dest, manifest, payloads)


def patch(src: Path, dest: Path, offset: int, data: bytes) -> Path:
    raw = bytearray(src.read_bytes())
    raw[offset:offset + len(data)] = data
    dest.write_bytes(bytes(raw))
    return dest


def nan_graph(inputs, outputs, path: Path) -> Path:
    """An ONNX graph with the given I/O specs whose every output is NaN: latent (B,4,h,w) -> image (B,3,H,W)."""
    import onnx
    from onnx import TensorProto, helper

    (i,), (o,) = inputs, outputs
    factor = o.shape[2] // i.shape[2]
    nodes = [
        helper.make_node("Slice", [i.name, "s0", "s1", "ax"], ["rgb"]),
        helper.make_node("Resize", ["rgb", "", "scales"], ["big"], mode="nearest"),
        helper.make_node("Add", ["big", "nan"], [o.name]),
    ]
    inits = [helper.make_tensor("s0", TensorProto.INT64, [1], [0]), helper.make_tensor("s1", TensorProto.INT64, [1], [3]),
             helper.make_tensor("ax", TensorProto.INT64, [1], [1]),
             helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, factor, factor]),
             helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")])]
    graph = helper.make_graph(nodes, "nan_vae", [helper.make_tensor_value_info(i.name, TensorProto.FLOAT, i.shape)],
                              [helper.make_tensor_value_info(o.name, TensorProto.FLOAT, o.shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def nan_checker(path: Path) -> Path:
    """A checker graph ``x (N,3,H,W) -> y (N,3)`` = channel means + NaN, with its config beside it."""
    import json

    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("Add", ["m", "nan"], ["y"])]
    graph = helper.make_graph(nodes, "nan_checker",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    path.with_suffix(".json").write_text(json.dumps({"unsafe_classes": [0], "size": [64, 64]}))
    return path


@pytest.fixture(scope="module")
def variants(tinyworld_plan, guarded_plan, tmp_path_factory) -> dict[str, Path]:
    import json

    from export.bundle import onnx_component
    from runtime.guards.image_checker import check_config

    d = tmp_path_factory.mktemp("variants")
    plan = tinyworld_plan
    raw = plan.read_bytes()
    with Bundle.open(plan) as b:
        denoise = b.manifest.component("denoise")
        vae = b.manifest.component("vae_decoder")
    v = {"good": plan, "missing": d / "missing.plan", "directory": d}
    (d / "empty.plan").write_bytes(b"")
    v["empty"] = d / "empty.plan"
    (d / "truncated.plan").write_bytes(raw[:denoise.offset + 1000])
    v["truncated"] = d / "truncated.plan"
    where = denoise.offset + denoise.size // 2
    v["flipped"] = patch(plan, d / "flipped.plan", where, bytes([raw[where] ^ 0x01]))
    v["magic"] = patch(plan, d / "magic.plan", 0, b"NOTAPLAN")
    v["version"] = patch(plan, d / "version.plan", 8, (2).to_bytes(4, "little"))
    v["manifest_hash"] = patch(plan, d / "manifest_hash.plan", 24, bytes([raw[24] ^ 0xFF]))

    def family(name):
        def mutate(m, payloads):
            m.family = name
        return mutate

    v["sdxl"] = rewrite(plan, d / "sdxl.plan", family("sdxl"))
    v["unknown_family"] = rewrite(plan, d / "unknown_family.plan", family("sd9"))

    def trt(m, payloads):  # engines "built" with TensorRT 8.6.1 for a Turing GPU (compute capability 7.5)
        for c in m.components:
            if c.backend == "onnx":
                c.backend, c.tensorrt_version, c.compute_capability = "tensorrt", "8.6.1", "7.5"

    v["trt"] = rewrite(plan, d / "trt.plan", trt)
    nan_onnx = nan_graph(vae.inputs, vae.outputs, d / "nan_vae.onnx")

    def nan(m, payloads):
        payloads["vae_decoder"] = nan_onnx.read_bytes()

    v["nan"] = rewrite(plan, d / "nan.plan", nan)
    checker_cfg = json.loads(CHECKER.with_suffix(".json").read_text())
    embedded = check_config({**checker_cfg, "component": "image_checker"}, "user", str(CHECKER))

    def checked(m, payloads, **settings):  # the checker embedded, as `export build --checker` does
        comps, pays = onnx_component("image_checker", "guard", CHECKER)
        m.components += comps
        payloads["image_checker"] = CHECKER.read_bytes()
        m.guards = {**m.guards, "image_checker": {**embedded, **settings}}

    def nan_guarded(m, payloads):
        nan(m, payloads)
        checked(m, payloads)

    v["nan_guarded"] = rewrite(plan, d / "nan_guarded.plan", nan_guarded)
    v["nan_checker"] = nan_checker(d / "nan_checker.onnx")
    for name, config in (("bad_config", {**checker_cfg, "treshold": 0.4}), ("bad_threshold", {"threshold": 2}),
                         ("no_classes", {"unsafe_classes": []}), ("with_component", {"component": "denoise"}),
                         ("permissive", {**checker_cfg, "threshold": 1.0})):
        (d / f"{name}.json").write_text(json.dumps(config))
        v[name] = d / f"{name}.json"

    v["checked"] = rewrite(plan, d / "checked.plan", checked)
    v["tampered_threshold"] = rewrite(plan, d / "tampered_threshold.plan", lambda m, p: checked(m, p, threshold=2))
    v["tampered_classes"] = rewrite(plan, d / "tampered_classes.plan", lambda m, p: checked(m, p, unsafe_classes=[]))

    def missing(m, payloads):
        checked(m, payloads)
        del m.guards["image_checker"]["threshold"]

    v["tampered_missing"] = rewrite(plan, d / "tampered_missing.plan", missing)

    def unknown(m, payloads):
        m.guards = {"nsfw_filter": {"threshold": 0.5}}

    v["unknown_guard"] = rewrite(plan, d / "unknown_guard.plan", unknown)
    v["blocking"] = rewrite(guarded_plan("safeguider"), d / "blocking.plan",  # as --guard-setting builds it
                            lambda m, p: m.guards["safeguider"].update(on_no_qualifier="block"))
    return v


# -- running a case ---------------------------------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


MESSAGES: dict[str, tuple[int, str]] = {}  # case name -> (exit code, message), for BAD_INPUT.md


def run_case(case: Case, variants, tmp_path, capsys, monkeypatch) -> tuple[int, str]:
    work, private_tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    private_tmp.mkdir()
    (work / "keep.txt").write_text("a regular file")
    if case.setup:
        case.setup(work)
    before = snapshot(work)
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))  # temporary files of this run land here
    subst = {"work": str(work), "nan_checker": str(variants["nan_checker"]),
             **{k: str(variants[k]) for k in ("bad_config", "bad_threshold", "no_classes", "with_component",
                                              "permissive")}}
    args = [a.format(**subst) if "{" in a else a for a in case.args]
    argv = ["generate", "--engine", str(variants[case.plan]), "--prompt", PROMPT, "--steps", "2",
            "--out", str(work / "o.png"), *args]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if case.code == 0:
        assert code == 0, err
        after = snapshot(work)
        assert sorted(after) == sorted([*before, *case.creates])
        assert all(after[f].startswith(b"\x89PNG") for f in case.creates)
        message = ""
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        message = lines[0].removeprefix("error: ")
        MESSAGES[case.name] = (code, message)
        assert code == case.code, err
        assert snapshot(work) == before  # no partial output, existing files untouched, no temporary file
        for needle in case.needles:
            assert needle in message, (needle, message)
    assert list(private_tmp.iterdir()) == []  # tokenizer / engine temporary folders are gone
    return code, message


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.xfail(reason=c.xfail, strict=False)]
                                               if c.xfail else []) for c in CASES])
def test_bad_input(case, variants, tmp_path, capsys, monkeypatch):
    run_case(case, variants, tmp_path, capsys, monkeypatch)


def test_catalogue_is_complete():
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)
    codes = {c.code for c in CASES}
    assert {2, 3, 4, 5, 6, 7} <= codes  # plus 130: test_interrupt_during_sampling


def test_catalogue_doc_lists_every_case():
    text = DOC.read_text(encoding="utf-8")
    for case in CASES:
        assert f"| {case.name} |" in text, f"{case.name!r} missing from {DOC}"
    assert "| interrupt during sampling (SIGINT) |" in text


# -- Ctrl-C and the lean import, in a child process --------------------------------------------------------------

# RUNNER: the child runs `python -m runtime ...` and prints HEAVY=<heavy modules it imported> (test_generate)


def test_interrupt_during_sampling(tinyworld_plan, tmp_path):
    work, private_tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    private_tmp.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TMPDIR": str(private_tmp)}
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, "generate", "--engine", str(tinyworld_plan), "--prompt",
                             PROMPT, "--steps", "500", "--progress", "--out", str(work / "o.png"), "--report",
                             str(work / "o.json")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # a background job (nohup, `&`) inherits SIGINT ignored; a terminal's Ctrl-C is not
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = proc.stderr.readline()  # the first progress line: sampling has started
        assert first.startswith("step 1/500"), first
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [line for line in rest.splitlines() if not line.startswith(("step ", "HEAVY="))]
    heavy = [line for line in rest.splitlines() if line.startswith("HEAVY=")]
    assert proc.returncode == ExitCode.INTERRUPTED, rest
    assert lines == ["error: interrupted"], rest
    MESSAGES["interrupt during sampling (SIGINT)"] = (proc.returncode, "interrupted")
    assert heavy == ["HEAVY="], heavy  # the lean runtime imported none of torch/diffusers/train/export/bench
    assert list(work.iterdir()) == []
    assert [p.name for p in private_tmp.iterdir() if p.name != ".ses"] == []  # .ses: onnxruntime's own id file


# -- BAD_INPUT.md -------------------------------------------------------------------------------------------------

def _example(case: Case) -> str:
    if case.example:
        return case.example
    shown = {"missing": "missing.plan", "directory": "some_dir/", "empty": "empty.plan (0 bytes)",
             "truncated": "truncated.plan", "flipped": "tampered.plan", "magic": "not_a_bundle.plan",
             "version": "v2.plan", "manifest_hash": "bad_manifest.plan", "sdxl": "sdxl.plan",
             "unknown_family": "sd9.plan", "trt": "trt8_sm75.plan", "nan": "nan_vae.plan",
             "nan_guarded": "nan_vae_checked.plan", "checked": "checked.plan (checker embedded)",
             "tampered_threshold": "checked.plan (manifest edited: threshold 2)",
             "tampered_classes": "checked.plan (manifest edited: unsafe_classes [])",
             "tampered_missing": "checked.plan (manifest edited: threshold removed)",
             "unknown_guard": "x.plan (manifest names guard nsfw_filter)",
             "blocking": "safeguider_block.plan (--guard-setting safeguider.on_no_qualifier=block)"}
    parts = [f"--engine {shown[case.plan]}"] if case.plan != "good" else []
    names = {"{work}": "out", "{nan_checker}": "nan_checker.onnx", "{bad_config}": "bad.json", str(CHECKER):
             "checker.onnx", **{f"{{{k}}}": f"{k}.json" for k in ("bad_threshold", "no_classes", "with_component",
                                                                 "permissive")}}
    for arg in case.args:
        for placeholder, shown_as in names.items():
            arg = arg.replace(placeholder, shown_as)
        parts.append(shlex.quote(arg))
    return " ".join(parts) or "(defaults)"


@pytest.fixture(scope="module", autouse=True)
def write_doc():
    """With ``GRT_BAD_INPUT_MD=PATH``, write the catalogue table (with the measured messages) to PATH."""
    yield
    dest = os.environ.get("GRT_BAD_INPUT_MD")
    if not dest:
        return
    rows = ["| case | example (`runtime generate --prompt P --out out/o.png ...`) | exit | message |",
            "|---|---|---|---|"]
    for case in CASES:
        code, message = MESSAGES.get(case.name, (case.code, "(image written)" if case.code == 0 else "?"))
        if case.xfail:
            message += f" **(gap: {case.xfail})**"
        example = _example(case).replace("|", "\\|")
        message = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/ ]+/work", "out", message)
        message = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/variants\d+", "bundles", message)
        rows.append(f"| {case.name} | `{example}` | {case.code} | {message.replace('|', '/')} |")
    rows.append("| interrupt during sampling (SIGINT) | `--steps 500 --progress`, SIGINT after `step 1/500` | 130 | interrupted |")
    header = Path(dest).read_text(encoding="utf-8").split("<!-- table -->")[0] if Path(dest).exists() else ""
    Path(dest).write_text(header + "<!-- table -->\n" + "\n".join(rows) + "\n", encoding="utf-8")
