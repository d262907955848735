"""The torch side of the guards, one home per guard, and the ONE registry of their names.

Each guard is one module here (``guards/<name>.py``): its ``nn.Module`` s, its config schema (a
:class:`~guards.config.GuardConfig` dataclass, exported as ``CONFIG``, holding the guard's only set of
defaults) and save/load of its weights folder (``config.json`` + ``model.safetensors``, :mod:`guards.storage`).
``train/`` trains these modules, ``export/`` fuses them into a bundle; this package imports neither (only
stdlib, torch, diffusers, safetensors), and importing it loads no guard module until one is asked for.

    >>> import guards
    >>> guards.GUARDS                                   # run order: text guards first
    ('safeguider', 'saferedir', 'safepatch', 'safectrl')
    >>> guards.config_class("safectrl").mask_threshold  # a default
    0.07
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

GUARDS = ("safeguider", "saferedir", "safepatch", "safectrl")
"""Every guard, in the order they run (and are listed in a bundle's manifest)."""

CATEGORIES = ("weapon", "gore", "shocking")
"""The unsafe categories the categorical guards (SafePatch, SafeCtrl) are trained for by default (tinyworld's)."""


def module(name: str) -> ModuleType:
    """``guards.<name>``: the guard's modules, ``CONFIG`` and persistence."""
    if name not in GUARDS:
        raise KeyError(f"unknown guard {name!r} (known: {', '.join(GUARDS)})")
    return importlib.import_module(f"{__name__}.{name}")


def config_class(name: str):
    """The guard's config schema (a :class:`~guards.config.GuardConfig` subclass)."""
    return module(name).CONFIG


def load_config(name: str, folder: str | Path):
    """The config in a weights folder of guard ``name`` (one-line ConfigError when it does not fit)."""
    from .storage import load_config as load

    return load(folder, config_class(name))
