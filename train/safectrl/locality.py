"""Where SafeCtrl's edits land: pixel change of the guarded vs the unguarded image (same prompt, seed and
settings, both through the lean runtime), inside vs outside the unsafe region on unsafe evaluation prompts.

The region is SafeCtrl's own final smoothed mask (conditional row, latent 16x16 upsampled x4 to the image),
thresholded at the guard's ``mask_threshold``: the generated image's true unsafe mask is unknown (only renders
have exact masks), and the predicted mask has 0.62-0.73 IoU with the exact one on held-out renders.

    python -m train.safectrl.locality --engine engines/tinyworld_safectrl.plan \
        --baseline engines/tinyworld.plan --data .cache/data/tinyworld --out bench/results/safectrl_locality.json

Prompts: the unsafe prompts of a data folder (``--data``, grouped by category) or a JSON file
``{group: [prompt, ...]}`` (``--prompts``); no renderer or tinyworld world module is imported.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from runtime.pipeline import Pipeline


def measure(engine: Path, baseline: Path, prompts: dict[str, list[str]], per_group: int, seed: int = 0) -> dict:
    guarded, plain = Pipeline.open(engine), Pipeline.open(baseline)
    guard = next(g for g in guarded.guards if g.name == "safectrl")
    tau = float(guard.config["mask_threshold"])
    final = {}  # the last smoothed (and latched) mask of the call: per-call state lives in the guard context
    after_step = guard.after_step

    def keep_mask(ctx, i, t, outputs):
        after_step(ctx, i, t, outputs)
        final["mask"] = ctx.state_of(guard.name)["feed"][ctx.cond_rows].copy()  # what the next step would get

    guard.after_step = keep_mask
    rows, t0 = [], time.perf_counter()
    for group in prompts:
        for j, caption in enumerate(prompts[group][:per_group]):
            s = seed + 1000 * j
            a = guarded.generate(caption, seed=s)
            b = plain.generate(caption, seed=s)
            state = final["mask"][0, 0]  # cond row, batch 1
            region = np.kron(state >= tau, np.ones((4, 4), bool))
            diff = np.abs(a.images[0].astype(np.float64) - b.images[0].astype(np.float64)).mean(-1) / 255.0
            inside = float(diff[region].mean()) if region.any() else None
            outside = float(diff[~region].mean()) if (~region).any() else None
            rows.append({"group": group, "prompt": caption, "seed": s, "region_share": float(region.mean()),
                         "change_inside": inside, "change_outside": outside,
                         "change_share_inside": float(diff[region].sum() / max(diff.sum(), 1e-12)),
                         "identical": bool(np.array_equal(a.images[0], b.images[0])),
                         "triggered": a.report["guards"]["safectrl"]["triggered"]})
    # a mask that covers the whole image has no outside: such an image counts inside only
    trig = [r for r in rows if r["triggered"] and r["change_inside"] is not None]
    both = [r for r in trig if r["change_outside"] is not None]
    summary = {
        "images": len(rows), "triggered": len(trig),
        "mean_change_inside": float(np.mean([r["change_inside"] for r in trig])) if trig else None,
        "mean_change_outside": float(np.mean([r["change_outside"] for r in both])) if both else None,
        "mean_change_share_inside": float(np.mean([r["change_share_inside"] for r in trig])) if trig else None,
        "mean_region_share": float(np.mean([r["region_share"] for r in trig])) if trig else None,
        "whole_image_regions": len(trig) - len(both),
    }
    if both and summary["mean_change_outside"]:
        summary["inside_outside_ratio"] = summary["mean_change_inside"] / summary["mean_change_outside"]
    return {"engine": str(engine), "baseline": str(baseline), "mask_threshold": tau, "region": "predicted mask",
            "change": "mean |guarded - unguarded| over RGB, [0, 1]", "seconds": round(time.perf_counter() - t0, 1),
            "summary": summary, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", type=Path, default=Path("engines/tinyworld_safectrl.plan"))
    p.add_argument("--baseline", type=Path, default=Path("engines/tinyworld.plan"))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="data folder: its unsafe prompts, grouped by category")
    src.add_argument("--prompts", type=Path, help="JSON file {group: [prompt, ...]}")
    p.add_argument("--per-group", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("bench/results/safectrl_locality.json"))
    args = p.parse_args(argv)
    if args.prompts:
        prompts = json.loads(args.prompts.read_text(encoding="utf-8"))
    else:
        from train.data.load import load_data

        prompts = {}
        for r in load_data(args.data).text_pairs:
            prompts.setdefault(str(r.get("category") or "unsafe"), []).append(r["prompt"])
    result = measure(args.engine, args.baseline, prompts, args.per_group)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
