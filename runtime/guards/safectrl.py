"""SafeCtrl at run time: carry the smoothed risk mask between denoise calls and switch suppression on late.

The Unsafe Attention Block and the Safety Guidance Block are fused into the denoise graph
(export/guards/safectrl.py). The host keeps the per-step state:

- ``step_feeds``: ``safectrl_mask_prev`` = the previous call's ``safectrl_mask`` output (zeros at step 0).
  With CFG one mask per image, the conditional row's (the unconditional row's own detection, on the empty
  prompt, is outside the detector's training distribution). It is fed to the conditional half; the
  unconditional half gets zeros (``blend_uncond: false``: that row stays the plain UNet, so CFG extrapolates
  from it towards the suppressed conditional prediction; ``bench/results/design_measurements.md``) or
  the same mask (``blend_uncond: true``). And the blend weight made from it, ``safectrl_blend`` =
  ``min(1, mask_gain * (mask_prev >= mask_threshold) * mask_prev)`` from step index
  ``ceil(start_step_fraction * steps)`` on (the later, less noisy steps) where the fed mask reaches
  ``mask_threshold`` somewhere, else all zeros: the same float32 operations as
  ``SafeCtrl.blend_weight`` of the torch module, on the host (five graph nodes fewer per step; and all zeros
  lets the pipeline run the bundle's idle denoise graph where it has one, ``export/idle.py``). The graph
  blends with it and outputs ``ema_alpha * mask_prev + (1 - ema_alpha) * M_t``. With ``mask_dilate`` r > 0
  the blend is made from the fed mask's (2r+1)^2 max filter (the state stays undilated): a thin object's mask
  peaks on a few pixels and the blend must cover the whole object; below tau everywhere stays all zeros.
- ``after_step``: writes the output into the next call's feed (one buffer per call, rewritten in place), with
  hysteresis when ``latch_threshold`` is set: from the active steps on, a pixel whose smoothed mask reached it
  keeps at least its highest such value, so suppression stays on where the object was once it has faded it
  (without it the object came back between blends); in an image whose mask has not reached it, the pixels that
  reached ``latch_floor`` are held instead (a thin knife's mask peaks below the latch; the lower level only
  where nothing reached the latch, so a large object's hold is not widened); keeps the conditional rows' fed
  mask, which ``on_images`` summarises per step as the mask coverage (share of latent pixels above ``coverage_threshold``) and the
  maximum (once per call: host work between two UNet calls runs on cold caches, so it is kept to what the next
  step needs).

``ctx.report["safectrl"]``: active_from_step, active_steps, coverage (per step), max_mask (per step),
blending_steps (active steps whose fed mask reached the threshold somewhere, i.e. the output differs from the
plain UNet), triggered.
"""

from __future__ import annotations

import math

import numpy as np

from runtime.guards import Guard, GuardContext
from runtime.guards.settings import flag, index, label, labels, optional, positive, unit


class SafeCtrl(Guard):
    name = "safectrl"
    SETTINGS = {"ema_alpha": unit, "start_step_fraction": unit, "mask_threshold": unit, "mask_gain": positive,
                "coverage_threshold": unit, "blend_uncond": flag, "latch_threshold": optional(unit),
                "latch_floor": unit, "mask_dilate": index,
                "state_input": label, "state_output": label, "blend_input": label, "categories": labels}

    def __init__(self, pipe, config, **kwargs):
        super().__init__(pipe, config, **kwargs)
        inputs = {t.name for t in pipe.bundle.manifest.component("denoise").inputs}
        outputs = {t.name for t in pipe.bundle.manifest.component("denoise").outputs}
        missing = sorted({self.config["state_input"], self.config["blend_input"]} - inputs
                         | {self.config["state_output"]} - outputs)
        if missing:
            raise self.bad_config(f"the denoise graph lacks {', '.join(missing)}: rebuild the bundle with "
                                  "`python -m export build ... --guards safectrl`")
        latch = self.config["latch_threshold"]
        if latch is not None and self.config["latch_floor"] > latch:
            raise self.bad_config(f"latch_floor {self.config['latch_floor']} is above latch_threshold {latch}: "
                                  "the floor is the lower level (equal turns it off)")

    def start_step(self, steps: int) -> int:
        return int(math.ceil(float(self.config["start_step_fraction"]) * steps - 1e-9))

    def on_text(self, ctx: GuardContext) -> None:
        # feed: the mask fed to the next denoise call (written in place by after_step); held: the running
        # maximum of the smoothed mask (hysteresis); fed_max: the largest value in the feed; fed: per step, the
        # conditional rows' fed mask (references; summarised in on_images). The rest: per-call constants of the
        # step hooks
        start, latch = self.start_step(ctx.steps), self.config["latch_threshold"]
        ctx.state_of(self.name).update(
            feed=None, held=None, fed_max=0.0, fed=[], output=self.config["state_output"],
            rows=ctx.cond_rows if ctx.cfg else slice(None), report_rows=slice(None) if ctx.cfg else ctx.cond_rows,
            uncond=ctx.batch if ctx.cfg and self.config["blend_uncond"] else 0,
            start=start, tau=np.float32(self.config["mask_threshold"]), gain=np.float32(self.config["mask_gain"]),
            latch=None if latch is None else np.float32(latch), floor=np.float32(self.config["latch_floor"]),
            dilate=int(self.config["mask_dilate"]),
            latch_from=start - 1)  # the call whose output the first active step is fed
        ctx.report[self.name] = {"active_from_step": start, "active_steps": [], "blending_steps": [], "coverage": [],
                                 "max_mask": [], "triggered": False}

    def step_feeds(self, ctx: GuardContext, i: int, t: np.float32, x: np.ndarray) -> dict[str, np.ndarray]:
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
            # blend_weight's float32 operations in the order min(m * gain, 1) * (m >= tau): the same values,
            # since m >= 0 makes both +0 below tau
            blend = st["blend"]
            src = dilate(feed, st["dilate"]) if st["dilate"] else feed  # the state fed stays undilated
            if st["gain"] != 1:
                np.multiply(src, st["gain"], out=blend)
                np.minimum(blend, np.float32(1), out=blend)
                blend *= src >= st["tau"]
            else:
                np.multiply(src, src >= st["tau"], out=blend)
        else:  # all zeros: the graph's blend weight is 0, and the pipeline may run denoise_idle
            blend = st["no_blend"]
        return {self.config["state_input"]: feed, self.config["blend_input"]: blend}

    def after_step(self, ctx: GuardContext, i: int, t: np.float32, outputs: dict[str, np.ndarray]) -> None:
        st = ctx.state_of(self.name)
        kept = outputs[st["output"]][st["rows"]]  # the rows whose mask is fed on (a view)
        top = float(kept.max())
        if not math.isfinite(top):
            raise ValueError("safectrl_mask has NaN/Inf")
        latch = st["latch"]
        if latch is not None and i >= st["latch_from"] and (st["held"] is not None or top >= st["floor"]):
            # hysteresis (guards.safectrl.SafeCtrl.hold): the held pixels at or above each image's level, the
            # latch where its held mask reached it, else the floor; max(new, those) is the next feed. Held from
            # the first call that reaches the floor: values below it never hold, and a benign step skips this
            held = st["held"] = kept.copy() if st["held"] is None else np.maximum(st["held"], kept)
            peak = held.reshape(held.shape[0], -1).max(axis=1).reshape(-1, 1, 1, 1)
            level = np.where(peak >= latch, latch, st["floor"])
            kept = np.maximum(kept, held * (held >= level))
            top = float(kept.max())
        feed = st["feed"]
        feed[st["rows"]] = kept
        if st["uncond"]:
            feed[:st["uncond"]] = kept
        st["fed_max"] = top
        st["fed"].append(kept[st["report_rows"]])

    def on_images(self, ctx: GuardContext, images) -> None:
        fed = ctx.state_of(self.name)["fed"]
        report = ctx.report[self.name]
        if fed:
            flat = np.stack(fed).reshape(len(fed), -1)
            covered = np.count_nonzero(flat > float(self.config["coverage_threshold"]), axis=1) / flat.shape[1]
            report["coverage"] = [round(float(v), 4) for v in covered]
            report["max_mask"] = [round(float(v), 4) for v in flat.max(axis=1)]

    def parts(self) -> set[str]:
        return {self.config[k] for k in ("state_input", "blend_input", "state_output")}

    def summary(self, report: dict) -> str:
        if report.get("triggered"):
            return (f"unsafe region found (mask up to {max(report['max_mask']):.2f}): suppressed on "
                    f"{len(report['blending_steps'])} steps")
        return "no unsafe region found: plain UNet"


HOST = SafeCtrl


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """(N, 1, h, w) max filter over a (2r+1)^2 window, zero padding: torch's max_pool2d(k=2r+1, stride 1, pad r)
    for masks >= 0 (guards.safectrl.SafeCtrl.blend_weight)."""
    h, w = mask.shape[-2:]
    padded = np.pad(mask, ((0, 0), (0, 0), (r, r), (r, r)))
    out = mask.copy()
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            np.maximum(out, padded[..., dy:dy + h, dx:dx + w], out=out)
    return out
