import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess
import sys
import time
from pathlib import Path

import pytest

from guards import GUARDS

ROOT = Path(__file__).resolve().parent.parent
TINYWORLD = ROOT / "models" / "tinyworld"
TINYWORLD_JUDGE = ROOT / "models" / "tinyworld-judge"


@pytest.fixture(scope="session")
def tinyworld_dir() -> Path:
    assert (TINYWORLD / "model_index.json").is_file(), (
        f"committed tinyworld model missing at {TINYWORLD}; retrain with `python -m train tinyworld fit`")
    return TINYWORLD


@pytest.fixture(scope="session")
def judge_dir() -> Path:
    assert (TINYWORLD_JUDGE / "judge.safetensors").is_file(), f"committed judge missing at {TINYWORLD_JUDGE}"
    return TINYWORLD_JUDGE


@pytest.fixture(scope="session")
def tinyworld_build(tmp_path_factory, tinyworld_dir) -> tuple[Path, float]:
    """The tinyworld ONNX bundle built once per test session with the real CLI, and the seconds it took."""
    out = tmp_path_factory.mktemp("plan") / "tinyworld.plan"
    t0 = time.perf_counter()
    build_tinyworld_plan(out)
    return out, time.perf_counter() - t0


def build_tinyworld_plan(out: Path, *args: str) -> Path:
    """``python -m export build`` of the committed tinyworld model into ``out`` with extra CLI ``args``
    (e.g. ``--guards safeguider``), in a child process like a user runs it (no ``--profile``: the tinyworld
    folder picks the tinyworld profile by itself)."""
    proc = subprocess.run([sys.executable, "-m", "export", "build", "--model", str(TINYWORLD), *args,
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def tinyworld_plan(tinyworld_build) -> Path:
    return tinyworld_build[0]


@pytest.fixture(scope="session")
def guarded_plan(tmp_path_factory):
    """``guarded_plan("safectrl")`` / ``guarded_plan(*STACK)``: the tinyworld bundle with those guards, built once
    per test session with the real CLI (every test module that needs a guarded bundle shares these)."""
    built: dict[tuple[str, ...], Path] = {}

    def get(*guards: str, extra: tuple[str, ...] = ()) -> Path:
        key = (*guards, *extra)
        if key not in built:
            out = tmp_path_factory.mktemp("guarded") / f"tinyworld_{'_'.join(guards)}.plan"
            built[key] = build_tinyworld_plan(out, "--guards", ",".join(guards), *extra)
        return built[key]

    return get


STACK = GUARDS  # the four-guard stack: every guard of the registry, in the order they run
