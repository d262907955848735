"""Inference backends (runtime/backends): OrtEngine against plain ONNX Runtime, feed validation, NaN/Inf
detection, external data, provider and backend selection, and TensorRT (GPU only; skipped here)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from runtime.backends import (NonFiniteOutputError, OrtEngine, TrtEngine, available_backends, close_engines,
                              open_engines, select_providers)
from runtime.backends.tensorrt import tensorrt_available
from runtime.bundle import Bundle
from runtime.errors import BackendError, BadInputError, ExitCode, RuntimeToolError
from runtime.manifest import ComponentSpec, Manifest

from .conftest import ROOT, TINYWORLD

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
GRAPHS = ("text_encoder", "denoise", "vae_decoder")
THREADS = 2  # same intra-op thread count on both sides of the bit-identical comparisons

_TRT_OK, _TRT_WHY = tensorrt_available()
requires_tensorrt = pytest.mark.skipif(not _TRT_OK, reason=f"needs TensorRT >= 10, cuda-python and an NVIDIA "
                                                           f"GPU: {_TRT_WHY}")


# -- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tinyworld_plan):
    with Bundle.open(tinyworld_plan) as b:
        yield b


@pytest.fixture(scope="module")
def unpacked(bundle, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("unpacked")
    for name in GRAPHS:
        bundle.extract(name, folder / bundle.manifest.component(name).filename)
    return folder


def feeds_for(component: ComponentSpec, n: int = 2, seed: int = 0, length: int = 16) -> dict[str, np.ndarray]:
    """Random feeds matching a component's TensorSpecs: the text length ``L`` = ``length`` (tinyworld's
    tokenizer), every other symbolic dim = ``n``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in component.inputs:
        shape = [d if isinstance(d, int) else length if d == "L" else n for d in spec.shape]
        if np.dtype(spec.dtype).kind in "iu":
            feeds[spec.name] = rng.integers(0, 50, size=shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


def plain_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


# -- ONNX Runtime: parity, validation, NaN -------------------------------------------------------------------------

@pytest.mark.parametrize("name", GRAPHS)
def test_ort_engine_matches_plain_onnxruntime_bit_for_bit(bundle, unpacked, name):
    component = bundle.manifest.component(name)
    feeds = feeds_for(component)
    with OrtEngine.from_bundle(bundle, name, threads=THREADS) as engine:
        assert engine.providers == ["CPUExecutionProvider"]
        ours = engine.infer(feeds)
    session = plain_session(unpacked / component.filename)
    names = [o.name for o in session.get_outputs()]
    theirs = dict(zip(names, session.run(names, feeds)))
    assert list(ours) == [o.name for o in component.outputs] == names
    for out_name in names:
        assert ours[out_name].dtype == theirs[out_name].dtype
        np.testing.assert_array_equal(ours[out_name], theirs[out_name])


def _bad_input(engine, feeds) -> str:
    with pytest.raises(BadInputError) as info:
        engine.infer(feeds)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == ExitCode.BAD_INPUT
    return message


def test_feed_validation_errors_are_one_line_and_name_the_input(bundle):
    with OrtEngine.from_bundle(bundle, "denoise", threads=THREADS) as engine:
        good = feeds_for(engine.component)
        assert _bad_input(engine, {**good, "latents": good["sample"]}).count("'latents'") == 1  # unknown name
        missing = dict(good)
        del missing["timestep"]
        assert "'timestep'" in _bad_input(engine, missing)
        msg = _bad_input(engine, {**good, "sample": good["sample"].astype(np.float16)})
        assert "'sample'" in msg and "float16" in msg and "float32" in msg
        msg = _bad_input(engine, {**good, "sample": good["sample"][0]})
        assert "'sample'" in msg and "rank 3" in msg
        msg = _bad_input(engine, {**good, "sample": np.zeros((2, 3, 16, 16), np.float32)})
        assert "'sample'" in msg and "dimension 1 must be 4" in msg
        msg = _bad_input(engine, {**good, "encoder_hidden_states": np.zeros((3, 16, 128), np.float32)})
        assert "'encoder_hidden_states'" in msg and "'N'" in msg and "sample[0]" in msg
        msg = _bad_input(engine, {**good, "sample": good["sample"].tolist()})
        assert "'sample'" in msg and "numpy array" in msg
        assert set(engine.infer(good)) == {"noise_pred"}  # still usable after the errors


def test_nan_output_fails_closed(bundle):
    with OrtEngine.from_bundle(bundle, "vae_decoder", threads=THREADS) as engine:
        latent = np.full((1, 4, 16, 16), np.nan, np.float32)
        with pytest.raises(NonFiniteOutputError) as info:
            engine.infer({"latent": latent})
        err = info.value
        assert isinstance(err, RuntimeToolError) and err.exit_code == ExitCode.FAILURE
        assert err.component == "vae_decoder" and err.output == "image" and err.count > 0
        assert "\n" not in str(err) and "'image'" in str(err)
        raw = engine.infer({"latent": latent}, check_outputs=False)["image"]  # opt-out returns the NaNs
        assert np.isnan(raw).any()


def test_ort_engine_is_usable_from_several_threads(bundle):
    with OrtEngine.from_bundle(bundle, "vae_decoder", threads=1) as engine:
        feeds = [feeds_for(engine.component, n=1, seed=s) for s in range(4)]
        expected = [engine.infer(f)["image"] for f in feeds]
        results: dict[int, np.ndarray] = {}

        def work(i):
            results[i] = engine.infer(feeds[i])["image"]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(4):
            np.testing.assert_array_equal(results[i], expected[i])


def test_closed_engine_refuses(bundle):
    engine = OrtEngine.from_bundle(bundle, "vae_decoder")
    engine.close()
    engine.close()  # idempotent
    for run in (engine.infer, engine.infer_rows):
        with pytest.raises(BackendError, match="closed"):
            run({"latent": np.zeros((1, 4, 16, 16), np.float32)})


@pytest.mark.parametrize("rows", [3, 13, 64])
def test_infer_rows_gives_the_rows_of_one_run_bit_for_bit(bundle, rows):
    """SafeGuider's candidates run as row slices side by side on a one-thread session (a small CPU graph): every
    output row equals the one run's, in order; fewer than two slices' worth of rows is the one run itself."""
    with OrtEngine.from_bundle(bundle, "text_encoder") as engine:
        assert engine.parallel_runs == (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                        else os.cpu_count())
        feeds = feeds_for(engine.component, n=rows, seed=rows)
        want, got = engine.infer(feeds), engine.infer_rows(feeds)
        assert list(got) == list(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


# -- external data ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def external_data_plan(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A bundle holding z = x + w, w a 256 KiB initializer kept in an external data file."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.bundle import onnx_component, write_bundle

    folder = tmp_path_factory.mktemp("extdata")
    w = np.random.default_rng(1).standard_normal((256, 256)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256, 256])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 256, 256])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["z"])], "bias", [x], [z],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "bias.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="bias.onnx.data", size_threshold=1024)
    assert (folder / "bias.onnx.data").stat().st_size >= w.nbytes
    components, payloads = onnx_component("bias", "denoise", path)
    assert components[0].external_data == "bias.data"
    plan = write_bundle(folder / "bias.plan", Manifest(family="test", components=components), payloads)
    for source in payloads.values():  # only the bundle remains: nothing can be read from the original files
        Path(source).unlink()
    return plan, w


@pytest.mark.parametrize("mode", ["auto", "memory", "tempdir"])
def test_external_data_graph_loads_and_matches(external_data_plan, mode):
    plan, w = external_data_plan
    x = np.random.default_rng(2).standard_normal((3, 256, 256)).astype(np.float32)
    with Bundle.open(plan) as bundle:
        engine = OrtEngine.from_bundle(bundle, "bias", external_data=mode)
        folder = engine.external_data_dir
        assert (folder is not None) == (mode == "tempdir")
        if folder is not None:
            assert sorted(p.name for p in Path(folder).iterdir()) == ["bias.onnx", "bias.onnx.data"]
            assert Path(folder).stat().st_mode & 0o077 == 0  # private
        np.testing.assert_array_equal(engine.infer({"x": x})["z"], x + w)
        engine.close()
        if folder is not None:
            assert not Path(folder).exists()  # cleaned up on close


def test_external_data_graph_runs_through_open_engines(external_data_plan):
    plan, w = external_data_plan
    with Bundle.open(plan) as bundle:
        engines = open_engines(bundle)
        try:
            assert list(engines) == ["bias"]  # the .data file component is not an engine
            x = np.ones((1, 256, 256), np.float32)
            np.testing.assert_array_equal(engines["bias"].infer({"x": x})["z"], x + w)
            # a graph with external data is not held twice: its rows run as one call
            assert engines["bias"].parallel_runs == 1
            x = np.ones((8, 256, 256), np.float32)
            np.testing.assert_array_equal(engines["bias"].infer_rows({"x": x})["z"], x + w)
        finally:
            close_engines(engines)


# -- providers and backend selection ---------------------------------------------------------------------------

def test_provider_auto_selection_is_cpu_only_here():
    if set(ort.get_available_providers()) & {"CUDAExecutionProvider", "TensorrtExecutionProvider"}:
        pytest.skip("this machine has GPU execution providers")
    assert select_providers("auto") == ["CPUExecutionProvider"]
    assert select_providers("cpu") == ["CPUExecutionProvider"]
    assert select_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(BackendError, match="CUDAExecutionProvider.*not available"):
        select_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_open_engines_picks_onnxruntime_for_an_onnx_bundle(bundle):
    engines = open_engines(bundle, "auto", threads=THREADS)
    try:
        assert list(engines) == list(GRAPHS)
        assert all(isinstance(e, OrtEngine) for e in engines.values())
        text = engines["text_encoder"].infer(feeds_for(bundle.manifest.component("text_encoder"), n=1))
        assert text["hidden"].shape == (1, 16, 128)
    finally:
        close_engines(engines)
    assert all(e.session is None for e in engines.values())
    close_engines(open_engines(bundle, "onnxruntime"))


def test_forcing_tensorrt_on_an_onnx_bundle_is_refused(bundle):
    with pytest.raises(BackendError, match="ONNX graphs only.*--backend tensorrt") as info:
        open_engines(bundle, "tensorrt")
    assert info.value.exit_code == ExitCode.BACKEND and "\n" not in str(info.value)
    with pytest.raises(BadInputError, match="unknown backend"):
        open_engines(bundle, "cuda")


def _trt_manifest_bundle(tmp_path: Path) -> Path:
    """A bundle whose single graph component claims to be a TensorRT engine (bytes are not a real engine)."""
    from export.bundle import write_bundle

    engine = ComponentSpec(name="unet", kind="denoise", backend="tensorrt", tensorrt_version="10.9.0",
                           compute_capability="9.0")
    return write_bundle(tmp_path / "trt.plan", Manifest(family="test", components=[engine]),
                        {"unet": b"not a real engine"})


def test_forcing_onnxruntime_on_a_tensorrt_bundle_is_refused(tmp_path):
    with Bundle.open(_trt_manifest_bundle(tmp_path)) as bundle:
        with pytest.raises(BackendError, match="TensorRT engine.*ONNX Runtime cannot run"):
            open_engines(bundle, "onnxruntime")
        with pytest.raises(BackendError, match="tensorrt component, not an ONNX graph"):
            OrtEngine.from_bundle(bundle, "unet")


def test_available_backends_report():
    report = available_backends()
    assert set(report) == {"onnxruntime", "tensorrt"}
    assert report["onnxruntime"][0] and ort.__version__ in report["onnxruntime"][1]
    assert isinstance(report["tensorrt"][1], str) and report["tensorrt"][1]


# -- TensorRT ------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(_TRT_OK, reason="TensorRT is available here; this checks the error without it")
def test_trt_engine_without_tensorrt_raises_backend_error(tmp_path):
    with Bundle.open(_trt_manifest_bundle(tmp_path)) as bundle:
        for call in (lambda: TrtEngine.from_bundle(bundle, "unet"), lambda: open_engines(bundle)):
            with pytest.raises(BackendError) as info:  # not ImportError
                call()
            assert info.value.exit_code == ExitCode.BACKEND and "\n" not in str(info.value)
            assert "--backend onnx" in str(info.value) or "nvidia-smi" in str(info.value)  # onnx(runtime)


@requires_tensorrt
def test_tensorrt_engines_match_onnxruntime(tmp_path, bundle):
    """Build the tinyworld bundle as TensorRT engines on this GPU and compare with ONNX Runtime (fp32)."""
    out = tmp_path / "tinyworld-trt.plan"
    proc = subprocess.run([sys.executable, "-m", "export", "build", "--model", str(TINYWORLD), "--profile",
                           "tinyworld", "--backend", "tensorrt", "--precision", "fp32", "--out", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Bundle.open(out) as trt_bundle:
        engines = open_engines(trt_bundle, "tensorrt", cuda_graph=True)
        try:
            for name, engine in engines.items():
                if not isinstance(engine, TrtEngine):
                    continue
                reference = OrtEngine.from_bundle(bundle, name)
                feeds = feeds_for(engine.component, n=1)
                for _ in range(3):  # plain run, CUDA graph capture, graph replay
                    ours = engine.infer(feeds)
                theirs = reference.infer(feeds)
                for key in theirs:
                    np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-2, atol=1e-2)
        finally:
            close_engines(engines)
