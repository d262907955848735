"""`python -m bench latency` end to end on the tinyworld bundle (quick settings), and its helpers."""

import json
import os
import subprocess
import sys

import pytest

from bench.latency import aggregate, markdown, ratio_summary, summary
from tests.conftest import ROOT


def _check_summary(d):
    assert set(d) == {"min", "median", "max"}
    assert 0 <= d["min"] <= d["median"] <= d["max"]


def test_summary_and_ratios():
    assert summary([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0}
    assert ratio_summary([2.0, 4.0, 9.0], [1.0, 2.0, 3.0])["median"] == pytest.approx(2.0)
    agg = aggregate([{"tokenize": 1.0, "denoise_steps": [1.0, 3.0], "end_to_end": 10.0},
                     {"tokenize": 2.0, "denoise_steps": [2.0, 5.0], "end_to_end": 12.0}])
    assert agg["stages_ms"]["denoise_steps"][1] == {"min": 3.0, "median": 4.0, "max": 5.0}
    assert agg["stages_ms"]["denoise_step"]["median"] == pytest.approx(2.5)
    assert agg["end_to_end_ms"]["median"] == pytest.approx(11.0)


def test_bench_latency_cli(tinyworld_plan, tmp_path):
    out = tmp_path / "x.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "latency", "--engine", str(tinyworld_plan), "--baseline",
                           str(tinyworld_plan), "--quick", "--runs", "2", "--warmup", "0", "--quiet", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for key in ("backend", "providers", "machine", "settings", "stages_ms", "end_to_end_ms",
                "baseline_end_to_end_ms", "ratio_vs_baseline"):
        assert key in r, key
    for key in ("platform", "processor", "cores", "ram_gib", "onnxruntime"):
        assert key in r["machine"], key
    assert r["settings"]["runs"] == 2 and r["settings"]["warmup"] == 0
    for stage in ("tokenize", "text_encoder", "denoise_step", "denoise_total", "vae_decoder"):
        _check_summary(r["stages_ms"][stage])
    assert len(r["stages_ms"]["denoise_steps"]) == r["settings"]["steps"]
    for step in r["stages_ms"]["denoise_steps"]:
        _check_summary(step)
    _check_summary(r["end_to_end_ms"])
    _check_summary(r["baseline_end_to_end_ms"])
    assert isinstance(r["ratio_vs_baseline"], float) and r["ratio_vs_baseline"] > 0
    assert isinstance(r["step_ratio_vs_baseline"], float) and r["step_ratio_vs_baseline"] > 0
    step = r["step_ratio_vs_baseline_range"]
    assert step["min"] <= r["step_ratio_vs_baseline"] <= step["max"]
    if "reference_end_to_end_ms" in r:  # the manifest's source model folder exists in this checkout
        _check_summary(r["reference_end_to_end_ms"])
        assert isinstance(r["ratio_lean_vs_reference"], float) and r["ratio_lean_vs_reference"] > 0
        assert "torch" in r["machine"]
    md = out.with_name("x.json.md")
    png = out.with_name("x.json.png")
    assert md.is_file() and png.is_file()
    assert md.read_text() in proc.stdout and "| end to end |" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_markdown_without_extras():
    result = {"settings": {"runs": 1, "warmup": 0, "steps": 2, "scheduler": "ddim", "guidance": 5.0, "height": 64,
                           "width": 64, "prompt_set": "benign"}, "machine": {"description": "test"},
              "backend": "auto", "stages_ms": {"tokenize": {"min": 1.0, "median": 1.0, "max": 1.0}},
              "end_to_end_ms": {"min": 2.0, "median": 2.0, "max": 2.0}}
    text = markdown(result)
    assert "| tokenize | 1.00 (1.00-1.00) |" in text and "ratio" not in text
