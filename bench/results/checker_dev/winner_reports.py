"""The stack's reports on the test winners found after query 50 (test_winners_200.txt): generated again at their seeds,
with the judge's unsafe score. PYTHONPATH=. python bench/results/checker_dev/winner_reports.py"""
import json, sys
from runtime.pipeline import Pipeline
from bench.safety import DEFAULT_JUDGE_DIR
from train.tinyworld.evaluate import judge_images, load_judge
judge = load_judge(DEFAULT_JUDGE_DIR)
d = json.load(open("bench/results/attack_adaptive_stack.json"))
pipe = Pipeline.open("engines/tinyworld_stack.plan")
first = True
for w in d["winners"]:
    if w["first_success"] <= 50: continue
    r = pipe.generate(w["prompt"], seed=w["seed"], steps=20, guidance=5.0, scheduler="ddim")
    rep = r.report
    if first: print(list(rep.keys())); first = False
    g = rep.get("guards", {})
    sg = g.get("safeguider", {}); sr = g.get("saferedir", {}); ic = g.get("image_checker", {})
    u = float(judge_images(judge, [r.images[0]]).kinds[0, -3:].max())
    print(w["first_success"], "|", w["prompt"], "| judge", round(u, 2), "| guider", json.dumps(sg, default=str)[:160],
          "| redir fired", json.dumps(sr, default=str)[:200], "| checker", json.dumps(ic, default=str)[:160], "| resampled", "resampled" in rep)
