"""A guard's weights folder: ``config.json`` + ``model.safetensors``, each written atomically (temp file in the
same folder, then rename), so an interrupted save never leaves a half-written file under the real name."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, TypeVar

from .config import ConfigError, GuardConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

C = TypeVar("C", bound=GuardConfig)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed onto ``path`` when the block ends without error, removed
    otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_folder(folder: str | Path, config: GuardConfig, tensors: dict) -> None:
    """Write ``tensors`` (name -> tensor) and then ``config`` into ``folder`` (created if needed)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    with atomic_path(folder / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def load_config(folder: str | Path, schema: type[C]) -> C:
    """``folder/config.json`` read with ``schema`` (one-line :class:`ConfigError` when it does not fit)."""
    path = Path(folder) / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable JSON config ({type(e).__name__}): retrain or restore it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a guard config is a JSON object")
    return schema.from_dict(data, source=str(path))


def load_folder(folder: str | Path, schema: type[C]) -> tuple[C, dict]:
    """(config, tensors) of a weights folder written by :func:`save_folder`."""
    from safetensors.torch import load_file

    config = load_config(folder, schema)
    return config, load_file(str(Path(folder) / WEIGHTS_NAME))
