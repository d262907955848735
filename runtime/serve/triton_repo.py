"""``runtime triton-repo``: write a Triton model repository that serves one ``.plan`` bundle.

    runtime triton-repo --engine engines/tinyworld_stack.plan --out REPO [--name NAME] [--instances N]
        [--gpus 0,1] [--max-batch B] [--max-queue-delay-us U] [--copy] [--backend auto] [--overwrite]

writes ``REPO/NAME/config.pbtxt`` and ``REPO/NAME/1/model.py`` (and with ``--copy`` the bundle itself as
``REPO/NAME/1/bundle.plan``; otherwise the config references the bundle by absolute path). Other models in
``REPO`` are left alone. The model folder is written to a temporary folder beside ``REPO/NAME`` and renamed into
place, so a failure leaves no half-written model.

The model (``runtime/serve/model.py``, Triton's Python backend) takes

======================  =============  =======  =====================================================
input                   Triton type    shape    meaning (absent: the bundle's default)
======================  =============  =======  =====================================================
``prompt``              TYPE_STRING    [B, 1]   UTF-8 text, required
``negative_prompt``     TYPE_STRING    [B, 1]   optional
``seed``                TYPE_INT64     [B, 1]   optional, 0..4294967295 or -1 (random; the report has it)
``steps``               TYPE_INT32     [B, 1]   optional
``guidance``            TYPE_FP64      [B, 1]   optional (FP64: the same number the Python API gets)
``scheduler``           TYPE_STRING    [B, 1]   optional: ddim, euler, euler_a, dpmpp_2m
``height``, ``width``   TYPE_INT32     [B, 1]   optional
======================  =============  =======  =====================================================

and returns ``image`` (TYPE_UINT8, ``[B, H, W, 3]``) and ``report`` (TYPE_STRING ``[B, 1]``, the JSON report:
settings, guard decisions, stage timings), or an error naming the field and the fix. Instance groups:
``KIND_GPU`` on each ``--gpus`` id (default ``0`` for a TensorRT bundle), else ``KIND_CPU``; ``--instances`` per
group. ``max_batch_size`` is the bundle's max batch (``--max-batch`` may lower it, never raise it); the dynamic
batcher hands the model up to that many queued rows at once (waiting up to ``--max-queue-delay-us`` for more),
and the rows that agree on the denoise settings share every UNet call (``Pipeline.run_many``, which keeps to
the bundle's max batch by itself), each image bit-identical to the single-process API (model.py says why).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from runtime.bundle import Bundle, replace_dir, staging_dir
from runtime.errors import BadInputError, OutputError

MODEL_TEMPLATE = Path(__file__).with_name("model.py")
COPIED_BUNDLE = "bundle.plan"  # the --copy bundle, beside model.py in the version folder
MAX_INSTANCES = 64
MAX_QUEUE_DELAY_US = 10_000_000  # 10 s: longer only piles up latency
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

# (name, Triton data type, optional): the request contract of model.py, in one place
INPUTS = (("prompt", "TYPE_STRING", False), ("negative_prompt", "TYPE_STRING", True), ("seed", "TYPE_INT64", True),
          ("steps", "TYPE_INT32", True), ("guidance", "TYPE_FP64", True), ("scheduler", "TYPE_STRING", True),
          ("height", "TYPE_INT32", True), ("width", "TYPE_INT32", True))
OUTPUTS = (("image", "TYPE_UINT8", "[ -1, -1, 3 ]"), ("report", "TYPE_STRING", "[ 1 ]"))


@dataclass(frozen=True)
class ModelSpec:
    """What ``config.pbtxt`` says about one served bundle."""

    name: str
    bundle: str              # absolute path, or COPIED_BUNDLE (relative to the version folder)
    manifest_sha256: str     # the model refuses to load any other bundle at that path
    max_batch: int
    instances: int
    gpus: tuple[int, ...]    # empty: KIND_CPU
    max_queue_delay_us: int
    backend: str


def write_model(engine: str | Path, out: str | Path, name: str | None = None, instances: int = 1,
                gpus: str | None = None, max_batch: int | None = None, max_queue_delay_us: int = 0,
                copy: bool = False, backend: str = "auto", overwrite: bool = False) -> Path:
    """Write ``out/<name>/`` (config.pbtxt, 1/model.py[, 1/bundle.plan]) for bundle ``engine``; return that
    folder. BadInputError for a bad option, BundleError for a bundle that does not open or verify, OutputError
    when the folder exists (without ``overwrite``) or cannot be written."""
    from runtime.backends import BACKENDS

    engine, out = Path(engine), Path(out)
    name = engine.stem if name is None else name
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BadInputError(f"--name {name!r} is not a usable model name: use letters, digits, '_', '.', '-' "
                            "(at most 128, starting with a letter or digit)")
    _check_count("--instances", instances, 1, MAX_INSTANCES, "e.g. 1 per core group or GPU")
    _check_count("--max-queue-delay-us", max_queue_delay_us, 0, MAX_QUEUE_DELAY_US, "e.g. 0 or 2000")
    if backend not in BACKENDS:
        raise BadInputError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    gpu_ids = parse_gpus(gpus)
    dest = out / name
    if dest.exists() and not overwrite:
        raise OutputError(f"{dest} exists: pass --overwrite to replace that model, or choose another --name")
    with Bundle.open(engine, verify=True) as bundle:  # a bundle that does not verify is refused here already
        bundle_max = bundle.manifest.max_batch
        digest = bundle.manifest_sha256
        tensorrt = any(c.backend == "tensorrt" for c in bundle.components)
    if max_batch is None:
        max_batch = bundle_max
    _check_count("--max-batch", max_batch, 1, bundle_max, f"this bundle takes 1..{bundle_max} images per call")
    if tensorrt and not gpu_ids:
        gpu_ids = (0,)  # TensorRT engines run on a GPU only
    spec = ModelSpec(name, COPIED_BUNDLE if copy else str(engine.resolve()), digest, max_batch, instances, gpu_ids,
                     max_queue_delay_us, backend)
    staging = staging_dir(dest)
    try:
        version = staging / "1"
        version.mkdir()
        shutil.copyfile(MODEL_TEMPLATE, version / "model.py")
        if copy:
            shutil.copyfile(engine, version / COPIED_BUNDLE)
        (staging / "config.pbtxt").write_text(config_pbtxt(spec), encoding="utf-8")
        replace_dir(staging, dest)
    except OSError as e:
        raise OutputError(f"cannot write the model folder {dest}: {e.strerror or e}; check the path, permissions "
                          "and free space") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def parse_gpus(gpus: str | None) -> tuple[int, ...]:
    """``"0,1"`` -> ``(0, 1)``; None or ``""`` -> ``()`` (CPU instances)."""
    if gpus is None or gpus == "":
        return ()
    parts = [p.strip() for p in str(gpus).split(",")]
    if not all(p.isdigit() and len(p) <= 3 for p in parts) or len(set(parts)) != len(parts):
        raise BadInputError("--gpus must list distinct GPU ids separated by commas, e.g. 0 or 0,1")
    return tuple(int(p) for p in parts)


def config_pbtxt(spec: ModelSpec) -> str:
    """The model's ``config.pbtxt`` (protobuf text format of Triton's ModelConfig)."""
    inputs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ 1 ]{" optional: true" if opt else ""} }}'
                        for n, t, opt in INPUTS)
    outputs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: {dims} }}' for n, t, dims in OUTPUTS)
    if spec.gpus:
        groups = ",\n".join(f"  {{ count: {spec.instances} kind: KIND_GPU gpus: [ {g} ] }}" for g in spec.gpus)
    else:
        groups = f"  {{ count: {spec.instances} kind: KIND_CPU }}"
    params = {"bundle": spec.bundle, "bundle_manifest_sha256": spec.manifest_sha256, "backend": spec.backend}
    parameters = ",\n".join(f'  {{ key: "{k}" value: {{ string_value: "{_pbtxt_string(v)}" }} }}'
                            for k, v in params.items())
    return (f'# written by `runtime triton-repo`: the bundle is verified (sha256) once per instance at load\n'
            f'name: "{spec.name}"\nbackend: "python"\nmax_batch_size: {spec.max_batch}\n'
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {spec.max_queue_delay_us}\n}}\n"
            f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\ninstance_group [\n{groups}\n]\n"
            f"parameters [\n{parameters}\n]\n")


def _pbtxt_string(value: str) -> str:
    if any(ord(ch) < 32 for ch in value):
        raise BadInputError("the bundle path contains control characters: move the bundle to a plain path")
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _check_count(flag: str, value, low: int, high: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadInputError(f"{flag} {value!r} must be an integer in {low}..{high}: {hint}")
