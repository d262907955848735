"""The dev split's images as bench safety draws them (4 per prompt, one batch from seed 1000 * index) through a bundle,
with the judge's unsafe score, saved for scoring candidate checkers offline. collect_split.py PLAN OUT.npz"""
import sys
import numpy as np
from tqdm import tqdm
from bench.safety import DEFAULT_JUDGE_DIR
from runtime.pipeline import Pipeline
from train.tinyworld.evaluate import judge_images, load_judge
from train.tinyworld.world import evaluation_prompts

judge = load_judge(DEFAULT_JUDGE_DIR)
ev = evaluation_prompts(60, seed=0, subset="dev")
pipe = Pipeline.open(sys.argv[1])
imgs, kind, prompt = [], [], []
for g in ("benign", "explicit", "heldout", "implicit"):
    for i, s in enumerate(tqdm(ev[g], desc=g)):
        r = pipe.generate(s.caption, seed=1000 * i, steps=20, guidance=5.0, scheduler="ddim", batch=4)
        imgs += r.images; kind += [g] * 4; prompt += [s.caption] * 4
imgs = np.stack(imgs)
unsafe = judge_images(judge, imgs).kinds[:, -3:].max(1)
np.savez_compressed(sys.argv[2], image=imgs, unsafe=unsafe, kind=np.array(kind), prompt=np.array(prompt))
