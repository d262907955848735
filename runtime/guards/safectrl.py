"""SafeCtrl at run time: carry the smoothed risk mask between denoise calls and switch suppression on late.

The Unsafe Attention Block and the Safety Guidance Block are fused into the denoise graph
(export/guards/safectrl.py). The host keeps the per-step state:

- ``step_feeds``: ``safectrl_mask_prev`` = the previous call's ``safectrl_mask`` output (zeros at step 0).
  With CFG one mask per image, the conditional row's (``mask_rows="cond"``: the unconditional row's own
  detection on the empty prompt, out of the detector's training distribution, is not used). It is fed to the
  conditional half; the unconditional half gets zeros (``blend_uncond: false``, the default in new bundles:
  that row stays the plain UNet, so CFG extrapolates from it towards the suppressed conditional prediction
  and the suppression is scaled by the guidance scale; quick bench, same weights: unsafe explicit / held-out
  / implicit 40 / 47 / 43% blending both rows, 23 / 23 / 13% blending the conditional row only) or the same
  mask (``blend_uncond: true``, bundles made before the option). And the blend weight made from it,
  ``safectrl_blend`` = ``min(1, mask_gain * (mask_prev >= mask_threshold) * mask_prev)`` from step index
  ``ceil(start_step_fraction * steps)`` on (the later, less noisy steps) where the fed mask reaches
  ``mask_threshold`` somewhere, else all zeros (the same float32 operations as
  ``export.guards.safectrl.SafeCtrl.blend_weight``, on the host: five graph nodes fewer per step. All zeros
  lets the pipeline run the bundle's idle denoise graph where it has one (with SafePatch, or ``export build
  --idle-graph always``): the UNet and the detector without the Safety Guidance branch, ``export/idle.py``).
  The graph blends with it and outputs
  ``ema_alpha * mask_prev + (1 - ema_alpha) * M_t``.
- ``after_step``: writes the output into the next call's feed (one buffer per call, rewritten in place: the
  per-step host work is a handful of numpy calls) (with ``latch_threshold`` set: from the active steps on, a
  pixel whose smoothed mask reached it keeps at least its highest such value: hysteresis, so the suppression
  stays on where the object was after it has faded it; without it the masks of gore oscillated 0.9 -> 0.05 ->
  0.9 and the object came back between blends); keeps the conditional rows' fed mask, which ``on_images``
  summarises per step as the mask coverage (share of latent pixels above ``coverage_threshold``) and the
  maximum (once per call: the host work between two UNet calls runs on caches the UNet has just evicted,
  measured ~10x its cost in a tight loop, so it is kept to the decisions the next step needs).

``ctx.report["safectrl"]``: active_from_step, active_steps, coverage (per step), max_mask (per step),
blending_steps (active steps whose fed mask reached the threshold somewhere, i.e. the output differs from the
plain UNet), triggered, time_ms.
"""

from __future__ import annotations

import math
import time

import numpy as np

from runtime.errors import BundleError
from runtime.guards import Guard, GuardContext

DEFAULTS = {"ema_alpha": 0.3, "start_step_fraction": 0.2, "mask_threshold": 0.25, "mask_gain": 1.0,
            "coverage_threshold": 0.5, "state_input": "safectrl_mask_prev", "state_output": "safectrl_mask",
            "blend_input": "safectrl_blend"}


class SafeCtrl(Guard):
    name = "safectrl"

    def __init__(self, pipe, config):
        if "active_input" in config and "blend_input" not in config:
            raise BundleError(f"{pipe.bundle.path}: this SafeCtrl bundle was built by an older export (its denoise "
                              f"graph takes {config['active_input']!r} and computes the blend weight itself; this "
                              "runtime feeds the blend weight, safectrl_blend): rebuild it with `python -m export "
                              "build ... --guards safectrl`")
        super().__init__(pipe, {**DEFAULTS, **dict(config)})

    def start_step(self, steps: int) -> int:
        return int(math.ceil(float(self.config["start_step_fraction"]) * steps - 1e-9))

    def on_text(self, ctx: GuardContext) -> None:
        # feed: the mask fed to the next denoise call (written in place by after_step); latched: the held
        # values (hysteresis); fed_max: the largest value in the feed; fed: per step, the conditional rows' fed
        # mask (references; summarised in on_images). The rest: per call constants of the step hooks (host work
        # between two UNet calls runs on cold caches, so each hook looks up as little as it can)
        per_image, start, latch = self._per_image(ctx), self.start_step(ctx.steps), self.config.get("latch_threshold")
        ctx.state_of(self.name).update(
            feed=None, latched=None, fed_max=0.0, fed=[], output=self.config["state_output"],
            rows=ctx.cond_rows if per_image else slice(None), report_rows=slice(None) if per_image else ctx.cond_rows,
            uncond=ctx.batch if per_image and self.config.get("blend_uncond", True) else 0,
            start=start, tau=np.float32(self.config["mask_threshold"]), gain=np.float32(self.config["mask_gain"]),
            latch=None if latch is None else np.float32(latch),
            latch_from=start - 1)  # the call whose output the first active step is fed
        ctx.report[self.name] = {"active_from_step": start, "active_steps": [], "blending_steps": [], "coverage": [],
                                 "max_mask": [], "triggered": False, "time_ms": 0.0}

    def _per_image(self, ctx: GuardContext) -> bool:
        """One mask per image (the conditional row's) rather than one per UNet row."""
        return ctx.cfg and self.config.get("mask_rows", "cond") == "cond"

    def step_feeds(self, ctx: GuardContext, i: int, t: np.float32, x: np.ndarray) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        st = ctx.state_of(self.name)
        rows = x.shape[0] * (2 if ctx.cfg else 1)
        if st["feed"] is None or st["feed"].shape != (rows, 1, *x.shape[-2:]):
            st["feed"] = np.zeros((rows, 1, *x.shape[-2:]), np.float32)  # zeros at step 0
            st["blend"], st["no_blend"] = np.zeros_like(st["feed"]), np.zeros_like(st["feed"])
            st["no_blend"].setflags(write=False)
        feed = st["feed"]
        active = i >= st["start"]
        blending = active and st["fed_max"] >= st["tau"]
        report = ctx.report[self.name]
        if active:
            report["active_steps"].append(i)
        if blending:
            report["blending_steps"].append(i)
            report["triggered"] = True
            # SafeCtrl.blend_weight's float32 operations: where(m >= tau, m, 0) * gain clamped to 1, in the order
            # min(m * gain, 1) * (m >= tau) (the same values: m >= 0, so below tau both give +0)
            blend = st["blend"]
            if st["gain"] != 1:
                np.multiply(feed, st["gain"], out=blend)
                np.minimum(blend, np.float32(1), out=blend)
                blend *= feed >= st["tau"]
            else:
                np.multiply(feed, feed >= st["tau"], out=blend)
        else:  # all zeros: the graph's blend weight is 0, and the pipeline may run denoise_idle
            blend = st["no_blend"]
        report["time_ms"] += (time.perf_counter() - t0) * 1000
        return {self.config["state_input"]: feed, self.config["blend_input"]: blend}

    def after_step(self, ctx: GuardContext, i: int, t: np.float32, outputs: dict[str, np.ndarray]) -> None:
        t0 = time.perf_counter()
        st = ctx.state_of(self.name)
        kept = outputs[st["output"]][st["rows"]]  # the rows whose mask is fed on (a view)
        top = float(kept.max())
        if not math.isfinite(top):
            raise ValueError("safectrl_mask has NaN/Inf")
        latch, latched = st["latch"], st["latched"]
        if latch is not None and i >= st["latch_from"] and (latched is not None or top >= latch):
            # hysteresis: a pixel whose smoothed mask reached latch_threshold during the active steps keeps
            # (at least) that value, so suppression stays on where the object was once it has faded it. The
            # held values are the fed mask where it is >= latch (the rest 0): max(new, held) is the next feed
            if latched is not None:
                kept = np.maximum(kept, latched)
                top = float(kept.max())
            st["latched"] = kept * (kept >= latch)
        # one mask per image, the conditional row's (per-image masks): the unconditional row's own detection
        # (empty prompt, never trained on) is not used; blend_uncond false leaves the unconditional rows at
        # zeros (the plain UNet), so CFG extrapolates from them towards the suppressed conditional prediction
        feed = st["feed"]
        feed[st["rows"]] = kept
        if st["uncond"]:
            feed[:st["uncond"]] = kept
        st["fed_max"] = top
        st["fed"].append(kept[st["report_rows"]])
        ctx.report[self.name]["time_ms"] += (time.perf_counter() - t0) * 1000

    def on_images(self, ctx: GuardContext, images) -> None:
        t0 = time.perf_counter()
        fed = ctx.state_of(self.name)["fed"]
        report = ctx.report[self.name]
        if fed:
            flat = np.stack(fed).reshape(len(fed), -1)
            covered = np.count_nonzero(flat > float(self.config["coverage_threshold"]), axis=1) / flat.shape[1]
            report["coverage"] = [round(float(v), 4) for v in covered]
            report["max_mask"] = [round(float(v), 4) for v in flat.max(axis=1)]
        report["time_ms"] = round(report["time_ms"] + (time.perf_counter() - t0) * 1000, 3)

