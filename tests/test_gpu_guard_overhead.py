"""bench/gpu_guard_overhead.py on this CPU: the tiny architecture through the same code as the GPU run (no graphs),
and the real-size FLOP counts the GPU timings are read against."""

import json

import pytest


def test_tiny_run_writes_every_row_and_counts(tmp_path):
    from bench.__main__ import main

    out = tmp_path / "gpu_overhead.json"
    assert main(["gpu-overhead", "--arch", "tiny", "--device", "cpu", "--iters", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    r = res["archs"]["tiny"]
    rows = {"unet", "unet_again", "safepatch", "saferedir_check", "saferedir_redirect", "text_b1", "text_b64",
            *(f"safectrl_{m}_{layers}" for m in ("idle", "active") for layers in ("all", "up1"))}
    assert set(r["timings"]) == rows and all(v["median_ms"] > 0 for v in r["timings"].values())
    assert res["mode"] == "torch fp32, eager" and set(r["methods"].values()) == {"eager"}
    f = r["flops"]
    assert f["safepatch"] > f["unet"]                          # the encoder clone runs on top of the UNet
    assert f["safectrl_active_all"] > f["safectrl_active_up1"] > f["safectrl_idle_up1"] > f["unet"]
    assert f["safectrl_idle_all"] == f["safectrl_idle_up1"]   # idle: stock attention everywhere, the detector only
    assert r["blended_attn2_layers"]["all"] > r["blended_attn2_layers"]["up1"] > 0
    assert all(v > 0 for v in r["ratios"].values())
    assert out.with_suffix(".md").read_text().count("| tiny |") == len(f)
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
def test_real_size_flops_match_the_published_unet_costs():
    """SD 1.5 at 512 px and SDXL at 1024 px, batch 2: about 0.8 and 6.8 TFLOP per image (well-known counts)."""
    from bench.gpu_guard_overhead import architectures, count_flops

    arch = architectures()
    sd15, sdxl = count_flops(arch["sd15"]), count_flops(arch["sdxl"])
    assert 1.5e12 < sd15["unet"] < 1.7e12 and 13e12 < sdxl["unet"] < 14e12
    assert sdxl["text_b64"] == 64 * sdxl["text_b1"]
