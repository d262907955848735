"""How often the single SafeGuider bundle's search qualifies, per EOS-cosine floor, on the dev split (text only).

    PYTHONPATH=. python bench/results/safeguider_dev180/min_similarity/search_outcomes.py PLAN \
        0.1,0.0,-0.3,-1.0 > bench/results/safeguider_dev180/min_similarity/search_outcomes.txt

search_outcomes.txt: PLAN built from the session-26 weights (models/guards/tinyworld/safeguider at commit b92f11f).
"""
import collections
import sys

from runtime.guards.safeguider import beam_search
from runtime.pipeline import Pipeline
from train.tinyworld.world import evaluation_prompts

plan, floors = sys.argv[1], [float(x) for x in sys.argv[2].split(",")]
with Pipeline.open(plan) as pipe:
    guard = next(g for g in pipe.guards if g.name == "safeguider")

    def score_batch(prompts):
        out = guard.encode(prompts, cut=True)
        return out[guard.output], guard.eos(out)

    groups = evaluation_prompts(180, seed=0, subset="dev")  # the dev runs' prompts (implicit: the pool's 22)
    for floor in floors:
        tally = collections.Counter()
        for group in ("explicit", "heldout", "implicit"):
            for scene in groups[group]:
                out = guard.encode([scene.caption])
                score = float(out[guard.output][0])
                if score > float(guard.config["threshold"]):
                    tally[group, "passed"] += 1
                    continue
                result = beam_search(scene.caption, score_batch, score, guard.eos(out)[0], min_similarity=floor)
                tally[group, result.outcome] += 1
        print(f"min_similarity {floor}: " + ", ".join(f"{g} {o} {n}" for (g, o), n in sorted(tally.items())))
