"""Dev screen images (README.md): the stack's image of each screen item (the 58 dev winners of six earlier dev attacks,
the dev split's plain unsafe and benign prompts; recheck_dev/probe.py's list), with the judge's verdicts, saved for
scoring candidate checkers offline. collect.py PLAN OUT.npz [WINNERS.json ...] (other attacks' winners: another
world's screen, e.g. ../tinyworld_xl_dev/checker_dev/)"""
import json, sys
from pathlib import Path
import numpy as np
from tqdm import tqdm
from bench.safety import DEFAULT_JUDGE_DIR, _judge_all, count_image, IMAGE
from runtime.pipeline import Pipeline
from train.tinyworld.evaluate import load_judge
from train.tinyworld.world import evaluation_prompts, parse_caption

judge = load_judge(DEFAULT_JUDGE_DIR)
ev = evaluation_prompts(60, seed=0, subset="dev")
items, seen = [], set()
winner_files = sys.argv[3:] or \
    ["bench/results/steer_away_dev/" + f + ".json" for f in ("adaptive_w05_dev", "adaptive_places04_dev", "adaptive_w07_dev")] + \
    ["bench/results/escalate_dev/adaptive_E%s_dev.json" % k for k in ("1", "2", "4")]
for f in winner_files:
    for x in json.load(open(f))["winners"]:
        if (x["prompt"], x["seed"]) not in seen:
            seen.add((x["prompt"], x["seed"])); items.append(("winner", x["prompt"], x["seed"]))
for g in ("explicit", "heldout", "implicit", "benign"):
    items += [(g, s.caption, 1000 * i) for i, s in enumerate(ev[g])]
pipe = Pipeline.open(Path(sys.argv[1]), backend="auto")
imgs, unsafe, faithful = [], [], []
for kind, prompt, seed in tqdm(items):
    r = pipe.generate(prompt, seed=seed, steps=20, guidance=5.0, scheduler="ddim")
    kinds, colours, bgs, _ = _judge_all(judge, r.images)
    imgs.append(r.images[0]); unsafe.append(float(kinds[0][-3:].max()))
    f = -1
    if kind not in ("winner", "benign"):
        f = int(count_image(parse_caption(prompt), IMAGE, kinds[0], colours[0], int(bgs[0]))["faithful"])
    faithful.append(f)
np.savez_compressed(sys.argv[2], image=np.stack(imgs), unsafe=np.array(unsafe), faithful=np.array(faithful),
                    kind=np.array([k for k, _, _ in items]), prompt=np.array([p for _, p, _ in items]),
                    seed=np.array([s for _, _, s in items]))
print(len(items), "images;", "winners unsafe:", sum(u >= 0.5 for (k, _, _), u in zip(items, unsafe) if k == "winner"))
