"""The single-file engine bundle: writer, verifying reader, `runtime info` / `runtime unpack`, exit codes."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.bundle import onnx_component, tokenizer_components, write_bundle
from runtime.bundle import ALIGNMENT, HEADER, MAGIC, Bundle, align, check_engine_compat
from runtime.cli import main
from runtime.errors import BackendError, BadInputError, BundleError, ExitCode, OutputError
from runtime.manifest import ComponentSpec, Manifest, TensorSpec

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"torch", "diffusers", "transformers", "train", "export", "onnx", "onnxruntime"}
VOCAB = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2, "a</w>": 3}


# -- fixtures: tiny ONNX graphs and a bundle holding every kind of component ------------------------------------

def add_graph(path: Path) -> Path:
    """z = x + y over a symbolic length n."""
    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n"]) for n in "xy")
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n"])
    graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "add", [x, y], [z])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def bias_graph_with_external_data(path: Path) -> Path:
    """z = x + w, with the 64-float weight w stored in the external file '<path>.data'."""
    w = numpy_helper.from_array(np.arange(64, dtype=np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [64])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["z"])], "bias", [x], [z], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0)
    return path


def tokenizer_dir(path: Path) -> Path:
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps(VOCAB))
    (path / "merges.txt").write_text("#version: 0.2\n")
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    return path


def make_manifest_and_payloads(src: Path) -> tuple[Manifest, dict]:
    add, add_payloads = onnx_component("add", "denoise", add_graph(src / "add.onnx"))
    bias, bias_payloads = onnx_component("bias", "vae_decoder", bias_graph_with_external_data(src / "bias.onnx"))
    tok, tok_payloads, tok_entry = tokenizer_components(tokenizer_dir(src / "tok"), name="tokenizer")
    engine = ComponentSpec(
        name="unet", kind="denoise", backend="tensorrt", precision="fp16",
        inputs=[TensorSpec("sample", ["2B", 4, "h", "w"], "float16")],
        outputs=[TensorSpec("noise_pred", ["2B", 4, "h", "w"], "float16")],
        profiles={"sample": {"min": [2, 4, 8, 8], "opt": [2, 4, 16, 16], "max": [2, 4, 32, 32]}},
        tensorrt_version="10.9.0", compute_capability="9.0")
    blob = ComponentSpec(name="blob", kind="misc", backend="file", extra={"filename": "blob.bin"})
    manifest = Manifest(
        family="tinyworld", components=add + bias + tok + [engine, blob], tokenizers=[tok_entry],
        scheduler={"_class_name": "DDIMScheduler", "num_train_timesteps": 1000},
        latent={"channels": 4, "scale_factor": 8, "scaling_factor": 0.18215},
        guards={"safeguider": {"threshold": 0.5, "beam_width": 4}},
        defaults={"steps": 20, "guidance": 7.5, "height": 64, "width": 64, "scheduler": "ddim"},
        created_by={"exporter": "tests"})
    payloads = {**add_payloads, **bias_payloads, **tok_payloads,
                "unet": b"fake serialized engine " * 300, "blob": bytes(range(256)) * 20}
    return manifest, payloads


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Manifest, dict]:
    """A bundle (never modified: tests copy it), the manifest it was written from and its payloads."""
    src = tmp_path_factory.mktemp("src")
    manifest, payloads = make_manifest_and_payloads(src)
    return write_bundle(src / "model.plan", manifest, payloads), manifest, payloads


@pytest.fixture
def plan(built, tmp_path) -> Path:
    """A private copy of the bundle, free to corrupt."""
    return Path(shutil.copy(built[0], tmp_path / "model.plan"))


def payload_bytes(data) -> bytes:
    return data if isinstance(data, bytes) else Path(data).read_bytes()


def run_cli(*args, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RUNTIME_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def run_in_process(capsys, *args) -> subprocess.CompletedProcess:
    """``runtime.cli.main`` in this process (faster than a subprocess for the many manifest cases)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def assert_fails(proc: subprocess.CompletedProcess, code: ExitCode, *words: str) -> str:
    """The documented exit code, exactly one `error:` line on stderr, no traceback; returns the message."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def rewrite_manifest(path: Path, edit) -> None:
    """Replace the manifest by ``edit(manifest_dict)`` (or raw bytes) with a VALID hash: tests what follows it."""
    data = bytearray(path.read_bytes())
    _, version, flags, length, _ = HEADER.unpack_from(data)
    old = json.loads(data[HEADER.size:HEADER.size + length])
    new = edit(old)
    new = new if isinstance(new, bytes) else json.dumps(new).encode()
    data_start = align(HEADER.size + length)
    assert HEADER.size + len(new) <= data_start
    data[:data_start] = (HEADER.pack(MAGIC, version, flags, len(new), hashlib.sha256(new).digest()) + new
                         ).ljust(data_start, b"\0")
    path.write_bytes(bytes(data))


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# -- round trip ---------------------------------------------------------------------------------------------------

def test_round_trip(built):
    path, manifest, payloads = built
    with Bundle.open(path) as bundle:
        assert bundle.format_version == 1
        written = bundle.manifest
        for c in written.components:
            assert c.offset % ALIGNMENT == 0 and c.offset >= ALIGNMENT
            view = bundle.payload(c.name)
            assert isinstance(view, memoryview) and view.readonly
            assert bytes(view) == payload_bytes(payloads[c.name]), c.name
            assert c.size == len(view) and c.sha256 == hashlib.sha256(view).hexdigest()
            view.release()
        assert bundle.file_size == max(c.offset + c.size for c in written.components)
    # Apart from the layout fields the writer fills in, the manifest comes back as it was given.
    for c in written.components:
        c.offset, c.size, c.sha256 = 0, 0, ""
    assert written == manifest
    assert manifest.component("unet").sha256 == ""  # write_bundle did not modify its argument


def test_manifest_json_round_trip(built):
    manifest = built[1]
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.component("bias").external_data == "bias.data"
    assert manifest.component("bias.data").filename == "bias.onnx.data"
    assert manifest.component("add").inputs == [TensorSpec("x", ["n"], "float32"), TensorSpec("y", ["n"], "float32")]


def test_component_lookup_names_the_alternatives(built):
    with pytest.raises(BundleError, match="no component 'vae'.*add, bias"):
        built[1].component("vae")


def test_tokenizer_components(built):
    manifest = built[1]
    assert manifest.tokenizers == [{"name": "tokenizer", "max_length": 8, "pad_id": 1, "files": {
        "vocab.json": "tokenizer.vocab", "merges.txt": "tokenizer.merges",
        "tokenizer_config.json": "tokenizer.tokenizer_config"}}]
    assert {manifest.component(c).filename for c in manifest.tokenizers[0]["files"].values()} == {
        "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json"}


def test_empty_payload_and_no_components(tmp_path):
    components = [ComponentSpec("empty", "misc", "file"), ComponentSpec("one", "misc", "file")]
    manifest = Manifest(family="x", components=components)
    path = write_bundle(tmp_path / "a.plan", manifest, {"empty": b"", "one": b"1"})
    with Bundle.open(path) as bundle:
        assert bytes(bundle.payload("empty")) == b"" and bytes(bundle.payload("one")) == b"1"
    path = write_bundle(tmp_path / "b.plan", Manifest(family="x", components=[]), {})
    with Bundle.open(path) as bundle:
        assert bundle.components == []


def test_extract(built, tmp_path):
    with Bundle.open(built[0], verify=False) as bundle:
        out = bundle.extract("blob", tmp_path / "blob.bin")
        assert out.read_bytes() == built[2]["blob"]
        with pytest.raises(OutputError, match="exists"):
            bundle.extract("blob", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin"]


# -- runtime info / unpack ----------------------------------------------------------------------------------------

def test_cli_info(built):
    proc = run_cli("info", built[0])
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    out = proc.stdout
    for text in ("family      tinyworld", "steps=20", "scaling_factor=0.18215", "threshold", "max_length=8",
                 "sample [2B,4,h,w] float16", "x [n] float32", "10.9.0 / sm 9.0", "payload hashes verified"):
        assert text in out, text
    with Bundle.open(built[0]) as bundle:
        for c in bundle.components:
            assert c.sha256[:12] in out
        proc = run_cli("info", built[0], "--json", "--no-verify")
        assert proc.returncode == 0
        assert Manifest.from_dict(json.loads(proc.stdout)) == bundle.manifest


def test_cli_unpack_gives_loadable_onnx(built, tmp_path):
    path, _, payloads = built
    dest = tmp_path / "unpacked"
    proc = run_cli("unpack", path, dest)
    assert proc.returncode == 0, proc.stderr
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == ["add.onnx", "bias.onnx", "bias.onnx.data", "blob.bin", "manifest.json",
                     "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet.engine"]
    assert (dest / "unet.engine").read_bytes() == payloads["unet"]
    assert (dest / "tokenizer" / "vocab.json").read_bytes() == payloads["tokenizer.vocab"].read_bytes()
    assert json.loads((dest / "manifest.json").read_text())["family"] == "tinyworld"
    assert list(tmp_path.iterdir()) == [dest]  # no staging folder left behind

    x = np.arange(5, dtype=np.float32)
    add = ort.InferenceSession(str(dest / "add.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(add.run(None, {"x": x, "y": 2 * x})[0], 3 * x)
    bias = ort.InferenceSession(str(dest / "bias.onnx"), providers=["CPUExecutionProvider"])
    x = np.ones(64, np.float32)
    np.testing.assert_array_equal(bias.run(None, {"x": x})[0], x + np.arange(64, dtype=np.float32))


def test_unpack_refuses_non_empty_dir_without_force(built, tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    assert_fails(run_cli("unpack", built[0], dest), ExitCode.OUTPUT, "not empty", "--force")
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert_fails(run_cli("unpack", built[0], dest / "keep.txt"), ExitCode.OUTPUT, "not a directory")

    proc = run_cli("unpack", built[0], dest, "--force")
    assert proc.returncode == 0, proc.stderr
    assert not (dest / "keep.txt").exists() and (dest / "add.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unpack_of_corrupt_bundle_leaves_nothing(plan, tmp_path):
    with Bundle.open(plan) as bundle:
        last = bundle.components[-1]
    where = last.offset + last.size - 1
    patch(plan, where, bytes([plan.read_bytes()[where] ^ 0xFF]))
    assert_fails(run_cli("unpack", plan, tmp_path / "out"), ExitCode.BUNDLE, repr(last.name), "sha256")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.plan"]


def test_cli_usage_errors():
    assert run_cli().returncode == ExitCode.USAGE
    assert run_cli("nonsense").returncode == ExitCode.USAGE
    assert run_cli("info").returncode == ExitCode.USAGE
    assert run_cli("--help").returncode == 0


# -- a bad bundle: exit code 4, one line, no traceback --------------------------------------------------------------

def test_flipped_byte_in_each_payload_is_caught(plan, capsys):
    original = plan.read_bytes()
    with Bundle.open(plan) as bundle:
        components = bundle.components
    for c in components:
        if c.size == 0:
            continue
        where = c.offset + c.size // 2
        patch(plan, where, bytes([original[where] ^ 0x01]))
        assert_fails(run_cli("info", plan), ExitCode.BUNDLE, repr(c.name), "sha256", "corrupt", "rebuild")
        assert run_in_process(capsys, "info", plan, "--no-verify").returncode == 0  # only the hash catches it
        patch(plan, where, original[where:where + 1])
    assert run_cli("info", plan).returncode == 0


def test_flipped_byte_in_api(plan):
    with Bundle.open(plan) as bundle:
        c = bundle.manifest.component("add")
    patch(plan, c.offset, bytes([plan.read_bytes()[c.offset] ^ 0xFF]))
    with pytest.raises(BundleError, match="'add' fails its sha256"):
        Bundle.open(plan)
    with Bundle.open(plan, verify=False) as bundle:  # opening without verify works; verify() catches it
        with pytest.raises(BundleError, match="'add'"):
            bundle.verify(["add"])


def test_truncated_bundle(built, plan, tmp_path):
    data = plan.read_bytes()
    _, _, _, length, _ = HEADER.unpack_from(data)
    with Bundle.open(plan) as bundle:
        components = sorted(bundle.components, key=lambda c: c.offset)
    first, last = components[0], components[-1]
    cases = {
        0: "not a bundle", 4: "truncated", 8: "truncated", HEADER.size - 1: "truncated",
        HEADER.size + length // 2: "manifest needs",  # inside the manifest
        first.offset - 1: repr(first.name),  # in the padding: the manifest is fine, the first payload is missing
        first.offset + 1: repr(first.name),
        last.offset + last.size - 1: repr(last.name),
    }
    for size, words in cases.items():
        short = tmp_path / f"short{size}.plan"
        short.write_bytes(data[:size])
        message = assert_fails(run_cli("info", short), ExitCode.BUNDLE, words)
        if size > HEADER.size + length:
            assert "truncated" in message and str(last.offset + last.size) in message and "re-copy" in message


def test_not_a_bundle(plan):
    patch(plan, 0, b"PK\x03\x04")
    assert_fails(run_cli("info", plan), ExitCode.BUNDLE, "not a bundle", "python -m export build")


@pytest.mark.parametrize("version, word", [(2, "newer"), (0, "older")])
def test_unsupported_version(plan, version, word):
    patch(plan, 8, version.to_bytes(4, "little"))
    assert_fails(run_cli("info", plan), ExitCode.BUNDLE, f"version {version}", word, "reads", "rebuild")


def test_unknown_flags(plan):
    patch(plan, 12, (1).to_bytes(4, "little"))
    assert_fails(run_cli("info", plan), ExitCode.BUNDLE, "flags")


def test_corrupted_manifest(plan):
    patch(plan, HEADER.size + 10, b"#")
    assert_fails(run_cli("info", plan), ExitCode.BUNDLE, "manifest", "sha256", "corrupt")


def test_manifest_length_beyond_file(plan):
    patch(plan, 16, (1 << 40).to_bytes(8, "little"))
    assert_fails(run_cli("info", plan), ExitCode.BUNDLE, "truncated", "manifest")


def changed(i: int, **fields):
    """An edit of manifest component ``i``'s fields."""
    def edit(m):
        components = [dict(c) for c in m["components"]]
        components[i].update(fields)
        return {**m, "components": components}
    return edit


@pytest.mark.parametrize("edit, words", [
    (lambda m: b"{not json", ("not valid JSON",)),
    (lambda m: [1, 2], ("expected a JSON object",)),
    (lambda m: {k: v for k, v in m.items() if k != "family"}, ("lacks family",)),
    (lambda m: {**m, "surprise": 1}, ("unknown field", "upgrade")),
    (lambda m: {**m, "format_version": 2}, ("disagrees",)),
    (changed(0, offset="0"), ("offset",)),
    (changed(0, backend="tflite"), ("tflite",)),
    (changed(0, extra={"filename": "../../evil"}), ("unsafe",)),
    (changed(0, offset=100), ("aligned",)),
    (changed(0, offset=0), ("overlaps the manifest",)),
    (changed(0, offset=1 << 40), ("truncated", "'add'")),
    (lambda m: changed(1, offset=m["components"][0]["offset"])(m), ("overlaps",)),
    (lambda m: changed(1, name="add")(m), ("repeated",)),
    (lambda m: changed(0, external_data="nothing")(m), ("external data", "nothing")),
])
def test_invalid_manifest_with_valid_hash(plan, edit, words, capsys):
    rewrite_manifest(plan, edit)
    assert_fails(run_in_process(capsys, "info", plan, "--no-verify"), ExitCode.BUNDLE, *words)


def test_missing_file_and_directory(tmp_path):
    assert_fails(run_cli("info", tmp_path / "nope.plan"), ExitCode.BUNDLE, "not found", "nope.plan", "export build")
    assert_fails(run_cli("info", tmp_path), ExitCode.BUNDLE, "directory", "not a bundle")
    assert_fails(run_cli("unpack", tmp_path / "nope.plan", tmp_path / "out"), ExitCode.BUNDLE, "not found")
    assert not (tmp_path / "out").exists()


# -- engine compatibility: exit code 5 -----------------------------------------------------------------------------

def test_trt_engine_compat(built):
    engine = built[1].component("unet")  # built with TensorRT 10.9.0 for compute capability 9.0
    check_engine_compat(engine, "10.9.0.34", "9.0")  # build numbers do not matter
    check_engine_compat(engine, "10.9", "sm_90")
    with pytest.raises(BackendError, match=r"built with TensorRT 10\.9\.0.*has TensorRT 10\.9\.1"):
        check_engine_compat(engine, "10.9.1", "9.0")  # engines need the exact release ...
    portable = ComponentSpec(**{**vars(engine), "extra": {"version_compatible": True}})
    check_engine_compat(portable, "10.12.0", "9.0")  # ... unless built version-compatible (same major)
    with pytest.raises(BackendError, match="built with TensorRT 10"):
        check_engine_compat(portable, "11.0.0", "9.0")
    with pytest.raises(BackendError, match=r"TensorRT 10\.9\.0.*has TensorRT 10\.3.*--backend tensorrt"):
        check_engine_compat(engine, "10.3", "9.0")
    old = ComponentSpec(**{**vars(engine), "tensorrt_version": "10.3"})
    with pytest.raises(BackendError, match=r"built with TensorRT 10\.3.*10\.9"):
        check_engine_compat(old, "10.9", "9.0")
    with pytest.raises(BackendError, match=r"compute capability 9\.0, this GPU has 8\.7.*python -m export build"):
        check_engine_compat(engine, "10.9.0", "8.7")
    with pytest.raises(BackendError, match="not installed"):
        check_engine_compat(engine, None, "9.0")
    with pytest.raises(BackendError, match="no.*found|none was found"):
        check_engine_compat(engine, "10.9.0", None)
    assert BackendError("x").exit_code == ExitCode.BACKEND == 5
    check_engine_compat(built[1].component("add"), None, None)  # ONNX runs anywhere


# -- writer: atomic, nothing left behind ---------------------------------------------------------------------------

def test_writer_missing_payload_leaves_nothing(built, tmp_path):
    manifest, payloads = built[1], dict(built[2])
    out = tmp_path / "model.plan"
    with pytest.raises(BadInputError, match="'add'.*not found.*missing.onnx"):
        write_bundle(out, manifest, {**payloads, "add": tmp_path / "missing.onnx"})
    assert list(tmp_path.iterdir()) == []

    out.write_bytes(b"previous bundle")
    with pytest.raises(BadInputError):
        write_bundle(out, manifest, {**payloads, "add": tmp_path / "missing.onnx"})
    with pytest.raises(BadInputError, match="no payload given for component 'blob'"):
        write_bundle(out, manifest, {k: v for k, v in payloads.items() if k != "blob"})
    with pytest.raises(BadInputError, match="unknown component"):
        write_bundle(out, manifest, {**payloads, "extra": b""})
    assert out.read_bytes() == b"previous bundle" and list(tmp_path.iterdir()) == [out]


def test_writer_failure_midway_leaves_existing_output_untouched(built, tmp_path):
    out = tmp_path / "model.plan"
    out.write_bytes(b"previous bundle")
    calls = []

    def progress(done, total):
        calls.append((done, total))
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the copy

    with pytest.raises(KeyboardInterrupt):
        write_bundle(out, built[1], built[2], progress=progress)
    assert out.read_bytes() == b"previous bundle" and list(tmp_path.iterdir()) == [out]

    calls.clear()
    write_bundle(out, built[1], built[2], progress=lambda done, total: calls.append((done, total)))
    assert calls[-1][0] == calls[-1][1] == sum(len(payload_bytes(p)) for p in built[2].values())
    assert out.read_bytes() == built[0].read_bytes()  # deterministic
    assert list(tmp_path.iterdir()) == [out]


def test_writer_output_errors(built, tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        write_bundle(tmp_path / "no" / "such" / "dir.plan", built[1], built[2])
    with pytest.raises(OutputError, match="is a directory"):
        write_bundle(tmp_path, built[1], built[2])


def test_writer_validates_manifest(built, tmp_path):
    manifest = Manifest(family="x", components=[ComponentSpec("a", "misc", "file", extra={"filename": "/etc/passwd"})])
    with pytest.raises(BundleError, match="unsafe"):
        write_bundle(tmp_path / "x.plan", manifest, {"a": b""})
    assert list(tmp_path.iterdir()) == []


# -- the runtime stays lean ------------------------------------------------------------------------------------------

def test_runtime_imports_no_heavy_packages():
    code = ("import sys, runtime.cli, runtime.bundle, runtime.manifest, runtime.errors; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_runtime_sources_import_nothing_from_train_export_or_torch():
    for path in sorted((ROOT / "runtime").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in {"torch", "diffusers", "transformers", "train", "export"}, \
                    f"{path.relative_to(ROOT)}:{node.lineno} imports {name}"
