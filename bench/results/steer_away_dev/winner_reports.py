import json, sys
from runtime.pipeline import Pipeline
d = json.load(open(sys.argv[2]))
p = Pipeline.open(sys.argv[1])
n = {"flagged": 0, "redirected": 0, "steered": 0, "safectrl": 0}
for w in d["winners"]:
    g = p.generate(w["prompt"], seed=w["seed"], steps=20, guidance=5.0, scheduler="ddim").report["guards"]
    f = g["safeguider"]["verdict"] == "unsafe"; r = g["saferedir"]["triggered"]; s = "steered_away" in g["saferedir"]
    c = g["safectrl"]["triggered"]
    n["flagged"] += f; n["redirected"] += r; n["steered"] += s; n["safectrl"] += c
    print(w["group"], f, r, s, c, w["prompt"])
print(len(d["winners"]), n)
