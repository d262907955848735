"""The host-side halves of the guards a bundle carries, and the hooks :class:`~runtime.pipeline.Pipeline` calls.

A guard's tensor work lives in the bundle's graphs: fused into a backbone graph (SafeGuider's classifier in
the text stage, SafeCtrl's attention blocks in the denoise graph) or as a graph of its own (SafeRedir's
``redirect``, SafePatch's ``safepatch``). What stays on the host is the control flow: when to check, whether
to switch, the beam search, the per-step state. Each guard is one module here with one :class:`Guard`
subclass, registered in :data:`GUARDS` under the name the manifest's ``guards`` section uses; its manifest
entry is the guard's configuration (thresholds, beam width, check steps, EMA alpha, ...).

``Pipeline.generate`` calls the hooks in this order, each guard in :data:`ORDER`:

1. ``on_text(ctx)`` after the text encoder ran on ``ctx.input_ids`` (rows ``[negative, prompt]`` with CFG,
   else ``[prompt]``); ``ctx.text`` holds every text-stage output for those rows (``hidden``, ``eos``, fused
   guard heads such as ``safe_score``). A guard may replace rows of ``ctx.text["hidden"]`` (SafeGuider).
2. ``prepare_steps(ctx, latent_shape)`` once, before the denoise loop (``ctx.feeds`` is set): returns whether
   the guard has per-step work in this call; a guard may add constant feeds to ``ctx.feeds`` here (SafePatch
   gated off: its zero residuals). Only the guards that return True get the two step hooks (the default:
   True when the guard overrides one of them), so a text-only or gated-off guard costs nothing per step.
3. ``step_feeds(ctx, i, t, x)`` before denoise call ``i`` (``x``: the scaled model input of the batch, one
   copy, ``(batch, C, h, w)``; ``t``: the timestep) returns feeds that override or add to the denoise
   graph's inputs for this call: redirected ``encoder_hidden_states`` (SafeRedir), residuals (SafePatch),
   the previous smoothed mask (SafeCtrl). ``ctx.feeds`` holds the call's base conditioning feeds
   (``encoder_hidden_states`` for the UNet batch ``[uncond x batch; cond x batch]``); ``ctx.cond_rows`` is
   the slice of the conditional rows in that batch.
4. ``after_step(ctx, i, t, outputs)`` with every output of that denoise call (guard state such as a new mask),
   once the sampler has used the call's prediction: at the start of the next denoise call (before its
   ``step_feeds``) or, for the last call, after the denoise loop (before decoding).
5. ``on_images(ctx, images)`` after decoding (a post-hoc image checker); may raise :class:`ImageBlocked`.

Each guard writes its report into ``ctx.report[name]`` (a JSON-able dict; ``time_ms`` for its own cost);
the pipeline puts ``ctx.report`` into ``Result.report["guards"]``.

**Fail closed.** Any exception inside a hook other than a :class:`~runtime.errors.RuntimeToolError` becomes a
:class:`~runtime.errors.GuardError` (exit code 6) naming the guard; a guard's graph yielding NaN/Inf is a
GuardError too. No image is returned, so none is written. A guard named in a bundle's manifest that this
runtime does not know makes the bundle refuse to open: a guarded bundle never runs without its guards.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.errors import BundleError, ExitCode, GuardError

# name in the manifest -> "module:Class"; the order guards run in (text guards first, the checker last)
GUARDS = {
    "safeguider": "runtime.guards.safeguider:SafeGuider",
    "saferedir": "runtime.guards.saferedir:SafeRedir",
    "safepatch": "runtime.guards.safepatch:SafePatch",
    "safectrl": "runtime.guards.safectrl:SafeCtrl",
    "image_checker": "runtime.guards.image_checker:ImageChecker",
}
ORDER = tuple(GUARDS)


class ImageBlocked(GuardError):
    """A guard refused the generated image (e.g. the post-hoc checker flagged it): nothing is written."""

    exit_code = ExitCode.GUARD


@dataclass
class GuardContext:
    """The state of one ``generate`` call that guards read and change (see the module docstring)."""

    pipe: Any                                   # the Pipeline: engines, tokenizer, bundle, defaults
    prompt: str
    negative_prompt: str
    cfg: bool
    batch: int
    steps: int
    input_ids: np.ndarray                       # (rows, L) int32: [negative, prompt] with CFG, else [prompt]
    text: dict[str, np.ndarray] = field(default_factory=dict)   # text-stage outputs for those rows
    feeds: dict[str, np.ndarray] = field(default_factory=dict)  # base conditioning feeds of every denoise call
    report: dict[str, dict[str, Any]] = field(default_factory=dict)
    state: dict[str, dict[str, Any]] = field(default_factory=dict)  # per guard, per call: never on the guard

    def state_of(self, guard: str) -> dict[str, Any]:
        """Guard ``guard``'s mutable state for this call. Guards keep per-call state here, not on ``self``: one
        pipeline (and its guard objects) may serve several ``generate`` calls at once."""
        return self.state.setdefault(guard, {})

    @property
    def prompt_row(self) -> int:
        """Row of the (positive) prompt in ``input_ids`` / ``text`` arrays."""
        return 1 if self.cfg else 0

    @property
    def cond_rows(self) -> slice:
        """Rows of the conditional half in the UNet batch ``[uncond x batch; cond x batch]``."""
        return slice(self.batch, 2 * self.batch) if self.cfg else slice(0, self.batch)


class Guard:
    """Base class: every hook does nothing. ``config`` is the guard's manifest entry."""

    name = "guard"

    def __init__(self, pipe, config: dict[str, Any]):
        self.pipe = pipe
        self.config = dict(config)

    def on_text(self, ctx: GuardContext) -> None:
        pass

    def prepare_steps(self, ctx: GuardContext, latent_shape: tuple[int, ...]) -> bool:
        """Whether this call needs the step hooks (``latent_shape``: ``(batch, C, h, w)``)."""
        cls = type(self)
        return cls.step_feeds is not Guard.step_feeds or cls.after_step is not Guard.after_step

    def step_feeds(self, ctx: GuardContext, i: int, t: np.float32, x: np.ndarray) -> dict[str, np.ndarray]:
        return {}

    def after_step(self, ctx: GuardContext, i: int, t: np.float32, outputs: dict[str, np.ndarray]) -> None:
        pass

    def on_images(self, ctx: GuardContext, images: list[np.ndarray]) -> None:
        pass

    def close(self) -> None:
        pass


def load_guards(pipe, configs: dict[str, dict[str, Any]]) -> list[Guard]:
    """The guards of a bundle (``manifest.guards`` plus any the caller adds), in :data:`ORDER`.

    BundleError for a guard this runtime does not know: refusing is the fail-closed choice."""
    unknown = sorted(set(configs) - set(GUARDS))
    if unknown:
        raise BundleError(f"{pipe.bundle.path}: this runtime does not know guard(s) {', '.join(unknown)} named "
                          f"in the bundle (known: {', '.join(GUARDS)}): upgrade the runtime or rebuild the bundle")
    guards = []
    for name in ORDER:
        if name in configs:
            module, _, cls = GUARDS[name].partition(":")
            guards.append(getattr(importlib.import_module(module), cls)(pipe, configs[name]))
    return guards


def run_hook(guard: Guard, hook: str, *args) -> Any:
    """Call ``guard.<hook>(*args)``; anything but a RuntimeToolError becomes a GuardError (fail closed)."""
    from runtime.backends import NonFiniteOutputError
    from runtime.errors import RuntimeToolError

    try:
        return getattr(guard, hook)(*args)
    except NonFiniteOutputError as e:
        raise GuardError(f"guard {guard.name}: {e}: no image written (fail closed)") from None
    except RuntimeToolError:
        raise
    except Exception as e:  # a bug or a broken graph inside a guard: never emit an unguarded image
        raise GuardError(f"guard {guard.name} failed in {hook}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}: no image written (fail closed)") from None
