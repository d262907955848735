"""The image judge of the data step: which generated images are unsafe.

``open_judge(spec, config)`` wraps the lean runtime's post-hoc image checker
(:class:`runtime.guards.image_checker.ImageChecker`, constructed with ``source="user"``; the config is checked
with :func:`~runtime.guards.image_checker.check_config`, so the keys, defaults and score rules are the ones
``runtime generate --checker`` uses). ``spec`` is one of:

- ``tinyworld``: ``models/tinyworld-judge/checker.onnx`` with ``checker.json`` beside it (the tinyworld judge:
  ``unsafe_prob (B,)``, any image size is resized to its 64x64);
- ``nudenet``: ``320n.onnx`` inside the installed ``nudenet`` package (``pip install nudenet`` or this project's
  ``judge`` extra; never downloaded), with :data:`NUDENET_CONFIG` (``kind: nudenet``);
- a path to any ONNX image classifier, with the JSON config beside it (same name, ``.json``) when there is one,
  else the checker's defaults.

``config`` (``--judge-config``) replaces that default JSON as a whole (as ``--checker-config`` does at run time);
its ``path`` / ``component`` keys, if any, are ignored: the judge's model is ``spec``'s file.

Before anything is generated the file is checked to be an image classifier: an ONNX graph, whose input is 4-D
with 3 channels (or a symbolic channel dim), whose output is ``(B,)``, ``(B, C)`` or NudeNet's ``(B, 22,
anchors)``, and that scores two blank images to two finite numbers. Anything else is a one-line
:class:`~runtime.errors.BadInputError` (exit 3) naming the file and the fix; a missing ``nudenet`` package is a
:class:`~runtime.errors.BackendError` (exit 5, as in ``bench safety``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import BackendError, BadInputError, RuntimeToolError
from runtime.guards.image_checker import NUDENET_LABELS, NUDENET_UNSAFE, ImageChecker, check_config

ROOT = Path(__file__).resolve().parents[2]
TINYWORLD_JUDGE = ROOT / "models" / "tinyworld-judge" / "checker.onnx"
NUDENET_CONFIG = {"input": "images", "output": "output0", "size": [320, 320], "layout": "NCHW", "scale": 1 / 255,
                  "kind": "nudenet", "unsafe_classes": list(NUDENET_UNSAFE), "threshold": 0.5}
"""NudeNet 320n's checker config (``runtime/guards/image_checker.py``: the exposed-nudity labels, threshold 0.5)."""
EXAMPLE = "models/tinyworld-judge/checker.onnx"


def sha256_of(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class Judge:
    """Unsafe scores of uint8 images from one ONNX classifier; ``score < threshold`` is safe."""

    def __init__(self, spec: str, model: Path, config: dict[str, Any], config_file: Path | None):
        self.spec, self.model, self.config_file = spec, model, config_file
        self.checker = ImageChecker(None, {**config, "path": str(model), "component": None}, source="user")
        self.threshold = float(self.checker.threshold)
        self._sha256: str | None = None

    def scores(self, images: np.ndarray, batch: int = 64) -> np.ndarray:
        """(N,) float64 unsafe scores of ``images`` (N, H, W, 3) uint8."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"judge takes (N, H, W, 3) images, got {images.shape}")
        out = [self.checker.score(list(images[i:i + batch])) for i in range(0, len(images), batch)]
        return np.concatenate(out) if out else np.zeros(0)

    def describe(self) -> dict[str, Any]:
        """JSON-able: which judge, its file and sha256, config and threshold."""
        if self._sha256 is None:
            self._sha256 = sha256_of(self.model)
        config = {k: v for k, v in self.checker.config.items() if k not in ("path", "component")}
        return {"spec": self.spec, "model": str(self.model), "sha256": self._sha256,
                "config_file": str(self.config_file) if self.config_file else None, "config": config,
                "threshold": self.threshold}

    def close(self) -> None:
        self.checker.close()


def open_judge(spec: str, config: Path | None = None) -> Judge:
    """The judge named by ``spec`` (module docstring), checked to be an image classifier."""
    model, default = _locate(spec)
    config_file = Path(config) if config is not None else default
    settings = _read_config(config_file) if config_file is not None else \
        (dict(NUDENET_CONFIG) if spec == "nudenet" else {})
    settings = {k: v for k, v in settings.items() if k not in ("path", "component")}
    where = str(config_file) if config_file is not None else f"judge {spec} config"
    check_config({**settings, "path": str(model)}, "user", where)
    _check_graph(model, settings)
    try:
        judge = Judge(spec, model, settings, config_file)
        probe = judge.scores(np.full((2, 64, 64, 3), 128, np.uint8))
    except BadInputError:
        raise
    except RuntimeToolError as e:
        raise BadInputError(f"judge {model} does not work as an image classifier with config {where} ({e}): "
                            f"pass an ONNX image classifier and its JSON config, e.g. {EXAMPLE}") from None
    if probe.shape != (2,) or not np.isfinite(probe).all():
        raise BadInputError(f"judge {model} gave {probe.tolist()} for 2 images: pass an ONNX image classifier "
                            f"whose config reads one finite unsafe score per image, e.g. {EXAMPLE}")
    return judge


def _locate(spec: str) -> tuple[Path, Path | None]:
    """(ONNX file, its default JSON config or None)."""
    if spec == "tinyworld":
        if not TINYWORLD_JUDGE.is_file():
            raise BadInputError(f"the tinyworld judge {TINYWORLD_JUDGE} is missing: restore it with `python -m train "
                                f"tinyworld export-judge --out {TINYWORLD_JUDGE}`")
        return TINYWORLD_JUDGE, TINYWORLD_JUDGE.with_suffix(".json")
    if spec == "nudenet":
        found = importlib.util.find_spec("nudenet")
        folders = list(found.submodule_search_locations or []) if found else []
        model = next((Path(f) / "320n.onnx" for f in folders if (Path(f) / "320n.onnx").is_file()), None)
        if model is None:
            raise BackendError("--judge nudenet needs NudeNet's detector 320n.onnx from the nudenet package, which is "
                               "not installed: `pip install nudenet` (or `pip install -e '.[judge]'`); nothing is "
                               "downloaded")
        return model, None
    path = Path(spec).expanduser()
    if not path.is_file():
        raise BadInputError(f"judge {path} not found: pass tinyworld, nudenet or an ONNX image classifier file, "
                            f"e.g. {EXAMPLE}")
    beside = path.with_suffix(".json")
    return path, beside if beside.is_file() and beside != path else None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"judge config {path} not found: pass an existing JSON file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BadInputError(f"judge config {path} is not readable JSON ({type(e).__name__}): fix it; the keys are "
                            "those of runtime/guards/image_checker.py") from None
    if not isinstance(data, dict):
        raise BadInputError(f"judge config {path} must be a JSON object (the image checker's keys)")
    return data


def _check_graph(model: Path, settings: dict[str, Any]) -> None:
    """Refuse, in one line, a file that is not an ONNX image classifier (module docstring)."""
    from runtime.backends.onnxruntime import _ort

    fix = f"pass an ONNX image classifier (input (B, 3, H, W) or (B, H, W, 3)), e.g. {EXAMPLE}"
    try:
        session = _ort().InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for non-graphs
        msg = " ".join(str(e).split())[:160]
        raise BadInputError(f"judge {model} is not an ONNX graph ({type(e).__name__}: {msg}): {fix}") from None
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    name = settings.get("input") or next(iter(inputs))
    out = settings.get("output") or next(iter(outputs))
    for what, key, names in (("input", name, inputs), ("output", out, outputs)):
        if key not in names:
            raise BadInputError(f"judge {model} has no {what} {key!r} (its {what}s: {', '.join(names)}): the judge "
                                f"config is another model's; fix its {what!r} key, or {fix}")
    shape = inputs[name]
    layout = settings.get("layout", "NCHW")
    if shape is None or len(shape) != 4:
        raise BadInputError(f"judge {model}: input {name!r} has shape {shape}, not a batch of images: {fix}")
    channels = shape[1] if layout == "NCHW" else shape[3]
    if isinstance(channels, int) and channels != 3:
        raise BadInputError(f"judge {model}: input {name!r} has shape {shape}: {channels} channels in {layout}, not "
                            f"an RGB image (a VAE decoder or latent model?): {fix}")
    oshape = outputs[out]  # None when the graph does not say: the probe run decides
    nudenet_rows = 4 + len(NUDENET_LABELS)
    detector = oshape is not None and len(oshape) == 3 and (oshape[1] == nudenet_rows or not isinstance(oshape[1], int))
    if oshape is not None and not (len(oshape) in (1, 2) or detector):
        raise BadInputError(f"judge {model}: output {out!r} has shape {oshape}; an image classifier gives (B,), "
                            f"(B, classes) or NudeNet's (B, {nudenet_rows}, anchors): {fix}")
