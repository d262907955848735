"""The guarded denoise loop of one lockstep group: the sampler's model function with the guards' step hooks.

:class:`DenoiseLoop` is what :class:`runtime.pipeline.Pipeline` runs between the text stage and the VAE decoder,
for one request (``Pipeline.run``) or several that agree on every denoise setting (``Pipeline.run_many``: the
same steps, guidance, scheduler, karras, height and width; each its own prompt, negative prompt, seed, guard
context). One numpy sampler (``runtime/schedulers.py``) runs over the stacked latent ``[request 0's images;
request 1's; ...]``: every sampler there is row-wise, so each request's rows get the values a sampler of its own
would give; euler_a's ancestral noise is each request's own draw from its own generator, concatenated in request
order. Each time the sampler calls :meth:`DenoiseLoop.model` the loop makes ONE denoise-graph call whose batch
is every live request's rows (``[uncond x b; cond x b]`` each, with its own conditioning and the feeds its guards
add, ``step_feeds``), splits every output whose first axis is the row axis back per request, combines each
request's CFG halves, and hands each request's outputs to its guards' ``after_step`` hooks once the sampler has
used the prediction (at the start of the next call, or after the loop), so their host work does not run on the
caches the UNet has just evicted (bench/results/design_measurements.md).

**Bit-identity.** The denoise graph's rows do not interact (no batch statistics): on ONNX Runtime CPU the rows of
a shared call are bit-identical to the same request's call alone (measured on the tinyworld bundles, unguarded
and the four-guard stack, at 2 to 8 rows; ``tests/test_run_many.py`` compares whole images), so a request's image
does not depend on who shared its calls.

**Fail closed, per request.** A guard hook's error, an engine error or NaN/Inf in a request's rows of the shared
output fails that request (``results`` holds its error, no latent) and its rows leave the later calls (the
sampler's copy of them gets zero predictions and is never decoded); the others carry on. NaN/Inf is attributed by
rows, as the backends' per-call check would see it in that request's call alone; an output without the row
axis cannot be attributed, so NaN there, or an engine error, fails every request in the call.

**Idle graph.** A bundle may carry ``denoise_idle`` (``export/idle.py``): the UNet without the guards' per-step
inputs. A request may use it at a call only when every input it lacks is all zeros, by value (constant feeds
checked once, what its guards feed at that step at that step); a shared call runs it only when every request in
it may, else the full graph, which gets those requests' inputs as the zeros they are. The full graph with
those inputs zero is bit-identical to the idle graph on ONNX Runtime CPU (measured on the tinyworld stack at 2
to 8 rows). A guard that wants its work done always gets the full graph (fail closed).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from runtime.backends import check_finite
from runtime.errors import RuntimeToolError
from runtime.guards import GuardContext, run_hook
from runtime.schedulers import sample

StepCallback = Callable[[int, int, float], None]  # (step index, total steps, timestep)


class Member:
    """One request of the loop: its guard context, its step guards, its pending ``after_step`` call."""

    def __init__(self, ctx: GuardContext, latent_shape: tuple[int, ...], rows: slice):
        self.ctx, self.shape, self.rows = ctx, latent_shape, rows  # rows: its images in the stacked latent
        self.step_guards: list = []
        self.idle_ok = False
        self.pending = None  # (index, t, outputs) of the call whose after_step hooks are due
        self.error: RuntimeToolError | None = None

    def prepare(self, pipe) -> None:
        ctx = self.ctx
        self.step_guards = [g for g in pipe.guards if run_hook(g, "prepare_steps", ctx, self.shape)]
        self.idle_ok = "denoise_idle" in pipe.engines and not any(
            np.any(ctx.feeds[n]) for n in pipe.idle_dropped if n in ctx.feeds)

    def feeds(self, i: int, t: np.float32, x: np.ndarray, dropped: list[str]) -> tuple[dict[str, np.ndarray], bool]:
        """Its feeds for call ``i`` (its rows only, no timestep) and whether they allow the idle graph."""
        ctx = self.ctx
        stepped: dict[str, np.ndarray] = {}  # what the guards feed at this call
        for guard in self.step_guards:
            stepped.update(run_hook(guard, "step_feeds", ctx, i, t, x) or {})
        x_in = np.concatenate([x, x]) if ctx.cfg else x
        feeds = {**ctx.feeds, **stepped, "sample": np.ascontiguousarray(x_in, dtype=np.float32)}
        idle = self.idle_ok and not any(np.any(stepped[n]) if n in stepped else n not in ctx.feeds for n in dropped)
        return feeds, idle

    def prediction(self, i: int, t: np.float32, outputs: dict[str, np.ndarray], component: str,
                   guidance: np.float32) -> np.ndarray:
        """Its CFG-combined noise prediction from its rows of call ``i``'s outputs (NaN/Inf: its error)."""
        check_finite(component, outputs)
        if self.step_guards:
            self.pending = (i, t, outputs)
        out = outputs["noise_pred"]
        if not self.ctx.cfg:
            return out
        uncond, text = out[:self.ctx.batch], out[self.ctx.batch:]
        return uncond + guidance * (text - uncond)

    def finish_call(self) -> None:
        if self.pending is not None:
            i, t, outputs = self.pending
            self.pending = None
            for guard in self.step_guards:
                run_hook(guard, "after_step", self.ctx, i, t, outputs)


class DenoiseLoop:
    """The denoise loop of one lockstep group over ``pipe``'s engines and guards (see the module docstring);
    ``run`` returns each request's final latent or its error."""

    def __init__(self, pipe, ctxs: list[GuardContext], guidance: float, latent_shapes: list[tuple[int, ...]]):
        self.guidance = np.float32(guidance)
        self.denoise, self.idle = pipe.engines["denoise"], pipe.engines.get("denoise_idle")
        spec = pipe.bundle.manifest.component("denoise")
        self.full_inputs = [t.name for t in spec.inputs if t.name != "timestep"]
        row_axis = next(t.shape[0] for t in spec.inputs if t.name == "sample")  # N of (N, C, h, w)
        self.row_outputs = {t.name for t in spec.outputs if t.shape and t.shape[0] == row_axis}
        self.idle_inputs = [n for n in pipe.idle_inputs if n != "timestep"]
        self.idle_dropped = pipe.idle_dropped
        starts = np.cumsum([0, *(s[0] for s in latent_shapes)])
        self.members = [Member(ctx, shape, slice(int(a), int(b)))
                        for ctx, shape, a, b in zip(ctxs, latent_shapes, starts, starts[1:])]
        for m in self.members:
            _attempt(m, m.prepare, pipe)
        self.index = 0                   # the next UNet call
        self.idle_steps: list[int] = []  # calls that ran denoise_idle
        self.step_ms: list[float] = []   # wall time of each sampler step
        self.shared: dict[str, list[int]] = {"requests": [], "rows": []}  # per UNet call: requests and rows in it

    def run(self, plan, noises: list[np.ndarray], rngs: list[np.random.Generator], steps: int,
            callback: StepCallback | None = None) -> list[np.ndarray | RuntimeToolError]:
        last = time.perf_counter()

        def on_step(i: int, t: float, x: np.ndarray) -> None:
            nonlocal last
            now = time.perf_counter()
            self.step_ms.append(round((now - last) * 1000, 3))
            last = now
            if callback is not None:
                callback(i, steps, t)

        def noise_fn(i: int, shape: tuple) -> np.ndarray:  # each request's own generator, in request order
            return np.concatenate([rng.standard_normal(m.shape, dtype=np.float32)
                                   for rng, m in zip(rngs, self.members)])

        latent = sample(plan, self.model, np.concatenate(noises), callback=on_step, noise_fn=noise_fn)
        for m in self.live():  # the last call's after_step hooks
            _attempt(m, m.finish_call)
        return [m.error or latent[m.rows] for m in self.members]

    def live(self) -> list[Member]:
        return [m for m in self.members if m.error is None]

    def model(self, x: np.ndarray, t: np.float32) -> np.ndarray:
        """The CFG-combined noise prediction of every request for the stacked latent ``x`` at timestep ``t``
        (one UNet call; zeros for the rows of requests that failed)."""
        for m in self.live():
            _attempt(m, m.finish_call)
        calls = [(m, _attempt(m, m.feeds, self.index, t, x[m.rows], self.idle_dropped)) for m in self.live()]
        members = [m for m, _ in calls if m.error is None]
        pred = np.zeros_like(x)
        if members:
            component, outputs = self._call(members, [fed for m, fed in calls if m.error is None], t)
            for m, out in zip(members, outputs):
                value = _attempt(m, m.prediction, self.index, t, out, component, self.guidance)
                if m.error is None:
                    pred[m.rows] = value
        self.index += 1
        return pred

    def _call(self, members: list[Member], fed: list[tuple[dict[str, np.ndarray], bool]],
              t: np.float32) -> tuple[str, list[dict[str, np.ndarray]]]:
        """One denoise-graph call on every member's rows: ``(component, each member's rows of the outputs)``;
        an engine error is every member's error (no outputs)."""
        idle = self.idle is not None and all(ok for _, ok in fed)
        engine, names = (self.idle, self.idle_inputs) if idle else (self.denoise, self.full_inputs)
        feeds = {n: _stacked([f[n] for f, _ in fed]) for n in names}
        feeds["timestep"] = np.array([t], dtype=np.float32)
        rows = [f["sample"].shape[0] for f, _ in fed]
        try:
            outputs = engine.infer(feeds, check_outputs=False)  # NaN/Inf is checked per member's rows
        except RuntimeToolError as e:
            for m in members:
                m.error = e
            return engine.name, []
        if idle:
            self.idle_steps.append(self.index)
        self.shared["requests"].append(len(members))
        self.shared["rows"].append(sum(rows))
        return engine.name, _split(outputs, rows, self.row_outputs)


def _attempt(member: Member, fn: Callable, *args) -> Any:
    """``fn(*args)``; a RuntimeToolError becomes ``member``'s error (None returned): it fails that request only."""
    try:
        return fn(*args)
    except RuntimeToolError as e:
        member.error = e
        return None


def _stacked(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)  # one request: its own array, uncopied


def _split(outputs: dict[str, Any], rows: list[int], row_outputs: set[str]) -> list[dict[str, Any]]:
    """Each member's rows of the ``row_outputs`` (first axis: the call's rows); other outputs go to every member
    whole (NaN/Inf there then fails them all: it cannot be attributed)."""
    starts = np.cumsum([0, *rows])
    return [{k: v[a:b] if k in row_outputs else v for k, v in outputs.items()} for a, b in zip(starts, starts[1:])]
