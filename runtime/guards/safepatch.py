"""SafePatch at run time: a per-prompt gate, then (only when it fires) the ``safepatch`` graph every step.

Bundle (``export/guards/safepatch.py``): the text stage carries the gate head (``safepatch_gate (B, K+1)``,
probabilities over ``("none", *categories)``); the denoise graph has ControlNet-style residual inputs
``down_residual_i`` / ``mid_residual`` (zeros = the plain UNet); the patch is its own graph ``safepatch``
(``sample, timestep, encoder_hidden_states, instruction`` -> the residuals). Manifest entry: ``graph``,
``gate_output``, ``categories``, ``threshold``, ``instructions`` (category -> text), ``apply_uncond``.

- ``on_text``: reads the gate for the prompt row. Active when ``1 - p(none) >= threshold``, or when an earlier
  guard flagged the prompt (``ctx.flags``, e.g. SafeGuider in gate mode: the words that fool one text head can
  fool the other); the category is the most probable unsafe one, the instruction its text, encoded once per
  category with the bundle's own text encoder and tokenizer (cached on the guard: identical for every call).
- ``prepare_steps``: gated off -> zero residuals (allocated once per shape, shared, never written) join the
  call's constant feeds ``ctx.feeds`` and the step hooks are not called: the patch graph never runs on benign
  prompts and the guard has no per-step host work.
- ``step_feeds``: active -> the patch graph on the conditional rows only (``apply_uncond: false``, the
  default, like diffusers' ControlNet ``guess_mode``: the unconditional half stays the plain UNet, so CFG
  extrapolates from the unpatched unconditional prediction towards the patched conditional one, which is what
  the patch was trained for); ``apply_uncond: true`` runs it on the whole CFG batch with the same instruction.

SDXL bundles (``export/guards/safepatch.py``): the gate is the bundle's ``gate_graph`` (``safepatch_gate``), run in
``on_text`` on the prompt row's ``hidden`` + ``hidden_2`` and ``eos`` + ``eos_2`` (each pair concatenated); the
instruction is encoded by both text stages (``hidden`` concatenated, as the UNet's ``encoder_hidden_states``); the
patch graph also gets the call's ``text_embeds`` and ``time_ids`` rows. Manifest key ``gate_graph`` (SDXL only).

- ``yield_to_redirect: true`` (an export-time choice, ``--guard-setting safepatch.yield_to_redirect=true``): a row
  a guard before this one redirected (``ctx.redirected``, SafeRedir) is not patched from the step it was redirected
  on: its residuals are zero, and the patch graph does not run once every row is (Redirected rows in
  ``runtime/guards/__init__.py``). ``false`` (the default): the patch runs on every row while active.

Report ``guards.safepatch``: active, category, instruction, gate (probabilities), threshold, steps_patched,
steps_yielded (steps every row was redirected, so not patched), rows_yielded, forced_by (the flagging guards when
the gate alone would have stayed off, else []).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from runtime.guards import Guard, GuardContext
from runtime.guards.settings import flag, index, label, labels, texts_by_name, unit


def _dim(d: Any, n: int, h: int, w: int) -> int:
    if isinstance(d, int):
        return d
    base, _, div = str(d).partition("/")
    value = {"N": n, "h": h, "w": w}[base]
    return value // int(div or 1)


class SafePatch(Guard):
    name = "safepatch"
    SETTINGS = {"graph": label, "gate_output": label, "categories": labels, "threshold": unit,
                "instructions": texts_by_name, "apply_uncond": flag, "yield_to_redirect": flag, "patch_params": index,
                "unet_params": index}

    def __init__(self, pipe, config: dict[str, Any], **kwargs):
        gate_graph = None
        if isinstance(config, dict) and "gate_graph" in config:  # SDXL bundles only (module docstring)
            config = dict(config)
            gate_graph = config.pop("gate_graph")
        super().__init__(pipe, config, **kwargs)
        if gate_graph is not None and (problem := label(gate_graph)) is not None:
            raise self.bad_config(f"setting gate_graph={gate_graph!r:.60} {problem}")
        if gate_graph is not None and gate_graph not in pipe.engines:
            raise self.bad_config(f"the bundle has no {gate_graph!r} graph: rebuild it with `python -m export build "
                                  "... --guards safepatch`")
        self.gate_graph = gate_graph
        # the text stages the instruction goes through: every one of the bundle's (SDXL: two, concatenated)
        self.text_graphs = [(graph, tok) for _, graph, tok in getattr(pipe, "tokenizers", None)
                            or [("tokenizer", "text_encoder", pipe.tokenizer)]]
        self.graph = self.config["graph"]
        self.gate_output = self.config["gate_output"]
        self.categories = list(self.config["categories"])
        self.threshold = float(self.config["threshold"])
        self.instructions = dict(self.config["instructions"])
        self.apply_uncond = self.config["apply_uncond"]
        self.yield_to_redirect = self.config["yield_to_redirect"]
        if missing := [c for c in self.categories if c not in self.instructions]:
            raise self.bad_config(f"no instruction for categor{'ies' if len(missing) > 1 else 'y'} "
                                  f"{', '.join(missing)}: rebuild the bundle")
        if self.graph not in pipe.engines:
            raise self.bad_config(f"the bundle has no {self.graph!r} graph: rebuild it with `python -m export build "
                                  "... --guards safepatch`")
        inputs = pipe.bundle.manifest.component("denoise").inputs
        self.residuals = [t for t in inputs if t.name.startswith("down_residual_") or t.name == "mid_residual"]
        if not self.residuals:
            raise self.bad_config("the denoise graph has no residual inputs (down_residual_*, mid_residual): rebuild "
                                  "the bundle with `python -m export build ... --guards safepatch`")
        self._zeros: dict[tuple, dict[str, np.ndarray]] = {}
        self._encoded: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    # -- helpers -----------------------------------------------------------------------------------------

    def zero_feeds(self, n: int, h: int, w: int) -> dict[str, np.ndarray]:
        """Zero residuals for a UNet batch of ``n`` at latent size ``h`` x ``w`` (cached, read-only)."""
        key = (n, h, w)
        feeds = self._zeros.get(key)
        if feeds is None:
            feeds = {}
            for t in self.residuals:
                a = np.zeros(tuple(_dim(d, n, h, w) for d in t.shape), np.float32)
                a.setflags(write=False)
                feeds[t.name] = a
            with self._lock:
                self._zeros[key] = feeds
        return feeds

    def instruction_embedding(self, text: str) -> np.ndarray:
        """(1, L, D) hidden states of ``text`` from the bundle's text encoder(s) (SDXL: both, concatenated on the
        last axis; cached per text)."""
        emb = self._encoded.get(text)
        if emb is None:
            hidden = [self.pipe.engines[graph].infer({"input_ids": tok([text]).input_ids})["hidden"]
                      for graph, tok in self.text_graphs]
            emb = hidden[0] if len(hidden) == 1 else np.ascontiguousarray(np.concatenate(hidden, axis=-1), np.float32)
            emb.setflags(write=False)
            with self._lock:
                self._encoded[text] = emb
        return emb

    # -- hooks -------------------------------------------------------------------------------------------

    def gate_probabilities(self, ctx: GuardContext) -> np.ndarray:
        """The gate's probabilities for the prompt row: the text-stage head's output, or (SDXL) the gate graph on
        both text stages' outputs."""
        row = ctx.prompt_row
        if self.gate_graph is None:
            return np.asarray(ctx.text[self.gate_output][row], dtype=np.float64)
        t = ctx.text
        feeds = {"hidden": np.concatenate([t["hidden"][row:row + 1], t["hidden_2"][row:row + 1]], axis=-1),
                 "eos": np.concatenate([t["eos"][row:row + 1], t["eos_2"][row:row + 1]], axis=-1)}
        out = self.pipe.engines[self.gate_graph].infer({k: np.ascontiguousarray(v, np.float32) for k, v in feeds.items()})
        return np.asarray(out[self.gate_output][0], dtype=np.float64)

    def on_text(self, ctx: GuardContext) -> None:
        probs = self.gate_probabilities(ctx)
        score = float(1.0 - probs[0])
        forced_by = ctx.flagged_by if score < self.threshold else []
        active = score >= self.threshold or bool(forced_by)
        category = self.categories[int(np.argmax(probs[1:]))] if active else None
        instruction = self.instructions[category] if active else None
        state = {"active": active, "instruction_embedding": self.instruction_embedding(instruction) if active else None}
        ctx.state[self.name] = state  # per-call state (the guard object is shared between calls)
        ctx.report[self.name] = {"active": active, "category": category, "instruction": instruction,
                                 "unsafe_score": round(score, 6), "threshold": self.threshold,
                                 "gate": {c: round(float(p), 6) for c, p in zip(["none", *self.categories], probs)},
                                 "apply_uncond": self.apply_uncond, "steps_patched": 0, "steps_yielded": 0,
                                 "rows_yielded": [], "forced_by": forced_by}

    def prepare_steps(self, ctx: GuardContext, latent_shape: tuple[int, ...]) -> bool:
        if ctx.state_of(self.name)["active"]:
            return True
        # gated off: the zero residuals join the call's constant feeds, and the step hooks are not called
        b, _, h, w = latent_shape
        ctx.feeds.update(self.zero_feeds(2 * b if ctx.cfg else b, h, w))
        return False

    def step_feeds(self, ctx: GuardContext, i: int, t: np.float32, x: np.ndarray) -> dict[str, np.ndarray]:
        state = ctx.state_of(self.name)
        b, _, h, w = x.shape
        n = 2 * b if ctx.cfg else b
        if not state["active"]:  # the pipeline does not call it then (prepare_steps); the plain UNet's feeds
            return self.zero_feeds(n, h, w)
        # rows SafeRedir redirected are left to it when the bundle says so (module docstring)
        yielded = sorted(r for r in ctx.redirected if r < b) if self.yield_to_redirect else []
        if yielded:
            ctx.report[self.name]["rows_yielded"] = yielded
        if len(yielded) == b:
            ctx.report[self.name]["steps_yielded"] += 1
            return self.zero_feeds(n, h, w)
        enc = ctx.feeds["encoder_hidden_states"]
        rows = slice(0, n) if (self.apply_uncond or not ctx.cfg) else ctx.cond_rows
        sample = np.ascontiguousarray(np.concatenate([x, x]) if rows.stop - rows.start == 2 * b else x, np.float32)
        m = sample.shape[0]
        feeds = {"sample": sample, "timestep": np.array([t], dtype=np.float32),
                 "encoder_hidden_states": np.ascontiguousarray(enc[rows]),
                 "instruction": np.ascontiguousarray(np.repeat(state["instruction_embedding"], m, axis=0))}
        for name in ("text_embeds", "time_ids"):  # SDXL: the patch gets the UNet's text_time conditioning rows
            if name in ctx.feeds:
                feeds[name] = np.ascontiguousarray(ctx.feeds[name][rows])
        out = self.pipe.engines[self.graph].infer(feeds)
        feeds = {}
        for spec in self.residuals:
            r = out[spec.name]
            if m == n and not yielded:
                feeds[spec.name] = r
                continue
            full = np.zeros((n, *r.shape[1:]), np.float32)
            full[rows] = r
            for y in yielded:  # the image's conditional row, and its unconditional one when that is patched too
                full[ctx.cond_rows.start + y] = 0.0
                if m == n and ctx.cfg:
                    full[y] = 0.0
            feeds[spec.name] = full
        ctx.report[self.name]["steps_patched"] += 1
        return feeds

    def parts(self) -> set[str]:
        return {self.graph, self.gate_output, *(t.name for t in self.residuals),
                *((self.gate_graph,) if self.gate_graph else ())}

    def summary(self, report: dict) -> str:
        yielded = f", {report['steps_yielded']} left to the redirect" if report.get("steps_yielded") else ""
        if report.get("forced_by"):
            return (f"activated by {', '.join(report['forced_by'])} ({report['category']}; own gate "
                    f"{report['unsafe_score']:.2f}): patch \"{report['instruction']}\" on {report['steps_patched']} "
                    f"steps{yielded}")
        if report.get("active"):
            return (f"gate fired ({report['category']}, {report['unsafe_score']:.2f}): patch \"{report['instruction']}\" "
                    f"on {report['steps_patched']} steps{yielded}")
        return f"gate off ({report.get('unsafe_score', 0):.2f} < {report.get('threshold')}): plain UNet"


HOST = SafePatch
