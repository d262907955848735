import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

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
