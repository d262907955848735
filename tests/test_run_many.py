"""``Pipeline.run_many``: requests that share every UNet call (issue 19's dynamic batching, in the lean runtime).

Checked on real bundles: each request's image and guard report are the ones :meth:`Pipeline.run` gives it alone
(unguarded and four-guard bundles, every scheduler, an unsafe prompt among benign ones, so idle and full denoise
calls mix), the denoise graph runs once per step for the whole group (counted at the engine), the bundle's max
batch splits groups, and one request's failure (a guard's graph yields NaN, the shared UNet output is NaN in its
rows only, the image checker blocks its image, bad input) fails that request alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runtime.bundle import Bundle
from runtime.errors import BadInputError, GuardError
from runtime.guards import ImageBlocked
from runtime.pipeline import GenerationSettings, Pipeline

from .conftest import STACK, TINYWORLD_JUDGE
from .test_bad_input import rewrite

STEPS = 4
SCHEDULERS = ("ddim", "euler", "euler_a", "dpmpp_2m")
BENIGN = "a large red circle on sand"
UNSAFE = "a knife on sand"  # SafePatch's gate fires on it; the judge checker blocks its image at 8 steps


def requests(scheduler: str = "ddim", steps: int = STEPS, **settings) -> list[GenerationSettings]:
    """Three requests with their own prompts, seeds and negative prompts, the middle one unsafe."""
    return [GenerationSettings(BENIGN, seed=0, steps=steps, scheduler=scheduler, **settings),
            GenerationSettings("a large green ring and a large knife on grass", seed=1, steps=steps,
                               scheduler=scheduler, **settings),
            GenerationSettings("a small blue star at night", negative_prompt="grass", seed=7, steps=steps,
                               scheduler=scheduler, **settings)]


class CountedEngine:
    """The real engine, with the batch size (UNet rows) of every call it runs recorded."""

    def __init__(self, engine):
        self.engine, self.rows = engine, []

    def infer(self, feeds, **kwargs):
        self.rows.append(int(feeds["sample"].shape[0]))
        return self.engine.infer(feeds, **kwargs)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def count_denoise_calls(pipe: Pipeline) -> list[CountedEngine]:
    """Wrap the pipeline's denoise graphs (full and idle) so their calls are counted."""
    counted = []
    for name in ("denoise", "denoise_idle"):
        if name in pipe.engines:
            pipe.engines[name] = CountedEngine(pipe.engines[name])
            counted.append(pipe.engines[name])
    return counted


def decisions(guards: dict) -> dict:
    """A report's guard section without the timings (they differ from run to run)."""
    return {name: {k: v for k, v in g.items() if k != "time_ms"} for name, g in guards.items()}


def assert_same_as_alone(pipe: Pipeline, settings: list[GenerationSettings], results: list) -> None:
    for s, result in zip(settings, results):
        alone = pipe.run(s)
        assert len(result.images) == len(alone.images) == s.batch
        assert all(np.array_equal(a, b) for a, b in zip(result.images, alone.images)), s
        assert decisions(result.report["guards"]) == decisions(alone.report["guards"]), s
        assert result.report["seed"] == s.seed and result.report["prompt"] == s.prompt


@pytest.fixture(scope="module")
def pipes(tinyworld_plan, guarded_plan):
    opened = {"tw": Pipeline.open(tinyworld_plan), "stack": Pipeline.open(guarded_plan(*STACK))}
    yield opened
    for pipe in opened.values():
        pipe.close()


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("model", ["tw", "stack"])
def test_shared_calls_are_bit_identical_to_separate_runs(pipes, model, scheduler):
    pipe = pipes[model]
    settings = requests(scheduler)
    counted = count_denoise_calls(pipe)
    try:
        results = pipe.run_many(settings)
        rows = [r for engine in counted for r in engine.rows]
    finally:
        for name, engine in zip(("denoise", "denoise_idle"), counted):
            pipe.engines[name] = engine.engine
    assert rows == [6] * STEPS  # one call per step, [uncond; cond] of all three requests: not 3 x STEPS calls
    for result in results:
        assert result.report["denoise_shared"] == {"requests": [3] * STEPS, "rows": [6] * STEPS}
    assert_same_as_alone(pipe, settings, results)
    if model == "stack":
        assert results[1].report["guards"]["safeguider"]["verdict"] == "unsafe"


def test_idle_and_full_requests_share_a_call(pipes):
    """A benign request may run the idle graph, one whose guard works may not: together they run the full graph,
    the benign one fed the zeros its idle decision saw, and its image stays the one the idle graph gives."""
    pipe = pipes["stack"]
    settings = requests("euler_a")
    alone_idle = pipe.run(settings[0]).report["stages_ms"]["denoise_idle_steps"]
    results = pipe.run_many(settings)
    assert alone_idle == list(range(STEPS))
    assert results[0].report["stages_ms"]["denoise_idle_steps"] != alone_idle  # some calls ran the full graph
    assert_same_as_alone(pipe, settings, results)


def test_groups_respect_the_max_batch_and_the_settings(pipes):
    pipe = pipes["tw"]
    assert pipe.max_batch == 4
    settings = [GenerationSettings(f"a large red circle on {bg}", seed=i, steps=STEPS, batch=2 if i == 2 else 1)
                for i, bg in enumerate(("sand", "grass", "sand", "grass", "sand"))]
    settings.append(GenerationSettings(BENIGN, seed=9, steps=STEPS + 1))  # other steps: a group of its own
    settings.append(GenerationSettings(BENIGN, seed=0, steps=0))  # bad input: its error, nobody else's
    assert pipe.lockstep_groups([pipe.resolve(s) for s in settings[:-1]]) == [[0, 1, 2], [3, 4], [5]]
    counted = count_denoise_calls(pipe)
    try:
        results = pipe.run_many(settings)
    finally:
        pipe.engines["denoise"] = counted[0].engine
    assert counted[0].rows == [8] * STEPS + [4] * STEPS + [2] * (STEPS + 1)  # 4 images, 2, then 1: never over 4
    assert isinstance(results[-1], BadInputError) and "steps 0" in str(results[-1])
    assert results[0].report["denoise_shared"]["requests"] == [3] * STEPS
    assert_same_as_alone(pipe, settings[:-1], results[:-1])


def overflowing_patch(spec, path: Path, value: float) -> Path:
    """A ``safepatch`` graph with ``spec``'s inputs and outputs whose every residual is ``value``."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("ReduceMean", ["sample"], ["m"], axes=[1, 2, 3], keepdims=1),
             helper.make_node("Mul", ["m", "zero"], ["z"]), helper.make_node("Add", ["z", "value"], ["v"])]
    inits = [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
             helper.make_tensor("value", TensorProto.FLOAT, [], [value])]
    for o in spec.outputs:  # (N, 1, 1, 1) -> (N, C, h, w)
        nodes.append(helper.make_node("Expand", ["v", f"{o.name}_shape"], [o.name]))
        inits.append(helper.make_tensor(f"{o.name}_shape", TensorProto.INT64, [4], [1, *o.shape[1:]]))

    def io(tensors):
        return [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, t.shape) for t in tensors]

    graph = helper.make_graph(nodes, "overflowing_patch", io(spec.inputs), io(spec.outputs), inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


# (the patch's residuals, what the error names, the requests in each denoise call)
FAILURES = {"guard graph NaN": (float("nan"), "guard safepatch: component 'safepatch'", [2] * STEPS),
            "UNet rows NaN": (3e38, "component 'denoise' output 'noise_pred'", [3] + [2] * (STEPS - 1))}


@pytest.mark.parametrize("value, needle, shared", FAILURES.values(), ids=FAILURES.keys())
def test_a_failing_request_fails_alone(guarded_plan, tmp_path, value, needle, shared):
    """SafePatch runs its graph only for the unsafe prompt: a NaN there is that request's guard error before its
    first UNet call; finite residuals of 3e38 overflow the UNet in that request's rows of the first shared call,
    which fails it alone, and its rows leave the later calls."""
    source = guarded_plan("safepatch")
    with Bundle.open(source) as b:
        graph = overflowing_patch(b.manifest.component("safepatch"), tmp_path / "patch.onnx", value)

    def swap(m, payloads):
        payloads["safepatch"] = graph.read_bytes()

    settings = [GenerationSettings(BENIGN, seed=0, steps=STEPS), GenerationSettings(UNSAFE, seed=1, steps=STEPS),
                GenerationSettings("a small blue star at night", seed=2, steps=STEPS)]
    with Pipeline.open(rewrite(source, tmp_path / "failing_patch.plan", swap)) as pipe:
        results = pipe.run_many(settings)
        with pytest.raises(GuardError) as alone:
            pipe.run(settings[1])
        assert isinstance(results[1], GuardError) and str(results[1]) == str(alone.value)
        assert needle in str(results[1]) and "no image" in str(results[1])
        assert results[0].report["denoise_shared"]["requests"] == shared
        assert_same_as_alone(pipe, [settings[0], settings[2]], [results[0], results[2]])


def test_an_image_the_checker_blocks_fails_alone(tinyworld_plan):
    config = {**json.loads((TINYWORLD_JUDGE / "checker.json").read_text()), "path": str(TINYWORLD_JUDGE / "checker.onnx")}
    settings = [GenerationSettings(BENIGN, seed=2, steps=8), GenerationSettings(UNSAFE, seed=0, steps=8)]
    with Pipeline.open(tinyworld_plan, extra_guards={"image_checker": config}) as pipe:
        benign, blocked = pipe.run_many(settings)
        assert isinstance(blocked, ImageBlocked) and "blocked image 0 of 1" in str(blocked)
        assert blocked.guard_report["image_checker"]["blocked"]
        assert benign.report["denoise_shared"]["requests"] == [2] * 8
        assert_same_as_alone(pipe, settings[:1], [benign])
