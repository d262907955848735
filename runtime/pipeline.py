"""The lean text-to-image pipeline: tokenizer -> text encoder -> denoise loop (numpy samplers) -> VAE decoder.

    pipe = Pipeline.open("engines/tinyworld.plan")          # bundle, tokenizer, engines: opened once
    result = pipe.generate("a large red circle on sand", seed=0)
    result.images[0]            # (H, W, 3) uint8 numpy array
    result.pil()[0]             # the same as a PIL image (Pillow imported on demand)
    result.report               # settings, truncation warnings, per-stage timings in ms, guards
    pipe.close()

Sampling follows diffusers' StableDiffusionPipeline:

* classifier-free guidance with the UNet batch ``[uncond; cond]`` (the negative prompt's embedding is the
  uncond half) and ``noise_pred = uncond + guidance * (cond - uncond)``; ``guidance <= 1`` disables CFG and
  only the cond half runs;
* the initial noise is ``np.random.default_rng(seed).standard_normal((batch, C, h, w), dtype=np.float32)``
  (unit noise; the sampler multiplies it by the scheduler's ``init_noise_sigma``, as diffusers does with
  ``latents=``), and euler_a's ancestral noise of every step is drawn afterwards from the same generator,
  ``rng.standard_normal((batch, C, h, w), dtype=np.float32)`` once per step. :func:`initial_noise` and
  :func:`ancestral_noise` reproduce both for reference comparisons.

Several requests at once: :meth:`Pipeline.run_many` generates requests that agree on the denoise settings
(:data:`DENOISE_SETTINGS`) in lockstep, every UNet call one batch of all their rows, each request with its own
prompt, seed, noise generator and guard context, up to the bundle's max batch of images per group. On ONNX
Runtime CPU each image is bit-identical to :meth:`Pipeline.run` of its request alone (tests/test_run_many.py;
a GPU backend may pick other kernels for another batch size); one request's failure fails it alone
(``runtime/denoise.py`` says how).

Thread safety: a :class:`Pipeline` keeps no per-call state, and ONNX Runtime sessions are thread-safe, so one
ONNX Runtime pipeline may serve concurrent :meth:`Pipeline.generate` calls. TensorRT engines of one bundle
share one activation buffer and CUDA stream: serialise calls on a TensorRT pipeline (e.g. with a lock).
:meth:`Pipeline.close` must not race with ``generate``.

Families: SD 1.x-structured bundles (one CLIP text encoder; ``sd1``, ``sd2``, ``tinyworld``) and SDXL
(``sdxl``: two tokenizers and two text-stage graphs), following diffusers' StableDiffusionXLPipeline with
``prompt_2 = prompt``, ``negative_prompt_2 = negative_prompt``, ``clip_skip=None``:

* each manifest tokenizer entry feeds the text-stage graph its ``encoder`` names (``tokenizer`` ->
  ``text_encoder``, pads with ``<|endoftext|>``; ``tokenizer_2`` -> ``text_encoder_2``, pads with ``!`` = id 0,
  OpenCLIP style). The lean tokenizer encodes a literal ``!`` in the text as the ``!`` BPE token, as OpenCLIP
  (SDXL's training tokenizer) does; transformers 5 turns it into the pad id 0, so for prompts containing ``!``
  the second encoder's ids (and the image) differ from diffusers+transformers 5, and only there;
* ``ctx.text`` (what guards see) is the first encoder's outputs (``hidden``, ``eos``) plus the second's under
  ``hidden_2``, ``eos_2``, ``pooled_2``; ``encoder_hidden_states = concat(hidden, hidden_2, axis=-1)``,
  ``text_embeds = pooled_2``, ``time_ids = (height, width, 0, 0, height, width)`` (original size = target
  size, no crop) for the uncond and cond rows;
* ``force_zeros_for_empty_prompt`` (manifest ``defaults``, True when absent, as SDXL's config says): an empty
  negative prompt (diffusers: ``negative_prompt=None``) makes the uncond rows of ``hidden``, ``hidden_2`` and
  ``pooled_2`` zeros, before the guards' ``on_text`` hooks (``eos``/``eos_2`` stay as encoded);
* ``report["truncated"]`` is per prompt (any tokenizer) and ``report["truncated_by_tokenizer"]`` per tokenizer;
  ``stages_ms["text_encoder"]`` covers both text-stage graphs.
"""

from __future__ import annotations

import math
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import NonFiniteOutputError, close_engines, open_engines
from runtime.bundle import Bundle
from runtime.denoise import DenoiseLoop, StepCallback
from runtime.errors import BackendError, BadInputError, BundleError, GuardError, RuntimeToolError
from runtime.guards import GuardContext, ImageBlocked, ResampleRequested, load_guards, run_hook
from runtime.schedulers import KARRAS_SCHEDULERS, SCHEDULERS, plan as make_plan
from runtime.tokenizer import CLIPTokenizer, TokenizerError

MAX_PROMPT_CHARS = 10_000
MAX_STEPS = 1000
MAX_SEED = 2**32 - 1
KNOWN_FAMILIES = ("sd1", "sd2", "sdxl", "tinyworld")
SDXL_TIME_IDS = 6  # (original h, w, crop top, left, target h, w): the SDXL base UNet's add_time_ids
RANDOM_SEED = -1  # seed -1 draws a random seed (A1111's convention); the report records the one used
# the settings requests must share to share UNet calls (run_many); prompts, seeds and batch sizes may differ
DENOISE_SETTINGS = ("steps", "guidance", "scheduler", "karras", "height", "width")


def resolve_seed(seed):
    """``seed`` itself, or for -1 a seed drawn from the OS's entropy, 0..MAX_SEED (anything else is left to
    the settings check)."""
    random = isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed == RANDOM_SEED
    return secrets.randbelow(MAX_SEED + 1) if random else seed


def initial_noise(seed: int, shape: tuple[int, ...]) -> tuple[np.random.Generator, np.ndarray]:
    """The generator of ``seed`` and the unit noise x_T it draws first (see the module docstring)."""
    rng = np.random.default_rng(seed)
    return rng, rng.standard_normal(shape, dtype=np.float32)


def ancestral_noise(seed: int, shape: tuple[int, ...], steps: int) -> np.ndarray:
    """The ``(steps, *shape)`` ancestral noises euler_a adds, as :meth:`Pipeline.generate` draws them."""
    rng, _ = initial_noise(seed, shape)
    return np.stack([rng.standard_normal(shape, dtype=np.float32) for _ in range(steps)])


@dataclass
class Result:
    images: list[np.ndarray]  # (H, W, 3) uint8, one per batch item
    report: dict[str, Any] = field(default_factory=dict)

    def pil(self) -> list:
        """The images as ``PIL.Image`` objects (Pillow is imported only here)."""
        from PIL import Image

        return [Image.fromarray(im) for im in self.images]


@dataclass(frozen=True)
class GenerationSettings:
    """The settings of one ``generate`` call. None takes the bundle's default; ``seed`` -1 draws a random seed
    (:meth:`Pipeline.resolve` returns the settings with every value filled in and checked)."""

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    height: int | None = None
    width: int | None = None
    batch: int = 1
    scheduler: str | None = None
    karras: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Call:
    """One request between its text stage and its images."""

    s: GenerationSettings
    ctx: GuardContext
    encs: list
    ms: dict[str, Any]
    t_start: float
    shared: dict[str, list[int]] = field(default_factory=dict)  # per UNet call: requests and rows in it
    again: ResampleRequested | None = None  # the second sampling a checker asked for: its first images and verdict


class Pipeline:
    """An opened bundle ready to generate: tokenizer, engines and defaults (see the module docstring)."""

    def __init__(self, bundle: Bundle, engines: dict[str, Any], tokenizer: CLIPTokenizer, backend: str,
                 extra_guards: dict[str, dict[str, Any]] | None = None,
                 tokenizers: list[tuple[str, str, CLIPTokenizer]] | None = None):
        self.bundle, self.engines, self.tokenizer, self.backend = bundle, engines, tokenizer, backend
        m = bundle.manifest
        # (tokenizer name, text-stage graph, tokenizer) in manifest order; SDXL has two (module docstring)
        self.tokenizers = tokenizers or [("tokenizer", "text_encoder", tokenizer)]
        self.sdxl = len(self.tokenizers) > 1
        self.force_zeros_for_empty_prompt = self.sdxl and bool(m.defaults.get("force_zeros_for_empty_prompt", True))
        self.guards = load_guards(self, m.guards, extra_guards)
        self.defaults = dict(m.defaults)
        self.scheduler_config = dict(m.scheduler)
        self.channels = int(m.latent["channels"])
        self.vae_factor = int(m.latent["scale_factor"])
        sample_spec = m.component("denoise").inputs[0].shape  # (N, C, h, w)
        self.static_hw = (None if not all(isinstance(d, int) for d in sample_spec[2:])
                          else (sample_spec[2] * self.vae_factor, sample_spec[3] * self.vae_factor))
        self.dynamic_hw = bool(self.defaults.get("dynamic_hw", False)) or self.static_hw is None
        self.latent_multiple = _latent_multiple(m, engines["denoise"])
        self.max_batch = m.max_batch
        self.idle_inputs, self.idle_dropped = _idle_graph_inputs(bundle, engines)

    # -- opening ------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, plan_path: str | Path, backend: str = "auto", verify: bool = True,
             extra_guards: dict[str, dict[str, Any]] | None = None) -> Pipeline:
        """Open (and with ``verify`` hash-check) the bundle, its tokenizer, engines and guards.

        ``extra_guards`` adds post-hoc image checkers the bundle does not carry (``{name: config}``, names
        ``image_checker`` or ``image_checker.<x>`` that the bundle does not use): the bundle's own guards and
        their settings cannot be removed, replaced or changed (BadInputError)."""
        bundle = Bundle.open(plan_path, verify=verify)
        engines: dict[str, Any] = {}
        try:
            _check_family(bundle)
            tokenizers = _load_tokenizers(bundle)
            engines = open_engines(bundle, backend)
            return cls(bundle, engines, tokenizers[0][2], backend, extra_guards, tokenizers=tokenizers)
        except BaseException:
            close_engines(engines)
            bundle.close()
            raise

    @property
    def guard_names(self) -> list[str]:
        return [g.name for g in self.guards]

    def close(self) -> None:
        for guard in self.guards:
            guard.close()
        close_engines(self.engines)
        self.bundle.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def providers(self) -> dict[str, list[str]]:
        return {name: list(getattr(e, "providers", [getattr(e, "backend", "?")])) for name, e in self.engines.items()}

    # -- generating ---------------------------------------------------------------------------------------

    def generate(self, prompt: str, negative_prompt: str = "", steps: int | None = None,
                 guidance: float | None = None, seed: int = 0, height: int | None = None, width: int | None = None,
                 batch: int = 1, scheduler: str | None = None, karras: bool = False,
                 callback: StepCallback | None = None) -> Result:
        """Generate ``batch`` images for ``prompt`` (an empty prompt generates unconditionally); None arguments
        take the bundle's defaults, ``seed=-1`` draws a random seed (``report["seed"]`` is the one used).

        ``callback(i, steps, t)`` runs after every denoising step. BadInputError on a bad argument; a graph
        yielding NaN/Inf raises GuardError when the bundle has guards (fail closed), else BackendError; a guard
        that refuses the image raises ImageBlocked (``guard_report``: what the guards reported). An image checker
        built with ``on_unsafe: resample`` has a request it reads unsafe sampled once more, every guard at full
        strength (``report["resampled"]``; Resample in ``runtime/guards/__init__.py``)."""
        settings = GenerationSettings(prompt, negative_prompt, steps, guidance, seed, height, width, batch,
                                      scheduler, karras)
        return self.run(settings, callback)

    def run(self, settings: GenerationSettings, callback: StepCallback | None = None) -> Result:
        """:meth:`generate` for a :class:`GenerationSettings`."""
        result = self._run_group([self.resolve(settings)], callback)[0]
        if isinstance(result, RuntimeToolError):
            raise result
        return result

    def run_many(self, settings: list[GenerationSettings]) -> list[Result | RuntimeToolError]:
        """Generate several requests, each with its own prompt, negative prompt, seed and guards, sharing every
        UNet call between those that agree on :data:`DENOISE_SETTINGS` (:meth:`lockstep_groups`;
        ``runtime/denoise.py``). Returns, in request order, each one's :class:`Result` or its error, the one
        :meth:`run` would raise (bad input, guard failure or NaN/Inf: fail closed, ImageBlocked): one request's
        failure never stops the others. On ONNX Runtime CPU every image is bit-identical to :meth:`run` of its
        request alone (module docstring); ``report["denoise_shared"]`` says how many requests and UNet rows each
        of its denoise calls held."""
        resolved = [_attempt(self.resolve, s) for s in settings]
        results: list[Result | RuntimeToolError] = list(resolved)
        for group in self.lockstep_groups(resolved):
            for i, result in zip(group, self._run_group([resolved[i] for i in group])):
                results[i] = result
        return results

    def lockstep_groups(self, settings: list) -> list[list[int]]:
        """The indices of ``settings`` (resolved) that share one denoise loop: the same DENOISE_SETTINGS, in
        order, at most the bundle's ``max_batch`` images per group; entries that are not settings (errors) are
        left out."""
        groups: list[list[int]] = []
        images: list[int] = []
        last: dict[tuple, int] = {}  # denoise settings -> the group now filling
        for i, s in enumerate(settings):
            if not isinstance(s, GenerationSettings):
                continue
            key = tuple(getattr(s, k) for k in DENOISE_SETTINGS)
            g = last.get(key)
            if g is None or images[g] + s.batch > self.max_batch:
                g = last[key] = len(groups)
                groups.append([])
                images.append(0)
            groups[g].append(i)
            images[g] += s.batch
        return groups

    def resolve(self, settings: GenerationSettings) -> GenerationSettings:
        """``settings`` with the bundle's defaults filled in and a random seed drawn for -1, checked
        (BadInputError naming the setting and the fix)."""
        s, d = settings, self.defaults
        s = replace(s, steps=d.get("steps", 20) if s.steps is None else s.steps,
                    guidance=d.get("guidance_scale", 7.5) if s.guidance is None else s.guidance,
                    scheduler=d.get("scheduler", "ddim") if s.scheduler is None else s.scheduler,
                    height=self._default_size(0) if s.height is None else s.height,
                    width=self._default_size(1) if s.width is None else s.width)
        self._validate(s)
        seed = int(resolve_seed(s.seed))
        return replace(s, steps=int(s.steps), guidance=float(s.guidance), seed=seed, height=int(s.height),
                       width=int(s.width), batch=int(s.batch))

    def _run_group(self, group: list[GenerationSettings],
                   callback: StepCallback | None = None) -> list[Result | RuntimeToolError]:
        """One lockstep group (resolved settings): each request's text stage, the shared denoise loop, each
        request's decoding and image guards; each request's result or error."""
        results = self._sample(group, [None] * len(group), callback)
        again = [k for k, r in enumerate(results) if isinstance(r, ResampleRequested)]
        if again:  # a checker read these unsafe: once more, every guard at full strength (runtime/guards Resample)
            for k, r in zip(again, self._sample([group[k] for k in again], [results[k] for k in again], callback)):
                results[k] = r
        return results

    def _sample(self, group: list[GenerationSettings], again: list[ResampleRequested | None],
                callback: StepCallback | None) -> list[Result | RuntimeToolError]:
        calls = [_attempt(self._begin, s, a) for s, a in zip(group, again)]
        live = [c for c in calls if isinstance(c, _Call)]
        latents = iter(self._denoise(live, callback) if live else [])
        return [self._settle(c, next(latents)) if isinstance(c, _Call) else self._fail_closed(c) for c in calls]

    def _begin(self, s: GenerationSettings, again: ResampleRequested | None = None) -> _Call:
        """Tokenizer, text stage and the guards' ``on_text`` hooks: the request up to its denoise feeds."""
        t_start = time.perf_counter()
        cfg = s.guidance > 1.0
        ms: dict[str, Any] = {}

        t0 = time.perf_counter()
        prompts = [s.negative_prompt, s.prompt] if cfg else [s.prompt]
        encs = [tok(prompts) for _, _, tok in self.tokenizers]
        ms["tokenize"] = _ms(t0)

        ctx = GuardContext(self, s.prompt, s.negative_prompt, cfg, s.batch, s.steps, encs[0].input_ids)
        if again is not None:  # the checker's verdict flags the prompt; every guard removes at full strength
            ctx.flags[again.guard] = {"rows": again.rows, "scores": again.scores}
            ctx.escalate = True
        t0 = time.perf_counter()
        ctx.text = self._encode_text(encs, cfg, s.negative_prompt)
        ms["text_encoder"] = _ms(t0)
        try:
            for guard in self.guards:
                run_hook(guard, "on_text", ctx)
        except ImageBlocked as e:  # a text guard refused the prompt: the CLI writes what the guards saw
            e.guard_report = self._guard_report(ctx, ms)
            raise
        ctx.feeds = self._conditioning(ctx.text, s.batch, s.height, s.width)
        return _Call(s, ctx, encs, ms, t_start, again=again)

    def _settle(self, call: _Call, latent: np.ndarray | RuntimeToolError) -> Result | RuntimeToolError:
        """The request's :class:`Result` from its final latent, or its error (fail closed)."""
        if isinstance(latent, RuntimeToolError):
            return self._fail_closed(latent)
        try:
            return self._finish(call, latent)
        except ImageBlocked as e:
            e.guard_report = self._guard_report(call.ctx, call.ms)  # the CLI writes it with --report
            return e
        except RuntimeToolError as e:
            return self._fail_closed(e)

    def _fail_closed(self, error: RuntimeToolError) -> RuntimeToolError:
        """NaN/Inf from a backbone graph: a GuardError when the bundle has guards, else a BackendError."""
        if not isinstance(error, NonFiniteOutputError):
            return error
        if not self.guards:
            return BackendError(f"{error}; nothing was written")
        return GuardError(f"{error}; guards {', '.join(self.guard_names)} active: no image returned, nothing was "
                          "written (fail closed)")

    def _finish(self, call: _Call, latent: np.ndarray) -> Result:
        s, ctx, ms = call.s, call.ctx, call.ms
        t0 = time.perf_counter()
        images = self._decode(latent)
        ms["vae_decoder"] = _ms(t0)
        if call.again is not None:  # rows the checker passed keep their first image
            images = [im if r in call.again.rows else call.again.images[r] for r, im in enumerate(images)]
        for guard in self.guards:
            run_hook(guard, "on_images", ctx, images)
        guards = self._guard_report(ctx, ms)
        ms["total"] = _ms(call.t_start)

        keys = ["negative_prompt", "prompt"] if ctx.cfg else ["prompt"]
        by_tokenizer = {name: dict(zip(keys, e.truncated)) for (name, _, _), e in zip(self.tokenizers, call.encs)}
        truncated = {k: any(t[k] for t in by_tokenizer.values()) for k in keys}
        warnings = [f"{k} is {n} tokens{f' ({name})' if self.sdxl else ''}, longer than the {tok.max_length}-token "
                    "limit: truncated"
                    for (name, _, tok), e in zip(self.tokenizers, call.encs)
                    for k, t, n in zip(keys, e.truncated, e.lengths) if t]
        report = {**s.as_dict(), "model": self.bundle.path.name, "family": self.bundle.manifest.family,
                  "backend": self.backend, "providers": self.providers, "truncated": truncated,
                  **({"truncated_by_tokenizer": by_tokenizer} if self.sdxl else {}),
                  "warnings": warnings, "stages_ms": ms, "guards": guards, "denoise_shared": call.shared}
        if call.again is not None:
            report["resampled"] = {"by": call.again.guard, "rows": call.again.rows, "scores": call.again.scores,
                                   "first_guards": call.again.guard_report}
        return Result(images, report)

    @staticmethod
    def _guard_report(ctx: GuardContext, ms: dict[str, Any]) -> dict[str, Any]:
        """``ctx.report`` with each guard's ``time_ms`` (all its hooks); its per-stage times go into ``ms``."""
        for name, seconds in ctx.seconds.items():
            for stage, value in seconds.items():
                ms[f"guard_{stage}.{name}"] = round(value * 1000, 3)
            if name in ctx.report:
                ctx.report[name]["time_ms"] = round(sum(seconds.values()) * 1000, 3)
        return ctx.report

    def _default_size(self, axis: int) -> int:
        key = "height" if axis == 0 else "width"
        if key in self.defaults:
            return int(self.defaults[key])
        return self.static_hw[axis] if self.static_hw else 512

    # -- stages -------------------------------------------------------------------------------------------

    def _encode_text(self, encs: list, cfg: bool, negative_prompt: str) -> dict[str, np.ndarray]:
        """Run every text-stage graph on its tokenizer's ids: the first encoder's outputs as they are, the
        i-th's (i >= 2) with the suffix ``_i`` (SDXL: ``hidden_2``, ``eos_2``, ``pooled_2``); SDXL's
        ``force_zeros_for_empty_prompt`` zeroes the uncond rows of the conditioning outputs."""
        text: dict[str, np.ndarray] = {}
        for i, ((_, graph, _), enc) in enumerate(zip(self.tokenizers, encs)):
            suffix = "" if i == 0 else f"_{i + 1}"
            out = self.engines[graph].infer({"input_ids": enc.input_ids})
            text.update({f"{k}{suffix}": v for k, v in out.items()})
        if cfg and negative_prompt == "" and self.force_zeros_for_empty_prompt:
            # diffusers: negative_prompt_embeds = zeros_like(prompt_embeds), same for the pooled embeds
            for key in ("hidden", "hidden_2", "pooled_2"):
                text[key] = np.array(text[key], copy=True)
                text[key][0] = 0.0
        return text

    def prompt_conditioning(self, prompt: str) -> dict[str, np.ndarray]:
        """One prompt's denoise conditioning rows without CFG (``encoder_hidden_states``; SDXL also
        ``text_embeds``): what a guard feeds in place of a row's own (SafeRedir's ``steer_away``)."""
        encs = [tok([prompt]) for _, _, tok in self.tokenizers]
        feeds = self._conditioning(self._encode_text(encs, False, prompt), 1)
        feeds.pop("time_ids", None)
        return feeds

    def _conditioning(self, text: dict[str, np.ndarray], batch: int, height: int = 0,
                      width: int = 0) -> dict[str, np.ndarray]:
        """Text-stage outputs -> the denoise graph's conditioning feeds for the UNet batch (``[uncond; cond]``
        rows, each repeated per image). SDXL: both encoders' hidden states concatenated, ``text_embeds`` =
        the second encoder's pooled output, ``time_ids`` = (height, width, 0, 0, height, width) per row."""
        if not self.sdxl:
            return {"encoder_hidden_states": np.ascontiguousarray(np.repeat(text["hidden"], batch, axis=0))}
        hidden = np.concatenate([text["hidden"], text["hidden_2"]], axis=-1)
        rows = hidden.shape[0] * batch
        time_ids = np.array([height, width, 0, 0, height, width], np.float32)
        return {"encoder_hidden_states": np.ascontiguousarray(np.repeat(hidden, batch, axis=0), dtype=np.float32),
                "text_embeds": np.ascontiguousarray(np.repeat(text["pooled_2"], batch, axis=0), dtype=np.float32),
                "time_ids": np.ascontiguousarray(np.tile(time_ids, (rows, 1)))}

    def _denoise(self, calls: list[_Call], callback: StepCallback | None) -> list[np.ndarray | RuntimeToolError]:
        """The shared denoise loop of ``calls`` (one lockstep group): each one's final latent or its error."""
        s = calls[0].s
        try:
            plan = make_plan(s.scheduler, self.scheduler_config, s.steps, karras=s.karras)
        except ValueError as e:  # the arguments are already valid: the bundle's scheduler config is not
            return [BundleError(f"{self.bundle.path}: scheduler {s.scheduler!r} cannot run this bundle's scheduler "
                                f"config ({e}): pick another scheduler or rebuild the bundle")] * len(calls)
        shapes = [(c.s.batch, self.channels, s.height // self.vae_factor, s.width // self.vae_factor) for c in calls]
        rngs, noises = zip(*(initial_noise(c.s.seed, shape) for c, shape in zip(calls, shapes)))
        loop = DenoiseLoop(self, [c.ctx for c in calls], s.guidance, shapes)
        t0 = time.perf_counter()
        latents = loop.run(plan, list(noises), list(rngs), s.steps, callback)
        for c in calls:
            c.ms["denoise_steps"] = loop.step_ms
            if loop.idle is not None:
                c.ms["denoise_idle_steps"] = loop.idle_steps  # step indices that ran denoise_idle
            c.ms["denoise_total"] = _ms(t0)
            c.shared = loop.shared
        return latents

    def _decode(self, latent: np.ndarray) -> list[np.ndarray]:
        image = self.engines["vae_decoder"].infer({"latent": np.ascontiguousarray(latent, dtype=np.float32)})["image"]
        # diffusers' numpy_to_pil: (x * 255).round() of the [0, 1] image
        u8 = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        return [np.ascontiguousarray(im.transpose(1, 2, 0)) for im in u8]

    # -- validation ---------------------------------------------------------------------------------------

    def _validate(self, s: GenerationSettings) -> None:
        _check_text("prompt", s.prompt)
        _check_text("negative_prompt", s.negative_prompt)
        # leading/trailing spacing adds steps_offset to the timesteps: more steps than this overruns the table
        max_steps = int(self.scheduler_config.get("num_train_timesteps", 1000)) - int(
            self.scheduler_config.get("steps_offset", 0) or 0)
        _check_int("steps", s.steps, 1, min(MAX_STEPS, max_steps), "e.g. 20")
        guidance = s.guidance
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(guidance)) or float(guidance) < 0:
            raise BadInputError(f"guidance {guidance!r} must be a finite number >= 0 (e.g. 5.0; <= 1 disables "
                                "classifier-free guidance)")
        _check_int("seed", s.seed, RANDOM_SEED, MAX_SEED, "e.g. 0, or -1 for a random seed")
        _check_int("batch", s.batch, 1, self.max_batch, f"this bundle takes 1..{self.max_batch} images per call")
        for name, value, axis in (("height", s.height, 0), ("width", s.width, 1)):
            self._check_side(name, value, axis)
        if s.scheduler not in SCHEDULERS:
            raise BadInputError(f"unknown scheduler {s.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        if not isinstance(s.karras, bool):
            raise BadInputError(f"karras {s.karras!r} must be True or False")
        if s.karras and s.scheduler not in KARRAS_SCHEDULERS:
            raise BadInputError(f"karras sigmas do not apply to scheduler {s.scheduler!r}: use one of "
                                f"{', '.join(KARRAS_SCHEDULERS)} or drop karras")

    def _check_side(self, name: str, value: Any, axis: int) -> None:
        if not self.dynamic_hw and self.static_hw:
            allowed = self.static_hw[axis]
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value != allowed:
                raise BadInputError(f"{name} {value!r} is not supported: this bundle's graphs are static, {name} "
                                    f"must be {allowed} (rebuild with `python -m export build --dynamic-hw` for "
                                    "other sizes)")
            return
        step = self.vae_factor * self.latent_multiple
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < step or value % step:
            raise BadInputError(f"{name} {value!r} must be a positive multiple of {step} (VAE factor "
                                f"{self.vae_factor} x UNet multiple {self.latent_multiple}), e.g. "
                                f"{max(step, round(value / step) * step) if isinstance(value, int) else step}")


# -- helpers --------------------------------------------------------------------------------------------------


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


def _attempt(fn, *args) -> Any:
    """``fn(*args)``, or the RuntimeToolError it raised: one request's failure, returned to be reported."""
    try:
        return fn(*args)
    except RuntimeToolError as e:
        return e


def _check_text(name: str, text: Any) -> None:
    if not isinstance(text, str):
        raise BadInputError(f"{name} must be a string, got {type(text).__name__}: pass text")
    if "\x00" in text:
        raise BadInputError(f"{name} contains a NUL character: remove it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInputError(f"{name} is not valid UTF-8 (undecodable bytes): pass UTF-8 text") from None
    if len(text) > MAX_PROMPT_CHARS:
        raise BadInputError(f"{name} is {len(text)} characters, more than the {MAX_PROMPT_CHARS} allowed: "
                            "shorten it (only the first tokens are used anyway)")


def _check_int(name: str, value: Any, low: int, high: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise BadInputError(f"{name} {value!r} must be an integer in {low}..{high}: {hint}")


def _latent_multiple(manifest, denoise_engine) -> int:
    """Latent sides must be multiples of the UNet's downsampling, 2**(levels - 1): from the manifest, else the
    ONNX graph's ``grt.latent_multiple`` metadata (export/graphs.py), else 8 (SD 1.x/2.x/XL)."""
    value = manifest.latent.get("multiple") or manifest.component("denoise").extra.get("latent_multiple")
    if value is None:
        try:
            value = denoise_engine.session.get_modelmeta().custom_metadata_map.get("grt.latent_multiple")
        except AttributeError:  # not an ONNX Runtime engine
            value = None
    try:
        return max(1, int(value)) if value is not None else 8
    except (TypeError, ValueError):
        return 8


def _idle_graph_inputs(bundle: Bundle, engines: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(inputs of denoise_idle, inputs of denoise it lacks)``, the latter smallest rank first (the cheapest to
    check every step); two empty lists when the bundle has no idle graph (export/idle.py). BundleError unless
    its inputs are a subset of the denoise graph's and its outputs the same."""
    if "denoise_idle" not in engines:
        return [], []
    m = bundle.manifest
    full, idle = m.component("denoise"), m.component("denoise_idle")
    full_in = {t.name: t for t in full.inputs}
    extra_in = [t.name for t in idle.inputs if t.name not in full_in]
    if extra_in or {t.name for t in idle.outputs} != {t.name for t in full.outputs}:
        raise BundleError(f"{bundle.path}: denoise_idle does not match the denoise graph (its inputs must be a "
                          f"subset and its outputs the same; extra inputs: {extra_in or 'none'}): rebuild the bundle")
    names = {t.name for t in idle.inputs}
    dropped = sorted((t for t in full.inputs if t.name not in names), key=lambda t: (len(t.shape), t.name))
    return [t.name for t in idle.inputs], [t.name for t in dropped]


def _check_family(bundle: Bundle) -> None:
    """An SD 1.x-structured bundle (one tokenizer, one text stage) or a complete SDXL one (module docstring)."""
    m = bundle.manifest
    if m.family not in KNOWN_FAMILIES:
        raise BundleError(f"{bundle.path}: family {m.family!r} is not one this runtime runs "
                          f"({', '.join(KNOWN_FAMILIES)}): rebuild the bundle from a supported backbone")
    try:
        m.component("denoise")
    except BundleError as e:
        raise BundleError(f"{bundle.path}: {e}") from None
    denoise_inputs = {t.name for t in m.component("denoise").inputs}
    sdxl = m.family == "sdxl" or len(m.tokenizers) > 1 or bool({"text_embeds", "time_ids"} & denoise_inputs)
    if not sdxl and len(m.tokenizers) != 1:
        raise BundleError(f"{bundle.path} has no tokenizer entry in its manifest: rebuild it with "
                          "`python -m export build`")
    for name in ("text_encoder", "denoise", "vae_decoder") + (("text_encoder_2",) if sdxl else ()):
        try:
            m.component(name)
        except BundleError as e:  # name the file too
            raise BundleError(f"{bundle.path}: {e}") from None
    if not sdxl:
        return
    problems = []
    if len(m.tokenizers) != 2:
        problems.append(f"{len(m.tokenizers)} tokenizer entries (needs 2)")
    missing = {"encoder_hidden_states", "text_embeds", "time_ids"} - denoise_inputs
    if missing:
        problems.append(f"the denoise graph lacks input(s) {', '.join(sorted(missing))}")
    else:
        width = next(t.shape for t in m.component("denoise").inputs if t.name == "time_ids")[-1]
        if width != SDXL_TIME_IDS:
            problems.append(f"time_ids has {width} values, not the SDXL base model's {SDXL_TIME_IDS} (a refiner?)")
    outputs = {t.name for t in m.component("text_encoder_2").outputs}
    if not {"hidden", "pooled"} <= outputs:
        problems.append(f"text_encoder_2 lacks output(s) {', '.join(sorted({'hidden', 'pooled'} - outputs))}")
    if problems:
        raise BundleError(f"{bundle.path}: not a complete SDXL bundle ({'; '.join(problems)}): rebuild it with "
                          "`python -m export build`")


def _load_tokenizers(bundle: Bundle) -> list[tuple[str, str, CLIPTokenizer]]:
    """``(tokenizer name, text-stage graph, tokenizer)`` of every manifest tokenizer entry, in order; the
    graph is the entry's ``encoder`` (default: ``text_encoder``, ``text_encoder_2``, ...)."""
    out = []
    for i, entry in enumerate(bundle.manifest.tokenizers):
        suffix = "" if i == 0 else f"_{i + 1}"
        graph = entry.get("encoder") or f"text_encoder{suffix}"
        bundle.manifest.component(graph)  # BundleError naming the missing text stage
        out.append((entry.get("name") or f"tokenizer{suffix}", graph, _load_tokenizer(bundle, i)))
    return out


def _load_tokenizer(bundle: Bundle, index: int = 0) -> CLIPTokenizer:
    """Extract the tokenizer files (hash-checked) to a private temporary folder, load them, remove the folder."""
    entry = bundle.manifest.tokenizers[index]
    with tempfile.TemporaryDirectory(prefix="grt-tokenizer-") as d:
        for filename, component in entry["files"].items():
            bundle.extract(component, Path(d) / filename)
        try:
            return CLIPTokenizer(d, max_length=entry.get("max_length"))
        except (TokenizerError, ValueError, KeyError) as e:
            raise BundleError(f"{bundle.path}: the tokenizer files cannot be loaded ({e}): rebuild the bundle") from None
