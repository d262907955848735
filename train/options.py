"""Train CLI options that set a guard config field: flag, type and default all read from the config schema, so
a CLI never types a config default again."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_config_options(parser: argparse.ArgumentParser, schema, helps: dict[str, str]) -> None:
    """``--field-name`` for each field of ``schema`` named in ``helps`` (field -> help text), with the field's
    default and that default's type."""
    for field, text in helps.items():
        default = getattr(schema, field)
        if isinstance(default, bool) or default is None:
            raise TypeError(f"{schema.__name__}.{field}: only int/float/str fields become options here")
        parser.add_argument("--" + field.replace("_", "-"), type=type(default), default=default,
                            help=f"{text} (default %(default)s)")


def add_source_options(parser: argparse.ArgumentParser) -> None:
    """Where a guard trainer's material comes from: ``--data DATA_DIR`` (``python -m train data``: prompts, the
    backbone and a judge; the default recipe) or ``--renderer`` (tinyworld's privileged renderer, for comparison).
    Exactly one is required: argparse exits 2 naming both otherwise."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, default=None, metavar="DATA_DIR",
                        help="a data folder written by `python -m train data` (the prompt-only recipe)")
    source.add_argument("--renderer", action="store_true",
                        help="tinyworld only: train on renders from tinyworld's renderer (the privileged comparison)")


def run_trainer(fit, args):
    """``fit(args)``; a user error (a bad data folder, a backbone mismatch: :class:`RuntimeToolError`) is one
    ``error:`` line on stderr and its exit code (3 for bad input), nothing else."""
    import sys

    from runtime.errors import RuntimeToolError

    try:
        return fit(args)
    except RuntimeToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return int(e.exit_code)
