"""``python -m export build`` end to end on tinyworld: fast, inspectable, tamper-evident, all-or-nothing."""

import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from runtime.bundle import Bundle

from .conftest import ROOT, TINYWORLD

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)


def test_build_is_fast(tinyworld_build):
    seconds = tinyworld_build[1]
    print(f"tinyworld bundle built in {seconds:.1f} s")
    assert seconds < 120, f"build took {seconds:.0f} s (acceptance: under 2 minutes)"


def test_bundle_contents_and_info(tinyworld_plan):
    with Bundle.open(tinyworld_plan) as b:
        m = b.manifest
        names = {c.name for c in m.components}
        assert {"text_encoder", "denoise", "vae_decoder"} <= names
        assert m.latent == {"channels": 4, "scale_factor": 4, "scaling_factor": pytest.approx(m.latent["scaling_factor"])}
        assert m.tokenizers[0]["max_length"] == 16
        # built without --profile: the model's own size (16 x factor 4) and the tinyworld profile it matches
        assert m.defaults["height"] == m.defaults["width"] == 64
        assert (m.defaults["steps"], m.defaults["guidance_scale"], m.created_by["profile"]) == (20, 5.0, "tinyworld")
        assert {c.precision for c in m.components if c.backend == "onnx"} == {"fp32"}
        text = m.component("text_encoder")
        assert [t.shape for t in text.inputs] == [["B", "L"]]
        # the packed graph runs: text stage on a real prompt's ids
        sess = ort.InferenceSession(bytes(b.payload("text_encoder")), providers=["CPUExecutionProvider"])
        ids = np.full((3, 16), 662, np.int32)
        ids[:, 0] = 661
        hidden, eos = sess.run(["hidden", "eos"], {"input_ids": ids})
        assert hidden.shape == (3, 16, 128) and eos.shape == (3, 128) and np.isfinite(hidden).all()
    proc = _run("-m", "runtime", "info", str(tinyworld_plan))
    assert proc.returncode == 0 and "denoise" in proc.stdout and "vae_decoder" in proc.stdout


def _expect_bundle_error(path):
    proc = _run("-m", "runtime", "info", str(path))
    assert proc.returncode == 4, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    return lines[0]


def test_every_payload_is_tamper_evident(tinyworld_plan, tmp_path):
    data = tinyworld_plan.read_bytes()
    with Bundle.open(tinyworld_plan, verify=False) as b:
        components = [(c.name, c.offset, c.size) for c in b.manifest.components]
    for name, offset, size in components:
        bad = bytearray(data)
        bad[offset + size // 2] ^= 0xFF
        p = tmp_path / "flipped.plan"
        p.write_bytes(bad)
        assert name in _expect_bundle_error(p)


@pytest.mark.parametrize("damage", ["truncate_header", "truncate_payload", "magic", "version"])
def test_damaged_bundle_is_refused(tinyworld_plan, tmp_path, damage):
    data = bytearray(tinyworld_plan.read_bytes())
    if damage == "truncate_header":
        data = data[:20]
    elif damage == "truncate_payload":
        data = data[: len(data) - 1000]
    elif damage == "magic":
        data[:8] = b"NOTAPLAN"
    else:
        data[8:12] = (99).to_bytes(4, "little")
    p = tmp_path / "damaged.plan"
    p.write_bytes(bytes(data))
    _expect_bundle_error(p)


def _leftovers(folder, keep):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.mark.parametrize("args,code,needle", [
    (["--model", "/nonexistent/model"], 3, "does not exist"),
    (["--model", str(TINYWORLD), "--guards", "safeguider", "--guard-dir", "/nonexistent"], 3, "no trained weights"),
    (["--model", str(TINYWORLD), "--guards", "nope"], 3, "unknown guard"),
    (["--model", str(TINYWORLD), "--height", "60"], 3, "multiple of 8"),
    (["--model", str(TINYWORLD), "--backend", "tensorrt"], 5, "tensorrt"),
    (["--model", str(TINYWORLD), "--profile", "no-such-profile"], 3, "no-such-profile"),
    (["--model", str(TINYWORLD), "--guards", "safeguider", "--guard-setting", "mode=search"], 3, "GUARD.KEY=VALUE"),
    (["--model", str(TINYWORLD), "--guards", "safeguider", "--guard-setting", "safeguider.mode=gate"], 3,
     "no guard of the bundle removes on its flag"),
    (["--model", str(TINYWORLD), "--guards", "safeguider", "--guard-weights", "safepatch=models/x"], 3,
     "not among --guards"),
])
def test_failed_build_writes_nothing_and_keeps_the_old_bundle(tmp_path, args, code, needle):
    out = tmp_path / "model.plan"
    out.write_bytes(b"previous bundle")
    proc = _run("-m", "export", "build", *args, "--out", str(out))
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert needle.lower() in proc.stderr.lower()
    assert "Traceback" not in proc.stderr
    assert out.read_bytes() == b"previous bundle"
    assert _leftovers(tmp_path, {"model.plan"}) == []


def test_fp16_build_of_a_tiny_fixture(tmp_path):
    """No --height/--width: the fixture's own size (UNet sample_size 32 x VAE factor 2); its family's profile."""
    from export.families.fixtures import make_tiny

    model = make_tiny("sd1", tmp_path / "sd1")
    out = tmp_path / "sd1.plan"
    proc = _run("-m", "export", "build", "--model", str(model), "--out", str(out), "--precision", "fp16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Bundle.open(out) as b:
        assert {c.precision for c in b.manifest.components if c.backend == "onnx"} == {"fp16"}
        m = b.manifest
        assert (m.defaults["height"], m.defaults["width"], m.created_by["profile"]) == (64, 64, "sd1")
        assert m.component("denoise").inputs[0].shape[-2:] == [32, 32]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_profile_and_size_come_from_the_model(tmp_path, family, tinyworld_dir):
    """A backbone picks the first profile whose "match" fits it, else its family's; the image size is its own."""
    from export.families import load_backbone, make_tiny
    from export.tensorrt import select_build_profile

    backbone = load_backbone(make_tiny(family, tmp_path / family))
    assert select_build_profile(backbone)["family"] == family
    assert backbone.image_size == backbone.unet.config.sample_size * backbone.vae_scale_factor == 64
    assert select_build_profile(backbone, "tinyworld")["family"] == "tinyworld"  # --profile overrides
    if family == "sd1":
        tiny = load_backbone(tinyworld_dir)
        assert (tiny.family, select_build_profile(tiny)["family"], tiny.image_size) == ("sd1", "tinyworld", 64)
