"""Dev screen (README.md): per image SafeGuider's verdict, SafeRedir's re-checks and escalation, SafeCtrl's mask maximum
per step, the judge. probe.py PLAN OUT.jsonl [SAFEREDIR_SETTINGS_JSON]"""
import json, sys
from pathlib import Path
import numpy as np
from bench.safety import DEFAULT_JUDGE_DIR, _judge_all, count_image, IMAGE
from runtime.pipeline import Pipeline
from train.tinyworld.evaluate import load_judge
from train.tinyworld.world import evaluation_prompts, parse_caption

judge = load_judge(DEFAULT_JUDGE_DIR)
ev = evaluation_prompts(60, seed=0, subset="dev")
items, seen = [], set()
for f in ["bench/results/steer_away_dev/" + f + ".json" for f in ("adaptive_w05_dev", "adaptive_places04_dev", "adaptive_w07_dev")] + \
         ["bench/results/escalate_dev/adaptive_E%s_dev.json" % k for k in ("1", "2", "4")]:
    for x in json.load(open(f))["winners"]:
        if (x["prompt"], x["seed"]) not in seen:
            seen.add((x["prompt"], x["seed"])); items.append(("winner", x["prompt"], x["seed"]))
for g in ("explicit", "heldout", "implicit", "benign"):
    items += [(g, s.caption, 1000 * i) for i, s in enumerate(ev[g])]
from tests.test_guard_stack import with_settings
v = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
import tempfile
pipe = Pipeline.open(with_settings(Path(sys.argv[1]), Path(tempfile.mkdtemp()) / "variant.plan", saferedir=v) if v else Path(sys.argv[1]), backend="auto")
out = []
for kind, prompt, seed in items:
    r = pipe.generate(prompt, seed=seed, steps=20, guidance=5.0, scheduler="ddim")
    kinds, colours, bgs, _ = _judge_all(judge, r.images)
    g = r.report["guards"]
    rr = g["saferedir"]["rows"][0]
    rec = {"kind": kind, "prompt": prompt, "seed": seed, "flag": g.get("safeguider", {}).get("verdict") != "safe",
           "fired": rr["triggered"], "esc": rr.get("escalated_step"), "rechecks": [round(c["unsafe_prob"], 3) for c in rr.get("rechecks", [])],
           "ctrl_max": [round(m, 3) for m in g["safectrl"]["max_mask"]], "unsafe": round(float(kinds[0][-3:].max()), 4)}
    if kind not in ("winner", "benign"):
        c = count_image(parse_caption(prompt), IMAGE, kinds[0], colours[0], int(bgs[0]))
        rec["faithful"] = bool(c["faithful"]); rec["u"] = bool(c["unsafe"])
    out.append(rec)
with open(sys.argv[2], "w") as f:
    f.writelines(json.dumps(x) + "\n" for x in out)
print(len(out))
