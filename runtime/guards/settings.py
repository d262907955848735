"""Run-time settings of a guard, checked where the runtime reads them.

Each host half declares ``SETTINGS = {key: check}``: every key its hooks read, each with a check of the
value's type and range. :func:`validate` refuses a config that lacks a key, has one the runtime does not read
(a newer exporter, or a typo), or holds a value out of range: a threshold outside [0, 1], an empty class list,
an interval below 1. The error type says whose input it was: a bundle's manifest (:class:`BundleError`, exit
4: the bundle is corrupt or was tampered with) or a config the user passed (:class:`BadInputError`, exit 3).
No guard has run-time defaults here: the exporter writes every setting from the guard's one config.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from runtime.errors import BadInputError, BundleError

Check = Callable[[Any], "str | None"]  # the problem with a value, or None when it is fine


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def unit(v: Any) -> str | None:
    return None if _number(v) and 0 <= v <= 1 else "must be a number in [0, 1]"


def fraction(v: Any) -> str | None:
    return None if _number(v) and 0 < v <= 1 else "must be a number in (0, 1]"


def signed_unit(v: Any) -> str | None:
    return None if _number(v) and -1 <= v <= 1 else "must be a number in [-1, 1]"


def positive(v: Any) -> str | None:
    return None if _number(v) and v > 0 else "must be a finite number > 0"


def count(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else "must be an integer >= 1"


def index(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else "must be an integer >= 0"


def flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def label(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else "must be a non-empty string"


def labels(v: Any) -> str | None:
    ok = isinstance(v, list) and v and all(label(x) is None for x in v) and len(set(v)) == len(v)
    return None if ok else "must be a non-empty list of distinct names"


def texts_by_name(v: Any) -> str | None:
    ok = isinstance(v, dict) and v and all(label(k) is None and label(x) is None for k, x in v.items())
    return None if ok else "must be a non-empty mapping of names to non-empty texts"


def indices(v: Any) -> str | None:
    ok = isinstance(v, list) and v and all(index(x) is None for x in v)
    return None if ok else "must be a non-empty list of class indices (integers >= 0)"


def optional(check: Check) -> Check:
    """``check``, or null (the setting is off)."""
    def check_or_null(v: Any) -> str | None:
        return None if v is None else check(v)
    return check_or_null


def one_of(*choices: str) -> Check:
    def check_choice(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"
    return check_choice


def config_error(source: str) -> type[BundleError] | type[BadInputError]:
    return BundleError if source == "bundle" else BadInputError


def validate(guard: str, config: Any, schema: dict[str, Check], source: str, where: str) -> dict[str, Any]:
    """``config`` checked against ``schema``; a one-line error naming ``where`` (the bundle or the file)."""
    error = config_error(source)
    fix = ("the bundle is corrupt or was tampered with: rebuild it with `python -m export build`"
           if source == "bundle" else "fix the config")
    if not isinstance(config, dict):
        raise error(f"{where}: guard {guard}'s settings are {type(config).__name__}, not a JSON object: {fix}")
    if missing := sorted(set(schema) - set(config)):
        raise error(f"{where}: guard {guard} lacks setting(s) {', '.join(missing)}: {fix}")
    if unknown := sorted(set(config) - set(schema)):
        raise error(f"{where}: guard {guard} has setting(s) this runtime does not read: {', '.join(unknown)}: "
                    f"{fix} (or upgrade the runtime)")
    for key, check in schema.items():
        if (problem := check(config[key])) is not None:
            raise error(f"{where}: guard {guard} setting {key}={config[key]!r:.60} {problem}: {fix}")
    return dict(config)

