"""The guarded denoise loop of one ``generate`` call: the sampler's model function with the guards' step hooks.

:class:`DenoiseLoop` is what :meth:`runtime.pipeline.Pipeline.generate` runs between the text stage and the VAE
decoder: the numpy sampler (``runtime/schedulers.py``) calls :meth:`DenoiseLoop.model` once per UNet call,
which feeds the denoise graph the call's conditioning plus what the step guards add (``step_feeds``), combines
the CFG halves, and hands the call's outputs to the guards' ``after_step`` hooks once the sampler has used the
prediction (at the start of the next call, or after the loop), so their host work does not run on the caches
the UNet has just evicted (bench/results/design_measurements.md).

**Idle graph.** A bundle may carry ``denoise_idle`` (``export/idle.py``): the UNet without the guards' per-step
inputs. A step runs it only when every input it lacks is all zeros, by value: the call's constant feeds are
checked once, what the guards feed at a step at that step. A guard that wants its work done always gets the
full graph (fail closed).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from runtime.guards import GuardContext, run_hook
from runtime.schedulers import sample

StepCallback = Callable[[int, int, float], None]  # (step index, total steps, timestep)


class DenoiseLoop:
    """One call's denoise loop over ``pipe``'s engines and guards; ``run`` returns the final latent."""

    def __init__(self, pipe, ctx: GuardContext, guidance: float, latent_shape: tuple[int, ...]):
        self.ctx, self.guidance = ctx, np.float32(guidance)
        self.denoise, self.idle = pipe.engines["denoise"], pipe.engines.get("denoise_idle")
        self.idle_inputs, self.idle_dropped = pipe.idle_inputs, pipe.idle_dropped
        self.step_guards = [g for g in pipe.guards if run_hook(g, "prepare_steps", ctx, latent_shape)]
        self.idle_ok = self.idle is not None and not any(
            np.any(ctx.feeds[n]) for n in self.idle_dropped if n in ctx.feeds)
        self.index = 0                 # the next UNet call
        self.pending = None            # (index, t, outputs) of the call whose after_step hooks are due
        self.idle_steps: list[int] = []  # calls that ran denoise_idle
        self.step_ms: list[float] = []   # wall time of each sampler step

    def run(self, plan, noise: np.ndarray, rng: np.random.Generator, steps: int,
            callback: StepCallback | None = None) -> np.ndarray:
        last = time.perf_counter()

        def on_step(i: int, t: float, x: np.ndarray) -> None:
            nonlocal last
            now = time.perf_counter()
            self.step_ms.append(round((now - last) * 1000, 3))
            last = now
            if callback is not None:
                callback(i, steps, t)

        latent = sample(plan, self.model, noise, callback=on_step,
                        noise_fn=lambda i, shape: rng.standard_normal(shape, dtype=np.float32))
        self._finish_call()  # the last call's after_step hooks
        return latent

    def model(self, x: np.ndarray, t: np.float32) -> np.ndarray:
        """The CFG-combined noise prediction for latent ``x`` at timestep ``t`` (one UNet call)."""
        self._finish_call()
        ctx = self.ctx
        stepped: dict[str, np.ndarray] = {}  # what the guards feed at this call
        for guard in self.step_guards:
            stepped.update(run_hook(guard, "step_feeds", ctx, self.index, t, x) or {})
        x_in = np.concatenate([x, x]) if ctx.cfg else x
        feeds = {**ctx.feeds, **stepped, "sample": np.ascontiguousarray(x_in, dtype=np.float32),
                 "timestep": np.array([t], dtype=np.float32)}
        if self._idle(stepped):
            outputs = self.idle.infer({n: feeds[n] for n in self.idle_inputs})
            self.idle_steps.append(self.index)
        else:
            outputs = self.denoise.infer(feeds)
        if self.step_guards:
            self.pending = (self.index, t, outputs)
        self.index += 1
        out = outputs["noise_pred"]
        if not ctx.cfg:
            return out
        uncond, text = out[:ctx.batch], out[ctx.batch:]
        return uncond + self.guidance * (text - uncond)

    def _idle(self, stepped: dict[str, np.ndarray]) -> bool:
        return self.idle_ok and not any(np.any(stepped[n]) if n in stepped else n not in self.ctx.feeds
                                        for n in self.idle_dropped)

    def _finish_call(self) -> None:
        if self.pending is not None:
            i, t, outputs = self.pending
            self.pending = None
            for guard in self.step_guards:
                run_hook(guard, "after_step", self.ctx, i, t, outputs)
