"""The manifest of a ``.plan`` engine bundle: what is inside it and how to run it.

The manifest is the JSON document stored after the bundle header (layout: ``runtime/bundle.py`` and
``engines/BUNDLE.md``). It lists every component (ONNX graph, serialized TensorRT engine, ONNX external data,
tokenizer file) with its byte range and sha256 in the bundle, its I/O contract and, for engines, the TensorRT
version and GPU compute capability it was built for; plus the tokenizers, scheduler config, latent scaling,
guard configuration and generation defaults.

Every class round-trips through JSON with ``to_dict`` / ``from_dict``. ``from_dict`` checks the structure and
raises a one-line :class:`~runtime.errors.BundleError`; ``Manifest.validate`` checks cross references
(external data, tokenizer files) and that every component unpacks to a safe, unique relative path.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import PurePosixPath
from typing import Any

from runtime.errors import BundleError

FORMAT_VERSION = 1
BACKENDS = ("onnx", "tensorrt", "file")
# File name suffix of an unpacked component, by backend (``extra["filename"]`` overrides it).
UNPACK_SUFFIX = {"onnx": ".onnx", "tensorrt": ".engine", "file": ""}
RESERVED_FILENAMES = ("manifest.json",)  # `runtime unpack` writes the manifest under this name

Dim = int | str  # a fixed size, or a symbolic one such as "batch", "2B", "h"


@dataclass
class TensorSpec:
    """One graph input or output: name, shape (ints or symbolic dim names) and dtype (numpy name)."""

    name: str
    shape: list[Dim]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "tensor") -> TensorSpec:
        _check_fields(cls, d, where)
        spec = cls(**d)
        _expect(spec.name, str, f"{where}.name")
        _expect(spec.dtype, str, f"{where}.dtype")
        _expect(spec.shape, list, f"{where}.shape")
        for dim in spec.shape:
            if isinstance(dim, bool) or not isinstance(dim, (int, str)):
                raise BundleError(f"manifest {where}.shape has dim {dim!r}, expected an int or a name: "
                                  "the bundle is corrupt; rebuild it")
        return spec

    def describe(self) -> str:
        """``name [2B,4,h,w] float16``."""
        return f"{self.name} [{','.join(str(d) for d in self.shape)}] {self.dtype}"


@dataclass
class ComponentSpec:
    """One payload of the bundle. ``offset``/``size``/``sha256`` are filled in by the bundle writer."""

    name: str
    kind: str  # e.g. "text_encoder", "denoise", "redirect", "vae_decoder", "external_data", "tokenizer"
    backend: str  # "onnx" | "tensorrt" | "file"
    offset: int = 0
    size: int = 0
    sha256: str = ""
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    precision: str = ""  # "fp32", "fp16", "mixed", or "" for files
    # TensorRT optimisation profile: input name -> {"min": shape, "opt": shape, "max": shape}
    profiles: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    tensorrt_version: str | None = None  # TensorRT version an engine was built with, e.g. "10.9.0"
    compute_capability: str | None = None  # GPU an engine was built for, e.g. "9.0"
    external_data: str | None = None  # name of the component holding this ONNX graph's external data
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"filename": "unet.onnx.data"}

    @property
    def filename(self) -> str:
        """Relative path of the component when unpacked: ``extra["filename"]``, else name + backend suffix.

        An ONNX external-data component must keep the file name its graph references, so the exporter
        stores that name in ``extra["filename"]``; tokenizer files keep their original names the same way.
        """
        return self.extra.get("filename") or self.name + UNPACK_SUFFIX[self.backend]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = [t.to_dict() for t in self.inputs]
        d["outputs"] = [t.to_dict() for t in self.outputs]
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "component") -> ComponentSpec:
        _check_fields(cls, d, where)
        d = dict(d)
        for key in ("inputs", "outputs"):
            items = _expect(d.get(key, []), list, f"{where}.{key}")
            d[key] = [TensorSpec.from_dict(t, f"{where}.{key}[{i}]") for i, t in enumerate(items)]
        spec = cls(**d)
        for key in ("name", "kind", "backend", "sha256", "precision"):
            _expect(getattr(spec, key), str, f"{where}.{key}")
        for key in ("tensorrt_version", "compute_capability", "external_data"):
            _expect(getattr(spec, key), (str, type(None)), f"{where}.{key}")
        for key in ("profiles", "extra"):
            _expect(getattr(spec, key), dict, f"{where}.{key}")
        for key in ("offset", "size"):
            value = getattr(spec, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BundleError(f"manifest {where}.{key} is {value!r}, expected a byte count: "
                                  "the bundle is corrupt; rebuild it")
        if spec.backend not in BACKENDS:
            raise BundleError(f"manifest {where} has backend {spec.backend!r}, this runtime knows "
                              f"{', '.join(BACKENDS)}: upgrade the runtime or rebuild the bundle")
        return spec


@dataclass
class Manifest:
    """Everything the runtime needs to know about a bundle, besides the payload bytes."""

    family: str  # "sd1", "sd2", "sdxl", "tinyworld", ...
    components: list[ComponentSpec]
    format_version: int = FORMAT_VERSION
    # One entry per text encoder: {"name": "tokenizer", "files": {"vocab.json": <component name>,
    # "merges.txt": <component>, "tokenizer_config.json": <component>}, "max_length": 77, "pad_id": 49407}
    tokenizers: list[dict[str, Any]] = field(default_factory=list)
    scheduler: dict[str, Any] = field(default_factory=dict)  # diffusers-style scheduler config
    latent: dict[str, Any] = field(default_factory=dict)  # channels, scale_factor (VAE), scaling_factor
    guards: dict[str, Any] = field(default_factory=dict)  # thresholds, beam width, check steps, EMA alpha
    defaults: dict[str, Any] = field(default_factory=dict)  # steps, guidance, height, width, scheduler
    created_by: dict[str, Any] = field(default_factory=dict)  # exporter, versions, source model, date

    @property
    def max_batch(self) -> int:
        """The most images one call may generate: the top of the exporter's batch range ``defaults["batch"]``."""
        return int((self.defaults.get("batch") or [1, 1, 1])[-1])

    def component(self, name: str) -> ComponentSpec:
        """The component called ``name``; a BundleError listing the available ones if there is none."""
        for c in self.components:
            if c.name == name:
                return c
        have = ", ".join(c.name for c in self.components) or "none"
        raise BundleError(f"bundle has no component {name!r} (it has: {have}): "
                          "rebuild the bundle with that component or pick another bundle")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["components"] = [c.to_dict() for c in self.components]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        _check_fields(cls, d, "manifest")
        d = dict(d)
        items = _expect(d["components"], list, "manifest.components")
        d["components"] = [ComponentSpec.from_dict(c, f"component[{i}]") for i, c in enumerate(items)]
        manifest = cls(**d)
        if isinstance(manifest.format_version, bool) or not isinstance(manifest.format_version, int):
            raise BundleError(f"manifest.format_version is {manifest.format_version!r}, expected an int: "
                              "the bundle is corrupt; rebuild it")
        _expect(manifest.family, str, "manifest.family")
        _expect(manifest.tokenizers, list, "manifest.tokenizers")
        for key in ("scheduler", "latent", "guards", "defaults", "created_by"):
            _expect(getattr(manifest, key), dict, f"manifest.{key}")
        return manifest

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON, as stored in the bundle."""
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        try:
            d = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"manifest is not valid JSON ({e}): the bundle is corrupt; rebuild it") from None
        manifest = cls.from_dict(d)
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Check cross references and unpack paths; raise a one-line BundleError on the first problem."""
        names = [c.name for c in self.components]
        for name in names:
            if not name or names.count(name) > 1:
                raise BundleError(f"manifest component name {name!r} is empty or repeated: rebuild the bundle")
        by_name = {c.name: c for c in self.components}
        _check_unpack_paths(self.components)
        for c in self.components:
            if c.external_data is not None:
                _check_external_data(c, by_name.get(c.external_data))
        for i, tok in enumerate(self.tokenizers):
            files = tok.get("files") if isinstance(tok, dict) else None
            if not isinstance(files, dict) or not files:
                raise BundleError(f"manifest tokenizers[{i}] has no 'files' mapping (file name -> component): "
                                  "rebuild the bundle")
            for filename, comp in files.items():
                if comp not in by_name:
                    raise BundleError(f"manifest tokenizers[{i}] file {filename!r} names missing component "
                                      f"{comp!r}: rebuild the bundle")


def _check_unpack_paths(components: list[ComponentSpec]) -> None:
    """Every component must unpack to a unique relative path inside the target folder (no ``..``)."""
    seen: dict[str, str] = {}
    for c in components:
        name = c.filename
        if not isinstance(name, str):
            raise BundleError(f"manifest component {c.name!r} has a non-string extra.filename: rebuild the bundle")
        path = PurePosixPath(name)
        if (not name or "\\" in name or path.is_absolute() or ".." in path.parts
                or str(path) != name or name in RESERVED_FILENAMES):
            raise BundleError(f"manifest component {c.name!r} has unsafe or reserved file name {name!r} "
                              "(must be a plain relative path): the bundle is corrupt or tampered; rebuild it")
        if name in seen:
            raise BundleError(f"manifest components {seen[name]!r} and {c.name!r} both unpack to {name!r}: "
                              "set distinct extra['filename'] values and rebuild the bundle")
        seen[name] = c.name


def _check_external_data(graph: ComponentSpec, data: ComponentSpec | None) -> None:
    """An ONNX graph's external data is a "file" component unpacked next to the graph, under its own name."""
    if graph.backend != "onnx":
        raise BundleError(f"manifest component {graph.name!r} is {graph.backend}, only ONNX graphs have "
                          "external data: rebuild the bundle")
    if data is None or data.backend != "file":
        raise BundleError(f"manifest component {graph.name!r} names external data {graph.external_data!r}, "
                          "which is not a 'file' component of the bundle: rebuild the bundle")
    if "filename" not in data.extra:
        raise BundleError(f"manifest external-data component {data.name!r} lacks extra['filename'] (the file "
                          f"name graph {graph.name!r} references): rebuild the bundle")
    if PurePosixPath(data.filename).parent != PurePosixPath(graph.filename).parent:
        raise BundleError(f"manifest external data {data.filename!r} would not unpack next to its graph "
                          f"{graph.filename!r}: rebuild the bundle")


def _check_fields(cls: type, d: Any, where: str) -> None:
    """``d`` is a JSON object with every required field of dataclass ``cls`` and no unknown one."""
    where = "manifest" if where == "manifest" else f"manifest {where}"
    if not isinstance(d, dict):
        raise BundleError(f"{where} is {type(d).__name__}, expected a JSON object: the bundle is corrupt; "
                          "rebuild it")
    known = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    if missing := sorted(required - set(d)):
        raise BundleError(f"{where} lacks {', '.join(missing)}: the bundle is corrupt or was "
                          "written by another exporter; rebuild it")
    if unknown := sorted(set(d) - known):
        raise BundleError(f"{where} has unknown field(s) {', '.join(unknown)}: the bundle was "
                          "written by a newer exporter; upgrade the runtime or rebuild the bundle")


def _expect(value: Any, types: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, types):
        raise BundleError(f"manifest {where} is {type(value).__name__} {value!r:.40}, of the wrong type: "
                          "the bundle is corrupt; rebuild it")
    return value
