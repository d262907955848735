"""TensorRT engine building (export/tensorrt.py), ONNX sanitizing (export/sanitize.py), build profiles.

Tests in ``TestTensorRTBuild`` need the ``tensorrt`` package (>= 10) and an NVIDIA GPU; elsewhere they are
skipped with the reason ``tensorrt_available()`` / ``gpu_available()`` give. Everything else runs on any
machine. Graphs are built with ``onnx.helper`` (tiny, deterministic, no torch).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export import tensorrt as trt_build
from export.sanitize import SanitizeError, sanitize_onnx
from export.tensorrt import (EngineBuildError, EngineInfo, TensorRTUnavailable, build_engine, gpu_available,
                             load_build_profile, normalize_profile, parse_batch, profile_from_flags,
                             tensorrt_available)

OPSET = 17
_TRT_OK, _TRT_REASON = tensorrt_available()
_GPU_OK, _GPU_REASON = gpu_available()
_SKIP_REASON = "; ".join(r for ok, r in ((_TRT_OK, _TRT_REASON), (_GPU_OK, _GPU_REASON)) if not ok)
requires_tensorrt_gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (_TRT_OK and _GPU_OK), reason=f"needs TensorRT >= 10 and an NVIDIA GPU: {_SKIP_REASON}"),
]

DENOISE_SPEC = [
    {"name": "sample", "shape": ["N", 4, "h", "w"], "dtype": "float32"},
    {"name": "timestep", "shape": [1], "dtype": "float32"},
    {"name": "encoder_hidden_states", "shape": ["N", 77, 768], "dtype": "float16"},
    {"name": "down_res", "shape": ["N", 320, "h/2", "w/2"], "dtype": "float16"},
]


# ---- tiny graphs ------------------------------------------------------------------------------------

def _denoise_like_graph(path: Path, *, fp16: bool = False, channels: int = 8, seed: int = 0) -> Path:
    """``sample (N,4,h,w)``, ``timestep (1,)`` -> ``noise_pred (N,4,h,w)``: conv, +t, softmax (FP32), conv.

    ``fp16=True``: FP16 I/O and weights, softmax kept in FP32 between Casts (what export/fp16.py produces)."""
    rng = np.random.default_rng(seed)
    wdt, tp = (np.float16, TensorProto.FLOAT16) if fp16 else (np.float32, TensorProto.FLOAT)
    inits = [
        numpy_helper.from_array((rng.standard_normal((channels, 4, 3, 3)) * 0.2).astype(wdt), "w1"),
        numpy_helper.from_array((rng.standard_normal(channels) * 0.1).astype(wdt), "b1"),
        numpy_helper.from_array((rng.standard_normal((4, channels, 1, 1)) * 0.2).astype(wdt), "w2"),
        numpy_helper.from_array((rng.standard_normal(4) * 0.1).astype(wdt), "b2"),
    ]
    nodes = [helper.make_node("Conv", ["sample", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1])]
    if fp16:
        nodes += [helper.make_node("Cast", ["timestep"], ["t16"], to=TensorProto.FLOAT16),
                  helper.make_node("Add", ["c1", "t16"], ["a1"]),
                  helper.make_node("Cast", ["a1"], ["a32"], to=TensorProto.FLOAT),
                  helper.make_node("Softmax", ["a32"], ["s32"], axis=1),
                  helper.make_node("Cast", ["s32"], ["s1"], to=TensorProto.FLOAT16)]
    else:
        nodes += [helper.make_node("Add", ["c1", "timestep"], ["a1"]),
                  helper.make_node("Softmax", ["a1"], ["s1"], axis=1)]
    nodes.append(helper.make_node("Conv", ["s1", "w2", "b2"], ["noise_pred"]))
    graph = helper.make_graph(
        nodes, "denoise_like",
        [helper.make_tensor_value_info("sample", tp, ["N", 4, "h", "w"]),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("noise_pred", tp, ["N", 4, "h", "w"])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _foldable_graph(path: Path, *, big: bool = False) -> Path:
    """``x (B, 16)`` -> ``y``: constant subgraphs (Add/Mul/Transpose of constants, Shape of a static dim)
    that fold away; ``big=True`` gives a 16 KiB weight (so it goes to external data)."""
    rng = np.random.default_rng(1)
    n = 64 if big else 16
    w = numpy_helper.from_array(rng.standard_normal((n, 16)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Constant", [], ["c1"], value=numpy_helper.from_array(np.full(16, 0.5, np.float32))),
        helper.make_node("Constant", [], ["c2"], value=numpy_helper.from_array(np.arange(16, dtype=np.float32))),
        helper.make_node("Add", ["c1", "c2"], ["c3"]),
        helper.make_node("Mul", ["c3", "c3"], ["scale"]),
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),        # constant -> folds
        helper.make_node("Mul", ["x", "scale"], ["xs"]),
        helper.make_node("MatMul", ["xs", "wt"], ["m"]),
        helper.make_node("Shape", ["m"], ["shp"]),                          # static dim 1 -> folds
        helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1, np.int64))),
        helper.make_node("Gather", ["shp", "one"], ["dim1"], axis=0),
        helper.make_node("Cast", ["dim1"], ["shpf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["m", "shpf"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "foldable", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _ort(path: Path, feed: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feed)


# ---- sanitize (runs everywhere) ---------------------------------------------------------------------

def test_sanitize_folds_constants_and_keeps_outputs(tmp_path):
    src = _foldable_graph(tmp_path / "g.onnx")
    report = sanitize_onnx(src, tmp_path / "g_clean.onnx")
    assert report.folded
    assert report.nodes_after <= report.nodes_before
    assert report.nodes_after < report.nodes_before, "the constant subgraphs should fold away"
    assert report.external_data is None
    clean = onnx.load(str(tmp_path / "g_clean.onnx"))
    assert {n.op_type for n in clean.graph.node} <= {"Mul", "MatMul", "Div"}
    # declared I/O (names, symbolic dim names) exactly as exported
    assert clean.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "B"
    assert clean.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "B"
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(_ort(tmp_path / "g_clean.onnx", {"x": x})[0], _ort(src, {"x": x})[0],
                               rtol=1e-6, atol=1e-6)


def test_sanitize_denoise_like_graph_parity(tmp_path):
    for fp16 in (False, True):
        src = _denoise_like_graph(tmp_path / f"d{int(fp16)}.onnx", fp16=fp16)
        report = sanitize_onnx(src, tmp_path / f"d{int(fp16)}_clean.onnx")
        assert report.nodes_after <= report.nodes_before
        dt = np.float16 if fp16 else np.float32
        feed = {"sample": np.random.default_rng(2).standard_normal((2, 4, 8, 8)).astype(dt),
                "timestep": np.array([0.3], np.float32)}
        np.testing.assert_array_equal(_ort(tmp_path / f"d{int(fp16)}_clean.onnx", feed)[0], _ort(src, feed)[0])


def test_sanitize_external_data_single_file_and_in_place(tmp_path):
    src = _foldable_graph(tmp_path / "g.onnx", big=True)
    out = tmp_path / "out" / "g.onnx"
    report = sanitize_onnx(src, out, external_data=True)
    assert report.external_data == "g.onnx.data"
    assert sorted(p.name for p in out.parent.iterdir()) == ["g.onnx", "g.onnx.data"]  # no temp files left
    x = np.ones((2, 16), np.float32)
    expected = _ort(src, {"x": x})[0]
    np.testing.assert_allclose(_ort(out, {"x": x})[0], expected, rtol=1e-6)
    # again, in place: a graph that came with external data keeps one external file
    report = sanitize_onnx(out, out)
    assert report.external_data == "g.onnx.data"
    assert sorted(p.name for p in out.parent.iterdir()) == ["g.onnx", "g.onnx.data"]
    np.testing.assert_allclose(_ort(out, {"x": x})[0], expected, rtol=1e-6)


def test_sanitize_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(SanitizeError, match="not found"):
        sanitize_onnx(tmp_path / "nope.onnx", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


# ---- profiles from symbolic shapes (runs everywhere) --------------------------------------------------

def test_profile_from_flags_denoise_spec():
    prof = profile_from_flags(DENOISE_SPEC, batch="1:1:4", height=512, width=512, latent_factor=8)
    assert "timestep" not in prof  # fully static: no profile entry needed
    # N = the UNet batch: B_min (no guidance) .. 2 * B_max (classifier-free guidance), opt 2 * B_opt
    assert prof["sample"] == ((1, 4, 64, 64), (2, 4, 64, 64), (8, 4, 64, 64))
    assert prof["encoder_hidden_states"] == ((1, 77, 768), (2, 77, 768), (8, 77, 768))
    assert prof["down_res"] == ((1, 320, 32, 32), (2, 320, 32, 32), (8, 320, 32, 32))


def test_profile_from_flags_batch_symbols_and_overrides():
    spec = [{"name": "input_ids", "shape": ["B", 16]}, {"name": "latent", "shape": ["B", 4, "h", "w"]},
            {"name": "x2", "shape": ["2B", "H", "W"]}, {"name": "seq", "shape": ["B", "S"]}]
    prof = profile_from_flags(spec, batch=(1, 2, 4), height=64, width=32, latent_factor=4, symbols={"S": "8:16:32"})
    assert prof["input_ids"] == ((1, 16), (2, 16), (4, 16))
    assert prof["latent"] == ((1, 4, 16, 8), (2, 4, 16, 8), (4, 4, 16, 8))
    assert prof["x2"] == ((2, 64, 32), (4, 64, 32), (8, 64, 32))
    assert prof["seq"] == ((1, 8), (2, 16), (4, 32))
    no_cfg = profile_from_flags([{"name": "sample", "shape": ["N", 4, "h", "w"]}], batch=2, height=768,
                                width=512, cfg=False)
    assert no_cfg["sample"] == ((2, 4, 96, 64),) * 3
    ranged = profile_from_flags([{"name": "sample", "shape": ["N", 4, "h", "w"]}], batch=1,
                                height=(512, 768, 1024), width=512)
    assert ranged["sample"] == ((1, 4, 64, 64), (2, 4, 96, 64), (2, 4, 128, 64))


def test_profile_from_flags_errors_name_the_input():
    with pytest.raises(ValueError, match=r"'ids'.*unknown dimension symbol 's0'"):
        profile_from_flags([{"name": "ids", "shape": ["s0", 77]}])
    with pytest.raises(ValueError, match="not a multiple of the VAE factor 8"):
        profile_from_flags(DENOISE_SPEC, height=500)
    with pytest.raises(ValueError, match="fractional"):
        profile_from_flags(DENOISE_SPEC, height=520, width=512)  # latent 65, h/2 = 32.5
    with pytest.raises(ValueError, match="batch"):
        profile_from_flags(DENOISE_SPEC, batch="4:2:1")


def test_parse_batch_and_normalize_profile():
    assert parse_batch("1:1:4") == (1, 1, 4)
    assert parse_batch("2") == (2, 2, 2)
    assert parse_batch(3) == (3, 3, 3)
    for bad in ("0:1:2", "1:2", "a:b:c", "2:1:4"):
        with pytest.raises(ValueError):
            parse_batch(bad)
    assert normalize_profile({"x": ([1, 2], [2, 2], [4, 2])}) == {"x": ((1, 2), (2, 2), (4, 2))}
    with pytest.raises(ValueError, match="'x'.*dimension 0"):
        normalize_profile({"x": ([2, 2], [1, 2], [4, 2])})
    with pytest.raises(ValueError, match="ranks differ"):
        normalize_profile({"x": ([1], [1, 2], [1, 2])})


# ---- build profiles JSON (runs everywhere) ------------------------------------------------------------

def test_build_profiles_load_and_are_consistent():
    names = sorted(p.stem for p in trt_build.PROFILES_DIR.glob("*.json"))
    assert names == ["sd1", "sd2", "sdxl", "tinyworld"]
    profiles = {n: load_build_profile(n) for n in names}
    for name, p in profiles.items():
        assert p["family"] == name
        assert parse_batch(p["batch"]) == (1, 1, 4)
        assert set(p["precision"]) == {"text_encoder", "denoise", "redirect", "vae_decoder"}
        assert "image" not in p  # the image size is the model's own (export/build.py)
    assert profiles["sd2"]["prediction_type"] == "v_prediction"
    for name in ("sd1", "sd2", "sdxl"):
        assert profiles[name]["latent_factor"] == 8 and profiles[name]["tokenizer_max_length"] == 77
        assert profiles[name]["precision"]["text_encoder"] == profiles[name]["precision"]["denoise"] == "fp16"
    assert profiles["sd1"]["precision"]["vae_decoder"] == profiles["sd2"]["precision"]["vae_decoder"] == "fp16"
    assert profiles["sdxl"]["precision"]["vae_decoder"] == "fp32"  # SDXL's VAE overflows in FP16
    tiny = profiles["tinyworld"]
    assert tiny["match"] == {"vae_scale_factor": 4, "sample_size": 16, "text_max_length": 16}
    assert tiny["latent_factor"] == 4 and tiny["tokenizer_max_length"] == 16
    assert set(tiny["precision"].values()) == {"fp32"}
    assert tiny["defaults"] == {"steps": 20, "guidance_scale": 5.0, "scheduler": "ddim"}
    # a profile gives profile_from_flags everything it needs
    prof = profile_from_flags(DENOISE_SPEC[:2], batch=tiny["batch"], height=64, width=64,
                              latent_factor=tiny["latent_factor"])
    assert prof["sample"][2] == (8, 4, 16, 16)


def test_load_build_profile_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="known: sd1, sd2, sdxl, tinyworld"):
        load_build_profile("sd3")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**load_build_profile("sd1"), "precision": {"denoise": "int8"}}))
    with pytest.raises(ValueError, match="int8"):
        load_build_profile(bad)
    bad.write_text(json.dumps({**load_build_profile("sd1"), "image": {"height": 512, "width": 512}}))
    with pytest.raises(ValueError, match="the image size is the model's own"):
        load_build_profile(bad)
    bad.write_text(json.dumps({**load_build_profile("sd1"), "match": {"colour": "red"}}))
    with pytest.raises(ValueError, match="match key.*colour"):
        load_build_profile(bad)


# ---- availability and clear errors without TensorRT (runs everywhere) ---------------------------------

def test_availability_reports_a_reason():
    for ok, reason in (tensorrt_available(), gpu_available()):
        assert isinstance(ok, bool) and isinstance(reason, str) and reason


def test_gpu_available_without_cuda_python_or_nvidia_smi(monkeypatch):
    monkeypatch.setattr(trt_build, "_import_cudart", lambda: None)
    monkeypatch.setattr(trt_build.shutil, "which", lambda _name: None)
    ok, reason = gpu_available()
    assert not ok and "cuda-python is not installed" in reason and "nvidia-smi" in reason


def test_build_engine_without_tensorrt_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as if not installed, on any machine
    ok, reason = tensorrt_available()
    assert not ok and "not installed" in reason
    onnx_path = _denoise_like_graph(tmp_path / "d.onnx")
    engine = tmp_path / "d.engine"
    prof = profile_from_flags(DENOISE_SPEC[:2], height=64, width=64)
    with pytest.raises(TensorRTUnavailable, match=r"tensorrt.*not installed.*--backend onnx") as exc:
        build_engine(onnx_path, engine, profile=prof)
    assert not isinstance(exc.value, ImportError)
    assert not engine.exists()
    with pytest.raises(FileNotFoundError, match="ONNX graph not found"):
        build_engine(tmp_path / "missing.onnx", engine, profile=prof)
    with pytest.raises(ValueError, match="refit"):
        build_engine(onnx_path, engine, profile=prof, refit="sometimes")


def test_engine_info_fits_the_bundle_manifest():
    from runtime.manifest import ComponentSpec

    info = EngineInfo(tensorrt_version="10.9.0", compute_capability="8.9", device_name="NVIDIA L4",
                      strongly_typed=True, refit=False, refit_mode=None,
                      profile={"sample": {"min": [1, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [8, 4, 8, 8]}},
                      build_seconds=1.5, inputs=[{"name": "sample", "shape": [-1, 4, 8, 8], "dtype": "float32"}],
                      outputs=[{"name": "noise_pred", "shape": [-1, 4, 8, 8], "dtype": "float32"}])
    json.dumps(info.to_dict())
    spec = ComponentSpec(name="denoise", kind="denoise", **info.manifest_fields())
    assert ComponentSpec.from_dict(spec.to_dict()).profiles == info.profile


# ---- TensorRT builds (need tensorrt + GPU; skipped here with the reason) ------------------------------

@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    d = tmp_path_factory.mktemp("trt_graphs")
    return {"fp32": _denoise_like_graph(d / "fp32.onnx"), "fp16": _denoise_like_graph(d / "fp16.onnx", fp16=True)}


def _run_engine(engine_path: Path, feed: dict) -> dict:
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    with TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path)))) as runner:
        return {k: np.array(v) for k, v in runner.infer(feed).items()}


def _feed(n: int, dtype, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((n, 4, 8, 8)).astype(dtype), "timestep": np.array([0.25], np.float32)}


class TestTensorRTBuild:
    pytestmark = requires_tensorrt_gpu

    PROFILE_ARGS = dict(batch="1:1:4", height=64, width=64, latent_factor=8)  # latent 8x8, N 1..8

    def _profile(self):
        return profile_from_flags(DENOISE_SPEC[:2], **self.PROFILE_ARGS)

    @pytest.mark.parametrize("precision", ["fp32", "fp16"])
    def test_build_strongly_typed_engine_matches_onnxruntime(self, graphs, tmp_path, precision):
        import tensorrt as trt

        engine_path = tmp_path / f"{precision}.engine"
        messages = []
        info = build_engine(graphs[precision], engine_path, profile=self._profile(), progress=messages.append)
        assert engine_path.is_file() and engine_path.stat().st_size == info.engine_bytes > 0
        assert info.tensorrt_version == trt.__version__
        assert re.fullmatch(r"\d+\.\d+", info.compute_capability)
        assert (info.device_name, info.compute_capability) == trt_build.device_properties(0)
        assert info.strongly_typed and not info.refit and info.refit_mode is None
        assert info.profile["sample"] == {"min": [1, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [8, 4, 8, 8]}
        dtype = "float16" if precision == "fp16" else "float32"
        assert info.inputs == [{"name": "sample", "shape": [-1, 4, 8, 8], "dtype": dtype},
                               {"name": "timestep", "shape": [1], "dtype": "float32"}]
        assert info.outputs == [{"name": "noise_pred", "shape": [-1, 4, 8, 8], "dtype": dtype}]
        assert any("building" in m for m in messages)
        json.dumps(info.to_dict())
        tol = 2e-2 if precision == "fp16" else 5e-3  # FP16; FP32 convs may use TF32
        for n in (1, 2, 8):  # min, opt, max of the profile
            feed = _feed(n, np.float16 if precision == "fp16" else np.float32, seed=n)
            got = _run_engine(engine_path, feed)["noise_pred"]
            assert got.dtype == np.dtype(dtype)
            np.testing.assert_allclose(got.astype(np.float32), _ort(graphs[precision], feed)[0].astype(np.float32),
                                       rtol=tol, atol=tol)

    @pytest.mark.parametrize("refit", [True, "identical"])
    def test_refit_flag(self, graphs, tmp_path, refit):
        import tensorrt as trt

        engine_path = tmp_path / "refit.engine"
        info = build_engine(graphs["fp32"], engine_path, profile=self._profile(), refit=refit)
        assert info.refit is True
        assert info.refit_mode == ("refit" if refit is True else "refit_identical")
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_path.read_bytes())
        assert engine.refittable
        # TensorRT 11.3 notes that REFIT can drop a GEMM bias: the refittable engine must still match ORT
        feed = _feed(2, np.float32)
        np.testing.assert_allclose(_run_engine(engine_path, feed)["noise_pred"], _ort(graphs["fp32"], feed)[0],
                                   rtol=5e-3, atol=5e-3)

    def test_timing_cache_written_and_reused(self, graphs, tmp_path):
        cache = tmp_path / "cache" / "timing.cache"
        info = build_engine(graphs["fp32"], tmp_path / "a.engine", profile=self._profile(), timing_cache=cache)
        assert info.timing_cache == str(cache)
        assert cache.is_file() and cache.stat().st_size > 0
        messages = []
        build_engine(graphs["fp32"], tmp_path / "b.engine", profile=self._profile(), timing_cache=cache,
                     progress=messages.append)
        assert any("reusing" in m for m in messages), messages
        assert cache.stat().st_size > 0
        assert not list(cache.parent.glob(".*.tmp"))  # atomic writes leave no temporaries

    def test_parse_error_is_one_readable_line(self, tmp_path):
        node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="grt.test")
        graph = helper.make_graph([node], "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid("grt.test", 1)])
        path = tmp_path / "bad.onnx"
        onnx.save(model, str(path))
        with pytest.raises(EngineBuildError, match="could not parse") as exc:
            build_engine(path, tmp_path / "bad.engine", profile={})
        assert "\n" not in str(exc.value)
        assert not (tmp_path / "bad.engine").exists()

    def test_profile_must_cover_dynamic_inputs(self, graphs, tmp_path):
        with pytest.raises(EngineBuildError, match="'sample' has dynamic shape"):
            build_engine(graphs["fp32"], tmp_path / "x.engine", profile={})
        bad = {"sample": ((1, 3, 8, 8), (1, 3, 8, 8), (1, 3, 8, 8))}
        with pytest.raises(EngineBuildError, match="fixed at 4"):
            build_engine(graphs["fp32"], tmp_path / "x.engine", profile=bad)
        with pytest.raises(EngineBuildError, match="does not have"):
            build_engine(graphs["fp32"], tmp_path / "x.engine", profile={**self._profile(), "nope": ((1,), (1,), (1,))})
