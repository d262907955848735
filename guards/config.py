"""The base of every guard's config schema: one dataclass per guard, ONE set of defaults (its fields').

A guard's ``config.json`` holds its architecture (sizes read from the backbone at training time), its run-time
settings (what the bundle's manifest entry carries: thresholds, check steps, EMA alpha, ...) and provenance
(``training``: how the weights were made; no code reads it). :meth:`GuardConfig.from_dict` refuses a key the
schema does not know with one line naming it, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A guard config that does not fit its schema; the message is one line naming the key and the fix."""


@dataclass(kw_only=True)
class GuardConfig:
    """Subclasses are ``@dataclass(kw_only=True)``; a field without a default is an architecture size that
    has to come from the backbone (``hidden_size``, ``unet_config`` ...)."""

    NAME: ClassVar[str] = "guard"                 # the guard's registry name (guards.GUARDS)
    RUNTIME_KEYS: ClassVar[tuple[str, ...]] = ()  # the fields the bundle's manifest entry carries

    training: dict = field(default_factory=dict)  # provenance of the weights (steps, data, seed ...); not read

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "GuardConfig":
        """The config of ``data`` (a parsed ``config.json``); ``source`` names it in errors."""
        data = cls.upgrade(dict(data))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))} for {cls.NAME} "
                              f"(known: {', '.join(sorted(known))}): remove or rename them")
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in data
                         and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        if missing:
            raise ConfigError(f"{source}: {cls.NAME} config lacks {', '.join(map(repr, missing))} (sizes of the "
                              f"backbone it was trained for): retrain or restore the file")
        return cls(**copy.deepcopy(data))

    @classmethod
    def upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Older ``config.json`` layouts -> this schema's keys (committed weights load unchanged)."""
        kind = str(data.pop("_class_name", cls.NAME))
        if kind.lower() != cls.NAME:
            raise ConfigError(f"a {kind} config given to {cls.NAME}: check the weights folder")
        return data

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists), ``_class_name`` first."""
        return {"_class_name": self.NAME, **json.loads(json.dumps(dataclasses.asdict(self)))}

    def runtime(self) -> dict[str, Any]:
        """The run-time settings (:data:`RUNTIME_KEYS`), JSON-ready: the config part of the manifest entry."""
        return json.loads(json.dumps({k: getattr(self, k) for k in self.RUNTIME_KEYS}))

    def replace(self, **changes: Any) -> "GuardConfig":
        """A copy with ``changes`` (unknown keys refused like :meth:`from_dict`)."""
        return type(self).from_dict({**dataclasses.asdict(self), **changes}, source=f"{self.NAME} overrides")
