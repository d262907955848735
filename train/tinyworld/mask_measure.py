"""``python -m train tinyworld masks --data DATA_DIR``: how good are the data step's derived SafeCtrl masks?

Generated images have no exact masks, so three figures (``train/data/README.md`` records them):

1. the derived masks' area (share of the image) over the kept pairs of ``DATA_DIR`` (and, for reading it, the keep
   rate by caption form);
2. on ``--rendered`` (50) guard-split RENDERED pairs (the renderer is used here only, never by the data step):
   the rule "difference of the unsafe render and its counterfactual render (> 0.1) -> 3x3 closing / opening"
   (:func:`train.data.masks.derived_masks`) against the renderer's exact mask of the unsafe object: IoU, for the
   ``remove`` counterfactual (what the rule file does beside another object) and ``replace`` (the confuser: what
   it does to an object alone);
3. on the first ``--generated`` (50) kept pairs of ``DATA_DIR``: the changed-pixel share and the share of pairs
   whose changed region is CONCENTRATED: one connected region no larger than the largest exact unsafe mask of
   the rendered pairs (an unsafe object's size), i.e. where a derived mask can stand for the object's mask; by
   caption form (one object, two objects, implicit place).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from runtime.bundle import atomic_write
from runtime.errors import BadInputError
from train.data.load import load_data
from train.data.masks import derived_masks

from .data import counterfactual_pairs
from .world import parse_caption


def components(mask: np.ndarray) -> int:
    """Number of 8-connected regions of a bool (H, W) map (label propagation, numpy only)."""
    h, w = mask.shape
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        p = np.pad(lab, 1)
        best = lab.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                best = np.maximum(best, p[dy:dy + h, dx:dx + w])
        best = np.where(mask, best, 0)
        if np.array_equal(best, lab):
            return len(np.unique(lab[mask]))
        lab = best


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _q(x) -> dict[str, float]:
    x = np.asarray(x, np.float64)
    q = np.quantile(x, [0.1, 0.5, 0.9])
    return {"n": int(x.size), "mean": round(float(x.mean()), 4), "p10": round(float(q[0]), 4),
            "p50": round(float(q[1]), 4), "p90": round(float(q[2]), 4)}


def _form(prompt: str) -> str:
    scene = parse_caption(prompt)
    if scene is None:
        return "other"
    if scene.place:
        return "implicit"
    return "explicit, 1 object" if len(scene.objects) == 1 else "explicit, 2 objects"


def measure(data_dir: Path, n_rendered: int = 50, n_generated: int = 50, seed: int = 123) -> dict:
    out: dict = {}
    d = load_data(data_dir)
    kept = np.nonzero(d.kept)[0]
    if not len(kept):
        raise BadInputError(f"{data_dir} has no kept pair: nothing to measure (pass a tinyworld data folder)")
    by_form: dict[str, list[bool]] = {}
    for p in d.pairs:
        by_form.setdefault(_form(p["prompt"]), []).append(p["kept"])
    out["keep_rate_by_form"] = {f: {"pairs": len(k), "keep_rate": round(float(np.mean(k)), 4)}
                                for f, k in sorted(by_form.items())}
    out["derived_mask_area"] = _q(d.mask[kept].reshape(len(kept), -1).mean(axis=1))

    rendered = {}
    exact_max = 0.0
    for mode in ("remove", "replace"):
        cp = counterfactual_pairs("guard", n_rendered, seed, mode=mode)
        derived = derived_masks(cp.unsafe, cp.safe, np.ones(len(cp.unsafe), bool)).astype(bool)
        ious = [iou(a, b) for a, b in zip(derived, cp.mask)]
        areas = cp.mask.reshape(len(cp.mask), -1).mean(axis=1)
        exact_max = max(exact_max, float(areas.max()))
        rendered[mode] = {"iou": _q(ious), "exact_area": _q(areas),
                          "concentrated": round(float(np.mean([components(m) == 1 and m.mean() <= areas.max()
                                                               for m in derived])), 4)}
    out["rendered"] = rendered
    out["unsafe_object_area_max"] = round(exact_max, 4)

    pick = kept[:n_generated]
    forms: dict[str, list] = {}
    for i in pick:
        m = d.mask[i].astype(bool)
        share = float(d.pairs[i]["changed"][d.pairs[i]["kept_candidate"]])
        forms.setdefault(_form(d.pairs[i]["prompt"]), []).append(
            (share, components(m) == 1 and m.mean() <= exact_max, int(components(m))))
    everything = [r for rows in forms.values() for r in rows]
    out["generated"] = {
        "pairs": len(everything),
        "changed_share": _q([r[0] for r in everything]),
        "concentrated": round(float(np.mean([r[1] for r in everything])), 4),
        "regions": _q([r[2] for r in everything]),
        "by_form": {f: {"pairs": len(rows), "changed_share": _q([r[0] for r in rows]),
                        "concentrated": round(float(np.mean([r[1] for r in rows])), 4)}
                    for f, rows in sorted(forms.items())}}
    return out


def main(args) -> int:
    try:
        result = measure(Path(args.data), args.rendered, args.generated, args.seed)
    except BadInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return int(e.exit_code)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with atomic_write(args.out) as f:
            f.write((text + "\n").encode())
    return 0
