"""The host-side halves of the guards a bundle carries, and the hooks :class:`~runtime.pipeline.Pipeline` calls.

A guard's tensor work lives in the bundle's graphs: fused into a backbone graph (SafeGuider's classifier in
the text stage, SafeCtrl's attention blocks in the denoise graph) or as a graph of its own (SafeRedir's
``redirect``, SafePatch's ``safepatch``). What stays on the host is the control flow: when to check, whether
to switch, the beam search, the per-step state. Guard ``NAME`` is the module ``runtime/guards/NAME.py`` and its
class ``HOST``; the bundle's manifest names its guards, in the order they run, each with its settings
(thresholds, beam width, check steps, EMA alpha, ...), which the host class checks (``SETTINGS``,
:mod:`runtime.guards.settings`). There is no list of guards here: the manifest is the one the exporter wrote
from the guard registry (``guards/__init__.py``).

``Pipeline.generate`` calls the hooks in this order, each guard in the manifest's order:

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

Under ``Pipeline.run_many`` (requests sharing every UNet call, ``runtime/denoise.py``) each request has its own
context and its own calls of each hook, in this order; the ``x`` and ``outputs`` a step hook sees are that
request's rows of the shared call only, so a guard never sees, nor needs to know of, another request.

**Flags.** A guard that gates rather than removes (SafeGuider with ``mode: "gate"``) publishes its verdict on a
prompt it judges unsafe in ``on_text`` as ``ctx.flags[name]`` (what it saw, JSON-able) and leaves the prompt as it
is. The guards after it act on a flag with the ORIGINAL prompt, each in its own module: SafeRedir redirects the
flagged rows from its first check, SafePatch activates even when its own gate says none (its category: the
gate's most probable unsafe one), SafeCtrl keeps its own detector. Each report names the flagging guards that
forced it (``forced_by``). A flag never lets a prompt through that a guard would otherwise act on: it only adds
removal (SafePatch built to yield to a redirect leaves a redirected row to SafeRedir, Redirected rows).

**Redirected rows.** A guard that replaces an image's conditioning with a safe one for the rest of the call
(SafeRedir) adds the image's row of the batch to ``ctx.redirected`` in the ``step_feeds`` of the step it
switches. SafePatch built with ``yield_to_redirect: true`` stops patching that row from that step on: the patch
was trained on the prompt's own conditioning and can over-edit a redirected one, which costs the scene where it
does (the tinyworld-xl stack: bench/results/stack_yield_dev/README.md); with ``false`` both act.

**Resample.** A post-hoc image checker built with ``on_unsafe: "resample"`` does not refuse a first image it reads
unsafe: it raises :class:`ResampleRequested` and the pipeline runs the request once more, with the checker's verdict
as a flag (``ctx.flags[<checker>]``: the guards remove on it as on SafeGuider's) and ``ctx.escalate`` set: every guard
removes at its full strength from its first step (SafeRedir redirects and escalates at once). Rows the checker passed
keep their first image; the others take the second one, and the checker reads them again: an image still read
unsafe is refused (ImageBlocked). Only requests the checker read unsafe pay the second sampling.

Each guard writes its report into ``ctx.report[name]`` (a JSON-able dict); the pipeline adds ``time_ms``, the
guard's time in all its hooks, measured in one place (:func:`run_hook`), and puts ``ctx.report`` into
``Result.report["guards"]``.

**Immutable guards.** A bundle's guards and their settings are what its manifest says: no argument, flag or
environment variable replaces, removes or reconfigures them. ``extra_guards`` may only ADD post-hoc image
checkers, under names of their own (``image_checker`` when the bundle has none, else ``image_checker.<x>``),
run after the bundle's guards.

**Fail closed.** Any exception inside a hook other than a :class:`~runtime.errors.RuntimeToolError` becomes a
:class:`~runtime.errors.GuardError` (exit code 6) naming the guard; a guard's graph yielding NaN/Inf is a
GuardError too. No image is returned, so none is written. A guard named in a bundle's manifest that this
runtime does not know makes the bundle refuse to open: a guarded bundle never runs without its guards.
"""

from __future__ import annotations

import importlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import BadInputError, BundleError, ExitCode, GuardError, RuntimeToolError
from runtime.guards.settings import Check, config_error, validate

CHECKER = "image_checker"  # the post-hoc image checker: the one guard a user may add at run time
# graph inputs/outputs of the plain backbone; every other one, and every component of kind "guard", is a guard's
BACKBONE_TEXT_OUTPUTS = {"hidden", "eos", "pooled"}
BACKBONE_DENOISE_IO = {"sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "noise_pred"}
_GUARD_NAME = re.compile(r"[a-z][a-z0-9_]*")
_EXTRA_NAME = re.compile(rf"{CHECKER}(\.[A-Za-z0-9_-]+)?")
# the seconds a hook's time is booked under (Result.report["stages_ms"]["guard_<stage>.<name>"])
STAGE_OF_HOOK = {"on_text": "text", "prepare_steps": "steps", "step_feeds": "steps", "after_step": "steps",
                 "on_images": "image"}


class ImageBlocked(GuardError):
    """A guard refused the generated image (e.g. the post-hoc checker flagged it): nothing is written."""

    exit_code = ExitCode.GUARD


class ResampleRequested(ImageBlocked):
    """A checker read some of a request's images unsafe and asks for one more, fully escalated, sampling (Resample in
    the module docstring). The pipeline handles it; anything that sees it unhandled treats it as a refusal."""

    def __init__(self, message: str, guard: str, rows: list[int], scores: list[float], images: list[np.ndarray]):
        super().__init__(message)
        self.guard, self.rows, self.scores, self.images = guard, rows, scores, images


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
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # per guard: seconds per STAGE_OF_HOOK
    flags: dict[str, dict[str, Any]] = field(default_factory=dict)  # gate verdicts: guard -> what it saw (Flags)
    redirected: set[int] = field(default_factory=set)  # batch rows whose prompt a guard replaced (Redirected rows)
    escalate: bool = False  # the second sampling of a request a checker read unsafe: full removal from step 0 (Resample)

    def state_of(self, guard: str) -> dict[str, Any]:
        """Guard ``guard``'s mutable state for this call. Guards keep per-call state here, not on ``self``: one
        pipeline (and its guard objects) may serve several ``generate`` calls at once."""
        return self.state.setdefault(guard, {})

    @property
    def flagged_by(self) -> list[str]:
        """The guards that flagged this call's prompt (Flags in the module docstring), in the order they ran."""
        return list(self.flags)

    @property
    def prompt_row(self) -> int:
        """Row of the (positive) prompt in ``input_ids`` / ``text`` arrays."""
        return 1 if self.cfg else 0

    @property
    def cond_rows(self) -> slice:
        """Rows of the conditional half in the UNet batch ``[uncond x batch; cond x batch]``."""
        return slice(self.batch, 2 * self.batch) if self.cfg else slice(0, self.batch)


class Guard:
    """Base class: every hook does nothing. ``config``: the guard's settings, checked against ``SETTINGS``.

    ``source`` says whose settings they are: ``"bundle"`` (the manifest; a bad value is a BundleError, exit 4)
    or ``"user"`` (a config given at run time, e.g. an added checker's; BadInputError, exit 3)."""

    name = "guard"
    SETTINGS: dict[str, Check] = {}

    def __init__(self, pipe, config: dict[str, Any], *, name: str | None = None, source: str = "user"):
        self.pipe = pipe
        self.name = name or type(self).name
        self.source = source
        self.where = str(pipe.bundle.path) if source == "bundle" else f"{self.name} config"
        self.config = validate(self.name, config, self.SETTINGS, source, self.where)

    def bad_config(self, problem: str) -> RuntimeToolError:
        """The error for settings that are each in range but do not fit together or the bundle."""
        return config_error(self.source)(f"{self.where}: guard {self.name}: {problem}")

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

    def parts(self) -> set[str]:
        """The bundle's guard parts this guard runs: graph components, and inputs / outputs of the backbone's
        graphs (:func:`load_guards` refuses a bundle whose graphs carry a part no guard claims)."""
        return set()

    def summary(self, report: dict[str, Any]) -> str:
        """What the guard saw and did in one run, in one line for people (``runtime compare``)."""
        return ", ".join(f"{k} {v}" for k, v in report.items() if k != "time_ms" and not isinstance(v, (list, dict)))

    def close(self) -> None:
        pass


def host_class(name: str, where: str) -> type[Guard]:
    """The host half of guard ``name``: ``runtime/guards/<name>.py``'s ``HOST``. BundleError for a name this
    runtime does not know: refusing is the fail-closed choice."""
    module_file = Path(__file__).with_name(f"{name}.py")
    host = None
    if isinstance(name, str) and _GUARD_NAME.fullmatch(name) and module_file.is_file():
        host = getattr(importlib.import_module(f"runtime.guards.{name}"), "HOST", None)
    if not (isinstance(host, type) and issubclass(host, Guard) and host.name == name):
        known = sorted(p.stem for p in Path(__file__).parent.glob("*.py") if p.stem not in ("__init__", "settings"))
        raise BundleError(f"{where}: this runtime does not know guard {name!r} named in the bundle (known: "
                          f"{', '.join(known)}): upgrade the runtime or rebuild the bundle")
    return host


def load_guards(pipe, bundle_guards: dict[str, Any], extra_guards: dict[str, Any] | None = None) -> list[Guard]:
    """The bundle's guards in manifest order (post-hoc checkers last), then the added checkers.

    ``extra_guards`` (``{name: checker config}``) may only add image checkers under new names: a name the bundle
    already uses, or any other kind of guard, is refused (BadInputError): nothing at run time replaces,
    removes or weakens a bundle's guard."""
    where = str(pipe.bundle.path)
    hosts = [(name, host_class(name, where)) for name in bundle_guards]
    hosts.sort(key=lambda item: item[0] == CHECKER)  # stable: learned guards in manifest order, checker last
    guards = [host(pipe, bundle_guards[name], source="bundle") for name, host in hosts]
    unclaimed = guard_parts(pipe.bundle.manifest) - set().union(*(g.parts() for g in guards))
    if unclaimed:  # a guard taken out of the manifest while its graphs stay: never run a bundle half-guarded
        raise BundleError(f"{where}: its graphs carry guard parts that no guard in its manifest runs "
                          f"({', '.join(sorted(unclaimed))}): the manifest was edited or written by another exporter; "
                          "rebuild the bundle with `python -m export build`")
    for name, config in (extra_guards or {}).items():
        if name in bundle_guards:
            raise BadInputError(f"guard {name!r} is part of the bundle {pipe.bundle.path.name}: its settings cannot "
                                f"be replaced at run time; add a checker under another name, e.g. {CHECKER}.extra")
        if not isinstance(name, str) or not _EXTRA_NAME.fullmatch(name):
            raise BadInputError(f"extra guard {name!r}: only post-hoc image checkers can be added at run time, "
                                f"named {CHECKER!r} or '{CHECKER}.<name>'; other guards are fused into the bundle "
                                "(`python -m export build --guards ...`)")
        guards.append(host_class(CHECKER, where)(pipe, config, name=name, source="user"))
    return guards


def guard_parts(manifest) -> set[str]:
    """Every guard part in a bundle: its components of kind ``guard`` and the inputs / outputs of its text-stage
    and denoise graphs that the plain backbone does not have."""
    parts = {c.name for c in manifest.components if c.kind == "guard"}
    for c in manifest.components:
        if c.kind == "text_encoder":
            parts |= {t.name for t in c.outputs} - BACKBONE_TEXT_OUTPUTS
        elif c.kind == "denoise":
            parts |= {t.name for t in (*c.inputs, *c.outputs)} - BACKBONE_DENOISE_IO
    return parts


def run_hook(guard: Guard, hook: str, ctx: GuardContext, *args) -> Any:
    """``guard.<hook>(ctx, *args)``, timed into ``ctx.seconds``; anything but a RuntimeToolError becomes a
    GuardError (fail closed)."""
    from runtime.backends import NonFiniteOutputError

    t0 = time.perf_counter()
    try:
        return getattr(guard, hook)(ctx, *args)
    except NonFiniteOutputError as e:
        raise GuardError(f"guard {guard.name}: {e}: no image written (fail closed)") from None
    except RuntimeToolError:
        raise
    except Exception as e:  # a bug or a broken graph inside a guard: never emit an unguarded image
        raise GuardError(f"guard {guard.name} failed in {hook}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}: no image written (fail closed)") from None
    finally:
        seconds = ctx.seconds.setdefault(guard.name, {})
        stage = STAGE_OF_HOOK[hook]
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t0
