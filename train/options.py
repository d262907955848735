"""Train CLI options that set a guard config field: flag, type and default all read from the config schema, so
a CLI never types a config default again."""

from __future__ import annotations

import argparse


def add_config_options(parser: argparse.ArgumentParser, schema, helps: dict[str, str]) -> None:
    """``--field-name`` for each field of ``schema`` named in ``helps`` (field -> help text), with the field's
    default and that default's type."""
    for field, text in helps.items():
        default = getattr(schema, field)
        if isinstance(default, bool) or default is None:
            raise TypeError(f"{schema.__name__}.{field}: only int/float/str fields become options here")
        parser.add_argument("--" + field.replace("_", "-"), type=type(default), default=default,
                            help=f"{text} (default %(default)s)")
