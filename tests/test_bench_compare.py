"""`python -m bench compare`: the guard table from recorded results, one protocol per table, and old vs new.

The new-format results are small hand-written JSONs with the keys `bench safety` writes (the format itself is
checked end to end in tests/test_bench_safety.py); the old ones are the committed results in
bench/results/before_dev_test."""

import json
import shutil

from bench.__main__ import main
from bench.safety import COUNTING
from tests.conftest import ROOT

BEFORE = ROOT / "bench" / "results" / "before_dev_test"


def _result(split="test", quick=False, **over):
    r = {"engine": "x.plan", "guards": [], "split": split, "counting": COUNTING, "images": 900,
         "prompts": {"benign": 60, "explicit": 60, "heldout": 60, "implicit": 30},
         "unsafe_rate_explicit": 0.5, "unsafe_rate_heldout": 0.25, "unsafe_rate_implicit": 0.125,
         "benign_attribute_accuracy": 0.98, "benign_identical_share": 1.0, "benign_feature_distance": 0.0,
         "unsafe_faithfulness": 0.75, "attack_success_rate": 0.9, "attack_budget": 20,
         "blocked": {"benign": 0, "explicit": 2, "heldout": 1, "implicit": 0, "attack": 1, "total": 4},
         "errors": {"benign": 1, "explicit": 1, "heldout": 0, "implicit": 0, "attack": 0, "total": 2},
         "settings": {"quick": quick, "split": split}}
    return {**r, **over}


def _write(folder, name, result):
    (folder / f"safety_tinyworld_{name}.json").write_text(json.dumps(result))


def test_table_shows_split_blocked_and_errors(tmp_path, capsys):
    _write(tmp_path, "none", _result())
    _write(tmp_path, "stack", _result(unsafe_rate_explicit=0.0))
    (tmp_path / "latency_tinyworld_stack_benign.json").write_text(json.dumps({"ratio_vs_baseline": 1.05}))
    out = tmp_path / "g.md"
    assert main(["compare", "--results", str(tmp_path), "--out", str(out)]) == 0
    md = out.read_text()
    assert md == capsys.readouterr().out
    assert md.startswith("Guards on the tinyworld test split; unsafe = any unsafe kind the judge sees")
    assert "| ASR (budget) | adaptive ASR @50 | blocked | errors | overhead benign |" in md
    assert "| none (unguarded) | full, test, 900 img | 50.0% |" in md
    assert "| all four (stack) | full, test, 900 img | 0.0% |" in md and "| 1.050 | - |" in md
    assert md.count("| 3 (+1 attack) | 2 |") == 2
    assert (tmp_path / "g.md.png").stat().st_size > 0
    assert "adaptive" not in md.splitlines()[0] and not (tmp_path / "attack_adaptive.png").exists()  # none measured


def test_world_picks_its_own_results(tmp_path, capsys):
    """--world tinyworld-xl reads safety_tinyworld_xl_*.json / latency_tinyworld_xl_* and ignores tinyworld's."""
    _write(tmp_path, "none", _result(unsafe_rate_explicit=1.0))
    (tmp_path / "safety_tinyworld_xl_safepatch.json").write_text(json.dumps(_result(unsafe_rate_explicit=0.0)))
    (tmp_path / "latency_tinyworld_xl_safepatch_unsafe.json").write_text(json.dumps({"ratio_vs_baseline": 1.3}))
    out = tmp_path / "xl.md"
    assert main(["compare", "--world", "tinyworld-xl", "--results", str(tmp_path), "--out", str(out)]) == 0
    md = out.read_text()
    assert md.startswith("Guards on the tinyworld-xl test split")
    assert "| SafePatch | full, test, 900 img | 0.0% |" in md and "| - | 1.300 |" in md
    assert "none (unguarded)" not in md and len(md.strip().splitlines()) == 5  # note, blank, header, rule, one row
    # its adaptive results go to a chart of its own: tinyworld's attack_adaptive.* is left alone
    outcomes = [{"group": "explicit", "first_success": q, "success": q is not None} for q in (3, None)]
    (tmp_path / "attack_adaptive_tinyworld_xl_safepatch.json").write_text(json.dumps(
        {"budget": 50, "asr": {"20": 0.5, "50": 0.5}, "asr_per_group": {"explicit": {"20": 0.5, "50": 0.5}},
         "targets": {"split": "test", "prompts": {"explicit": 2}}, "outcomes": outcomes, "won_unedited": 0,
         "blocked": 0, "errors": 0, "seconds": 1.0, "queries_to_success": {"mean": 3.0, "median": 3.0}}))
    assert main(["compare", "--world", "tinyworld-xl", "--results", str(tmp_path), "--out", str(out)]) == 0
    assert "| 50.0% |" in out.read_text()
    assert (tmp_path / "attack_adaptive_tinyworld_xl.png").stat().st_size > 0
    assert (tmp_path / "attack_adaptive_tinyworld_xl.md").is_file() and not (tmp_path / "attack_adaptive.png").exists()


def test_adaptive_column_and_plot_from_first_successes(tmp_path, capsys):
    """The adaptive ASR cell and plot come from each target's first success: @50 and, when run longer, @200."""
    _write(tmp_path, "none", _result())
    _write(tmp_path, "stack", _result())
    first = [1, 10, 60, 150, None]
    outcomes = [{"group": "explicit", "first_success": q, "success": q is not None} for q in first]
    common = {"targets": {"split": "test", "prompts": {"explicit": 5}}, "outcomes": outcomes, "won_unedited": 1,
              "blocked": 7, "errors": 0, "seconds": 12.5, "queries_to_success": {"mean": 55.25, "median": 35.0}}
    (tmp_path / "attack_adaptive_stack.json").write_text(json.dumps(
        {"budget": 200, "asr": {"20": 0.4, "50": 0.4, "200": 0.8},
         "asr_per_group": {"explicit": {"20": 0.4, "50": 0.4, "200": 0.8}}, **common}))
    (tmp_path / "attack_adaptive_none.json").write_text(json.dumps(
        {"budget": 50, "asr": {"20": 0.4, "50": 0.4}, "asr_per_group": {"explicit": {"20": 0.4, "50": 0.4}},
         **common}))
    assert main(["compare", "--results", str(tmp_path), "--out", str(tmp_path / "g.md")]) == 0
    md = capsys.readouterr().out
    assert "adaptive ASR = `bench adaptive`" in md and "test split, 5 targets" in md
    assert "| 90.0% (20) | 40.0% (80.0% @200) | 3 (+1 attack) |" in md  # stack
    assert "| 90.0% (20) | 40.0% | 3 (+1 attack) |" in md  # unguarded, budget 50 only
    assert (tmp_path / "attack_adaptive.png").stat().st_size > 0
    per_row = (tmp_path / "attack_adaptive.md").read_text()
    assert ("| all four (stack) | 200 | 40.0% | 40.0% | 80.0% | 40.0% / - / - | 55.2 / 35.0 | 1 | 7 | 0 | 12.5 |"
            in per_row)
    assert "| none (unguarded) | 50 | 40.0% | 40.0% | - |" in per_row


def test_mixed_splits_or_counting_rules_are_refused(tmp_path, capsys):
    _write(tmp_path, "none", _result())
    shutil.copy(BEFORE / "safety_tinyworld_safeguider.json", tmp_path)  # eval split, own-category counting
    out = tmp_path / "g.md"
    assert main(["compare", "--results", str(tmp_path), "--out", str(out)]) == 3
    err = capsys.readouterr().out.strip()
    assert err.startswith("error: results of different splits or counting rules") and "\n" not in err
    assert "safety_tinyworld_none.json: test split, any-unsafe counting" in err
    assert "safety_tinyworld_safeguider.json: eval split, own-category counting" in err
    assert not out.exists()
    (tmp_path / "safety_tinyworld_safeguider.json").unlink()
    _write(tmp_path, "saferedir_quick", _result(split="dev", quick=True))  # a dev run next to a test run
    assert main(["compare", "--results", str(tmp_path), "--out", str(out)]) == 3
    assert "saferedir_quick.json: dev split" in capsys.readouterr().out and not out.exists()


def test_before_prints_old_against_new(tmp_path, capsys):
    _write(tmp_path, "none", _result())
    _write(tmp_path, "safectrl", _result(unsafe_rate_heldout=0.0, attack_success_rate=None))
    assert main(["compare", "--results", str(tmp_path), "--before", str(BEFORE)]) == 0
    text = capsys.readouterr().out
    head, _, body = text.partition("\n\n")
    assert head.startswith("Old: eval split, unsafe = an unsafe object of the prompt's own category")
    assert "New: test split, unsafe = any unsafe kind the judge sees" in head
    old = {r: json.loads((BEFORE / f"safety_tinyworld_{r}.json").read_text()) for r in ("none", "safectrl", "stack")}
    pct = "{:.1%}".format
    assert (f"| none (unguarded) | {old['none']['images']} -> 900 | {pct(old['none']['unsafe_rate_explicit'])} -> "
            f"50.0% |") in body
    assert f"| {pct(old['safectrl']['unsafe_rate_heldout'])} -> 0.0% |" in body
    assert f"| {pct(old['safectrl']['attack_success_rate'])} -> - |" in body
    assert f"| all four (stack) | {old['stack']['images']} -> - | " in body  # no new result yet
    assert sorted(p.name for p in tmp_path.iterdir()) == ["safety_tinyworld_none.json",
                                                         "safety_tinyworld_safectrl.json"]  # nothing written
    assert main(["compare", "--results", str(tmp_path), "--before", str(tmp_path / "empty")]) == 3
