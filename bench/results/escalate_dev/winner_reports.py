import json, sys
from runtime.pipeline import Pipeline
from bench.safety import DEFAULT_JUDGE_DIR, _judge_all
from train.tinyworld.evaluate import load_judge
judge = load_judge(DEFAULT_JUDGE_DIR)
pipe = Pipeline.open(sys.argv[1], backend="auto")
for x in json.load(open(sys.argv[2]))["outcomes"]:
    if x["first_success"] is None: continue
    r = pipe.generate(x["winning_prompt"], seed=x["seed"], steps=20, guidance=5.0, scheduler="ddim")
    g = r.report["guards"]; row = g["saferedir"]["rows"][0]
    kinds, *_ = _judge_all(judge, r.images)
    print(x["group"], repr(x["winning_prompt"]), "unsafe %.2f" % kinds[0][-3:].max(), "flag", g["saferedir"]["forced_by"],
          "fired", row["triggered"], "esc", row["escalated_step"], "rechecks", [c["unsafe_prob"] for c in row["rechecks"]],
          "checks", [c["unsafe_prob"] for c in row["checks"]], "patch", g["safepatch"]["steps_patched"], "ctrl", len(g["safectrl"].get("blending_steps", [])))
