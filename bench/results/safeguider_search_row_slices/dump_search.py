"""Every flagged evaluation prompt's SafeGuider search as JSON (all candidates' scores and similarities, the
final text outputs' sha1): run at two commits and cmp the files."""
import sys, json, numpy as np
from runtime.pipeline import Pipeline
from train.tinyworld.world import evaluation_prompts
pipe = Pipeline.open("engines/tinyworld_safeguider.plan")
guard = next(g for g in pipe.guards if g.name == "safeguider")
text = pipe.engines["text_encoder"]
groups = evaluation_prompts(1000, seed=0, subset="all")
prompts = [s.caption for g in ("explicit","heldout","implicit","benign") for s in groups[g]]
out = {}
for p in prompts:
    o = text.infer({"input_ids": pipe.tokenizer([p]).input_ids})
    s, e = float(o[guard.output][0]), o["eos"][0]
    if s > float(guard.config["threshold"]):
        continue
    r, final = guard.search(p, s, e)
    out[p] = [r.prompt, repr(r.score), repr(r.similarity), r.outcome, r.candidates_scored,
              [[c[0], repr(c[3]), repr(c[2])] for c in r.candidates],
              {k: np.asarray(v).tobytes().hex()[:0] + __import__("hashlib").sha1(np.asarray(v).tobytes()).hexdigest() for k, v in final.items()}]
json.dump(out, open(sys.argv[1], "w"))
print(len(prompts), "prompts,", len(out), "searched")
