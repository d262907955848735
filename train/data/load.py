"""Read a data folder written by ``python -m train data`` (:mod:`train.data.step`): :func:`load_data` -> :class:`Data`.

The arrays are the chunk files' concatenated in the order ``data.json`` lists them (= the order of
``pairs.jsonl`` / ``benign.jsonl``). A folder without ``data.json`` is incomplete (an interrupted run: finish it
with ``--resume``) and one of another format version is refused; both are a one-line
:class:`~runtime.errors.BadInputError` naming the folder and the fix.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import BadInputError

DATA_JSON = "data.json"
TEXT_JSONL = "text.jsonl"
FORMAT_VERSION = 1


@dataclass
class Data:
    folder: Path
    info: dict                  # data.json
    pairs: list[dict]           # pairs.jsonl records, in chunk order
    benign: list[dict]          # benign.jsonl records
    unsafe: np.ndarray          # (P,H,W,3) uint8
    safe: np.ndarray            # (P,H,W,3) uint8, zeros where not kept
    kept: np.ndarray            # (P,) bool
    mask: np.ndarray            # (P,H,W) uint8 0/1, derived
    traj_x: np.ndarray          # (P,S,C,h,w) float16: the unsafe prompts' trajectories
    traj_t: np.ndarray          # (S,) float32
    benign_images: np.ndarray   # (B,H,W,3) uint8
    benign_traj_x: np.ndarray   # (B,S,C,h,w) float16
    fewshot: dict | None        # image, mask, caption, category arrays, or None
    text_pairs: list[dict]      # EVERY pair the inputs made (beyond --limit; no images): text-only training
    text_benign: list[str]      # every benign prompt (beyond --benign-limit)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.info["image_size"])

    @property
    def sha256(self) -> str:
        """The identity of the folder's content (``data.json`` names every chunk and input hash): cache keys."""
        return hashlib.sha256((self.folder / DATA_JSON).read_bytes()).hexdigest()


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _concat(folder: Path, names: list[str], key: str, empty: tuple, dtype) -> np.ndarray:
    parts = []
    for name in names:
        with np.load(folder / "chunks" / name) as f:
            parts.append(f[key])
    return np.concatenate(parts) if parts else np.zeros(empty, dtype)


def load_data(folder: str | Path) -> Data:
    """The data folder's records and arrays (module docstring)."""
    folder = Path(folder)
    info_path = folder / DATA_JSON
    if not info_path.is_file():
        raise BadInputError(f"{folder} has no {DATA_JSON}: not a finished data folder (an interrupted run? finish it "
                            "with `python -m train data ... --resume`, or pass the folder --out named)")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadInputError(f"{info_path} is not readable JSON ({type(e).__name__}): rerun the data step") from None
    version = info.get("format_version") if isinstance(info, dict) else None
    if version != FORMAT_VERSION:
        raise BadInputError(f"{folder}: data format version {version!r}, this reader takes {FORMAT_VERSION}: rerun "
                            "`python -m train data` with this version of the project")
    try:
        h, w = info["image_size"]
        traj = info["trajectory"]
        s, c, (lh, lw) = traj["steps"], traj["channels"], traj["latent_size"]
        pair_chunks, benign_chunks = info["chunks"]["pairs"], info["chunks"]["benign"]
        pairs, benign = _jsonl(folder / "pairs.jsonl"), _jsonl(folder / "benign.jsonl")
        with np.load(folder / "chunks" / pair_chunks[0]) as f:
            traj_t = f["traj_t"]
        data = Data(
            folder=folder, info=info, pairs=pairs, benign=benign,
            unsafe=_concat(folder, pair_chunks, "unsafe", (0, h, w, 3), np.uint8),
            safe=_concat(folder, pair_chunks, "safe", (0, h, w, 3), np.uint8),
            kept=_concat(folder, pair_chunks, "kept", (0,), bool),
            mask=_concat(folder, pair_chunks, "mask", (0, h, w), np.uint8),
            traj_x=_concat(folder, pair_chunks, "traj_x", (0, s, c, lh, lw), np.float16),
            traj_t=traj_t,
            benign_images=_concat(folder, benign_chunks, "image", (0, h, w, 3), np.uint8),
            benign_traj_x=_concat(folder, benign_chunks, "traj_x", (0, s, c, lh, lw), np.float16),
            fewshot=None, text_pairs=[], text_benign=[])
        for record in _jsonl(folder / TEXT_JSONL):
            if record.pop("kind") == "unsafe":
                data.text_pairs.append(record)
            else:
                data.text_benign.append(record["prompt"])
        if (folder / "fewshot.npz").is_file():
            with np.load(folder / "fewshot.npz") as f:
                data.fewshot = {k: f[k] for k in ("image", "mask", "caption", "category")}
    except (OSError, KeyError, ValueError, IndexError, TypeError) as e:
        raise BadInputError(f"{folder}: a file of the data folder is missing or damaged ({type(e).__name__}: {e}): "
                            "rerun the data step with --resume") from None
    if len(data.pairs) != len(data.unsafe) or len(data.benign) != len(data.benign_images):
        raise BadInputError(f"{folder}: pairs.jsonl / benign.jsonl do not match the chunk files: rerun the data step "
                            "with --resume")
    return data


def check_backbone(data: Data, backbone) -> None:
    """Refuse (one-line :class:`BadInputError`) a data folder made for another family, image size or latent
    width than ``backbone``, and one with no kept pair."""
    made = data.info.get("backbone", {})
    size = [backbone.image_size, backbone.image_size]
    channels = data.info.get("trajectory", {}).get("channels")
    if made.get("family") != backbone.family or list(data.image_size) != size or channels != backbone.latent_channels:
        raise BadInputError(f"--data {data.folder} was made for a {made.get('family')} backbone at "
                            f"{data.image_size[0]}x{data.image_size[1]} px with {channels} latent channels, not this "
                            f"{backbone.family} one ({size[0]}x{size[1]} px, {backbone.latent_channels} channels): rerun "
                            f"`python -m train data --model` with this backbone")
    if not data.kept.any():
        raise BadInputError(f"--data {data.folder} has no kept pair (keep rate 0): raise --max-changed or "
                            "--candidates in the data step, or check the judge config")
