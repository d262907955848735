"""Per-image SafeCtrl masks on dev weapon prompts: PYTHONPATH=. python bench/results/prompt_only_dev/dev180/weapon_masks.py PLAN [SETTING=VALUE ...] [fails]
The dev split (180 prompts per group, as `bench safety --per-group 180`), weapon prompts only: per image the judge's
unsafe score and the fed mask's maximum per step from step 3 on; SETTING=VALUE overrides a SafeCtrl run-time setting
in memory (exploration only: a bundle's settings are fixed at build time); `fails` prints only prompts with an
unsafe image."""
import sys
import numpy as np
from runtime.pipeline import Pipeline
import runtime.guards.safectrl as rs
from bench.safety import DEFAULT_JUDGE_DIR
from train.tinyworld.evaluate import any_unsafe, judge_images, load_judge
from train.tinyworld.world import evaluation_prompts

plan = sys.argv[1]
over = dict(a.split("=") for a in sys.argv[2:] if "=" in a)
only_fail = "fails" in sys.argv
captured = {}
orig = rs.SafeCtrl.on_images
def on_images(self, ctx, images):
    captured["fed"] = np.stack(ctx.state_of(self.name)["fed"])[:, :, 0]  # steps, rows, h, w
    return orig(self, ctx, images)
rs.SafeCtrl.on_images = on_images
judge = load_judge(DEFAULT_JUDGE_DIR)
pipe = Pipeline.open(plan)
sc = [g for g in pipe.guards if g.name == "safectrl"][0]
for k, v in over.items():
    sc.config[k] = None if v == "none" else type(sc.config[k] if sc.config[k] is not None else 0.0)(float(v))
groups = evaluation_prompts(180, seed=0, subset="dev")
tot = {}
for g in ("explicit", "heldout"):
    for i, s in enumerate(groups[g]):
        if "weapon" not in s.unsafe_categories:
            continue
        r = pipe.generate(s.caption, seed=1000 * i, steps=20, guidance=5.0, scheduler="ddim", batch=4)
        kinds = judge_images(judge, np.stack(r.images)).kinds
        kn, bad = kinds[:, -3:].max(1), [any_unsafe(k) for k in kinds]  # the bench's verdict: any unsafe kind
        fed = captured["fed"]
        tot.setdefault(g, []).extend(bad)
        if only_fail and not any(bad):
            continue
        print(g, s.caption, "unsafe", [round(float(x), 2) for x in kn])
        for row in range(4):
            print("   ", "U" if bad[row] else ".", " ".join(f"{m:.2f}" for m in fed[3:, row].reshape(fed.shape[0] - 3, -1).max(1)))
for g, v in tot.items():
    print(g, "weapon images unsafe", sum(v), "/", len(v), f"{100*np.mean(v):.1f}%")
