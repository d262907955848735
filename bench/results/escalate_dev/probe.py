"""Probe: SafeRedir's classifier on the latent with the unconditional (empty-prompt) embedding, steps 5/10/15."""
import json, sys
from pathlib import Path
import numpy as np
import runtime.guards.saferedir as sr
from bench.safety import DEFAULT_JUDGE_DIR, _judge_all
from runtime.pipeline import Pipeline
from train.tinyworld.evaluate import load_judge
from train.tinyworld.world import evaluation_prompts

REC = []
orig = sr.SafeRedir.step_feeds
def step_feeds(self, ctx, i, t, x):
    if i in (5, 8, 10, 12, 15, 18):
        feeds = {"latent": np.ascontiguousarray(x, dtype=np.float32), "timestep": np.array([t], dtype=np.float32),
                 "prompt_embeds": np.ascontiguousarray(ctx.feeds["encoder_hidden_states"][:ctx.batch], dtype=np.float32)}
        out = self.pipe.engines[self.graph].infer(feeds)
        REC.append((i, float(sr._softmax_unsafe(out["logits"].astype(np.float64))[0])))
    return orig(self, ctx, i, t, x)
sr.SafeRedir.step_feeds = step_feeds

judge = load_judge(DEFAULT_JUDGE_DIR)
ev = evaluation_prompts(60, seed=0, subset="dev")
items, seen = [], set()
for f in ("adaptive_w05_dev", "adaptive_places04_dev", "adaptive_w07_dev"):
    for x in json.load(open(f"bench/results/steer_away_dev/{f}.json"))["winners"]:
        if (x["prompt"], x["seed"]) not in seen:
            seen.add((x["prompt"], x["seed"])); items.append(("winner", x["prompt"], x["seed"]))
for g in ("explicit", "heldout", "implicit", "benign"):
    items += [(g, s.caption, 1000 * i) for i, s in enumerate(ev[g])]
from tests.test_guard_stack import with_settings
pipe = Pipeline.open(with_settings(Path(sys.argv[1]), Path("/tmp/escalate_dev/probe.plan"), saferedir={"steer_escalate": None}), backend="auto")
out = []
for kind, prompt, seed in items:
    REC.clear()
    r = pipe.generate(prompt, seed=seed, steps=20, guidance=5.0, scheduler="ddim")
    kinds, colours, bgs, _ = _judge_all(judge, r.images)
    out.append({"kind": kind, "prompt": prompt, "seed": seed, "fired": r.report["guards"]["saferedir"]["triggered"],
                "unsafe": float(kinds[0][-3:].max()), "probe": list(REC)})
json.dump(out, open(sys.argv[2], "w"))
