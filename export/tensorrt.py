"""TensorRT engine builder: ONNX graph -> serialized engine, in the spirit of TensorRT's demo ``engine.py``.

Written against the documented TensorRT 10.x / 11.x Python API (``tensorrt`` is imported lazily, inside
the functions that need it, so this module imports everywhere):

- The network is always **strongly typed**: every tensor's type comes from the ONNX graph, so FP16 must
  already be in the graph (convert it before export; see ``export/fp16.py``). TensorRT 10 needs the
  ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` creation flag for that; TensorRT 11 removed weak typing
  (``BuilderFlag.FP16`` and friends are gone) and ignores the deprecated flag, so it is not passed there.
- One optimization profile (min/opt/max shape per dynamic input), built with
  ``builder.create_optimization_profile()`` / ``profile.set_shape`` / ``config.add_optimization_profile``.
- An optional tactic timing cache file: loaded with ``config.create_timing_cache(bytes)`` +
  ``config.set_timing_cache(cache, ignore_mismatch=False)``, saved back after the build from
  ``config.get_timing_cache().serialize()``. It is specific to the GPU, CUDA and TensorRT version.
- Optional refit: ``BuilderFlag.REFIT`` (weights may be swapped later) or ``BuilderFlag.REFIT_IDENTICAL``
  (refit only with the build weights, e.g. for weight-stripped plans). TensorRT 11.3's notes warn that
  ``REFIT`` can drop a GEMM bias; ``REFIT_IDENTICAL`` does not have that issue. Test the refit engine
  against ONNX Runtime before shipping it.
- ``builder.build_serialized_network`` -> engine bytes, written atomically (temporary file + ``os.replace``),
  then deserialized once to read back the I/O tensor names, shapes and dtypes.

Device queries never import torch: cuda-python (``cuda.bindings.runtime``) when installed, else
``nvidia-smi``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from runtime.backends.tensorrt import make_logger

MIN_TENSORRT_MAJOR = 10
PROFILES_DIR = Path(__file__).resolve().parent.parent / "engines" / "profiles"

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # (min, opt, max)


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a usable NVIDIA GPU is missing; the message says which and what to do."""


class EngineBuildError(RuntimeError):
    """The ONNX graph could not be parsed or built into an engine; the message says why."""


# ---- availability -------------------------------------------------------------------------------------

def tensorrt_available() -> tuple[bool, str]:
    """``(True, "TensorRT 10.x.y")`` or ``(False, why)``; never raises."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, ("the `tensorrt` Python package is not installed (install it on a machine with an NVIDIA "
                       "driver: `pip install tensorrt` — its wheels come from NVIDIA's index, pypi.nvidia.com)")
    try:
        import tensorrt as trt
    except Exception as exc:  # libnvinfer or CUDA libraries missing, ABI mismatch, ...
        return False, f"`import tensorrt` failed: {type(exc).__name__}: {exc}"
    version = getattr(trt, "__version__", "unknown")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return False, f"cannot read the TensorRT version ({version!r})"
    if major < MIN_TENSORRT_MAJOR:
        return False, (f"TensorRT {version} is too old: this project needs TensorRT >= {MIN_TENSORRT_MAJOR} "
                       f"(strongly typed networks)")
    return True, f"TensorRT {version}"


def _import_cudart():
    """cuda-python's runtime bindings, or None. ``cuda.bindings.runtime`` (cuda-python >= 12.6),
    else the older ``cuda.cudart`` module."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except Exception:
            continue
    return None


def _nvidia_smi_gpus() -> tuple[list[tuple[str, str]], str]:
    """``([(name, "major.minor"), ...], error)`` from nvidia-smi; the list is empty when it fails."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], "nvidia-smi is not on PATH"
    try:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"nvidia-smi failed: {exc}"
    if out.returncode != 0:
        first = (out.stdout.strip() or out.stderr.strip() or f"exit code {out.returncode}").splitlines()[0]
        return [], f"nvidia-smi failed: {first}"
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.rsplit(",", 1)]
        if len(parts) == 2 and parts[0]:
            gpus.append((parts[0], parts[1]))
    return gpus, "" if gpus else "nvidia-smi lists no GPU"


def device_properties(device: int = 0) -> tuple[str, str]:
    """``(device name, "major.minor" compute capability)`` of a CUDA device, without torch.

    Raises ``TensorRTUnavailable`` when no GPU can be queried."""
    cudart = _import_cudart()
    if cudart is not None:
        err, prop = cudart.cudaGetDeviceProperties(device)
        if err == cudart.cudaError_t.cudaSuccess:
            name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
            return name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}"
        raise TensorRTUnavailable(f"cuda-python: cudaGetDeviceProperties({device}) failed: {_cuda_error_name(err)}")
    gpus, why = _nvidia_smi_gpus()
    if len(gpus) <= device:
        raise TensorRTUnavailable(f"no CUDA device {device}: cuda-python is not installed and {why or 'no GPU'}")
    return gpus[device]


def _cuda_error_name(err) -> str:
    return getattr(err, "name", str(err))


def gpu_available() -> tuple[bool, str]:
    """``(True, "NVIDIA H100 ... (compute capability 9.0)")`` or ``(False, why)``; never raises, no torch."""
    cudart = _import_cudart()
    if cudart is not None:
        try:
            err, count = cudart.cudaGetDeviceCount()
        except Exception as exc:
            return False, f"cuda-python could not query devices: {type(exc).__name__}: {exc}"
        if err != cudart.cudaError_t.cudaSuccess:
            return False, f"cuda-python: cudaGetDeviceCount failed ({_cuda_error_name(err)}): no usable NVIDIA driver/GPU"
        if count < 1:
            return False, "cuda-python sees no CUDA device"
        try:
            name, cc = device_properties(0)
        except TensorRTUnavailable as exc:
            return False, str(exc)
        return True, f"{name} (compute capability {cc})"
    gpus, why = _nvidia_smi_gpus()
    if not gpus:
        return False, f"no NVIDIA GPU visible: cuda-python is not installed and {why}"
    name, cc = gpus[0]
    return True, f"{name} (compute capability {cc}, via nvidia-smi)"


def _require_tensorrt():
    ok, reason = tensorrt_available()
    if not ok:
        raise TensorRTUnavailable(f"cannot build a TensorRT engine: {reason}. Use the ONNX backend "
                                  f"(--backend onnx) on this machine, or build on a machine with TensorRT and a GPU.")
    ok, reason = gpu_available()
    if not ok:
        raise TensorRTUnavailable(f"cannot build a TensorRT engine: {reason}. TensorRT builds need the NVIDIA GPU "
                                  f"the engine will run on.")
    import tensorrt as trt

    return trt


def _tensorrt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


# ---- profiles -----------------------------------------------------------------------------------------

def normalize_profile(profile: Mapping[str, Sequence[Sequence[int]]]) -> dict[str, ShapeRange]:
    """Check and canonicalise ``{input: (min_shape, opt_shape, max_shape)}`` (tuples of positive ints,
    equal ranks, min <= opt <= max per dimension). Raises ``ValueError`` naming the input."""
    out: dict[str, ShapeRange] = {}
    for name, shapes in profile.items():
        if len(shapes) != 3:
            raise ValueError(f"profile for input {name!r} needs (min, opt, max) shapes, got {len(shapes)} entries")
        mn, opt, mx = (tuple(int(d) for d in s) for s in shapes)
        if not len(mn) == len(opt) == len(mx):
            raise ValueError(f"profile for input {name!r}: min/opt/max ranks differ: {mn} {opt} {mx}")
        for i, (a, b, c) in enumerate(zip(mn, opt, mx)):
            if a < 1 or not a <= b <= c:
                raise ValueError(f"profile for input {name!r}: dimension {i} needs 1 <= min <= opt <= max, "
                                 f"got min={a} opt={b} max={c}")
        out[name] = (mn, opt, mx)
    return out


def parse_batch(spec: str | int | Sequence[int], what: str = "batch") -> tuple[int, int, int]:
    """``"1:1:4"`` / ``"2"`` / ``4`` / ``(1, 2, 4)`` -> ``(min, opt, max)`` with 1 <= min <= opt <= max."""
    if isinstance(spec, int):
        values = [spec] * 3
    elif isinstance(spec, str):
        parts = [p.strip() for p in spec.split(":")]
        if len(parts) == 1:
            parts *= 3
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"{what} must be N or MIN:OPT:MAX with positive integers (e.g. 1:1:4), got {spec!r}")
        values = [int(p) for p in parts]
    else:
        values = [int(v) for v in spec]
        if len(values) == 1:
            values *= 3
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise ValueError(f"{what} needs 1 <= min <= opt <= max, got {spec!r}")
    return values[0], values[1], values[2]


_TERM = re.compile(r"^(?:(\d+)\*?)?([A-Za-z_][A-Za-z0-9_]*)(?:\*(\d+))?(?:/(\d+))?$")


def _triple(v, what: str) -> tuple[int, int, int]:
    return parse_batch(v, what)


def _symbol_value(sym: str, batch, unet_batch, height, width, factor, symbols) -> tuple[int, int, int]:
    if symbols and sym in symbols:
        return _triple(symbols[sym], f"symbol {sym!r}")
    latent_h = tuple(v // factor for v in height)
    latent_w = tuple(v // factor for v in width)
    named = {"B": batch, "batch": batch, "batch_size": batch, "N": unet_batch,
             "h": latent_h, "w": latent_w, "latent_height": latent_h, "latent_width": latent_w,
             "H": height, "W": width, "height": height, "width": width}
    if sym in named:
        return named[sym]
    raise KeyError(sym)


def profile_from_flags(spec_inputs: Iterable[Any], batch: str | int | Sequence[int] = (1, 1, 4),
                       height: int | Sequence[int] = 512, width: int | Sequence[int] = 512,
                       latent_factor: int = 8, *, cfg: bool = True,
                       symbols: Mapping[str, int | Sequence[int]] | None = None) -> dict[str, ShapeRange]:
    """Turn a graph's symbolic input shapes into TensorRT ``{input: (min, opt, max)}`` shapes.

    ``spec_inputs``: dicts (or objects) with ``name`` and ``shape`` as ``export.graphs`` writes them; shape
    entries are ints or symbols (``export/graphs.py``):

    - ``B`` (also ``batch``): prompts -> ``batch`` (min, opt, max);
    - ``N``: the UNet batch. With ``cfg=True`` (classifier-free guidance doubles the batch) it runs from
      ``B_min`` (guidance off) to ``2 * B_max``, optimised for ``2 * B_opt``; with ``cfg=False`` it is ``B``;
    - ``h``/``w``: latent size = image ``height``/``width`` // ``latent_factor``; ``H``/``W``: the image size;
    - ``h/2``, ``w/4``, ...: a UNet level (latent size divided); ``2B``, ``2*B``, ``B*2``: multiples.

    ``symbols`` adds or overrides symbols (an int or a min:opt:max). ``height``/``width`` may be one size
    or a (min, opt, max) range. Inputs whose shape is fully static need no profile entry and are left out.
    Raises ``ValueError`` naming the input and dimension it cannot resolve.
    """
    batch = parse_batch(batch)
    unet_batch = (batch[0], 2 * batch[1], 2 * batch[2]) if cfg else batch
    height, width = _triple(height, "height"), _triple(width, "width")
    if latent_factor < 1:
        raise ValueError(f"latent_factor must be >= 1, got {latent_factor}")
    for label, size in (("height", height), ("width", width)):
        if any(v % latent_factor for v in size):
            shown = size[0] if size[0] == size[2] else ":".join(map(str, size))
            raise ValueError(f"image {label} {shown} is not a multiple of the VAE factor {latent_factor}")
    profile: dict[str, ShapeRange] = {}
    for spec in spec_inputs:
        name = spec["name"] if isinstance(spec, Mapping) else spec.name
        shape = list(spec["shape"] if isinstance(spec, Mapping) else spec.shape)
        if all(isinstance(d, int) and d >= 0 for d in shape):
            continue
        dims = []
        for k, d in enumerate(shape):
            if isinstance(d, int) and d >= 0:
                dims.append((d, d, d))
                continue
            m = _TERM.match(str(d).replace(" ", ""))
            if not m:
                raise ValueError(f"input {name!r}: cannot read dimension {k} ({d!r}) of shape {shape}; name "
                                 f"dynamic dims like 'B', 'N', '2B', 'h', 'w', 'h/2' at export, or pass symbols=")
            sym, coef, div = m.group(2), int(m.group(1) or 1) * int(m.group(3) or 1), int(m.group(4) or 1)
            try:
                value = _symbol_value(sym, batch, unet_batch, height, width, latent_factor, symbols)
            except KeyError:
                raise ValueError(
                    f"input {name!r}: unknown dimension symbol {sym!r} in shape {shape}; known: B, N, h, w, H, W "
                    f"(and multiples/divisions like 2B, h/2); give its size with symbols={{{sym!r}: 77}}"
                ) from None
            if any(coef * v % div for v in value):
                raise ValueError(f"input {name!r}: dimension {d!r} = {coef}*{sym}/{div} is fractional for "
                                 f"{sym}={value}; choose an image size divisible by {div * latent_factor}")
            dims.append(tuple(coef * v // div for v in value))
        profile[name] = tuple(tuple(dim[i] for dim in dims) for i in range(3))  # type: ignore[assignment]
    return normalize_profile(profile)


# ---- build profiles (engines/profiles/*.json) ---------------------------------------------------------

PRECISIONS = ("fp32", "fp16")


MATCH_KEYS = {
    "family": lambda b: b.family,
    "vae_scale_factor": lambda b: b.vae_scale_factor,
    "sample_size": lambda b: b.sample_size,
    "latent_channels": lambda b: b.latent_channels,
    "text_max_length": lambda b: b.text_encoders[0].max_length,
    "cross_attention_dim": lambda b: b.cross_attention_dim,
    "prediction_type": lambda b: b.prediction_type,
}
"""What a profile's ``match`` clause may name: facts of a loaded backbone (``export.families.Backbone``)."""


def load_build_profile(name_or_path: str | os.PathLike) -> dict:
    """Read and check a build profile: ``"sdxl"`` (from ``engines/profiles``) or a path to a JSON file."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = PROFILES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.json")))
        raise FileNotFoundError(f"build profile {name_or_path!s} not found (known: {known})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    where = path.name
    for key in ("family", "batch", "latent_factor", "tokenizer_max_length", "precision", "defaults"):
        if key not in data:
            raise ValueError(f"{where}: missing key {key!r}")
    if "image" in data:
        raise ValueError(f"{where}: 'image' is no longer read: the image size is the model's own "
                         f"(UNet sample_size x VAE factor) unless --height/--width say otherwise; remove it")
    unknown = sorted(set(data.get("match", {})) - set(MATCH_KEYS))
    if unknown:
        raise ValueError(f"{where}: match key(s) {', '.join(unknown)} unknown (known: {', '.join(MATCH_KEYS)})")
    parse_batch(data["batch"])
    for component, precision in data["precision"].items():
        if precision not in PRECISIONS:
            raise ValueError(f"{where}: precision of {component!r} is {precision!r}; use one of {PRECISIONS}")
    defaults = data["defaults"]
    for key in ("steps", "guidance_scale", "scheduler"):
        if key not in defaults:
            raise ValueError(f"{where}: defaults need {key!r}")
    return data


def select_build_profile(backbone, name_or_path: str | os.PathLike | None = None) -> dict:
    """``name_or_path`` when given; else the first profile in ``engines/profiles`` (by file name) whose ``match``
    clause fits ``backbone`` (every key equal), else the backbone family's profile."""
    if name_or_path is not None:
        return load_build_profile(name_or_path)
    for path in sorted(PROFILES_DIR.glob("*.json")):
        profile = load_build_profile(path)
        match = profile.get("match")
        if match and all(MATCH_KEYS[k](backbone) == v for k, v in match.items()):
            return profile
    return load_build_profile(backbone.family)


# ---- the build ----------------------------------------------------------------------------------------

@dataclass
class EngineInfo:
    """What was built, for the bundle manifest (plain JSON types via ``to_dict``)."""

    tensorrt_version: str
    compute_capability: str               # "major.minor" of the GPU it was built on
    device_name: str
    strongly_typed: bool
    refit: bool
    refit_mode: str | None                # "refit" | "refit_identical" | None
    profile: dict[str, dict[str, list[int]]]  # input -> {"min": shape, "opt": shape, "max": shape}
    build_seconds: float
    inputs: list[dict] = field(default_factory=list)    # [{"name", "shape" (-1 = dynamic), "dtype"}]
    outputs: list[dict] = field(default_factory=list)
    engine_bytes: int = 0
    timing_cache: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def manifest_fields(self) -> dict:
        """The ``runtime.manifest.ComponentSpec`` fields an engine component takes from this build."""
        return {"backend": "tensorrt", "profiles": self.profile, "tensorrt_version": self.tensorrt_version,
                "compute_capability": self.compute_capability}


_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
                "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8_e4m3fn", "INT4": "int4",
                "FP4": "float4_e2m1fn"}


def _dtype_name(dtype) -> str:
    name = getattr(dtype, "name", str(dtype).split(".")[-1])
    return _DTYPE_NAMES.get(name, name.lower())


def _atomic_write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _make_progress_monitor(trt, progress):
    if progress is None or not hasattr(trt, "IProgressMonitor"):
        return None

    class _Monitor(trt.IProgressMonitor):
        """Reports TensorRT's top-level build phases (their steps are too fine-grained to print)."""

        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                progress(f"TensorRT: {phase_name} ...")

        def step_complete(self, phase_name, step):
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            pass

    return _Monitor()


def _parser_errors(parser) -> str:
    msgs = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = []
        node = err.node() if hasattr(err, "node") else -1
        if node is not None and node >= 0:
            where.append(f"node {node}")
        for attr in ("node_name", "node_operator"):
            value = getattr(err, attr, None)
            value = value() if callable(value) else value
            if value:
                where.append(str(value))
        desc = " ".join(str(err.desc()).split())
        msgs.append(f"{' '.join(where)}: {desc}" if where else desc)
    return "; ".join(msgs) or "no error recorded by the parser"


def _check_profile_against_network(network, profile: dict[str, ShapeRange], onnx_name: str) -> list[dict]:
    inputs = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        inputs.append({"name": t.name, "shape": tuple(int(d) for d in t.shape)})
    names = {t["name"] for t in inputs}
    unknown = sorted(set(profile) - names)
    if unknown:
        raise EngineBuildError(f"{onnx_name}: the profile names input(s) {unknown} that the graph does not have; "
                               f"its inputs are {sorted(names)}")
    for t in inputs:
        name, shape = t["name"], t["shape"]
        if name not in profile:
            if any(d < 0 for d in shape):
                raise EngineBuildError(f"{onnx_name}: input {name!r} has dynamic shape {list(shape)} but the profile "
                                       f"gives it no min/opt/max (pass --height/--width/--batch or a profile entry)")
            continue
        for label, s in zip(("min", "opt", "max"), profile[name]):
            if len(s) != len(shape):
                raise EngineBuildError(f"{onnx_name}: input {name!r} has rank {len(shape)} ({list(shape)}) but the "
                                       f"profile's {label} shape {list(s)} has rank {len(s)}")
            for k, (fixed, given) in enumerate(zip(shape, s)):
                if fixed >= 0 and fixed != given:
                    raise EngineBuildError(f"{onnx_name}: input {name!r} dimension {k} is fixed at {fixed} in the "
                                           f"graph but the profile's {label} shape {list(s)} says {given}")
    return inputs


def _read_io(trt, engine) -> tuple[list[dict], list[dict]]:
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        entry = {"name": name, "shape": [int(d) for d in engine.get_tensor_shape(name)],
                 "dtype": _dtype_name(engine.get_tensor_dtype(name))}
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(entry)
    return inputs, outputs


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *,
                 profile: Mapping[str, Sequence[Sequence[int]]],
                 timing_cache: str | os.PathLike | None = None, refit: bool | str = False,
                 workspace_gb: float | None = None,
                 progress: Callable[[str], None] | None = None) -> EngineInfo:
    """Build a strongly typed TensorRT engine from ``onnx_path`` and write it to ``engine_path``.

    ``profile``: ``{input: (min_shape, opt_shape, max_shape)}`` for every dynamic input (see
    ``profile_from_flags``). ``timing_cache``: a file read before and written after the build (created
    if missing). ``refit``: ``False``, ``True`` (``BuilderFlag.REFIT``) or ``"identical"``
    (``BuilderFlag.REFIT_IDENTICAL``). ``workspace_gb``: cap on TensorRT's scratch memory pool (default:
    the GPU's memory). ``progress``: called with human-readable status lines.

    Raises ``TensorRTUnavailable`` (no TensorRT >= 10 or no GPU), ``EngineBuildError`` (parse/build
    failure, profile mismatch; one readable line), ``FileNotFoundError``, ``ValueError`` (bad profile).
    External weights (``model.onnx.data``) are found next to ``onnx_path``.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX graph not found: {onnx_path}")
    profile = normalize_profile(profile)
    if refit not in (False, True, "identical"):
        raise ValueError(f"refit must be False, True or 'identical', got {refit!r}")
    if workspace_gb is not None and workspace_gb <= 0:
        raise ValueError(f"workspace_gb must be positive, got {workspace_gb}")
    trt = _require_tensorrt()
    say = progress or (lambda _msg: None)
    device_name, cc = device_properties(0)

    logger = make_logger(trt, echo=progress or (lambda line: print(line, file=sys.stderr)))
    builder = trt.Builder(logger)
    if _tensorrt_major(trt) >= 11:
        flags = 0  # TensorRT 11 networks are always strongly typed; STRONGLY_TYPED is deprecated and ignored
    else:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)

    say(f"parsing {onnx_path.name}")
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so the parser finds external weight files next to the graph
    if not parser.parse_from_file(str(onnx_path)):
        raise EngineBuildError(f"TensorRT {trt.__version__} could not parse {onnx_path}: {_parser_errors(parser)}")
    _check_profile_against_network(network, profile, onnx_path.name)

    config = builder.create_builder_config()
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    refit_mode = None
    if refit == "identical":
        if not hasattr(trt.BuilderFlag, "REFIT_IDENTICAL"):
            raise EngineBuildError(f"TensorRT {trt.__version__} has no BuilderFlag.REFIT_IDENTICAL")
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
        refit_mode = "refit_identical"
    elif refit:
        config.set_flag(trt.BuilderFlag.REFIT)
        refit_mode = "refit"
    if profile:
        opt_profile = builder.create_optimization_profile()
        for name, (mn, opt, mx) in profile.items():
            opt_profile.set_shape(name, mn, opt, mx)
        if config.add_optimization_profile(opt_profile) < 0:
            raise EngineBuildError(f"{onnx_path.name}: TensorRT rejected the optimization profile {profile}: "
                                   + ("; ".join(logger.errors) or "see the TensorRT log"))

    cache_path = Path(timing_cache) if timing_cache is not None else None
    if cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        if cache is None or not config.set_timing_cache(cache, False):
            say(f"timing cache {cache_path} does not match this TensorRT/GPU; starting an empty one")
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)
        elif blob:
            say(f"timing cache: reusing {cache_path} ({len(blob)} bytes)")

    monitor = _make_progress_monitor(trt, progress)
    if monitor is not None:
        config.progress_monitor = monitor

    say(f"building {engine_path.name} with TensorRT {trt.__version__} on {device_name} (sm {cc}); "
        f"this can take minutes")
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - t0
    if plan is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} could not build {onnx_path.name}: "
                               + (" | ".join(" ".join(e.split()) for e in logger.errors[-5:])
                                  or "no error message; rerun with a progress callback to see warnings"))
    # read the I/O back from the engine itself (and prove it deserializes) before anything is written
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise EngineBuildError(f"the engine built from {onnx_path.name} cannot be deserialized: "
                               + ("; ".join(logger.errors) or "see the TensorRT log"))
    if refit is True and not getattr(engine, "refittable", True):
        raise EngineBuildError(f"{engine_path.name}: asked for a refittable engine but TensorRT built one that "
                               f"is not (engine.refittable is False)")
    inputs, outputs = _read_io(trt, engine)
    del engine, runtime

    _atomic_write(engine_path, plan)
    if cache_path is not None:
        _atomic_write(cache_path, config.get_timing_cache().serialize())
        say(f"timing cache saved to {cache_path}")
    info = EngineInfo(
        tensorrt_version=trt.__version__, compute_capability=cc, device_name=device_name,
        strongly_typed=True, refit=bool(refit), refit_mode=refit_mode,
        profile={k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in profile.items()},
        build_seconds=round(build_seconds, 3), inputs=inputs, outputs=outputs,
        engine_bytes=engine_path.stat().st_size,
        timing_cache=str(cache_path) if cache_path is not None else None,
    )
    say(f"wrote {engine_path} ({info.engine_bytes / 2**20:.1f} MiB) in {build_seconds:.1f} s")
    return info
