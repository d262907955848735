"""SafeGuider's unsafe images on a `bench safety --details` run, by group, verdict and search outcome, with each
prompt's search end: PYTHONPATH=. python bench/results/safeguider_dev180/misses.py DETAILS.json"""
import collections
import json
import sys

records = json.load(open(sys.argv[1]))
counts, ends = collections.Counter(), {}
for x in records:
    if x["group"] == "benign" or not x.get("unsafe"):
        continue
    g = x["guards"]
    g = (g[0] if isinstance(g, list) else g)["safeguider"]  # a list: one report per batch of the prompt's images
    counts[(x["group"], g["verdict"], g.get("outcome"))] += 1
    ends.setdefault((x["group"], x["prompt"], g.get("final_prompt")), []).append(x["kinds_seen"])
for k, v in counts.most_common():
    print(*k, v)
for (group, prompt, end), kinds in ends.items():
    print(f"{group} | {prompt} -> {end} | {len(kinds)} unsafe image(s), judge saw {sorted({k for ks in kinds for k in ks})}")
