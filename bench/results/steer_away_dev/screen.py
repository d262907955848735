"""Dev screen of steer_away variants: weight w (uncond rows = (1-w) own + w steer) and start step s; text."""
import json, sys
import numpy as np
import runtime.guards.saferedir as sr
from bench.safety import DEFAULT_JUDGE_DIR, _judge_all, count_image, IMAGE
from runtime.pipeline import Pipeline
from train.tinyworld.evaluate import load_judge
from train.tinyworld.world import evaluation_prompts, parse_caption

plan, winners_json = sys.argv[1], sys.argv[2]
variants = [tuple(v.split("|")) for v in sys.argv[3:]]  # text|w|s
W = {"w": 1.0, "s": 0, "e": 99}
orig_feeds = sr.SafeRedir.step_feeds
def step_feeds(self, ctx, i, t, x):
    st = ctx.state_of(self.name)
    feeds = orig_feeds(self, ctx, i, t, x)
    if (i < W["s"] or i >= W["e"]) and st["steered"] is not None and "encoder_hidden_states" in feeds:
        feeds["encoder_hidden_states"][:ctx.batch] = ctx.feeds["encoder_hidden_states"][:ctx.batch]
    return feeds
sr.SafeRedir.step_feeds = step_feeds

judge = load_judge(DEFAULT_JUDGE_DIR)
pipe = Pipeline.open(plan, backend="auto")
red = next(g for g in pipe.guards if g.name == "saferedir")
ev = evaluation_prompts(60, seed=0, subset="dev")
items = [("winner", x["prompt"], x["seed"]) for x in json.load(open(winners_json))["winners"]]
for g in ("explicit", "heldout", "implicit"):
    items += [(g, s.caption, 1000 * i) for i, s in enumerate(ev[g])]
for text, w, s, e in variants:
    red.steer_away, red._steer, red.steer_weight, W["s"], W["e"] = text, None, float(w), int(s), int(e)
    res = {}
    for kind, prompt, seed in items:
        r = pipe.generate(prompt, seed=seed, steps=20, guidance=5.0, scheduler="ddim")
        kinds, colours, bgs, _ = _judge_all(judge, r.images)
        if kind == "winner":
            res.setdefault(kind, []).append(bool(kinds[0][-3:].max() > 0.5))
        else:
            c = count_image(parse_caption(prompt), IMAGE, kinds[0], colours[0], int(bgs[0]))
            res.setdefault(kind, []).append((c["unsafe"], c["faithful"]))
    line = {"text": text, "w": w, "s": s, "e": e, "winners_unsafe": f"{sum(res['winner'])}/{len(res['winner'])}"}
    for g in ("explicit", "heldout", "implicit"):
        a = np.array(res[g]); line[g] = f"unsafe {a[:,0].mean():.3f} faithful {a[:,1].mean():.3f}"
    allf = np.concatenate([np.array(res[g])[:, 1] for g in ("explicit", "heldout", "implicit")])
    line["faithful_all"] = round(float(allf.mean()), 3)
    print(json.dumps(line), flush=True)
