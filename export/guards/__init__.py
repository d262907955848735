"""Guards at export time: how each guard's trained modules (``guards/<name>.py``) enter the bundle.

One module per guard (``export/guards/<name>.py``), in the registry's order (:data:`guards.GUARDS`). Each has
``prepare(backbone, weights_dir: Path, image_hw=None) -> GuardParts`` (``image_hw``: the build's image size in
pixels, None = the backbone's native size; for state shaped like the latent), saying what it adds:

- ``text_heads``: :class:`~export.graphs.TextHead` modules fused into the first text-stage graph
  (SafeGuider's EOS classifier -> output ``safe_score``, SafePatch's gate);
- ``residual_inputs`` / ``extensions``: ControlNet-style residual inputs of the denoise graph and
  :class:`~export.graphs.DenoiseExtension` modules fused into it (SafePatch's inputs, SafeCtrl's blocks);
- ``graphs``: callables ``(out_dir: Path, common: dict) -> spec`` exporting the guard's own graphs
  (SafeRedir's ``redirect``, SafePatch's ``safepatch``); ``common`` holds the export options (exporter,
  opset, progress, height, width, dynamic_hw);
- ``idle_extensions``: the guard's part of the idle denoise graph (``denoise_idle``, ``export/idle.py``): what the
  full graph computes when the guard's step inputs are zero (SafePatch: nothing, its residual inputs dropped;
  SafeCtrl: the detector and mask state without the blend branch and ``safectrl_blend``);
- ``config``: the guard's manifest entry, read by ``runtime/guards/<name>.py``: its run-time settings from its
  config (``GuardConfig.runtime()``, no defaults here) plus the names of the graphs and tensors it uses;
- ``acts_on_flags``: its host half removes on a prompt an earlier guard flagged (``ctx.flags``; SafeRedir,
  SafePatch).

A guard module may also define ``settle(own: GuardParts, bundle: dict[str, GuardParts])``: settings that depend
on the other guards of the bundle (SafeGuider's ``mode: auto``), run once every guard is prepared and after
``--guard-setting`` overrides (:func:`apply_settings`), which may name any run-time setting of a guard's config.

Trained weights live by default in ``models/guards/<model folder name>/<guard>/`` (see :func:`weights_dir`);
``--guard-weights GUARD=DIR`` takes one guard's from elsewhere (the stack's renderer-trained SafePatch).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from guards import GUARDS, config_class
from guards.config import ConfigError
from runtime.errors import BadInputError


@dataclass
class GuardParts:
    text_heads: list = field(default_factory=list)
    residual_inputs: bool = False
    extensions: list = field(default_factory=list)
    graphs: list[Callable[[Path, dict], dict]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    idle_extensions: list = field(default_factory=list)
    idle_graph: bool = False  # ask for denoise_idle (export/idle.py: wants_idle_graph); SafePatch does
    acts_on_flags: bool = False  # its host half removes on an earlier guard's flag (runtime/guards/__init__.py)


def weights_dir(model: Path, guard: str, root: Path | None = None) -> Path:
    """Where ``guard``'s trained weights for backbone folder ``model`` live: ``<root>/<model name>/<guard>``,
    ``root`` defaulting to ``models/guards`` beside the model folder."""
    model = Path(model)
    root = Path(root) if root is not None else model.parent / "guards"
    return root / model.stem / guard


def prepare(names: list[str], backbone, model: Path, root: Path | None = None,
            image_hw: tuple[int, int] | None = None, settings: dict[str, dict[str, Any]] | None = None,
            weights: dict[str, Path] | None = None) -> dict[str, GuardParts]:
    """Load every named guard's weights for ``backbone``: ``{name: GuardParts}`` in registry order. ``image_hw``:
    the build's image size (pixels), passed to every guard's ``prepare``; None means the backbone's native size.
    ``settings``: ``{guard: {key: value}}`` overriding run-time settings of its config (:func:`apply_settings`);
    ``weights``: ``{guard: folder}`` for guards whose weights are not in ``root`` (``--guard-weights``)."""
    weights = weights or {}
    if unknown := sorted(set(weights) - set(names)):
        raise BadInputError(f"--guard-weights {', '.join(unknown)}: not among --guards {','.join(names) or '(none)'}")
    parts = {}
    for name in GUARDS:
        if name not in names:
            continue
        d = Path(weights[name]) if name in weights else weights_dir(model, name, root)
        if not (d / "config.json").is_file():
            raise BadInputError(f"--guards {name}: no trained weights in {d} (config.json missing): train them "
                                f"with `python -m train {name} --model {model} --out {d}` or pass --guard-dir")
        try:
            parts[name] = importlib.import_module(f"{__name__}.{name}").prepare(backbone, d, image_hw=image_hw)
        except ConfigError as e:
            raise BadInputError(f"--guards {name}: {e}") from None
    apply_settings(parts, settings or {})
    settle(parts)
    return parts


def settle(parts: dict[str, GuardParts]) -> None:
    """Each guard module's ``settle(own, bundle)``, in registry order: settings that depend on the bundle."""
    for name, own in parts.items():
        hook = getattr(importlib.import_module(f"{__name__}.{name}"), "settle", None)
        if hook is not None:
            hook(own, parts)


def apply_settings(parts: dict[str, GuardParts], settings: dict[str, dict[str, Any]]) -> None:
    """``--guard-setting GUARD.KEY=VALUE`` overrides, checked as the runtime checks them (BadInputError, exit 3):
    only a run-time setting of a guard in the build, with a value the runtime accepts (``auto`` where the guard's
    ``settle`` resolves it)."""
    from runtime.guards import host_class

    for name, changes in settings.items():
        if name not in parts:
            raise BadInputError(f"--guard-setting {name}.*: {name} is not among --guards {','.join(parts) or '(none)'}")
        keys = config_class(name).RUNTIME_KEYS
        for key, value in changes.items():
            check = host_class(name, "--guard-setting").SETTINGS.get(key)
            if key not in keys or check is None:
                raise BadInputError(f"--guard-setting {name}.{key}: not a run-time setting of {name} (known: "
                                    f"{', '.join(keys)})")
            if value != "auto" and (problem := check(value)) is not None:
                raise BadInputError(f"--guard-setting {name}.{key}={value!r} {problem}")
            parts[name].config[key] = value
