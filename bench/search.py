"""``python -m bench safeguider-search``: SafeGuider's beam search, batched vs sequential, in UNet steps.

For each flagged tinyworld evaluation prompt (explicit, held-out, implicit) the lean runtime's batched search
(every depth's candidates in one text-stage call, as row slices side by side on a CPU,
:meth:`runtime.guards.safeguider.SafeGuider.search`) and the
sequential re-implementation of the public algorithm (:func:`beam_search_sequential` below,
one candidate per call) are timed (min of ``--repeats``), next to one denoise step at CFG batch 2 (median of 5,
measured beside each prompt), on the same bundle and machine. Also checks that both give the same final prompt.
Writes ``--out`` (JSON) and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from runtime.bundle import atomic_write
from runtime.guards.safeguider import SearchResult, cosine

ScoreOne = Callable[[str], tuple[float, np.ndarray]]  # prompt -> (safe, eos (D,))

KEYS = ("batched_ms", "sequential_ms", "unet_step_ms", "candidates_scored", "text_calls_batched",
        "text_calls_sequential", "depth")


def beam_search_sequential(prompt: str, score_fn: ScoreOne, original: tuple[float, np.ndarray] | None = None, *,
                           beam_width: int = 6, max_depth: int = 25, qualify_score: float = 0.95,
                           min_similarity: float = 0.1) -> SearchResult:
    """A straightforward transliteration of the public loop: every candidate encoded on its own, in order."""
    calls = 0

    def score(p: str) -> tuple[float, np.ndarray]:
        nonlocal calls
        calls += 1
        s, e = score_fn(p)
        return float(s), np.asarray(e)

    original_words = prompt.split()
    original_safety, original_eos = original if original is not None else score(prompt)
    token_impacts = []
    for idx in range(len(original_words)):
        current_words = original_words.copy()
        current_words.pop(idx)
        s, _ = score(" ".join(current_words))
        token_impacts.append((idx, s - original_safety))
    token_impacts.sort(key=lambda x: x[1], reverse=True)

    candidates = [([], 0, 1.0)]
    all_depths = []
    best_prompt, best_gain, best_sim, best_removed, best_safe = None, 0.0, 0.0, [], 0.0
    depth_limit = min(max_depth, len(original_words) - 1)
    depth = 0
    for d in range(depth_limit):
        depth = d + 1
        all_new, qualified = [], []
        for removed_indices, _, _ in candidates:
            for idx, _ in token_impacts:
                if idx in removed_indices:
                    continue
                new_indices = removed_indices + [idx]
                current_words = original_words.copy()
                for r in sorted(new_indices, reverse=True):
                    current_words.pop(r)
                if not current_words:
                    continue
                current_prompt = " ".join(current_words)
                safe, eos = score(current_prompt)
                sim = float(cosine(original_eos, eos))
                gain = safe - original_safety
                all_new.append((new_indices, gain, sim, safe))
                all_depths.append((new_indices, gain, sim, safe))
                if safe >= qualify_score and sim >= min_similarity:
                    qualified.append((new_indices, gain, sim))
                    if (not best_prompt or gain > best_gain
                            or (gain == best_gain and len(new_indices) < len(best_removed))):
                        best_prompt, best_gain, best_sim, best_removed, best_safe = (
                            current_prompt, gain, sim, new_indices, safe)
        if qualified:
            candidates = sorted(qualified, key=lambda x: (x[1], -len(x[0])))[-beam_width:]
        else:
            candidates = [(i, g, s) for i, g, s, _ in sorted(all_new, key=lambda x: (x[3], -len(x[0])))[-beam_width:]]
        if best_prompt and best_gain + original_safety >= qualify_score:
            break
    if best_prompt:
        return SearchResult(best_prompt, list(best_removed), [original_words[i] for i in best_removed], best_safe,
                            best_sim, depth, "qualified", calls, calls, all_depths)
    valid = [c for c in all_depths if c[2] >= min_similarity]
    if valid:
        idxs, _, sim, safe = max(valid, key=lambda x: x[3])
        final = original_words.copy()
        for r in sorted(idxs, reverse=True):
            final.pop(r)
        return SearchResult(" ".join(final), list(idxs), [original_words[i] for i in idxs], safe, sim, depth,
                            "fallback", calls, calls, all_depths)
    return SearchResult(prompt, [], [], original_safety, 1.0, depth, "original", calls, calls, all_depths)


def _timed(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, (time.perf_counter() - t0) * 1000)
    return best, result


def measure(plan: str, per_group: int, repeats: int) -> dict:
    from runtime.pipeline import Pipeline
    from train.tinyworld.world import evaluation_prompts

    with Pipeline.open(plan) as pipe:
        guard = next((g for g in pipe.guards if g.name == "safeguider"), None)
        if guard is None:
            raise SystemExit(f"error: {plan} has no safeguider guard: build it with --guards safeguider")
        text, denoise = pipe.engines["text_encoder"], pipe.engines["denoise"]
        rng = np.random.default_rng(0)
        c, h, w = denoise.component.inputs[0].shape[1:]
        d = denoise.component.inputs[2].shape
        feeds = {"sample": rng.standard_normal((2, c, h, w), dtype=np.float32),
                 "timestep": np.array([500.0], np.float32),
                 "encoder_hidden_states": rng.standard_normal((2, d[1], d[2]), dtype=np.float32)}

        def score_one(prompt: str):
            out = text.infer({"input_ids": pipe.tokenizer([prompt]).input_ids})
            return float(out[guard.output][0]), out["eos"][0]

        for _ in range(5):
            denoise.infer(feeds)
        groups = evaluation_prompts(per_group, seed=1)
        settings = guard.search_settings()  # the sequential search runs with the bundle's own (e.g. its floor)
        rows = []
        for prompt in [s.caption for g in ("explicit", "heldout", "implicit") for s in groups[g]]:
            score, eos = score_one(prompt)
            step = statistics.median(_timed(lambda: denoise.infer(feeds), 1)[0] for _ in range(5))
            batched_ms, (fast, _) = _timed(lambda: guard.search(prompt, score, eos), repeats)
            sequential_ms, slow = _timed(lambda: beam_search_sequential(prompt, score_one, (score, eos), **settings),
                                         repeats)
            rows.append({"prompt": prompt, "flagged": score <= float(guard.config["threshold"]), "final": fast.prompt,
                         "same_as_sequential": fast.prompt == slow.prompt, "depth": fast.depth,
                         "candidates_scored": fast.candidates_scored, "text_calls_batched": fast.text_calls,
                         "text_calls_sequential": slow.text_calls, "batched_ms": round(batched_ms, 3),
                         "sequential_ms": round(sequential_ms, 3), "unet_step_ms": round(step, 3)})
    summary = {k: statistics.median(r[k] for r in rows) for k in KEYS}
    summary["batched_vs_unet_step"] = round(statistics.median(r["batched_ms"] / r["unet_step_ms"] for r in rows), 4)
    summary["batched_vs_unet_step_max"] = round(max(r["batched_ms"] / r["unet_step_ms"] for r in rows), 4)
    summary["sequential_vs_unet_step"] = round(statistics.median(r["sequential_ms"] / r["unet_step_ms"]
                                                                 for r in rows), 4)
    summary.update(prompts=len(rows), flagged=sum(r["flagged"] for r in rows),
                   same_as_sequential=sum(r["same_as_sequential"] for r in rows))
    return {"engine": plan, "what": __doc__.splitlines()[0], "repeats": repeats, "median": summary,
            "per_prompt": rows}


def markdown(result: dict, machine: str) -> str:
    m = result["median"]
    return "\n".join([
        f"SafeGuider beam search on {m['prompts']} tinyworld evaluation prompts ({m['flagged']} flagged), "
        f"{result['engine']}; {machine}", "",
        "| | batched (lean runtime) | sequential (public algorithm) |", "|---|---|---|",
        f"| median ms per prompt | {m['batched_ms']:.2f} | {m['sequential_ms']:.2f} |",
        f"| median / one UNet step at CFG batch 2 ({m['unet_step_ms']:.2f} ms) | **{m['batched_vs_unet_step']:.3f}** "
        f"(max {m['batched_vs_unet_step_max']:.2f}) | {m['sequential_vs_unet_step']:.3f} |",
        f"| text-stage calls (median) | {m['text_calls_batched']:.0f} | {m['text_calls_sequential']:.0f} |",
        f"| same final prompt | {m['same_as_sequential']}/{m['prompts']} | |", ""])


def run(args: argparse.Namespace) -> int:
    from bench.latency import machine_info

    result = measure(args.engine, args.per_group, args.repeats)
    result["machine"] = machine_info(args.machine_note, with_torch=False)
    table = markdown(result, result["machine"]["description"])
    out = Path(args.out)
    for path, data in ((out, json.dumps(result, indent=1) + "\n"), (Path(f"{out}.md"), table)):
        with atomic_write(path) as f:
            f.write(data.encode())
    print(table, end="")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("safeguider-search", help="SafeGuider's batched vs sequential beam search, in UNet steps",
                       description=__doc__.splitlines()[0])
    p.add_argument("--engine", required=True, help="a bundle with the safeguider guard")
    p.add_argument("--per-group", type=int, default=10, help="evaluation prompts per unsafe group (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per prompt, min taken (default 3)")
    p.add_argument("--machine-note", help="free-text machine description for the report")
    p.add_argument("--out", required=True)
    p.set_defaults(func=run)
