"""ONNX Runtime backend: one :class:`OrtEngine` per ONNX graph component of a bundle.

>>> with Bundle.open("tinyworld.plan") as bundle:
...     vae = OrtEngine.from_bundle(bundle, "vae_decoder")          # providers="auto"
...     image = vae.infer({"latent": latent})["image"]
...     vae.providers                                              # e.g. ['CPUExecutionProvider']

Design notes
------------
* **Loading.** ONNX Runtime's Python API builds a session from a path or ``bytes`` only (a ``memoryview``
  is refused), and parsing the protobuf copies the graph anyway, so the graph payload is copied ONCE into a
  ``bytes`` object that is dropped as soon as the session exists. Graphs are small; the weights of big
  graphs live in external data, which is where zero-copy matters.
* **External data** (``component.external_data`` names a "file" component holding the ``.onnx.data``
  file). Two ways, chosen by ``external_data=``:

  - ``"memory"`` (default when the ORT build has it; onnxruntime 1.32 does):
    ``SessionOptions.add_external_initializers_from_files_in_memory`` gets the data file as a zero-copy
    ``memoryview`` of the memory-mapped bundle, under the file name the graph references
    (``extra["filename"]``). ORT copies the weights it needs while the session is created; nothing is
    written to disk.
  - ``"tempdir"`` (fallback: an older ORT, or the TensorRT execution provider, whose own ONNX parser
    re-reads external data from disk): the graph and its data file are extracted (sha256-checked) into a
    private ``tempfile.mkdtemp`` folder (mode 0700) and the session is created from the path. The folder
    is removed by :meth:`OrtEngine.close` (also on ``with`` exit and, as a last resort, at garbage
    collection / interpreter exit via ``weakref.finalize``).
* **Providers.** ``providers="auto"`` takes TensorrtExecutionProvider, CUDAExecutionProvider,
  CPUExecutionProvider in that order among ``onnxruntime.get_available_providers()``; an explicit list is
  passed through (unknown names -> BackendError). :attr:`OrtEngine.providers` reports what the session
  actually uses (``session.get_providers()``), which can be fewer than asked for.
* **Thread safety.** ``InferenceSession.run`` is thread-safe in ONNX Runtime (concurrent ``run`` calls on
  one session are supported), and :meth:`OrtEngine.infer` keeps no per-call state on the engine, so one
  engine may be shared between threads. :meth:`close` must not race with ``infer``.
* **Row slices.** :meth:`OrtEngine.infer_rows` runs a batch of independent rows (SafeGuider's search candidates)
  as one slice per core, side by side on a second, one-thread session of the same graph, when the graph is small
  (at most ``ROW_SLICE_MAX_BYTES``, no external data) and runs on the CPU provider: a small graph's kernels barely
  use ORT's intra-op threads (tinyworld's text stage, 39 prompts: 6.1 ms as one run on 2 threads, 3.5 ms as two
  one-thread halves; ``bench/results/safeguider_search_row_slices/README.md``). The session is made on first use,
  from the bundle, which must still be open (a pipeline closes both together).
* **Checks.** :meth:`OrtEngine.infer` validates the feeds against the component's TensorSpecs (names,
  dtypes, ranks, static dims, and symbolic dims such as ``"N"`` equal across all inputs) and raises a
  one-line :class:`~runtime.errors.BadInputError` naming the input; it then checks every float output for
  NaN/Inf and raises :class:`NonFiniteOutputError` so the caller can fail closed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import BackendError, BadInputError, RuntimeToolError
from runtime.manifest import ComponentSpec, TensorSpec

PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
EXTERNAL_DATA_MODES = ("auto", "memory", "tempdir")
ORT_HINT = "install onnxruntime (CPU) or onnxruntime-gpu: pip install onnxruntime"
ROW_SLICE_MAX_BYTES = 64 << 20  # graphs up to this size run infer_rows as one-thread slices side by side
_ROW_POOL: ThreadPoolExecutor | None = None


class NonFiniteOutputError(RuntimeToolError):
    """An engine produced NaN or Inf: the caller must fail closed (write nothing). Exit code FAILURE (1).

    ``component``, ``output``, ``count`` (non-finite elements) and ``total`` say where.
    """

    def __init__(self, component: str, output: str, count: int, total: int):
        self.component, self.output, self.count, self.total = component, output, count, total
        super().__init__(f"component {component!r} output {output!r} has {count} NaN/Inf value(s) of {total}: "
                         "refusing to continue (fail closed); check the inputs, or rebuild the bundle in fp32 if "
                         "an fp16 engine overflows")


# -- helpers shared with the TensorRT backend ----------------------------------------------------------------

def validate_feeds(component: ComponentSpec, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Check ``feeds`` against ``component.inputs``; return them as numpy arrays (no cast, no copy).

    One-line BadInputError naming the input on: missing or unknown names, a non-array, the wrong dtype
    (never cast silently), the wrong rank, a static dim that differs, or a symbolic dim (e.g. ``"N"``)
    whose size differs between inputs (or within one input).
    """
    name = component.name
    expected = {t.name: t for t in component.inputs}
    if unknown := sorted(set(feeds) - set(expected)):
        raise BadInputError(f"component {name!r} has no input {unknown[0]!r} (its inputs: "
                            f"{', '.join(t.describe() for t in component.inputs)})")
    if missing := [t for t in component.inputs if t.name not in feeds]:
        raise BadInputError(f"component {name!r} input {missing[0].name!r} is missing: feed "
                            f"{missing[0].describe()}")
    symbols: dict[str, tuple[int, str]] = {}  # symbol -> (size, "input[dim]" that fixed it)
    arrays = {}
    for spec in component.inputs:
        value = feeds[spec.name]
        if not isinstance(value, np.ndarray):
            raise BadInputError(f"component {name!r} input {spec.name!r} is a {type(value).__name__}, expected a "
                                f"numpy array {spec.describe()}")
        _check_array(name, spec, value, symbols)
        arrays[spec.name] = value
    return arrays


def _check_array(component: str, spec: TensorSpec, value: np.ndarray, symbols: dict[str, tuple[int, str]]) -> None:
    where = f"component {component!r} input {spec.name!r}"
    if value.dtype != np.dtype(spec.dtype):
        raise BadInputError(f"{where} has dtype {value.dtype}, expected {spec.dtype} ({spec.describe()}): "
                            f"convert it with .astype(np.{spec.dtype})")
    if value.ndim != len(spec.shape):
        raise BadInputError(f"{where} has rank {value.ndim} (shape {list(value.shape)}), expected rank "
                            f"{len(spec.shape)} ({spec.describe()})")
    for axis, (dim, size) in enumerate(zip(spec.shape, value.shape)):
        if isinstance(dim, int) and dim >= 0:
            if size != dim:
                raise BadInputError(f"{where} has shape {list(value.shape)}: dimension {axis} must be {dim} "
                                    f"({spec.describe()})")
        elif isinstance(dim, str) and dim not in ("", "?"):
            if dim in symbols and symbols[dim][0] != size:
                raise BadInputError(f"{where} has shape {list(value.shape)}: dimension {axis} ({dim!r}) is "
                                    f"{size} but {dim!r} is {symbols[dim][0]} in {symbols[dim][1]}; all "
                                    f"inputs must agree on {dim!r}")
            symbols.setdefault(dim, (size, f"{spec.name}[{axis}]"))


def check_finite(component: str, outputs: Mapping[str, np.ndarray]) -> None:
    """Raise NonFiniteOutputError on the first floating-point output holding NaN or Inf."""
    for out_name, value in outputs.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in "fc":
            finite = np.isfinite(value)
            if not finite.all():
                raise NonFiniteOutputError(component, out_name, int(finite.size - np.count_nonzero(finite)),
                                           int(finite.size))


# -- providers ------------------------------------------------------------------------------------------------

def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendError(f"ONNX Runtime is not installed ({e}): {ORT_HINT}") from None
    return onnxruntime


def onnxruntime_available() -> tuple[bool, str]:
    """``(True, "onnxruntime 1.x (providers: ...)")`` or ``(False, why)``; never raises."""
    try:
        ort = _ort()
        return True, f"onnxruntime {ort.__version__} (providers: {', '.join(ort.get_available_providers())})"
    except BackendError as e:
        return False, str(e)
    except Exception as e:  # a broken install
        return False, f"import onnxruntime failed: {type(e).__name__}: {e}"


def select_providers(providers: str | Sequence[Any] = "auto") -> list[Any]:
    """The execution providers to ask for: ``"auto"`` -> TensorRT, CUDA, CPU (those available, in that
    order); ``"cpu"`` -> CPU only; an explicit list (names or ``(name, options)`` tuples) is checked against
    ``onnxruntime.get_available_providers()`` and returned as is."""
    available = _ort().get_available_providers()
    if isinstance(providers, str):
        if providers == "auto":
            chosen = [p for p in PROVIDER_PREFERENCE if p in available]
            return chosen or list(available)
        if providers == "cpu":
            return ["CPUExecutionProvider"]
        providers = [providers]
    chosen = list(providers)
    if not chosen:
        raise BackendError("no ONNX Runtime execution provider given: pass providers='auto' or a list such as "
                           "['CUDAExecutionProvider', 'CPUExecutionProvider']")
    for p in chosen:
        pname = p[0] if isinstance(p, tuple) else p
        if pname not in available:
            raise BackendError(f"ONNX Runtime execution provider {pname!r} is not available here (available: "
                               f"{', '.join(available)}): install onnxruntime-gpu for CUDA/TensorRT, or use "
                               "providers='auto'")
    return chosen


def _provider_name(p: Any) -> str:
    return p[0] if isinstance(p, tuple) else p


# -- the engine -------------------------------------------------------------------------------------------------

class OrtEngine:
    """One ONNX graph component running in an ``onnxruntime.InferenceSession``."""

    backend = "onnxruntime"

    def __init__(self, component: ComponentSpec, session, tempdir: str | None = None, row_session=None):
        self.component = component
        self.name = component.name
        self.session = session
        self._row_session = row_session  # None, or a callable making the one-thread session (infer_rows)
        self._row_lock = threading.Lock()
        self._tempdir = tempdir
        self._finalizer = (weakref.finalize(self, shutil.rmtree, tempdir, True) if tempdir else None)
        self._output_names = [o.name for o in session.get_outputs()]

    @classmethod
    def from_bundle(cls, bundle, component_name: str, providers: str | Sequence[Any] = "auto",
                    threads: int | None = None, external_data: str = "auto") -> OrtEngine:
        """Create the session for ONNX component ``component_name`` of an open :class:`~runtime.bundle.Bundle`.

        ``threads``: ORT intra-op threads (None: ORT's default, one per physical core). ``external_data``:
        ``"auto"``, ``"memory"`` or ``"tempdir"`` (see the module docstring). BackendError if ORT or a
        provider is missing or the graph cannot be loaded; BundleError if the component does not exist.
        """
        ort = _ort()
        component = bundle.manifest.component(component_name)
        if component.backend != "onnx":
            raise BackendError(f"component {component_name!r} is a {component.backend} component, not an ONNX "
                               "graph: ONNX Runtime cannot run it"
                               + (" (use --backend tensorrt)" if component.backend == "tensorrt" else ""))
        if external_data not in EXTERNAL_DATA_MODES:
            raise BadInputError(f"external_data={external_data!r}: choose one of {', '.join(EXTERNAL_DATA_MODES)}")
        chosen = select_providers(providers)
        options = ort.SessionOptions()
        # a spinning idle session steals the cores the next session's run needs (a pipeline runs several in
        # turn; bench/results/design_measurements.md). GRT_ORT_SPINNING=1 restores ORT's default
        if os.environ.get("GRT_ORT_SPINNING", "0") != "1":
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads is not None:
            if threads < 1:
                raise BadInputError(f"threads={threads}: pass a positive number of threads or None")
            options.intra_op_num_threads = int(threads)
        tempdir = None
        mode = external_data
        if component.external_data is not None and mode == "auto":
            in_memory = hasattr(options, "add_external_initializers_from_files_in_memory")
            uses_trt = any(_provider_name(p) == "TensorrtExecutionProvider" for p in chosen)
            mode = "memory" if in_memory and not uses_trt else "tempdir"
        row_session = None
        if component.external_data is None:
            model = _payload_bytes(bundle, component.name)
            session = _session(ort, model, options, chosen, component)
            if len(model) <= ROW_SLICE_MAX_BYTES and session.get_providers() == ["CPUExecutionProvider"]:
                def row_session(options=options):
                    options.intra_op_num_threads = 1
                    return _session(ort, _payload_bytes(bundle, component.name), options, chosen, component)
        elif mode == "memory":
            data = bundle.manifest.component(component.external_data)
            view = bundle.payload(data.name)  # zero copy: a view of the mapped bundle
            try:
                options.add_external_initializers_from_files_in_memory(
                    [Path(data.filename).name], [view], [view.nbytes])
                session = _session(ort, _payload_bytes(bundle, component.name), options, chosen, component)
            finally:
                del options  # ORT copied what it needs while creating the session
                try:
                    view.release()
                except BufferError:  # still referenced by ORT's options object: freed with it
                    pass
        else:
            tempdir = tempfile.mkdtemp(prefix=f"grt-{component.name}-")  # private: mode 0700
            try:
                data = bundle.manifest.component(component.external_data)
                for c in (data, component):
                    Path(tempdir, c.filename).parent.mkdir(parents=True, exist_ok=True)
                bundle.extract(data.name, os.path.join(tempdir, data.filename))
                graph_path = bundle.extract(component.name, os.path.join(tempdir, component.filename))
                session = _session(ort, str(graph_path), options, chosen, component)
            except BaseException:
                shutil.rmtree(tempdir, ignore_errors=True)
                raise
        return cls(component, session, tempdir, row_session)

    # -- info ------------------------------------------------------------------------------------------------

    @property
    def providers(self) -> list[str]:
        """The execution providers the session actually uses, in priority order."""
        return list(self.session.get_providers())

    @property
    def parallel_runs(self) -> int:
        """How many row slices :meth:`infer_rows` runs side by side: the usable cores, or 1 (see the module
        docstring: a GPU provider, or a graph too large to hold twice)."""
        if self._row_session is None:
            return 1
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    @property
    def external_data_dir(self) -> str | None:
        """The private folder holding the extracted graph + data file ("tempdir" mode), else None."""
        return self._tempdir

    # -- running ---------------------------------------------------------------------------------------------

    def infer(self, feeds: Mapping[str, np.ndarray], check_outputs: bool = True) -> dict[str, np.ndarray]:
        """Run the graph: validated ``feeds`` in, ``{output name: array}`` out (NaN/Inf checked unless
        ``check_outputs=False``). Thread-safe (see the module docstring)."""
        if self.session is None:
            raise BackendError(f"engine {self.name!r} is closed: open the bundle's engines again")
        return self._run(self.session, validate_feeds(self.component, feeds), check_outputs)

    __call__ = infer

    def infer_rows(self, feeds: Mapping[str, np.ndarray], min_rows: int = 4) -> dict[str, np.ndarray]:
        """:meth:`infer` for a batch of independent rows (every feed and output batch-first), as up to
        :attr:`parallel_runs` slices of at least ``min_rows`` rows side by side: the same rows back, in order."""
        global _ROW_POOL
        if self.session is None:
            raise BackendError(f"engine {self.name!r} is closed: open the bundle's engines again")
        arrays = validate_feeds(self.component, feeds)
        rows = len(next(iter(arrays.values())))
        ways = min(self.parallel_runs, rows // min_rows)
        if ways < 2:
            return self._run(self.session, arrays, True)
        with self._row_lock:
            if callable(self._row_session):
                self._row_session = self._row_session()
            if _ROW_POOL is None:
                _ROW_POOL = ThreadPoolExecutor(max_workers=self.parallel_runs, thread_name_prefix="grt-rows")
        session = self._row_session
        bounds = np.linspace(0, rows, ways + 1).astype(int)
        parts = list(_ROW_POOL.map(lambda a, b: self._run(session, {k: v[a:b] for k, v in arrays.items()}, True),
                                   bounds[:-1], bounds[1:]))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _run(self, session, arrays: dict[str, np.ndarray], check_outputs: bool) -> dict[str, np.ndarray]:
        try:
            values = session.run(self._output_names, arrays)
        except Exception as e:  # ORT's own errors (e.g. a kernel failure): one line, no traceback
            raise BackendError(f"ONNX Runtime failed running component {self.name!r}: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        outputs = dict(zip(self._output_names, values))
        if check_outputs:
            check_finite(self.name, outputs)
        return outputs

    # -- lifetime --------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the session and remove the private external-data folder, if any."""
        self.session = None
        self._row_session = None
        if self._finalizer is not None:
            self._finalizer()  # rmtree, once
            self._finalizer = None

    def __enter__(self) -> OrtEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.session is None else ",".join(self.providers)
        return f"OrtEngine({self.name!r}, {state})"


def _payload_bytes(bundle, name: str) -> bytes:
    """A copy of a (small) graph payload; the zero-copy view is released at once."""
    view = bundle.payload(name)
    try:
        return bytes(view)
    finally:
        view.release()


def _session(ort, model, options, providers, component: ComponentSpec):
    try:
        return ort.InferenceSession(model, sess_options=options, providers=providers)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BackendError(f"ONNX Runtime {ort.__version__} cannot load component {component.name!r}: {first}; "
                           "the bundle may need a newer onnxruntime, or rebuild it with `python -m export build`"
                           ) from None
