"""Build a ``.plan`` bundle from a local diffusers model: export graphs, FP16, TensorRT, pack.

Stages (one progress line each): load backbone -> export ONNX graphs -> FP16 conversion (per component, as
the build profile or ``--precision`` says; graphs that refuse FP16, like SDXL's VAE, stay FP32) ->
TensorRT engines (``--backend tensorrt``: sanitize + strongly typed build with one optimisation profile)
-> tokenizer files -> write the bundle atomically.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from runtime.errors import BackendError, BadInputError
from runtime.guards.image_checker import check_config
from runtime.manifest import Manifest

from guards import GUARDS

from .bundle import onnx_component, tokenizer_components, write_bundle
from .idle import IDLE_GRAPH, IDLE_MODES, export_idle_graph, share_weights, wants_idle_graph

KIND_OF_GRAPH = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder", "denoise": "denoise",
                 "denoise_idle": "denoise", "vae_decoder": "vae_decoder"}
"""Component kind of each backbone graph; a guard's own graphs (``redirect``, ``safepatch``) are kind
``guard`` and take the build profile's precision of their own name (default fp32)."""


@dataclass
class BuildOptions:
    model: Path
    out: Path
    backend: str = "onnx"                 # onnx | tensorrt
    precision: str | None = None          # fp32 | fp16 | None (= the build profile's per-component choice)
    height: int | None = None             # None: the model's own (UNet sample_size x VAE factor)
    width: int | None = None
    batch: str | None = None              # "MIN:OPT:MAX" prompts per call (TensorRT profile)
    dynamic_hw: bool = False
    profile: str | None = None            # engines/profiles/<name>.json or a path; default: the first whose
                                          # "match" fits the backbone, else the family's
    guards: list[str] = field(default_factory=list)
    guard_dir: Path | None = None         # root of trained guard weights (default: models/guards)
    guard_settings: dict = field(default_factory=dict)  # {guard: {key: value}}: run-time settings over its config
    guard_weights: dict = field(default_factory=dict)   # {guard: folder}: weights from elsewhere than guard_dir
    exporter: str | None = None
    timing_cache: Path | None = None
    config: Path | None = None            # local diffusers folder for an original-layout checkpoint
    family: str | None = None
    checker: Path | None = None           # ONNX image classifier embedded as component "image_checker"
    checker_config: Path | None = None    # its JSON config (default: the .json beside the .onnx)
    idle_graph: str = "auto"              # guarded ONNX bundles: denoise_idle "auto" | "always" | "never" (idle.py)


def _checker_entry(opts: BuildOptions) -> dict | None:
    """The manifest ``guards["image_checker"]`` entry for ``--checker`` (None without it): the config with every
    default filled in and range-checked (BadInputError, exit 3, naming the file)."""
    if opts.checker is None:
        if opts.checker_config is not None:
            raise BadInputError(f"--checker-config {opts.checker_config} needs --checker FILE.onnx")
        return None
    checker = Path(opts.checker)
    if not checker.is_file():
        raise BadInputError(f"--checker {checker} not found: pass an ONNX image classifier, e.g. "
                            "models/tinyworld-judge/checker.onnx")
    config_path = opts.checker_config
    if config_path is None and checker.with_suffix(".json").is_file():
        config_path = checker.with_suffix(".json")
    config = {}
    if config_path is not None:
        try:
            config = json.loads(Path(config_path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise BadInputError(f"--checker-config {config_path} is not readable JSON ({e}): fix the file") from None
        if not isinstance(config, dict):
            raise BadInputError(f"--checker-config {config_path} must hold a JSON object")
    config.pop("path", None)
    # every setting written out, checked as the runtime checks it: a bundle's checker entry is complete
    return check_config({**config, "component": "image_checker"}, "user", f"--checker-config {config_path or checker}")


def guards_section(guards: dict, checker: dict | None) -> dict:
    """The manifest's ``guards``: each guard's entry (``{name: GuardParts}``) in registry order, the image checker
    last (the order the runtime runs them in)."""
    return {**{name: guards[name].config for name in GUARDS if name in guards},
            **({"image_checker": checker} if checker is not None else {})}


def _check_request(opts: BuildOptions) -> None:
    """Reject what cannot be built before spending minutes on export."""
    if opts.backend not in ("onnx", "tensorrt"):
        raise BadInputError(f"--backend {opts.backend!r} is not one of onnx, tensorrt")
    if opts.precision not in (None, "fp32", "fp16"):
        raise BadInputError(f"--precision {opts.precision!r} is not one of fp32, fp16")
    if opts.idle_graph not in IDLE_MODES:
        raise BadInputError(f"--idle-graph {opts.idle_graph!r} is not one of {', '.join(IDLE_MODES)}")
    unknown = [g for g in opts.guards if g not in GUARDS]
    if unknown:
        raise BadInputError(f"--guards: unknown guard(s) {', '.join(unknown)} (known: {', '.join(GUARDS)})")
    if len(set(opts.guards)) != len(opts.guards):
        raise BadInputError(f"--guards {','.join(opts.guards)}: a guard is named twice")
    for name, v in (("--height", opts.height), ("--width", opts.width)):
        if v is not None and (v <= 0 or v % 8):
            raise BadInputError(f"{name} {v} must be a positive multiple of 8")
    if opts.backend == "tensorrt":
        from .tensorrt import gpu_available, tensorrt_available

        for ok, reason in (tensorrt_available(), gpu_available()):
            if not ok:
                raise BackendError(f"--backend tensorrt: {reason}; or build with --backend onnx")
    out = Path(opts.out)
    if out.exists() and out.is_dir():
        raise BadInputError(f"--out {out} is a directory; give a file name such as {out / 'model.plan'}")
    if not out.parent.exists():
        raise BadInputError(f"--out {out}: folder {out.parent} does not exist; create it first")


def _tokenizer_dirs(backbone, tmp: Path) -> list[tuple[str, Path]]:
    """Write each tokenizer in CLIP layout (vocab.json + merges.txt) for the lean runtime."""
    from .families.single_file import saved_files

    dirs = []
    for spec in backbone.text_encoders:
        d = tmp / spec.tokenizer_name
        d.mkdir(parents=True, exist_ok=True)
        for fname, text in saved_files(getattr(backbone.pipeline, spec.tokenizer_name)).items():
            (d / fname).write_text(text, encoding="utf-8")
        dirs.append((spec.tokenizer_name, d))
    return dirs


def build(opts: BuildOptions) -> Path:
    """Build the bundle ``opts.out``; returns its path. Raises runtime.errors.* on bad input."""
    import torch

    from .families import BackboneError, load_backbone

    from .fp16 import FP16Refused, convert_to_fp16
    from .graphs import DEFAULT_EXPORTER, export_all
    from .tensorrt import parse_batch, select_build_profile

    _check_request(opts)
    checker = _checker_entry(opts)
    t0 = time.perf_counter()
    stages = ["load", "export", "precision"] + (["tensorrt"] if opts.backend == "tensorrt" else []) + ["bundle"]
    bar = tqdm(total=len(stages), desc="build", unit="stage", bar_format="{desc}: {n}/{total} stages |{bar}| {elapsed}")

    def stage(msg):
        bar.set_description(f"build: {msg}")

    stage("loading backbone")
    try:
        backbone = load_backbone(opts.model, family=opts.family, config=opts.config, dtype=torch.float32)
    except BackboneError as e:
        raise BadInputError(str(e)) from None
    try:
        profile = select_build_profile(backbone, opts.profile)
    except Exception as e:  # unknown profile name / broken JSON
        raise BadInputError(f"--profile {opts.profile or backbone.family}: {e}") from None
    height = opts.height or backbone.image_size
    width = opts.width or backbone.image_size
    batch = parse_batch(opts.batch or profile.get("batch", "1:1:4"))
    exporter = opts.exporter or DEFAULT_EXPORTER
    from .guards import prepare as prepare_guards

    guards = prepare_guards(opts.guards, backbone, opts.model, opts.guard_dir, image_hw=(height, width),
                            settings=opts.guard_settings, weights=opts.guard_weights)
    bar.update()

    out = Path(opts.out)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out.parent) as tmpdir:
        tmp = Path(tmpdir)
        stage("exporting ONNX graphs")
        common = dict(exporter=exporter, progress=lambda m: stage(m), height=height, width=width,
                      dynamic_hw=opts.dynamic_hw)
        specs = export_all(backbone, tmp / "fp32", text_heads=[h for g in guards.values() for h in g.text_heads],
                           residual_inputs=any(g.residual_inputs for g in guards.values()),
                           extensions=[e for g in guards.values() for e in g.extensions], **common)
        for g in guards.values():
            specs += [export_graph(tmp / "fp32", common) for export_graph in g.graphs]
        if opts.backend == "onnx" and wants_idle_graph(guards, opts.idle_graph):
            specs.append(export_idle_graph(backbone, guards, tmp / "fp32", common))
        bar.update()

        stage("precision")
        notes, graphs = {}, []  # (spec, onnx path, precision)
        for spec in specs:
            kind = KIND_OF_GRAPH.get(spec["name"], "guard")
            want = opts.precision or profile.get("precision", {}).get(kind if kind != "guard" else spec["name"],
                                                                      "fp32")
            path, prec = Path(spec["path"]), "fp32"
            if want == "fp16":
                stage(f"fp16 {spec['name']}")
                dst = tmp / "fp16" / f"{spec['name']}.onnx"
                dst.parent.mkdir(exist_ok=True)
                try:
                    convert_to_fp16(path, dst)
                    path, prec = dst, "fp16"
                except FP16Refused as e:
                    notes[spec["name"]] = str(e)
            graphs.append((spec, path, prec))
        bar.update()

        components, payloads = [], {}
        if opts.backend == "tensorrt":
            from .sanitize import sanitize_onnx
            from .tensorrt import build_engine, profile_from_flags

            for spec, path, prec in graphs:
                stage(f"tensorrt {spec['name']}")
                clean = tmp / "trt" / f"{spec['name']}.onnx"
                clean.parent.mkdir(exist_ok=True)
                sanitize_onnx(path, clean)
                text_length = max(enc.max_length for enc in backbone.text_encoders)  # the text stages' symbolic L
                shapes = profile_from_flags(spec["inputs"], batch, height, width, backbone.vae_scale_factor,
                                            symbols={"L": (1, text_length, text_length)})
                engine = tmp / "trt" / f"{spec['name']}.engine"
                info = build_engine(clean, engine, profile=shapes, timing_cache=opts.timing_cache,
                                    workspace_gb=profile.get("workspace_gb"))
                comps, _ = onnx_component(spec["name"], KIND_OF_GRAPH.get(spec["name"], "guard"), clean,
                                          precision=prec)
                graph = comps[0]  # I/O names and symbolic shapes come from the graph
                for k, v in info.manifest_fields().items():
                    setattr(graph, k, v)
                graph.extra = {"device": info.device_name, "build_seconds": info.build_seconds}
                components.append(graph)
                payloads[graph.name] = engine
            bar.update()
        else:
            paths = {spec["name"]: path for spec, path, _ in graphs}
            shared, data_of = None, {}  # graph -> its external-data component (the idle graph shares denoise's)
            if IDLE_GRAPH in paths:  # one external-data file for both denoise graphs
                stage("sharing the denoise weights")
                paths["denoise"], paths[IDLE_GRAPH], shared = share_weights(paths["denoise"], paths[IDLE_GRAPH],
                                                                            tmp / "shared")
            for spec, _, prec in graphs:
                name = spec["name"]
                extra = {"exporter": spec.get("exporter", exporter), **({"note": notes[name]} if name in notes else {})}
                if name == IDLE_GRAPH:
                    extra |= {"idle_of": "denoise", "shared_weights": shared}
                comps, pays = onnx_component(name, KIND_OF_GRAPH.get(name, "guard"), paths[name], precision=prec,
                                             extra=extra, shared_data=data_of.get("denoise") if name == IDLE_GRAPH
                                             else None)
                data_of[name] = comps[0].external_data
                components += comps
                payloads |= pays

        if checker is not None:  # an ONNX graph on every backend (small; runs on ONNX Runtime)
            comps, pays = onnx_component("image_checker", "guard", opts.checker, precision="fp32",
                                         extra={"source": Path(opts.checker).name})
            components += comps
            payloads |= pays

        stage("writing bundle")
        tokenizers = []
        for (name, d), enc in zip(_tokenizer_dirs(backbone, tmp / "tokenizers"), backbone.text_encoders):
            comps, pays, entry = tokenizer_components(d, name=name, encoder=enc.name, bos_id=enc.bos_id,
                                                      eos_id=enc.eos_id)
            components += comps
            payloads |= pays
            tokenizers.append(entry)
        manifest = Manifest(
            family=backbone.family, components=components, tokenizers=tokenizers,
            scheduler=json.loads(json.dumps(dict(backbone.scheduler.config), default=str)),
            latent={"channels": backbone.latent_channels, "scale_factor": backbone.vae_scale_factor,
                    "scaling_factor": backbone.vae_scaling_factor},
            guards=guards_section(guards, checker),
            defaults={"steps": profile["defaults"]["steps"], "guidance_scale": profile["defaults"]["guidance_scale"],
                      "scheduler": profile["defaults"]["scheduler"], "height": height, "width": width,
                      "prediction_type": backbone.prediction_type, "batch": list(batch),
                      "dynamic_hw": opts.dynamic_hw,
                      **({"force_zeros_for_empty_prompt": bool(backbone.pipeline.config.get(
                          "force_zeros_for_empty_prompt", True))} if backbone.family == "sdxl" else {})},
            created_by=_provenance(opts, exporter, profile, backbone),
        )
        path = write_bundle(out, manifest, payloads)
        bar.update()
    bar.set_description(f"build: done in {time.perf_counter() - t0:.1f} s")
    bar.close()
    return path


def _provenance(opts: BuildOptions, exporter: str, profile: dict, backbone) -> dict:
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {"tool": "python -m export build", "source": str(opts.model), "profile": profile.get("family"),
            "exporter": exporter, "backend": opts.backend, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": platform.python_version(),
            "versions": {p: version(p) for p in ("torch", "diffusers", "transformers", "onnx", "onnxruntime")}}
