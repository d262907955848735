"""Acceptance (runtime issue): 1000 consecutive generations through the API keep resident memory flat."""

import pytest

from runtime.pipeline import Pipeline


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.mark.slow
def test_1000_generations_keep_memory_flat(tinyworld_plan):
    samples = {}
    with Pipeline.open(tinyworld_plan) as pipe:
        for i in range(1000):
            pipe.generate("a large red circle and a small knife on sand", seed=i)
            if i + 1 in (51, 1000):  # after warm-up (ONNX Runtime's arena grows in the first calls), and at the end
                samples[i + 1] = _rss_mb()
    growth = (samples[1000] - samples[51]) / samples[51]
    print(f"RSS after 51: {samples[51]:.1f} MB, after 1000: {samples[1000]:.1f} MB ({growth:+.2%})")
    assert abs(growth) <= 0.05
