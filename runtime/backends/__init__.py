"""Inference backends: a thin engine abstraction over ONNX Runtime and TensorRT.

Every engine (:class:`~runtime.backends.onnxruntime.OrtEngine`, :class:`~runtime.backends.tensorrt.TrtEngine`)
has ``name``, ``component`` (its manifest ComponentSpec), ``providers``, ``infer(feeds) -> outputs``
(``dict[str, np.ndarray]`` both ways; feeds validated against the manifest, outputs checked for NaN/Inf),
``infer_rows(feeds)`` (the same for a batch of independent rows, which ONNX Runtime on a CPU runs as row slices side
by side; ``parallel_runs`` says how many) and ``close()``.

>>> with Bundle.open("tinyworld.plan") as bundle:
...     engines = open_engines(bundle)                   # {"text_encoder": ..., "denoise": ..., "vae_decoder": ...}
...     try:
...         image = engines["vae_decoder"].infer({"latent": latent})["image"]
...     finally:
...         close_engines(engines)

Backend choice (``backend=``), by the graph components' ``backend`` field in the manifest:

- ``"auto"``: ONNX graphs run on ONNX Runtime (GPU execution providers when installed, else CPU), TensorRT
  engines on TensorRT; a bundle may mix both.
- ``"onnxruntime"``: every graph must be ONNX; a TensorRT engine is refused (BackendError: rebuild the
  bundle with --backend onnx, or use --backend tensorrt).
- ``"tensorrt"``: the bundle must hold TensorRT engines (an all-ONNX bundle is refused: rebuild it with
  --backend tensorrt); ONNX graphs of a mixed bundle still run on ONNX Runtime.

TensorRT engines of one bundle share one activation buffer and one CUDA stream (they run in turn).
Nothing here imports torch, diffusers, transformers or the ``train`` / ``export`` packages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from runtime.backends.onnxruntime import (NonFiniteOutputError, OrtEngine, check_finite, onnxruntime_available,
                                          select_providers, validate_feeds)
from runtime.backends.tensorrt import TrtEngine, open_tensorrt_engines, tensorrt_available
from runtime.errors import BackendError, BadInputError

__all__ = ["BACKENDS", "NonFiniteOutputError", "OrtEngine", "TrtEngine", "available_backends", "check_finite",
           "close_engines", "graph_components", "open_engines", "select_providers", "validate_feeds"]

BACKENDS = ("auto", "onnxruntime", "tensorrt")


def available_backends() -> dict[str, tuple[bool, str]]:
    """``{"onnxruntime": (ok, detail), "tensorrt": (ok, detail)}``: what can run here and why not."""
    return {"onnxruntime": onnxruntime_available(), "tensorrt": tensorrt_available()}


def graph_components(bundle) -> list:
    """The components that are graphs to run (ONNX or TensorRT), not tokenizer / external-data files."""
    return [c for c in bundle.manifest.components if c.backend in ("onnx", "tensorrt")]


def open_engines(bundle, backend: str = "auto", *, providers: str | Sequence[Any] = "auto",
                 threads: int | None = None, cuda_graph: bool = False,
                 names: Sequence[str] | None = None) -> dict[str, Any]:
    """Open an engine for every graph component of ``bundle`` (or just ``names``): ``{name: engine}``.

    ``providers`` / ``threads`` go to ONNX Runtime, ``cuda_graph`` to TensorRT (static-shape engines).
    On any failure the engines opened so far are closed and the one-line error is raised.
    """
    if backend not in BACKENDS:
        raise BadInputError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    components = graph_components(bundle)
    if names is not None:
        components = [bundle.manifest.component(n) for n in names]
    if not components:
        raise BackendError(f"{bundle.path} holds no ONNX graph or TensorRT engine to run: rebuild it with "
                           "`python -m export build`")
    trt_names = [c.name for c in components if c.backend == "tensorrt"]
    onnx_names = [c.name for c in components if c.backend == "onnx"]
    if other := [c.name for c in components if c.backend not in ("onnx", "tensorrt")]:
        raise BackendError(f"component {other[0]!r} is a file, not a graph: it cannot be run as an engine")
    if backend == "onnxruntime" and trt_names:
        raise BackendError(f"{bundle.path} holds TensorRT engine(s) ({', '.join(trt_names)}), which ONNX Runtime "
                           "cannot run: use --backend tensorrt on a machine with that GPU, or rebuild the bundle "
                           "with --backend onnx")
    if backend == "tensorrt" and not trt_names:
        raise BackendError(f"{bundle.path} holds ONNX graphs only, no TensorRT engines: rebuild it on the target "
                           "GPU with `python -m export build --backend tensorrt`, or use --backend onnxruntime")

    engines: dict[str, Any] = {}
    try:
        if trt_names:
            engines.update(open_tensorrt_engines(bundle, trt_names, cuda_graph=cuda_graph))
        for name in onnx_names:
            engines[name] = OrtEngine.from_bundle(bundle, name, providers=providers, threads=threads)
    except BaseException:
        close_engines(engines)
        raise
    return {c.name: engines[c.name] for c in components}  # manifest order


def close_engines(engines: Mapping[str, Any]) -> None:
    """Close every engine (idempotent); GPU memory and temporary folders are released."""
    for engine in engines.values():
        engine.close()
