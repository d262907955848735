"""All four guards in one bundle (``--guards safeguider,saferedir,safepatch,safectrl``), through the lean runtime:
benign prompts stay bit-identical to the unguarded bundle, every guard reports, and one Pipeline serves
concurrent calls with the same results as sequential ones (guards keep per-call state in the context)."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from guards import GUARDS
from runtime.pipeline import Pipeline


# a benign prompt no guard touches at seed 3. SafeCtrl (tau 0.07) blends on ~7% of benign images, red shapes
# among them ("a large red circle on sand" reads 0.23): the bench's "identical" column reports that tax
BENIGN = "a small purple heart and a large orange ring on grass"
UNSAFE = "a large green ring and a large knife on grass"
SETTINGS = dict(steps=10, guidance=5.0)


@pytest.fixture(scope="session")
def stack_plan(guarded_plan, tinyworld_dir):
    return guarded_plan(*GUARDS)


@pytest.fixture(scope="module")
def stack(stack_plan):
    with Pipeline.open(stack_plan) as pipe:
        yield pipe


def _strip_times(report):
    """The guard reports without wall-clock fields (they differ between runs)."""
    if isinstance(report, dict):
        return {k: _strip_times(v) for k, v in report.items() if not (k.endswith("_ms") or "time" in k or "seconds" in k)}
    if isinstance(report, list):
        return [_strip_times(v) for v in report]
    return report


def test_stack_manifest_and_benign_prompt_is_untouched(stack, tinyworld_plan):
    assert list(stack.bundle.manifest.guards) == list(GUARDS)  # written in registry order (guards.GUARDS)
    assert stack.guard_names == list(GUARDS)  # run in the manifest's order: text guards first
    guarded = stack.generate(BENIGN, seed=3, **SETTINGS)
    with Pipeline.open(tinyworld_plan) as base:
        plain = base.generate(BENIGN, seed=3, **SETTINGS)
    assert np.array_equal(guarded.images[0], plain.images[0])  # no guard fired: bit-identical
    g = guarded.report["guards"]
    assert g["safeguider"]["verdict"] == "safe"
    assert g["saferedir"]["triggered"] is False
    assert g["safepatch"]["active"] is False
    assert g["safectrl"]["triggered"] is False


def test_stack_unsafe_prompt_engages_the_guards(stack):
    g = stack.generate(UNSAFE, seed=3, **SETTINGS).report["guards"]
    assert g["safeguider"]["verdict"] == "unsafe" and "knife" in " ".join(g["safeguider"]["words_removed"])
    assert set(g) == set(GUARDS)
    # the guards after SafeGuider judge the conditioning the UNet gets: SafePatch's gate is the rewritten
    # prompt's, the same as when that prompt is given as it is
    alone = stack.generate(g["safeguider"]["final_prompt"], seed=3, **SETTINGS).report["guards"]["safepatch"]
    assert g["safepatch"]["gate"] == pytest.approx(alone["gate"], abs=1e-4)
    assert g["safepatch"]["active"] == alone["active"]


def test_idle_graph_runs_exactly_where_the_guards_are_idle(stack):
    """``denoise_idle`` (export/idle.py: no residual inputs, no ``safectrl_blend``, no Safety Guidance branch)
    computes what the full graph computes with those inputs at zero, and the pipeline runs it for exactly the
    steps where SafePatch is gated off and SafeCtrl does not blend."""
    full, idle = stack.engines["denoise"], stack.engines["denoise_idle"]
    dropped = {t.name for t in full.component.inputs} - {t.name for t in idle.component.inputs}
    assert dropped == {f"down_residual_{i}" for i in range(6)} | {"mid_residual", "safectrl_blend"}
    rng = np.random.default_rng(0)
    feeds = {t.name: rng.random(_shape(t), dtype=np.float32) for t in idle.component.inputs}
    feeds["timestep"] = np.array([500.0], np.float32)
    zeros = {t.name: np.zeros(_shape(t), np.float32) for t in full.component.inputs if t.name in dropped}
    got, want = idle.infer(feeds), full.infer({**feeds, **zeros})
    assert set(got) == set(want)
    for name in got:
        assert np.abs(got[name] - want[name]).max() <= 1e-5, name
    for prompt in (BENIGN, UNSAFE):  # (test_safepatch checks a patched call: no idle step)
        r = stack.generate(prompt, seed=3, **SETTINGS).report
        g = r["guards"]
        patched = set(range(SETTINGS["steps"])) if g["safepatch"]["active"] else set()
        busy = set(g["safectrl"]["blending_steps"]) | patched
        assert r["stages_ms"]["denoise_idle_steps"] == [i for i in range(SETTINGS["steps"]) if i not in busy]


def _shape(spec):  # the stack bundle's graphs are static but for the batch axis "N"
    return [2 if d == "N" else d for d in spec.shape]


def test_concurrent_calls_match_sequential(stack):
    jobs = [(BENIGN, 0), (UNSAFE, 1), (UNSAFE, 2), (BENIGN, 3)]
    sequential = [stack.generate(p, seed=s, **SETTINGS) for p, s in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda job: stack.generate(job[0], seed=job[1], **SETTINGS), jobs))
    for a, b in zip(sequential, concurrent):
        assert np.array_equal(a.images[0], b.images[0])
        assert _strip_times(a.report["guards"]) == _strip_times(b.report["guards"])


def test_idle_graph_policy():
    """``denoise_idle`` is built when a guard asks for it (SafePatch: zero residuals on every step of a gated-off
    prompt), not for SafeCtrl alone (measured: the mid-call session switch costs more than the idle graph saves);
    ``--idle-graph always|never`` override; a guard without step inputs never gets one; a bad mode is refused."""
    from export.build import BuildOptions, _check_request
    from export.guards import GuardParts
    from export.idle import wants_idle_graph
    from runtime.errors import BadInputError

    safepatch = GuardParts(residual_inputs=True, idle_graph=True)
    safectrl = GuardParts(extensions=["safectrl"])
    text = GuardParts(text_heads=["safeguider"])
    assert wants_idle_graph({"safepatch": safepatch})
    assert wants_idle_graph({"safepatch": safepatch, "safectrl": safectrl})
    assert not wants_idle_graph({"safectrl": safectrl}) and wants_idle_graph({"safectrl": safectrl}, "always")
    assert not wants_idle_graph({"safepatch": safepatch}, "never")
    assert not wants_idle_graph({"safeguider": text}, "always")
    with pytest.raises(BadInputError, match="--idle-graph 'sometimes'"):
        _check_request(BuildOptions(model=Path("m"), out=Path("o.plan"), idle_graph="sometimes"))
