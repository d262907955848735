"""SafeGuider's hard negatives found by its own search (train/safeguider/mining.py): with the phrase rule every mined
row is a deletion of an unsafe training caption that the runtime's search settles on while it still holds an unsafe
word, labelled unsafe; with a judge every search end is drawn by the backbone and labelled by what the judge sees;
mining is deterministic for a seed and never yields an evaluation prompt; ``--mine-rounds`` trains, mines and trains
again from the CLI (searching with ``--min-similarity``, which the weights' config records), and with a CSV needs a
judge."""

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
    from train.safeguider.adversarial import allowed
    from train.safeguider.data import tinyworld_prompts
    from train.safeguider.mining import mine

    torch.set_num_threads(1)
    backbone = load_backbone(TINYWORLD)
    classifier = SafeGuiderClassifier.from_pretrained(WEIGHTS)
    captions = tinyworld_prompts(400, seed=3)
    # as the CLI mines tinyworld's guard split: a deletion that spells a caption of another split is not taken
    first = mine(classifier, backbone, captions, 60, seed=0, progress=False, allowed=allowed)
    again = mine(classifier, backbone, captions, 60, seed=0, progress=False, allowed=allowed)
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
                           "--mine-prompts", "20", "--min-similarity", "-0.3"], **ENV_ARGS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = json.loads((out / "train_log.json").read_text())
    # the search the rows were mined with is the one the weights carry to the bundle
    assert json.loads((out / "config.json").read_text())["min_similarity"] == -0.3
    assert (out / "model.safetensors").is_file() and not (out / "mining").exists()  # the rounds' folders: a cache
    assert log["mine_rounds"] == 1 and log["mined_variants"] >= 1
    assert f"safeguider mining round 1: {log['mined_variants']} prompts the search settles on" in proc.stdout
    assert log["mined_unsafe"] == log["mined_variants"] and log["mine_label"] == "unsafe-phrase rule"


def test_judge_labels_read_what_the_backbone_draws():
    """The deployer's labelling: whole unsafe captions are drawn unsafe and benign ones safe, at the unguarded
    backbone's rates (tinyworld: explicit >= 80% unsafe, benign images safe)."""
    import torch

    from export.families import load_backbone
    from train.data.judge import open_judge
    from train.safeguider.data import SAFE, UNSAFE, tinyworld_prompts
    from train.safeguider.mining import judge_labels

    torch.set_num_threads(1)
    rows = tinyworld_prompts(400, seed=5)
    unsafe = [p for p, label in rows if label == UNSAFE and " at the " not in p][:16]  # explicit
    benign = [p for p, label in rows if label == SAFE][:16]
    labels = judge_labels(load_backbone(TINYWORLD), open_judge("tinyworld"), unsafe + benign, images=2,
                          progress=False)
    assert labels.shape == (32,) and set(labels.tolist()) <= {SAFE, UNSAFE}
    assert (labels[:16] == UNSAFE).mean() >= 0.8 and (labels[16:] == SAFE).mean() >= 0.9, labels


def test_judged_mining_labels_every_search_end(mined):
    """With a judge the rows are every distinct search end (the rule's rows among them), each labelled 0 or 1,
    deterministic for a seed. On SD1 tinyworld most ends the rule calls unsafe are drawn safe: the rule over-labels
    (bench/results/tinyworld_xl_dev/safeguider/README.md)."""
    import torch

    from export.families import load_backbone
    from guards.safeguider import SafeGuiderClassifier
    from train.data.judge import open_judge
    from train.safeguider.mining import mine

    torch.set_num_threads(1)
    captions, rule_rows, _ = mined
    args = (SafeGuiderClassifier.from_pretrained(WEIGHTS), load_backbone(TINYWORLD), captions, 30)
    judged = mine(*args, seed=0, progress=False, judge=open_judge("tinyworld"), images=1)
    assert judged == mine(*args, seed=0, progress=False, judge=open_judge("tinyworld"), images=1)
    labels = dict(judged)
    assert len(labels) == len(judged) and set(labels.values()) <= {0, 1}
    rule30 = mine(*args, seed=0, progress=False)
    assert {p for p, _ in rule30} <= set(labels) and len(labels) > len(rule30)
    print(f"{len(judged)} ends, {sum(v == 0 for v in labels.values())} drawn unsafe; of the {len(rule30)} the rule "
          f"calls unsafe, {sum(labels[p] == 0 for p, _ in rule30)} drawn unsafe")


def test_mine_rounds_with_a_judge_take_a_csv(tmp_path):
    csv = tmp_path / "p.csv"
    rows = [("a small knife and a small cat at night", 0), ("a large blade on stone", 0), ("a large knife on sand", 0),
            ("a small skull and a large ring on grass", 0), ("a small ring on sand", 1), ("a large cat at night", 1),
            ("a small star and a large ring on grass", 1), ("a large spoon on stone", 1)] * 3
    csv.write_text("prompt,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    base = [sys.executable, "-m", "train", "safeguider", "--model", str(TINYWORLD), "--csv", str(csv), "--epochs", "2",
            "--mine-rounds", "1"]
    proc = subprocess.run(base + ["--out", str(tmp_path / "no")], **ENV_ARGS)
    assert proc.returncode == 2 and "--mine-rounds with --csv / --i2p needs --mine-judge" in proc.stdout
    assert not (tmp_path / "no").exists()
    out = tmp_path / "sg"
    proc = subprocess.run(base + ["--out", str(out), "--mine-judge", "tinyworld", "--mine-images", "1"], **ENV_ARGS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = json.loads((out / "train_log.json").read_text())
    assert log["mine_label"]["spec"] == "tinyworld" if log["mined_variants"] else log["mine_label"] is None
    bad = subprocess.run(base + ["--out", str(tmp_path / "bad"), "--mine-judge", str(csv)], **ENV_ARGS)
    assert bad.returncode == 3 and "--mine-judge" in bad.stdout and not (tmp_path / "bad").exists()
    none = subprocess.run(base + ["--out", str(tmp_path / "none"), "--mine-judge", "tinyworld", "--mine-images", "0"],
                          **ENV_ARGS)
    assert none.returncode == 2 and "--mine-images 0 must be at least 1" in none.stdout
    assert not (tmp_path / "none").exists()


def test_a_resumed_run_takes_a_finished_rounds_rows(tmp_path):
    """Round k's fit and rows stay in OUT/mining/round<k>/ until the end: a resumed run reads them and neither
    trains nor searches that round again."""
    import shutil

    out = tmp_path / "sg"
    round0 = out / "mining" / "round0"
    shutil.copytree(WEIGHTS, round0, ignore=shutil.ignore_patterns("checkpoint.pt"))
    (round0 / "mined.json").write_text(json.dumps([["a small and a small cat", 0], ["a large ring", 1]]))
    proc = subprocess.run([sys.executable, "-m", "train", "safeguider", "--model", str(TINYWORLD), "--out", str(out),
                           "--prompts", "300", "--deletions", "1", "--epochs", "2", "--mine-rounds", "1", "--resume"],
                          **ENV_ARGS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = json.loads((out / "train_log.json").read_text())
    assert log["mined_variants"] == 2 and log["mined_unsafe"] == 1 and not (out / "mining").exists()
    assert "safeguider mining round 1: 2 prompts the search settles on, 1 of them unsafe" in proc.stdout
    assert "mining: search" not in proc.stderr
