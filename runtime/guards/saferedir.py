"""SafeRedir at sampling time: check the latent every ``check_every`` steps, redirect the prompt once unsafe.

Manifest entry (``export/guards/saferedir.py``): ``graph`` (the bundle graph, ``redirect``), ``check_every``,
``first_check``, ``threshold`` (unsafe probability that triggers), ``alpha`` (baked into the graph; recorded).

Per image of the batch (rows of the conditional half), independently:

- at steps ``first_check, first_check + check_every, ...`` while the row has not fired, the ``redirect`` graph
  runs on the conditional latent ``x`` (the sampler's scaled model input), ``t`` and the row's conditional
  ``encoder_hidden_states``; ``softmax(logits)[1] >= threshold`` fires the row;
- a fired row's conditional embedding is replaced by the graph's ``redirected`` output of the detection call
  for this and every later step (computed once, not recomputed: the redirection reads only the prompt, so a
  later check would give the same embedding, and no check runs after the last row has fired);
- SDXL (the graph has a ``pooled`` input): the check also feeds the conditional rows' ``text_embeds``, and a
  fired row's ``text_embeds`` is replaced by the graph's ``redirected_pooled`` of the same call, like its
  ``encoder_hidden_states``;
- a fired row joins ``ctx.redirected`` (Redirected rows in ``runtime/guards/__init__.py``: a SafePatch built
  with ``yield_to_redirect``, after this guard in a stack, stops patching it);
- ``steer_away`` (a text, or null = off; our extension, not the paper's): with CFG, a fired row's unconditional
  row is fed ``(1 - steer_weight) * own + steer_weight * steer`` from the same step on (``steer``: this text's
  conditioning; weight 1 = the text as the negative prompt), so guidance steers the image away from the named
  concepts however the prompt spells them (a redirect learns the spellings it was trained on; an attacker's
  misspelling or fragment can keep the object). Encoded once per pipeline, on the first fire;
- ``steer_escalate`` (a weight >= ``steer_weight``, or null = off; our extension): checks go on for fired rows,
  with the row's redirected embedding; a row the classifier still reads unsafe there (``escalate_threshold``)
  is escalated from that step on: its steer weight becomes ``steer_escalate`` and its embedding is redirected
  once more (the check's own ``redirected`` output); with ``escalate_patch`` it also leaves ``ctx.redirected``,
  so a SafePatch built with ``yield_to_redirect`` patches it again. A redirect that worked leaves the latent
  reading safe under it, so only rows whose image keeps the object (a spelling the redirect missed) pay the
  stronger removal's cost;
- the second sampling of a request an image checker read unsafe (``ctx.escalate``, Resample in
  ``runtime/guards/__init__.py``): every row fires at the first check (the checker's flag) and is escalated in the
  same step (a second graph call on its redirected embedding), so the full removal runs from step 0;
- rows that never fire are passed through untouched (no feed override at all while nothing fired), so a
  benign prompt gives the bit-identical image of the unguarded bundle.

- a prompt an earlier guard flagged (``ctx.flags``, e.g. SafeGuider in gate mode) fires every row at its
  first check whatever the classifier says: the latent classifier can be fooled by the same words that the
  flagging guard caught, and redirecting a flagged prompt early keeps the scene (its own check still runs
  and is reported).

``report["saferedir"]``: ``triggered`` (any row), ``detection_step`` (first, or None), ``forced_by`` (the
flagging guards, [] when none), ``steered_away`` (the text, once a row fired with it), ``escalated`` (the rows
escalated, once any was) and per row ``rows[i] = {triggered, forced, detection_step, checks: [{step, t,
unsafe_prob, logits}], mask, scale, rechecks: [{step, t, unsafe_prob}], escalated_step}`` (``forced``: fired by
the flag while the classifier was below the threshold; mask and scale per token at detection, rounded;
``rechecks``: the reads under the redirected embedding), ``checks`` (graph calls). A NaN/Inf graph output is a
GuardError (fail closed, no image).
"""

from __future__ import annotations

import numpy as np

from runtime.errors import GuardError
from runtime.guards import Guard, GuardContext
from runtime.guards.settings import count, flag, fraction, index, label, optional, positive, unit


def _softmax_unsafe(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e[:, 1] / e.sum(axis=-1)


class SafeRedir(Guard):
    name = "saferedir"
    SETTINGS = {"graph": label, "check_every": count, "first_check": index, "threshold": unit, "alpha": positive,
                "steer_away": optional(label), "steer_weight": fraction, "steer_escalate": optional(fraction),
                "escalate_threshold": unit, "escalate_patch": flag}

    def __init__(self, pipe, config, **kwargs):
        super().__init__(pipe, config, **kwargs)
        self.graph = self.config["graph"]
        self.check_every = self.config["check_every"]
        self.first_check = self.config["first_check"]
        self.threshold = float(self.config["threshold"])
        if self.graph not in pipe.engines:
            raise self.bad_config(f"the bundle has no {self.graph!r} graph: rebuild it with `python -m export build "
                                  "... --guards saferedir`")
        # SDXL: the graph redirects the pooled text_embeds too (export/guards/saferedir.py)
        self.pooled = "pooled" in {t.name for t in pipe.bundle.manifest.component(self.graph).inputs}
        self.steer_away, self.steer_weight = self.config["steer_away"], float(self.config["steer_weight"])
        for name, _, tokenizer in pipe.tokenizers if self.steer_away else ():  # a cut text would steer elsewhere
            enc = tokenizer([self.steer_away])
            if enc.truncated[0]:
                raise self.bad_config(f"steer_away={self.steer_away!r} is {enc.lengths[0]} tokens, over {name}'s "
                                      f"limit of {tokenizer.max_length}: rebuild with a shorter text")
        self.steer_escalate = self.config["steer_escalate"]
        if self.steer_escalate is not None and (not self.steer_away or self.steer_escalate < self.steer_weight):
            raise self.bad_config(f"steer_escalate={self.steer_escalate!r} needs steer_away and a weight >= "
                                  f"steer_weight ({self.steer_weight:g}): rebuild with both, or without it")
        self.escalate_threshold = float(self.config["escalate_threshold"])
        self.escalate_patch = self.config["escalate_patch"]
        self._steer: dict[str, np.ndarray] | None = None  # steer_away's conditioning rows, encoded on the first fire

    def on_text(self, ctx: GuardContext) -> None:
        ctx.report[self.name] = {"triggered": False, "detection_step": None, "checks": 0, "forced_by": ctx.flagged_by,
                                 "threshold": self.threshold, "check_every": self.check_every,
                                 "rows": [{"triggered": False, "forced": False, "detection_step": None, "checks": [],
                                           "mask": None, "scale": None, "rechecks": [], "escalated_step": None}
                                          for _ in range(ctx.batch)]}
        st = ctx.state_of(self.name)
        st["redirected"] = None   # (batch, L, D) conditional rows to feed, once any fired
        st["redirected_pooled"] = None  # SDXL: (batch, P) conditional text_embeds rows, likewise
        st["fired"] = np.zeros(ctx.batch, bool)
        st["steered"] = None  # {feed: (batch, ...) unconditional rows to feed}, once a row fired with steer_away
        st["weight"] = np.zeros(ctx.batch)  # each fired row's steer weight
        st["escalated"] = np.zeros(ctx.batch, bool)

    def step_feeds(self, ctx: GuardContext, i: int, t: np.float32, x: np.ndarray) -> dict[str, np.ndarray]:
        rep, st = ctx.report[self.name], ctx.state_of(self.name)
        if ((self._to_recheck(ctx).any() or not st["fired"].all()) and i >= self.first_check
                and (i - self.first_check) % self.check_every == 0):
            self._check(ctx, i, t, x, rep)
        feeds = {}
        if st["redirected"] is not None:
            ehs = ctx.feeds["encoder_hidden_states"].copy()
            ehs[ctx.cond_rows] = st["redirected"]
            feeds = {"encoder_hidden_states": ehs}
            if st["redirected_pooled"] is not None:
                pooled = ctx.feeds["text_embeds"].copy()
                pooled[ctx.cond_rows] = st["redirected_pooled"]
                feeds["text_embeds"] = pooled
            for name, rows in (st["steered"] or {}).items():
                feeds.setdefault(name, ctx.feeds[name].copy())[:ctx.batch] = rows  # the unconditional half
        return feeds

    def _steer_rows(self, ctx: GuardContext) -> dict[str, np.ndarray]:
        """The unconditional rows, each fired row's moved ``steer_weight`` of the way to ``steer_away``'s."""
        if self._steer is None:  # the same text for every call: encode once (a race encodes twice, harmlessly)
            self._steer = self.pipe.prompt_conditioning(self.steer_away)
        st = ctx.state_of(self.name)
        st["steered"] = {}
        for k, steer in self._steer.items():
            rows = np.array(ctx.feeds[k][:ctx.batch], copy=True)  # ctx.feeds holds the call's own rows
            for r in np.flatnonzero(st["fired"]):
                w = st["weight"][r]
                rows[r] = steer[0] if w == 1 else (1 - w) * rows[r] + w * steer[0]
            st["steered"][k] = rows
        return st["steered"]

    def _to_recheck(self, ctx: GuardContext) -> np.ndarray:
        """Rows fired earlier and not yet escalated, when the bundle escalates (a CFG call only: it steers)."""
        st = ctx.state_of(self.name)
        return st["fired"] & ~st["escalated"] & (self.steer_escalate is not None and ctx.cfg)

    def _check(self, ctx: GuardContext, i: int, t: np.float32, x: np.ndarray, rep: dict) -> None:
        st = ctx.state_of(self.name)
        rechecked = self._to_recheck(ctx)
        before = st["weight"].copy()
        cond = ctx.feeds["encoder_hidden_states"][ctx.cond_rows]
        embeds = np.array(cond, dtype=np.float32, copy=True)
        if rechecked.any():
            embeds[rechecked] = st["redirected"][rechecked]
        feeds = {"latent": np.ascontiguousarray(x, dtype=np.float32), "timestep": np.array([t], dtype=np.float32),
                 "prompt_embeds": embeds}
        outputs = ("logits", "redirected", "mask", "scale")
        if self.pooled:
            pooled = ctx.feeds["text_embeds"][ctx.cond_rows]
            feeds["pooled"] = np.array(pooled, dtype=np.float32, copy=True)
            if rechecked.any():
                feeds["pooled"][rechecked] = st["redirected_pooled"][rechecked]
            outputs += ("redirected_pooled",)
        out = self.pipe.engines[self.graph].infer(feeds)
        for name in outputs:  # backends check too; never trust a NaN
            if not np.all(np.isfinite(out[name])):
                raise GuardError(f"guard saferedir: graph {self.graph!r} output {name!r} is not finite at step "
                                 f"{i}: no image written (fail closed)")
        probs = _softmax_unsafe(out["logits"].astype(np.float64))
        rep["checks"] += 1
        for r in range(ctx.batch):
            if rechecked[r]:
                rep["rows"][r]["rechecks"].append({"step": int(i), "t": float(t),
                                                   "unsafe_prob": round(float(probs[r]), 5)})
                if probs[r] >= self.escalate_threshold or ctx.escalate:
                    st["escalated"][r], st["weight"][r] = True, self.steer_escalate
                    st["redirected"][r] = out["redirected"][r]  # redirected once more: the check's own output
                    if self.pooled:
                        st["redirected_pooled"][r] = out["redirected_pooled"][r]
                    if self.escalate_patch:
                        ctx.redirected.discard(r)  # a SafePatch built to yield to the redirect patches it again
                    rep["rows"][r]["escalated_step"] = int(i)
                    rep.setdefault("escalated", []).append(r)
            if st["fired"][r]:
                continue
            row = rep["rows"][r]
            row["checks"].append({"step": int(i), "t": float(t), "unsafe_prob": round(float(probs[r]), 5),
                                  "logits": [round(float(v), 4) for v in out["logits"][r]]})
            if probs[r] >= self.threshold or ctx.flags:  # a flagged prompt fires at once (module docstring)
                st["fired"][r], st["weight"][r] = True, self.steer_weight
                ctx.redirected.add(r)
                row["forced"] = bool(probs[r] < self.threshold)
                if st["redirected"] is None:
                    st["redirected"] = np.array(cond, dtype=np.float32, copy=True)
                st["redirected"][r] = out["redirected"][r]
                if self.pooled:
                    if st["redirected_pooled"] is None:
                        st["redirected_pooled"] = np.array(pooled, dtype=np.float32, copy=True)
                    st["redirected_pooled"][r] = out["redirected_pooled"][r]
                row.update(triggered=True, detection_step=int(i),
                           mask=[round(float(v), 3) for v in out["mask"][r]],
                           scale=[round(float(v), 3) for v in out["scale"][r]])
                if rep["detection_step"] is None:
                    rep.update(triggered=True, detection_step=int(i))
        if ctx.cfg and self.steer_away and (st["weight"] != before).any():  # a row fired or escalated here
            self._steer_rows(ctx)
            rep["steered_away"] = self.steer_away
        if ctx.escalate and self._to_recheck(ctx).any():  # resampling: escalate what just fired, in this step
            self._check(ctx, i, t, x, rep)

    def parts(self) -> set[str]:
        return {self.graph}

    def summary(self, report: dict) -> str:
        steered = (f"; guided away from {report['steered_away']!r} (weight {self.steer_weight:g})"
                   if report.get("steered_away") else "")
        if report.get("escalated"):
            steps = sorted({report["rows"][r]["escalated_step"] for r in report["escalated"]})
            steered += (f", weight {self.steer_escalate:g} from step {', '.join(map(str, steps))} (latent still "
                        "judged unsafe after the redirect)")
        if report.get("forced_by"):
            return (f"prompt flagged by {', '.join(report['forced_by'])}: prompt embedding redirected from step "
                    f"{report['detection_step']}{steered}")
        if report.get("triggered"):
            prob = max(c["unsafe_prob"] for row in report["rows"] for c in row["checks"])
            return (f"latent judged unsafe (p {prob:.2f}) at step {report['detection_step']}: prompt embedding "
                    f"redirected{steered}")
        return f"latent judged safe in {report.get('checks', 0)} check(s): no redirect"


HOST = SafeRedir
