"""``load_backbone``: SD 1.x / SD 2.x / SDXL from a local path, never from the hub.

Accepted inputs:

- a diffusers folder (the one holding ``model_index.json``);
- a ``.safetensors`` in the project's single-file format (``save_single_file``), self-contained;
- an original-layout ``.safetensors`` checkpoint (the single files published for SD 1.5 / SD 2.x / SDXL,
  keys ``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*`` / ``conditioner.*``)
  together with ``config=``, a local diffusers folder of the same model that supplies the component
  configs, the scheduler (and so the prediction type) and the tokenizer(s). Its weights are not read.

Every library call gets ``local_files_only=True``. The SD safety checker is not loaded: the backbone is
what gets guarded and exported; the checker is a baseline to load separately.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch

from .backbone import FAMILIES, PIPELINE_FAMILIES, Backbone, BackboneError
from .single_file import checkpoint_kind, load_single_file, read_header

_PIPELINE_KWARGS = {
    "StableDiffusionPipeline": {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
    "StableDiffusionXLPipeline": {"add_watermarker": False},
}


def load_backbone(path: str | Path, *, family: str | None = None, config: str | Path | None = None,
                  dtype: torch.dtype = torch.float32) -> Backbone:
    """Load a backbone from a local diffusers folder or ``.safetensors`` file (see the module docstring).

    ``family`` ("sd1", "sd2", "sdxl") overrides detection; ``config`` is the local diffusers folder an
    original-layout checkpoint needs (ignored for the other inputs); ``dtype`` is the weights' dtype.
    Raises ``BackboneError`` (a ``ValueError`` with a one-line message) for any bad input.
    """
    path = Path(path).expanduser()
    if family is not None and family not in FAMILIES:
        raise BackboneError(f"{path}: unknown family={family!r} (use one of {', '.join(FAMILIES)}, or omit it)")
    if not path.exists():
        raise BackboneError(f"backbone path does not exist: {path} (give a local diffusers folder or .safetensors "
                            f"file; nothing is downloaded)")
    saved_family = None
    if path.is_dir():
        pipeline = _load_folder(path, dtype)
    elif path.suffix != ".safetensors":
        raise BackboneError(f"{path} is not a .safetensors file (give a diffusers folder or a .safetensors "
                            f"checkpoint; convert .ckpt/.bin pickles to safetensors first)")
    else:
        metadata, keys = read_header(path)
        kind = checkpoint_kind(metadata, keys)
        if kind == "project":
            pipeline, saved_family = load_single_file(path, dtype=dtype)
        elif kind == "original":
            pipeline = _load_original(path, config, dtype)
        else:
            raise BackboneError(f"{path} is neither a project single-file backbone nor an original-layout SD "
                                f"checkpoint (no model.diffusion_model.* weights); for one component of a "
                                f"diffusers folder pass the folder itself")
    return Backbone.from_pipeline(pipeline, family=family or saved_family, source=path)


def _load_folder(folder: Path, dtype: torch.dtype):
    pipeline_class = _pipeline_class(folder)
    try:
        return pipeline_class.from_pretrained(folder, local_files_only=True, dtype=dtype,
                                              **_PIPELINE_KWARGS[pipeline_class.__name__])
    except Exception as exc:
        raise BackboneError(f"cannot load the diffusers folder {folder} ({BackboneError.reason(exc)}); check that "
                            f"every component folder listed in model_index.json is complete") from None


def _load_original(path: Path, config: str | Path | None, dtype: torch.dtype):
    if config is None:
        raise BackboneError(f"{path} is an original-layout checkpoint: pass config=<local diffusers folder of the "
                            f"same model> for its component configs and tokenizer (nothing is downloaded)")
    config = Path(config).expanduser()
    if not config.is_dir():
        raise BackboneError(f"config folder does not exist: {config} (config= must be a local diffusers folder "
                            f"for the checkpoint {path})")
    pipeline_class = _pipeline_class(config)
    try:
        return pipeline_class.from_single_file(str(path), config=str(config), local_files_only=True,
                                               dtype=dtype, **_PIPELINE_KWARGS[pipeline_class.__name__])
    except Exception as exc:
        raise BackboneError(f"cannot load the original-layout checkpoint {path} with config {config} "
                            f"({BackboneError.reason(exc)}); check the config folder is of the same model "
                            f"family and size") from None


def _pipeline_class(folder: Path) -> type:
    """The supported pipeline class named by ``folder/model_index.json``."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise BackboneError(f"{folder} has no model_index.json: not a diffusers pipeline folder (give the folder "
                            f"that contains model_index.json, or a .safetensors checkpoint)")
    try:
        class_name = json.loads(index.read_text(encoding="utf-8"))["_class_name"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackboneError(f"{index} is not a valid model_index.json ({BackboneError.reason(exc)}); restore it "
                            f"from the model's original files") from None
    if class_name not in PIPELINE_FAMILIES:
        raise BackboneError(f"{index}: unsupported pipeline class {class_name!r} (supported: "
                            f"{', '.join(PIPELINE_FAMILIES)})")
    return getattr(diffusers, class_name)
