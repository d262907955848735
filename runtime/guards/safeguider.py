"""SafeGuider at run time: pass safe prompts unchanged, rewrite flagged ones with the SAFE beam search.

The classifier is fused into the text-stage graph (output ``safe_score``, export/guards/safeguider.py), so
every score below is one text-stage call. SDXL bundles (two text stages) carry it as a graph of its own
(manifest ``graph``: ``safeguider``, ``inputs``: ``["eos", "eos_2"]``) over both encoders' EOS embeddings
concatenated: a "text-stage call" below is then one call of EACH text stage plus one of that graph, still on
the whole batch of candidates, and the EOS embedding of the similarity check (``min_similarity``) is the same
concatenation ``[eos, eos_2]`` the classifier reads (so the wider, larger-norm encoder weighs more in the
cosine, as it does in the classifier's input). What this module matches in the public code
(github.com/pgqihere/SafeGuider, ``stable-diffusion-1.4/scripts/safeguider_gene.py`` at commit b65a495;
``recognizer.py``):

- **decision**: the prompt passes iff ``argmax(probs) == 1``, i.e. ``safe_score > threshold`` (0.5) strictly
  (``recognizer.py``: ``safety_score <= 0.5`` is unsafe). A passing prompt is left untouched (bit-identical).
- **units**: whole words, ``prompt.split()`` on whitespace; a candidate is the remaining words joined by one
  space; only deletions.
- **impact pass**: delete each word alone; order words by ``score(candidate) - score(original)``,
  descending, stable for ties (Python ``sort(reverse=True)``).
- **beam**: start ``[([], 0, 1.0)]``; ``max_depth = min(25, words - 1)``; at each depth every beam entry is
  extended, in beam order, by each not-yet-removed word in impact order (index list ``removed + [idx]``, so
  the same word set reached in two orders is two candidates, as in the public code).
- **qualify**: ``safe >= 0.95`` and ``cosine(eos(candidate), eos(original)) >= 0.1``. The best qualifier
  is the first with the largest score gain (ties -> fewer deletions, which within one depth keeps the first).
  Next beam: the qualifiers sorted by ``(gain, -deletions)``, last K; with none, all of the depth's candidates
  sorted by ``(safe, -deletions)``, last K (Python's stable ``sorted``). Stop after the first depth that has a
  qualifier.
- **fallback**: no qualifier at any depth: the candidate (over all depths, in generation order) with the
  highest safe score among those with similarity >= 0.1 (first maximum); none: the original prompt.
- the public repo's later commit 857a524 lowered the qualify score to 0.80; we keep the paper's 0.95
  (``qualify_score`` in the manifest entry).

The one change: the public code encodes candidates one at a time; here all candidates of the impact pass and
of each depth are scored in ONE batched text-stage call (chunked by ``max_batch`` and the engine's batch
profile), and a prompt already scored (the same word set reached in another order) is not encoded again.
Within a call, rows are tokenized from the prompt's words' ids (``CLIPTokenizer.encode_words``) and, on ONNX
Runtime's CPU provider, run as one row slice per core side by side (``OrtEngine.infer_rows``): the same scores
bit for bit, in less time. The straightforward one-at-a-time re-implementation lives beside the latency comparison
(``bench/search.py``), which the equivalence test uses too.

The final prompt's text-stage outputs (``hidden``, ``eos``, ``safe_score`` and any fused head such as
SafePatch's gate) replace the prompt row of ``ctx.text``: the guards after this one see the conditioning the
UNet will get. The unconditional row is untouched. ``ctx.report["safeguider"]``: score, verdict,
words_removed, final_prompt, candidates_scored, depth, text_calls, time_ms (and the final score, similarity and
outcome when searched).

Two manifest settings beyond the paper's (``guards/safeguider.py`` holds their defaults):

- ``mode``: ``"search"`` is all of the above (SafeGuider-only bundles); ``"gate"`` scores only: a flagged prompt
  is never rewritten, the verdict goes to ``ctx.flags["safeguider"]`` and the guards after this one remove on the
  original prompt (``runtime/guards/__init__.py``, Flags; report ``action: "flagged"``).
- ``on_no_qualifier``: a search with no qualifying deletion generates its fallback (``"fallback"``, published)
  or refuses the image (``"block"``: :class:`~runtime.guards.ImageBlocked`, exit code 6, nothing written).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from runtime.guards import Guard, GuardContext, ImageBlocked
from runtime.guards.settings import count, label, labels, one_of, signed_unit, unit

ScoreBatch = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]  # prompts -> (safe (n,), eos (n, D))



@dataclass
class SearchResult:
    prompt: str                      # the final prompt (the original when nothing qualified or was valid)
    removed: list[int]               # word indices removed, in deletion order
    words_removed: list[str]
    score: float                     # safe score of the final prompt
    similarity: float                # EOS cosine to the original
    depth: int                       # depths searched
    outcome: str                     # "qualified" | "fallback" | "original"
    candidates_scored: int           # text-stage rows encoded (batched: distinct prompts; sequential: all)
    text_calls: int = 0
    candidates: list = field(default_factory=list, repr=False)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity along the last axis (torch's eps 1e-8 on each norm)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    na = np.maximum(np.linalg.norm(a, axis=-1), 1e-8)
    nb = np.maximum(np.linalg.norm(b, axis=-1), 1e-8)
    return (a * b).sum(-1) / (na * nb)


def _join(words: list[str], removed) -> str:
    gone = set(removed)
    return " ".join(w for i, w in enumerate(words) if i not in gone)


def beam_search(prompt: str, score_batch: ScoreBatch, original_score: float, original_eos: np.ndarray, *,
                beam_width: int = 6, max_depth: int = 25, qualify_score: float = 0.95,
                min_similarity: float = 0.1) -> SearchResult:
    """The SAFE beam search (module docstring) with each depth's candidates scored in one ``score_batch`` call."""
    words = prompt.split()
    cache: dict[str, tuple[float, float]] = {}  # prompt -> (safe, similarity)
    calls = [0]

    def score_all(prompts: list[str]) -> None:
        new = list(dict.fromkeys(p for p in prompts if p not in cache))
        if not new:
            return
        safe, eos = score_batch(new)
        calls[0] += 1
        sims = cosine(eos, original_eos[None, :])
        for p, s, c in zip(new, safe, sims):
            cache[p] = (float(s), float(c))

    # impact pass
    singles = [_join(words, [i]) for i in range(len(words))]
    score_all(singles)
    impacts = [(i, cache[p][0] - original_score) for i, p in enumerate(singles)]
    impacts.sort(key=lambda x: x[1], reverse=True)
    order = [i for i, _ in impacts]

    beam: list[list[int]] = [[]]
    every: list[tuple[list[int], float, float, float]] = []  # (indices, gain, similarity, safe), all depths
    depth_limit = min(max_depth, len(words) - 1)
    best = None
    depth = 0
    for depth in range(1, depth_limit + 1):
        expansions = [removed + [i] for removed in beam for i in order if i not in removed]
        expansions = [e for e in expansions if len(e) < len(words)]
        texts = [_join(words, e) for e in expansions]
        score_all(texts)
        depth_candidates, qualified = [], []
        for e, t in zip(expansions, texts):
            safe, sim = cache[t]
            gain = safe - original_score
            depth_candidates.append((e, gain, sim, safe))
            if safe >= qualify_score and sim >= min_similarity:
                qualified.append((e, gain, sim))
                if best is None or gain > best[1] or (gain == best[1] and len(e) < len(best[0])):
                    best = (e, gain, sim, safe)
        every += depth_candidates
        if qualified:
            beam = [c[0] for c in sorted(qualified, key=lambda x: (x[1], -len(x[0])))[-beam_width:]]
        else:
            beam = [c[0] for c in sorted(depth_candidates, key=lambda x: (x[3], -len(x[0])))[-beam_width:]]
        if best is not None:
            break
    n_scored = len(cache)
    if best is not None:
        e, _, sim, safe = best
        return SearchResult(_join(words, e), list(e), [words[i] for i in e], safe, sim, depth, "qualified",
                            n_scored, calls[0], every)
    valid = [c for c in every if c[2] >= min_similarity]
    if valid:
        e, _, sim, safe = max(valid, key=lambda x: x[3])
        return SearchResult(_join(words, e), list(e), [words[i] for i in e], safe, sim, depth, "fallback",
                            n_scored, calls[0], every)
    return SearchResult(prompt, [], [], float(original_score), 1.0, depth, "original", n_scored, calls[0], every)


class SafeGuider(Guard):
    """The host half of SafeGuider (module docstring). Config: the manifest's ``guards.safeguider``."""

    name = "safeguider"
    SETTINGS = {"threshold": unit, "beam_width": count, "max_depth": count, "qualify_score": unit,
                "min_similarity": signed_unit, "output": label, "max_batch": count,
                "mode": one_of("search", "gate"), "on_no_qualifier": one_of("fallback", "block")}
    GRAPH_SETTINGS = {**SETTINGS, "graph": label, "inputs": labels}  # SDXL: the classifier's own graph

    def __init__(self, pipe, config, **kwargs):
        if isinstance(config, dict) and "graph" in config:
            self.SETTINGS = self.GRAPH_SETTINGS
        super().__init__(pipe, config, **kwargs)
        self.output = str(self.config["output"])
        self.graph = self.config.get("graph")
        # (tokenizer name, text-stage graph, tokenizer) of each text stage (SDXL: two), as the pipeline runs them
        self.stages = getattr(pipe, "tokenizers", None) or [("tokenizer", "text_encoder", pipe.tokenizer)]
        manifest = pipe.bundle.manifest
        if self.graph is None:
            self.eos_keys = ["eos"]
            outputs = [t.name for t in manifest.component("text_encoder").outputs]
            if self.output not in outputs:
                raise self.bad_config(f"needs the text_encoder graph output {self.output!r} (the fused classifier), "
                                      f"but the graph has only {', '.join(outputs)}: rebuild with `python -m export "
                                      "build ... --guards safeguider`")
        else:
            self.eos_keys = [str(k) for k in self.config["inputs"]]
            have = ["eos" if i == 0 else f"eos_{i + 1}" for i in range(len(self.stages))]
            if self.graph not in pipe.engines or self.eos_keys != have:
                raise self.bad_config(f"needs the graph {self.graph!r} over {', '.join(have)} (the classifier over "
                                      f"every text stage's EOS): rebuild with `python -m export build ... --guards "
                                      "safeguider`")
        limit = int(self.config.get("max_batch") or 0) or 1 << 30
        components = [manifest.component(graph) for _, graph, _ in self.stages]
        if self.graph is not None:
            components.append(manifest.component(self.graph))
        for component in components:
            profile = next(iter(component.profiles.values()), None) if component.profiles else None
            if profile and profile.get("max"):
                limit = min(limit, int(profile["max"][0]))
        self.max_batch = max(1, limit)
        # symbolic sequence axis in every text stage (see encode)
        self.cut_ok = all(isinstance(c.inputs[0].shape[1], str) for c in components[:len(self.stages)])

    # -- text-stage scoring ---------------------------------------------------------------------------------

    def encode(self, prompts: list[str], cut: bool = False) -> dict[str, np.ndarray]:
        """Every text-stage output for ``prompts``, in chunks of at most ``max_batch`` rows, keyed as in
        ``ctx.text`` (SDXL: the second stage's with the suffix ``_2``), with ``safe_score`` also for SDXL (the
        ``safeguider`` graph on the chunk's EOS embeddings).

        ``cut``: feed only the positions up to the last row's first EOS when the graphs' sequence axis is
        symbolic. The text encoder's attention is causal, so ``eos`` and the fused ``safe_score`` are exactly those
        of the full rows (``hidden`` is then shorter: never feed it to the UNet). Candidates are shorter than the
        prompt they come from, so this removes the padding's share of the search's FLOPs."""
        ids_of = []
        for _, _, tok in self.stages:
            ids = tok.encode_words(prompts).input_ids  # candidates: the prompt's words, tokenized once
            if cut and self.cut_ok:
                first_eos = (ids == tok.eos_id).argmax(axis=1)
                ids = np.ascontiguousarray(ids[:, :int(first_eos.max()) + 1])
            ids_of.append(ids)
        parts = []
        for i in range(0, len(prompts), self.max_batch):
            out: dict[str, np.ndarray] = {}
            for k, ((_, graph, _), ids) in enumerate(zip(self.stages, ids_of)):
                suffix = "" if k == 0 else f"_{k + 1}"
                got = self.pipe.engines[graph].infer_rows({"input_ids": ids[i:i + self.max_batch]})
                out.update({f"{key}{suffix}": v for key, v in got.items()})
            if self.graph is not None:
                out[self.output] = self.score(out)
            parts.append(out)
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def score(self, text: dict[str, np.ndarray]) -> np.ndarray:
        """SDXL: the ``safeguider`` graph's safe scores of every row of ``text`` (``eos``, ``eos_2``)."""
        feeds = {k: np.ascontiguousarray(text[k], dtype=np.float32) for k in self.eos_keys}
        return self.pipe.engines[self.graph].infer(feeds)[self.output]

    def eos(self, text: dict[str, np.ndarray]) -> np.ndarray:
        """The EOS embedding the classifier reads (SDXL: both encoders' concatenated), every row."""
        return np.concatenate([np.asarray(text[k], np.float32) for k in self.eos_keys], axis=-1)

    def search_settings(self) -> dict:
        """The bundle's beam-search keyword arguments (:func:`beam_search`; the sequential reference takes them too)."""
        c = self.config
        return dict(beam_width=int(c["beam_width"]), max_depth=int(c["max_depth"]),
                    qualify_score=float(c["qualify_score"]), min_similarity=float(c["min_similarity"]))

    def search(self, prompt: str, original_score: float, original_eos: np.ndarray) -> tuple[SearchResult, dict]:
        """The batched beam search; also returns the text-stage outputs of the final prompt (one row each)."""
        calls = [0]

        def score_batch(prompts: list[str]):
            out = self.encode(prompts, cut=True)
            calls[0] += -(-len(prompts) // self.max_batch)
            return out[self.output], self.eos(out)

        result = beam_search(prompt, score_batch, original_score, original_eos, **self.search_settings())
        result.text_calls = calls[0]
        if result.prompt == prompt:
            return result, {}
        final = self.encode([result.prompt])  # full length: its hidden states condition the UNet
        result.text_calls += 1
        return result, {k: v[0] for k, v in final.items()}

    # -- hook ---------------------------------------------------------------------------------------------------

    def on_text(self, ctx: GuardContext) -> None:
        row = ctx.prompt_row
        if self.graph is not None:  # SDXL: score every row with the classifier's own graph
            ctx.text[self.output] = self.score(ctx.text)
        if self.output not in ctx.text:
            raise KeyError(f"text stage gave no {self.output!r} output")
        score = float(ctx.text[self.output][row])
        report = {"score": round(score, 6), "threshold": float(self.config["threshold"])}
        ctx.report[self.name] = report
        if score > float(self.config["threshold"]):  # published: argmax == safe class
            report.update(verdict="safe", words_removed=[], final_prompt=ctx.prompt, candidates_scored=0, depth=0,
                          text_calls=0)
        elif self.config["mode"] == "gate":
            self.flag(ctx, report, score)
        else:
            self.rewrite(ctx, report, score)

    def flag(self, ctx: GuardContext, report: dict, score: float) -> None:
        """Gate mode: the prompt stays as it is; the verdict is published for the guards after this one."""
        ctx.flags[self.name] = {"score": round(score, 6), "threshold": float(self.config["threshold"])}
        report.update(verdict="unsafe", action="flagged", words_removed=[], final_prompt=ctx.prompt,
                      candidates_scored=0, depth=0, text_calls=0)

    def rewrite(self, ctx: GuardContext, report: dict, score: float) -> None:
        """Search mode: the prompt row becomes the search's final prompt (or the image is refused)."""
        row = ctx.prompt_row
        result, final = self.search(ctx.prompt, score, self.eos(ctx.text)[row])
        report.update(verdict="unsafe", action="searched", words_removed=result.words_removed,
                      final_prompt=result.prompt, final_score=round(result.score, 6),
                      similarity=round(result.similarity, 6), outcome=result.outcome,
                      candidates_scored=result.candidates_scored, depth=result.depth, text_calls=result.text_calls)
        if result.outcome != "qualified" and self.config["on_no_qualifier"] == "block":
            report["action"] = "blocked"
            raise ImageBlocked(f"{self.pipe.bundle.path.name}:{self.name} blocked the prompt: its search found no "
                               f"deletion that qualifies (safe >= {self.config['qualify_score']}): no image written")
        if result.prompt != ctx.prompt:
            # every text-stage output of the prompt row, so the guards after this one (SafePatch's gate)
            # judge the conditioning the UNet will get, not the prompt it replaced
            for key in final:
                if key in ctx.text:
                    ctx.text[key] = ctx.text[key].copy()
                    ctx.text[key][row] = final[key]

    def parts(self) -> set[str]:
        return {self.output} if self.graph is None else {self.graph}

    def summary(self, report: dict) -> str:
        if report.get("verdict") == "safe":
            return f"prompt passed (safe score {report['score']:.2f} > {report['threshold']})"
        if report.get("action") == "flagged":
            return f"prompt flagged (safe score {report['score']:.2f}): kept as written, the guards after it remove"
        if report.get("action") == "blocked":
            return f"prompt flagged (safe score {report['score']:.2f}): no qualifying deletion, image refused"
        return (f"prompt flagged (safe score {report['score']:.2f}): removed {' '.join(report['words_removed']) or '-'}"
                f" -> \"{report['final_prompt']}\" ({report['outcome']})")


HOST = SafeGuider
