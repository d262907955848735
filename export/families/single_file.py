"""The project's single-file backbone format: one ``.safetensors`` that loads fully offline.

Layout. Every ``torch.nn.Module`` component's state dict is stored under its pipeline name as a prefix
(``unet.``, ``vae.``, ``text_encoder.``, ``text_encoder_2.``). The safetensors metadata holds one key,
``backbone``, a JSON object::

    {"format": "guarded-t2i-backbone", "version": 1, "family": "sdxl",
     "model_index": {...model_index.json...},
     "configs": {"unet": {...}, "vae": {...}, "text_encoder": {...}, "scheduler": {...}},
     "files": {"tokenizer": {"vocab.json": "...", "merges.txt": "...", "tokenizer.json": "...", ...}}}

``configs`` has each model's and the scheduler's config, ``files`` the text files each tokenizer (or
other ``save_pretrained`` component) writes, plus CLIP's ``vocab.json`` / ``merges.txt`` recovered from
``tokenizer.json`` when transformers does not write them (the lean runtime tokenizer reads those).
Loading rebuilds each component from its config and loads its weights strictly, so a saved backbone
loads back bit-identical.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import tempfile
from pathlib import Path

import diffusers
import torch
from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin
from safetensors import safe_open
from safetensors.torch import save_file

from .backbone import PIPELINE_FAMILIES, Backbone, BackboneError

FORMAT = "guarded-t2i-backbone"
FORMAT_VERSION = 1
METADATA_KEY = "backbone"

ORIGINAL_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")
"""Key prefixes of original-layout (CompVis/Stability "LDM") checkpoints, as shared for SD 1.5 and SDXL."""


def read_header(path: Path) -> tuple[dict[str, str], list[str]]:
    """The metadata and tensor names of a safetensors file; a corrupt or truncated file is a ``BackboneError``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), list(f.keys())
    except Exception as exc:  # SafetensorError (header too small/large, incomplete buffer) or OSError
        raise BackboneError(f"{path} is not a readable .safetensors file ({BackboneError.reason(exc)}); it is corrupt "
                            f"or truncated: copy or download it again") from None


def checkpoint_kind(metadata: dict[str, str], keys: list[str]) -> str | None:
    """"project" for this module's format, "original" for an LDM-layout checkpoint, None otherwise."""
    if METADATA_KEY in metadata:
        return "project"
    if any(key.startswith(ORIGINAL_PREFIXES) for key in keys):
        return "original"
    return None


def save_single_file(backbone_or_pipeline: Backbone | DiffusionPipeline, path: str | Path) -> Path:
    """Write a backbone (or a supported pipeline) to ``path`` (a ``.safetensors`` name) in the project's
    single-file format. The file is written beside ``path`` under a temporary name and renamed into
    place, so an existing file is never half-overwritten."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise BackboneError(f"{path}: a single-file backbone must be named *.safetensors (rename the output)")
    if isinstance(backbone_or_pipeline, Backbone):
        pipeline, family = backbone_or_pipeline.pipeline, backbone_or_pipeline.family
    else:
        pipeline = backbone_or_pipeline
        family = Backbone.from_pipeline(pipeline, source=path).family  # validates the pipeline too
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, dict] = {}
    files: dict[str, dict[str, str]] = {}
    for name, component in sorted(pipeline.components.items()):
        if component is None:
            continue
        if isinstance(component, torch.nn.Module):
            configs[name] = _module_config(component)
            for key, tensor in component.state_dict().items():
                tensors[f"{name}.{key}"] = tensor.detach().cpu().contiguous()
        elif isinstance(component, ConfigMixin):
            configs[name] = json.loads(component.to_json_string())
        elif hasattr(component, "save_pretrained"):
            files[name] = saved_files(component)
        else:
            raise BackboneError(f"{path}: component {name!r} ({type(component).__name__}) cannot be serialised "
                                f"(drop it from the pipeline before saving)")
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "family": family,
                "model_index": json.loads(pipeline.to_json_string()), "configs": configs, "files": files}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file(tensors, str(partial), metadata={"format": "pt", METADATA_KEY: json.dumps(manifest)})
        os.replace(partial, path)
    except Exception as exc:  # OSError, or SafetensorError for tensors safetensors cannot store
        raise BackboneError(f"cannot write {path} ({BackboneError.reason(exc)}); check the folder is writable "
                            f"and has space") from None
    finally:
        partial.unlink(missing_ok=True)
    return path


def load_single_file(path: Path, *, dtype: torch.dtype = torch.float32) -> tuple[DiffusionPipeline, str]:
    """Rebuild the pipeline stored by ``save_single_file``; returns it and the family recorded in the file."""
    metadata, keys = read_header(path)
    manifest = _manifest(path, metadata)
    model_index = manifest["model_index"]
    class_name = model_index.get("_class_name")
    if class_name not in PIPELINE_FAMILIES:
        raise BackboneError(f"{path}: unsupported pipeline class {class_name!r} in the file (supported: "
                            f"{', '.join(PIPELINE_FAMILIES)})")
    components: dict[str, object] = {}
    pipeline_kwargs: dict[str, object] = {}
    with safe_open(str(path), framework="pt") as weights, tempfile.TemporaryDirectory(prefix="backbone_") as scratch:
        for name, entry in model_index.items():
            if name.startswith("_"):
                continue
            if not isinstance(entry, list):
                pipeline_kwargs[name] = entry  # pipeline options such as requires_safety_checker
                continue
            library, component_class = entry
            if library is None:
                components[name] = None
                continue
            try:
                cls = _component_class(library, component_class)
                if issubclass(cls, torch.nn.Module):
                    prefix = f"{name}."
                    state = {key[len(prefix):]: weights.get_tensor(key) for key in keys if key.startswith(prefix)}
                    components[name] = _build_module(cls, manifest["configs"][name], state, dtype)
                elif issubclass(cls, ConfigMixin):
                    components[name] = cls.from_config(manifest["configs"][name])
                else:
                    folder = Path(scratch) / name
                    folder.mkdir()
                    for file_name, text in manifest["files"][name].items():
                        (folder / file_name).write_text(text, encoding="utf-8")
                    components[name] = cls.from_pretrained(folder, local_files_only=True)
            except Exception as exc:
                raise BackboneError(f"{path}: cannot rebuild component {name!r} ({BackboneError.reason(exc)}); "
                                    f"the file is damaged or from another version: save it again") from None
    pipeline_class = getattr(diffusers, class_name)
    if class_name == "StableDiffusionXLPipeline":
        pipeline_kwargs["add_watermarker"] = False
    try:
        pipeline = pipeline_class(**components, **pipeline_kwargs)
    except Exception as exc:
        raise BackboneError(f"{path}: cannot assemble a {class_name} ({BackboneError.reason(exc)}); save the "
                            f"file again from a loadable pipeline") from None
    return pipeline, manifest["family"]


def saved_files(component) -> dict[str, str]:
    """The text files ``component.save_pretrained`` writes, by name; for a byte-level BPE tokenizer also
    CLIP's ``vocab.json`` and ``merges.txt`` (transformers 5 writes only ``tokenizer.json``)."""
    with tempfile.TemporaryDirectory(prefix="component_") as scratch:
        component.save_pretrained(scratch)
        files = {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(scratch).iterdir()) if p.is_file()}
    if "tokenizer.json" in files and "vocab.json" not in files:
        model = json.loads(files["tokenizer.json"])["model"]
        if model.get("type") == "BPE":
            merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
            files["vocab.json"] = json.dumps(model["vocab"], ensure_ascii=False)
            files["merges.txt"] = "#version: 0.2\n" + "\n".join(merges) + "\n"
    return files


def _manifest(path: Path, metadata: dict[str, str]) -> dict:
    try:
        manifest = json.loads(metadata[METADATA_KEY])
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format is {manifest.get('format')!r}")
        for key in ("model_index", "configs", "files", "family"):
            manifest[key]  # noqa: B018 - presence check
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise BackboneError(f"{path}: its {METADATA_KEY!r} metadata is not a {FORMAT} manifest "
                            f"({BackboneError.reason(exc)}); save it again with save_single_file") from None
    if manifest.get("version") != FORMAT_VERSION:
        raise BackboneError(f"{path}: single-file format version {manifest.get('version')!r} is not supported "
                            f"(this code reads version {FORMAT_VERSION}); save it again with this version")
    return manifest


def _component_class(library: str, class_name: str) -> type:
    """Resolve a model_index entry the way diffusers does (pipeline submodules first, then the library)."""
    if hasattr(diffusers.pipelines, library):
        module = getattr(diffusers.pipelines, library)
    else:
        module = importlib.import_module(library)
    return getattr(module, class_name)


def _module_config(module: torch.nn.Module) -> dict:
    if isinstance(module, ModelMixin):
        return json.loads(module.to_json_string())
    return module.config.to_dict()  # transformers PreTrainedModel


def _build_module(cls: type, config: dict, state: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.nn.Module:
    """Instantiate ``cls`` from ``config`` without initialising weights and load ``state`` strictly, cast
    to ``dtype`` except for the modules the class keeps in float32 (as ``from_pretrained`` does)."""
    keep_fp32 = getattr(cls, "_keep_in_fp32_modules", None) or []
    keep_fp32 = [keep_fp32] if isinstance(keep_fp32, str) else list(keep_fp32)
    for key, tensor in state.items():
        if tensor.is_floating_point() and not any(m in key.split(".") for m in keep_fp32):
            state[key] = tensor.to(dtype)
    with _empty_weights():
        if issubclass(cls, ModelMixin):
            module = cls.from_config(config)
        else:
            module = cls._from_config(cls.config_class.from_dict(config))
    module.load_state_dict(state, strict=True, assign=True)
    meta = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(f"no weights for {', '.join(meta[:3])}")
    return module.eval()


def _empty_weights():
    """Parameters created on the meta device (no random init) when accelerate is installed."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        return contextlib.nullcontext()
    return init_empty_weights(include_buffers=False)

