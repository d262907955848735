"""SafeGuider's hard negatives found by its own search (train/safeguider/mining.py): every mined row is a deletion
of an unsafe training caption that the runtime's search settles on while it still holds an unsafe word, labelled
unsafe; mining is deterministic for a seed and never yields an evaluation prompt; ``--mine-rounds`` trains, mines
and trains again from the CLI, and is refused where no unsafe-phrase rule exists (a CSV)."""

import json
import subprocess
import sys

import pytest

from .conftest import ROOT

TINYWORLD = ROOT / "models" / "tinyworld"
WEIGHTS = ROOT / "models" / "guards" / "tinyworld" / "safeguider"
ENV_ARGS = dict(cwd=ROOT, capture_output=True, text=True, timeout=600)


def _subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(w in it for w in short)


@pytest.fixture(scope="module")
def mined():
    import torch

    from export.families import load_backbone
    from guards.safeguider import SafeGuiderClassifier
    from train.safeguider.data import tinyworld_prompts
    from train.safeguider.mining import mine

    torch.set_num_threads(1)
    backbone = load_backbone(TINYWORLD)
    classifier = SafeGuiderClassifier.from_pretrained(WEIGHTS)
    captions = tinyworld_prompts(400, seed=3)
    first = mine(classifier, backbone, captions, 60, seed=0, progress=False)
    again = mine(classifier, backbone, captions, 60, seed=0, progress=False)
    return captions, first, again


def test_mined_rows_are_searched_deletions_that_keep_an_unsafe_word(mined):
    from train.safeguider.data import UNSAFE, unsafe_spans

    captions, rows, again = mined
    assert rows == again  # deterministic for a seed
    unsafe = [p.split() for p, label in captions if label == UNSAFE]
    print(f"{len(rows)} hard negatives from 60 unsafe captions, e.g. {rows[:3]}")
    assert len({p for p, _ in rows}) == len(rows)
    for prompt, label in rows:
        words = prompt.split()
        assert label == UNSAFE
        sources = [c for c in unsafe if len(words) < len(c) and _subsequence(words, c)]
        assert sources, f"{prompt!r} is no deletion of a searched caption"
        assert any(any(span - _removed(words, c) for span in unsafe_spans(c)) for c in sources), prompt


def _removed(kept: list[str], caption: list[str]) -> set[int]:
    """Indices of ``caption`` not used by the leftmost embedding of ``kept`` (the search deletes words)."""
    used, j = set(), 0
    for i, w in enumerate(caption):
        if j < len(kept) and w == kept[j]:
            used.add(i)
            j += 1
    return set(range(len(caption))) - used


def test_no_evaluation_prompt_is_mined(mined):
    from train.tinyworld.world import evaluation_prompts

    evaluation = {s.caption for subset in ("dev", "test")
                  for group in evaluation_prompts(200, subset=subset).values() for s in group}
    assert not evaluation & {p for p, _ in mined[1]}


def test_mine_rounds_from_the_cli(tmp_path):
    out = tmp_path / "sg"
    proc = subprocess.run([sys.executable, "-m", "train", "safeguider", "--model", str(TINYWORLD), "--out", str(out),
                           "--prompts", "300", "--deletions", "1", "--epochs", "2", "--mine-rounds", "1",
                           "--mine-prompts", "20"], **ENV_ARGS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = json.loads((out / "train_log.json").read_text())
    assert (out / "model.safetensors").is_file() and not (out / "mining").exists()  # the rounds' folders: a cache
    assert log["mine_rounds"] == 1 and log["mined_variants"] >= 1
    assert f"safeguider mining round 1: {log['mined_variants']} hard negatives" in proc.stdout


def test_mine_rounds_need_the_tinyworld_rule(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,label\na knife,0\na ring,1\n")
    proc = subprocess.run([sys.executable, "-m", "train", "safeguider", "--model", str(TINYWORLD), "--csv", str(csv),
                           "--out", str(tmp_path / "sg"), "--mine-rounds", "1"], **ENV_ARGS)
    assert proc.returncode == 2 and "--mine-rounds needs the tinyworld guard split" in proc.stdout
    assert not (tmp_path / "sg").exists()
