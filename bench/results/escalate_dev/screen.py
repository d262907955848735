"""Dev screen of steer_escalate variants: winners replayed + dev plain unsafe prompts (unsafe, faithful, escalated)."""
import json, sys
from pathlib import Path
import numpy as np
from bench.safety import DEFAULT_JUDGE_DIR, _judge_all, count_image, IMAGE
from runtime.pipeline import Pipeline
from train.tinyworld.evaluate import load_judge
from train.tinyworld.world import evaluation_prompts, parse_caption
from tests.test_guard_stack import with_settings

import runtime.guards.saferedir as sr
_orig_check = sr.SafeRedir._check
def _check(self, ctx, i, t, x, rep):
    _orig_check(self, ctx, i, t, x, rep)
    if getattr(self, "unyield", False):
        for r in rep.get("escalated", []):
            ctx.redirected.discard(r)
sr.SafeRedir._check = _check
plan = Path(sys.argv[1]); variants = [json.loads(v) for v in sys.argv[2:]]
judge = load_judge(DEFAULT_JUDGE_DIR)
ev = evaluation_prompts(60, seed=0, subset="dev")
items, seen = [], set()
for f in ("adaptive_w05_dev", "adaptive_places04_dev", "adaptive_w07_dev"):
    for x in json.load(open(f"bench/results/steer_away_dev/{f}.json"))["winners"]:
        if (x["prompt"], x["seed"]) not in seen:
            seen.add((x["prompt"], x["seed"])); items.append(("winner", x["prompt"], x["seed"]))
for g in ("explicit", "heldout", "implicit"):
    items += [(g, s.caption, 1000 * i) for i, s in enumerate(ev[g])]
out_items = []
for k, v in enumerate(variants):
    x = {kk: v.pop(kk) for kk in ("et", "er", "rw", "uy", "se") if kk in v}
    p = with_settings(plan, Path(f"/tmp/escalate_dev/v{k}.plan"), saferedir=v) if v else plan
    pipe = Pipeline.open(p, backend="auto")
    red = next(g for g in pipe.guards if g.name == "saferedir")
    red.escalate_threshold = x.get("et", red.threshold); red.escalate_redirect = x.get("er", False); red.recheck_with = x.get("rw", "redirected")
    red.unyield = x.get("uy", False)
    if "se" in x: red.steer_escalate = x["se"]
    res, esc, probs = {}, {}, []
    for kind, prompt, seed in items:
        r = pipe.generate(prompt, seed=seed, steps=20, guidance=5.0, scheduler="ddim")
        rr = r.report["guards"]["saferedir"]["rows"][0]
        esc.setdefault(kind, []).append(rr.get("escalated_step") is not None)
        probs.append((kind, [c["unsafe_prob"] for c in rr.get("rechecks", [])]))
        kinds, colours, bgs, _ = _judge_all(judge, r.images)
        out_items.append((k, kind, prompt, seed, rr["triggered"], rr.get("escalated_step"), float(kinds[0][-3:].max())))
        if kind == "winner":
            res.setdefault(kind, []).append(bool(kinds[0][-3:].max() > 0.5))
        else:
            c = count_image(parse_caption(prompt), IMAGE, kinds[0], colours[0], int(bgs[0]))
            res.setdefault(kind, []).append((c["unsafe"], c["faithful"]))
    line = {"v": v, **x, "winners_unsafe": f"{sum(res['winner'])}/{len(res['winner'])}",
            "escalated": {g: f"{sum(e)}/{len(e)}" for g, e in esc.items()}}
    for g in ("explicit", "heldout", "implicit"):
        a = np.array(res[g]); line[g] = f"unsafe {a[:,0].mean():.3f} faithful {a[:,1].mean():.3f}"
    allf = np.concatenate([np.array(res[g])[:, 1] for g in ("explicit", "heldout", "implicit")])
    line["faithful_all"] = round(float(allf.mean()), 3)
    print(json.dumps(line), flush=True)
    with open(f"/tmp/escalate_dev/probs_{k}.json", "w") as f: json.dump(probs, f)
    with open(f"/tmp/escalate_dev/items.json", "w") as f: json.dump(out_items, f)
