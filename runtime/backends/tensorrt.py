"""TensorRT backend: one :class:`TrtEngine` per serialized engine component, in the spirit of TensorRT's demo
``engine.py``. Written against the TensorRT 10.x / 11.x Python API and cuda-python's runtime bindings
(``cuda.bindings.runtime``, or the older ``cuda.cudart``); both are imported lazily, so this module imports
everywhere and reports a missing TensorRT / GPU as a one-line :class:`~runtime.errors.BackendError`.

>>> with Bundle.open("sdxl-trt.plan") as bundle:
...     engines = open_tensorrt_engines(bundle, ["text_encoder", "unet", "vae_decoder"])
...     noise = engines["unet"].infer({"sample": x, "timestep": t, "encoder_hidden_states": h})["noise_pred"]

How an engine runs
------------------
* ``check_engine_compat(component, trt.__version__, compute_capability)`` before deserializing: an engine
  only loads on the TensorRT release and GPU it was built for (exit code 5 with the rebuild command).
* ``trt.Runtime(logger).deserialize_cuda_engine(payload)`` straight from the memory-mapped bundle.
* Engines are built with ONE optimisation profile (``export/tensorrt.py``). Device buffers for every I/O
  tensor are allocated ONCE, at the profile's max shapes (output sizes found by setting every input to its
  max shape and asking the context), and bound with ``context.set_tensor_address``. Each call sets the
  actual input shapes with ``context.set_input_shape``, copies the inputs in, runs
  ``context.execute_async_v3(stream)``, and copies the outputs (at the shapes the context reports) out.
* Activations ("device memory", TensorRT's scratch space): the context is created with
  ``ExecutionContextAllocationStrategy.USER_MANAGED`` and given memory with ``context.set_device_memory``
  (``context.device_memory = ptr`` before 10.1). :func:`open_tensorrt_engines` gives all engines of a
  bundle ONE buffer of the largest engine's ``device_memory_size_v2`` and ONE stream: the pipeline runs
  the engines one after another, so they can share scratch space (as TensorRT's diffusion demo does).
  Engines that share a buffer must never run concurrently (they use the same stream, and
  :class:`SharedDeviceMemory` holds a lock around every ``infer``).
* CUDA graphs (``cuda_graph=True``, static-shape engines only, i.e. min == max for every input): the second
  call captures ``execute_async_v3`` into a CUDA graph (stream capture; the first call runs normally, which
  TensorRT needs before capture) and later calls launch the graph. A graph bakes in the buffer and
  activation addresses, which never change here.
* Outputs are checked for NaN/Inf like the ONNX Runtime backend (:class:`NonFiniteOutputError`).

Thread safety: an execution context is NOT thread-safe; ``infer`` holds a lock (the shared-memory lock
when activations are shared), so concurrent calls are serialized, not parallel.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from runtime.backends.onnxruntime import NonFiniteOutputError, check_finite, validate_feeds
from runtime.bundle import check_engine_compat
from runtime.errors import BackendError, BadInputError
from runtime.manifest import ComponentSpec

__all__ = ["TrtEngine", "SharedDeviceMemory", "open_tensorrt_engines", "tensorrt_available",
           "NonFiniteOutputError"]

MIN_TENSORRT_MAJOR = 10
INSTALL_HINT = ("pip install '.[gpu]' on a machine with an NVIDIA GPU and driver, or use --backend onnxruntime "
                "with a bundle built with --backend onnx")


# -- availability -----------------------------------------------------------------------------------------------

def _import_tensorrt():
    """The ``tensorrt`` module (>= 10), or a BackendError saying why not."""
    if importlib.util.find_spec("tensorrt") is None:
        raise BackendError(f"TensorRT is not installed: {INSTALL_HINT}")
    try:
        import tensorrt as trt
    except Exception as e:  # libnvinfer / CUDA libraries missing, ABI mismatch, ...
        raise BackendError(f"`import tensorrt` failed ({type(e).__name__}: {' '.join(str(e).split())}): "
                           f"check the CUDA/TensorRT libraries, or {INSTALL_HINT}") from None
    version = getattr(trt, "__version__", "0")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_TENSORRT_MAJOR:
        raise BackendError(f"TensorRT {version} is too old: this runtime needs TensorRT >= {MIN_TENSORRT_MAJOR}; "
                           "upgrade it (pip install -U tensorrt) or use --backend onnxruntime")
    return trt


def _import_cudart():
    """cuda-python's runtime bindings: ``cuda.bindings.runtime`` (cuda-python >= 12.6), else ``cuda.cudart``."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except Exception:
            continue
    raise BackendError("cuda-python is not installed (needed to drive TensorRT without torch): pip install "
                       f"cuda-python, or {INSTALL_HINT}")


def _check(result, what: str):
    """Unpack a cuda-python ``(err, *values)`` tuple; BackendError unless ``err`` is cudaSuccess."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA {what} failed: {getattr(err, 'name', err)}; check the GPU and driver "
                           "(nvidia-smi) and free GPU memory")
    return values[0] if len(values) == 1 else tuple(values) if values else None


def compute_capability(device: int = 0) -> str:
    """``"major.minor"`` of CUDA device ``device``; BackendError without a GPU."""
    cudart = _import_cudart()
    count = _check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if count <= device:
        raise BackendError(f"no CUDA GPU {device} (found {count}): check the driver (nvidia-smi), or "
                           "use --backend onnxruntime")
    prop = _check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    return f"{prop.major}.{prop.minor}"


def tensorrt_available() -> tuple[bool, str]:
    """``(True, "TensorRT 10.x on a GPU of compute capability 9.0")`` or ``(False, why)``; never raises."""
    try:
        trt = _import_tensorrt()
        return True, f"TensorRT {trt.__version__} on a GPU of compute capability {compute_capability()}"
    except BackendError as e:
        return False, str(e)
    except Exception as e:
        return False, f"TensorRT / CUDA check failed: {type(e).__name__}: {e}"


def _probe(fn) -> Any:
    """``fn()``, or None when it fails (TensorRT or a GPU missing)."""
    try:
        return fn()
    except Exception:
        return None


def require_tensorrt() -> tuple[Any, Any, str]:
    """``(tensorrt, cudart, compute capability)``, or a BackendError with the reason and what to do."""
    trt = _import_tensorrt()
    cudart = _import_cudart()
    return trt, cudart, compute_capability()


# -- device memory ----------------------------------------------------------------------------------------------

class DeviceBuffer:
    """``cudaMalloc``-ed memory, freed by :meth:`free` (idempotent)."""

    def __init__(self, cudart, nbytes: int):
        self.cudart, self.nbytes = cudart, max(int(nbytes), 1)
        self.ptr = int(_check(cudart.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes} bytes)"))

    def free(self) -> None:
        if self.ptr:
            self.cudart.cudaFree(self.ptr)
            self.ptr = 0


class SharedDeviceMemory:
    """One activation buffer and one stream shared by engines that run one after another.

    ``attach(engine)`` grows the buffer to the largest engine's need (re-pointing every attached context);
    ``lock`` serializes their ``infer`` calls.
    """

    def __init__(self, cudart, stream: int | None = None):
        self.cudart = cudart
        self.lock = threading.RLock()
        self.stream = stream if stream is not None else int(_check(cudart.cudaStreamCreate(), "cudaStreamCreate"))
        self._owns_stream = stream is None
        self.buffer: DeviceBuffer | None = None
        self.engines: list[TrtEngine] = []

    def attach(self, engine: TrtEngine) -> None:
        with self.lock:
            need = engine.activation_bytes
            if self.buffer is None or self.buffer.nbytes < need:
                old, self.buffer = self.buffer, DeviceBuffer(self.cudart, need)
                for e in self.engines:
                    e._set_activation_memory(self.buffer.ptr, self.buffer.nbytes)
                if old is not None:
                    _check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
                    old.free()
            self.engines.append(engine)
            engine._set_activation_memory(self.buffer.ptr, self.buffer.nbytes)

    def detach(self, engine: TrtEngine) -> None:
        """Called by a closing engine; the buffer and stream go with the last one."""
        with self.lock:
            if engine in self.engines:
                self.engines.remove(engine)
            if not self.engines:
                self.close()

    def close(self) -> None:
        with self.lock:
            for e in list(self.engines):
                e.close()
            self.engines.clear()
            if self.buffer is not None:
                self.buffer.free()
                self.buffer = None
            if self._owns_stream and self.stream:
                self.cudart.cudaStreamDestroy(self.stream)
                self.stream = 0


# -- the engine -------------------------------------------------------------------------------------------------

def make_logger(trt, echo=None):
    """A ``trt.ILogger`` keeping TensorRT's errors (one line each) for the exception message; with ``echo`` (a
    callable taking one line) warnings and errors are also passed on (the engine build prints them). Nothing
    below warnings is printed."""
    severity_type = trt.ILogger.Severity
    errors = (severity_type.ERROR, severity_type.INTERNAL_ERROR)

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in errors:
                self.errors.append(" ".join(str(msg).split()))
            if echo is not None and (severity in errors or severity == severity_type.WARNING):
                echo(f"[TensorRT] {severity.name}: {msg}")

    return _Logger()


class TrtEngine:
    """One serialized TensorRT engine with persistent I/O buffers, an execution context and a stream."""

    backend = "tensorrt"
    parallel_runs = 1  # one context and stream: calls are serialized

    def __init__(self, component: ComponentSpec, trt, cudart, engine, runtime, logger, *, stream: int,
                 owns_stream: bool, cuda_graph: bool = False):
        self.component, self.name = component, component.name
        self.trt, self.cudart = trt, cudart
        self.engine, self._runtime, self._logger = engine, runtime, logger
        self.stream, self._owns_stream = stream, owns_stream
        self.lock = threading.RLock()
        self._own_activations: DeviceBuffer | None = None
        self.buffers: dict[str, DeviceBuffer] = {}
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.max_shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self._graph = self._graph_exec = None
        self._calls = 0
        self.shared_memory: SharedDeviceMemory | None = None

        for i in range(engine.num_io_tensors):
            tname = engine.get_tensor_name(i)
            (self.inputs if engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT else self.outputs).append(tname)
            self.dtypes[tname] = np.dtype(trt.nptype(engine.get_tensor_dtype(tname)))
        # USER_MANAGED: activations come from set_device_memory (own buffer or a SharedDeviceMemory)
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if strategy is not None:
            self.context = engine.create_execution_context(strategy.USER_MANAGED)
        else:  # very early 10.0 builds
            self.context = engine.create_execution_context_without_device_memory()
        if self.context is None:
            raise BackendError(f"TensorRT could not create an execution context for engine {self.name!r}: "
                               + ("; ".join(logger.errors[-3:]) or "out of GPU memory?"))
        self.static = True
        for tname in self.inputs:  # the profile's max shapes (profile 0: engines are built with exactly one)
            shape = tuple(engine.get_tensor_shape(tname))
            if any(d < 0 for d in shape):
                mn, _opt, mx = engine.get_tensor_profile_shape(tname, 0)
                shape = tuple(mx)
                self.static &= tuple(mn) == tuple(mx)
            self.max_shapes[tname] = shape
            self.context.set_input_shape(tname, shape)
        for tname in self.outputs:
            self.max_shapes[tname] = tuple(self.context.get_tensor_shape(tname))
        for tname in self.inputs + self.outputs:
            nbytes = int(np.prod(self.max_shapes[tname], dtype=np.int64)) * self.dtypes[tname].itemsize
            self.buffers[tname] = DeviceBuffer(cudart, nbytes)
            self.context.set_tensor_address(tname, self.buffers[tname].ptr)
        self.use_cuda_graph = bool(cuda_graph and self.static)

    # -- construction ----------------------------------------------------------------------------------------

    @classmethod
    def from_bundle(cls, bundle, component_name: str, *, shared: SharedDeviceMemory | None = None,
                    cuda_graph: bool = False) -> TrtEngine:
        """Deserialize TensorRT component ``component_name`` of an open bundle, after checking it was built
        for this TensorRT and GPU. ``shared``: activation memory + stream shared with other engines (see
        :func:`open_tensorrt_engines`); without it the engine gets its own. BackendError without
        TensorRT / cuda-python / a GPU, or for an engine built elsewhere."""
        component = bundle.manifest.component(component_name)
        if component.backend != "tensorrt":
            raise BackendError(f"component {component_name!r} is a {component.backend} component, not a TensorRT "
                               "engine: run it with --backend onnxruntime")
        trt, cudart, cc = require_tensorrt()
        check_engine_compat(component, trt.__version__, cc)
        logger = make_logger(trt)
        runtime = trt.Runtime(logger)
        view = bundle.payload(component.name)
        try:
            engine = runtime.deserialize_cuda_engine(view)  # zero copy from the mapped bundle
        except TypeError:  # bindings that want bytes
            engine = runtime.deserialize_cuda_engine(bytes(view))
        finally:
            try:
                view.release()
            except BufferError:
                pass
        if engine is None:
            raise BackendError(f"TensorRT {trt.__version__} could not deserialize engine {component.name!r}: "
                               + ("; ".join(logger.errors[-3:]) or "no error message")
                               + "; rebuild the engines on this machine with `python -m export build --backend "
                               "tensorrt`")
        if shared is not None:
            stream, owns = shared.stream, False
        else:
            stream, owns = int(_check(cudart.cudaStreamCreate(), "cudaStreamCreate")), True
        self = cls(component, trt, cudart, engine, runtime, logger, stream=stream, owns_stream=owns,
                   cuda_graph=cuda_graph)
        if shared is not None:
            self.lock, self.shared_memory = shared.lock, shared
            shared.attach(self)
        else:
            self._own_activations = DeviceBuffer(cudart, self.activation_bytes)
            self._set_activation_memory(self._own_activations.ptr, self._own_activations.nbytes)
        return self

    @property
    def activation_bytes(self) -> int:
        """Scratch memory the context needs (the profile's max over all shapes)."""
        size = getattr(self.engine, "device_memory_size_v2", None)  # TensorRT >= 10.1
        return int(size if size is not None else self.engine.device_memory_size)

    def _set_activation_memory(self, ptr: int, nbytes: int) -> None:
        if hasattr(self.context, "set_device_memory"):  # TensorRT >= 10.1
            self.context.set_device_memory(ptr, nbytes)
        else:
            self.context.device_memory = ptr
        self._drop_graph()  # a captured graph holds the old address

    # -- running ---------------------------------------------------------------------------------------------

    def infer_rows(self, feeds: Mapping[str, np.ndarray], min_rows: int = 4) -> dict[str, np.ndarray]:
        """:meth:`infer` (the ONNX Runtime engine's row slices have nothing to gain on one stream)."""
        return self.infer(feeds)

    def infer(self, feeds: Mapping[str, np.ndarray], check_outputs: bool = True) -> dict[str, np.ndarray]:
        """Run the engine: validated ``feeds`` in, ``{output name: array}`` out (NaN/Inf checked)."""
        if self.engine is None:
            raise BackendError(f"engine {self.name!r} is closed: open the bundle's engines again")
        arrays = validate_feeds(self.component, feeds)
        cudart = self.cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self.lock:
            shapes_changed = False
            for tname in self.inputs:
                value = np.ascontiguousarray(arrays[tname])
                if value.dtype != self.dtypes[tname]:
                    raise BadInputError(f"engine {self.name!r} input {tname!r} has dtype {value.dtype}, the engine "
                                        f"takes {self.dtypes[tname]}")
                self._check_profile(tname, value.shape)
                if tuple(self.context.get_tensor_shape(tname)) != value.shape:
                    shapes_changed = True
                    if not self.context.set_input_shape(tname, value.shape):
                        raise BadInputError(f"engine {self.name!r} rejects input {tname!r} shape {list(value.shape)}")
                _check(cudart.cudaMemcpyAsync(self.buffers[tname].ptr, value.ctypes.data, value.nbytes, h2d,
                                              self.stream), f"copy of input {tname!r} to the GPU")
            if shapes_changed:
                self._drop_graph()
            self._execute()
            outputs = {}
            for tname in self.outputs:
                out = np.empty(tuple(self.context.get_tensor_shape(tname)), dtype=self.dtypes[tname])
                _check(cudart.cudaMemcpyAsync(out.ctypes.data, self.buffers[tname].ptr, out.nbytes, d2h,
                                              self.stream), f"copy of output {tname!r} from the GPU")
                outputs[tname] = out
            _check(cudart.cudaStreamSynchronize(self.stream), f"running engine {self.name!r}")
            self._calls += 1
        if check_outputs:
            check_finite(self.name, outputs)
        return outputs

    __call__ = infer

    def _check_profile(self, tname: str, shape: tuple[int, ...]) -> None:
        mx = self.max_shapes[tname]
        if len(shape) != len(mx) or any(s > m for s, m in zip(shape, mx)):
            raise BadInputError(f"engine {self.name!r} input {tname!r} has shape {list(shape)}, beyond the "
                                f"engine's optimisation profile (max {list(mx)}): rebuild the engine with a "
                                "larger profile, or use smaller images / batches")

    def _execute(self) -> None:
        cudart = self.cudart
        if self._graph_exec is not None:
            _check(cudart.cudaGraphLaunch(self._graph_exec, self.stream), "cudaGraphLaunch")
            return
        if self.use_cuda_graph and self._calls >= 1:  # TensorRT needs one plain run before capture
            mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            _check(cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
            ok = self.context.execute_async_v3(self.stream)
            graph = _check(cudart.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
            if ok:
                self._graph = graph
                self._graph_exec = _check(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
                _check(cudart.cudaGraphLaunch(self._graph_exec, self.stream), "cudaGraphLaunch")
                return
            cudart.cudaGraphDestroy(graph)
            self.use_cuda_graph = False  # capture failed (e.g. an op that cannot be captured): run plainly
        if not self.context.execute_async_v3(self.stream):
            raise BackendError(f"TensorRT failed running engine {self.name!r}: "
                               + ("; ".join(self._logger.errors[-3:]) or "execute_async_v3 returned False"))

    def _drop_graph(self) -> None:
        if self._graph_exec is not None:
            self.cudart.cudaGraphExecDestroy(self._graph_exec)
            self._graph_exec = None
        if self._graph is not None:
            self.cudart.cudaGraphDestroy(self._graph)
            self._graph = None

    # -- lifetime --------------------------------------------------------------------------------------------

    @property
    def providers(self) -> list[str]:
        return ["TensorRT"]

    def close(self) -> None:
        """Free the graph, context, buffers and (if owned) activations and stream; idempotent."""
        with self.lock:
            if self.engine is None:
                return
            if self.stream:
                self.cudart.cudaStreamSynchronize(self.stream)
            self._drop_graph()
            self.context = None
            self.engine = None
            for buf in self.buffers.values():
                buf.free()
            self.buffers.clear()
            if self._own_activations is not None:
                self._own_activations.free()
                self._own_activations = None
            if self._owns_stream and self.stream:
                self.cudart.cudaStreamDestroy(self.stream)
            self.stream = 0
            shared, self.shared_memory = self.shared_memory, None
        if shared is not None:
            shared.detach(self)

    def __enter__(self) -> TrtEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TrtEngine({self.name!r}, {'closed' if self.engine is None else 'TensorRT'})"


def open_tensorrt_engines(bundle, names: Sequence[str], cuda_graph: bool = False) -> dict[str, TrtEngine]:
    """Load the named TensorRT components sharing ONE activation buffer and ONE stream (they run in turn).

    A plan built for another TensorRT release or GPU is refused first, with what it was built for, even on a
    machine without TensorRT or a GPU."""
    if not tensorrt_available()[0]:
        version, cc = _probe(lambda: _import_tensorrt().__version__), _probe(compute_capability)
        for name in names:
            check_engine_compat(bundle.manifest.component(name), version, cc)
    _trt, cudart, _cc = require_tensorrt()
    shared = SharedDeviceMemory(cudart)
    engines: dict[str, TrtEngine] = {}
    try:
        for name in names:
            engines[name] = TrtEngine.from_bundle(bundle, name, shared=shared, cuda_graph=cuda_graph)
    except BaseException:
        shared.close()
        raise
    return engines  # the shared buffer and stream are freed when the last engine closes
