"""``python -m bench compare``: the README's guard table and chart from the recorded safety and latency results.

Reads ``bench/results/safety_tinyworld_<name>.json`` (the full run, else ``..._quick.json``) and
``bench/results/latency_tinyworld_<bundle>_{benign,unsafe}.json`` for the unguarded bundle, each guard, the two text
guards together and the four-guard stack; writes ``--out`` (markdown) and ``<out>.png`` (unsafe rates per group
and end-to-end overhead per bundle). Nothing is measured here: run ``bench safety`` / ``bench latency`` first.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

from runtime.bundle import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = (("none (unguarded)", "none", None), ("SafeGuider", "safeguider", "safeguider"),
        ("SafeRedir", "saferedir", "saferedir"), ("SafePatch", "safepatch", "safepatch"),
        ("SafeCtrl", "safectrl", "safectrl"), ("SafeGuider + SafeRedir", "text", "text"),
        ("all four (stack)", "stack", "stack"))
GROUPS = (("explicit", "unsafe_rate_explicit"), ("held-out", "unsafe_rate_heldout"),
          ("implicit", "unsafe_rate_implicit"))


def load(results: Path) -> list[dict]:
    rows = []
    for label, safety, latency in ROWS:
        full, quick = results / f"safety_tinyworld_{safety}.json", results / f"safety_tinyworld_{safety}_quick.json"
        path = full if full.is_file() else quick
        if not path.is_file():
            continue
        row = {"label": label, "run": "full" if path == full else "quick", **json.loads(path.read_text())}
        for prompts in ("benign", "unsafe"):
            lat = results / f"latency_tinyworld_{latency}_{prompts}.json"
            measured = json.loads(lat.read_text()) if latency is not None and lat.is_file() else {}
            row[f"overhead_{prompts}"] = 1.0 if latency is None else measured.get("ratio_vs_baseline")
            row[f"step_overhead_{prompts}"] = 1.0 if latency is None else measured.get("step_ratio_vs_baseline")
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    def pct(x):
        return f"{100 * x:.1f}%"

    def ratio(x):
        return "-" if x is None else f"{x:.3f}"

    lines = ["| guards | run | unsafe explicit | held-out | implicit | benign accuracy | identical | feature dist. | "
             "faithfulness | ASR (budget) | overhead benign | overhead unsafe | per step benign / unsafe |",
             "|---" * 13 + "|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['run']}, {r['images']} img | {pct(r['unsafe_rate_explicit'])} | "
                     f"{pct(r['unsafe_rate_heldout'])} | {pct(r['unsafe_rate_implicit'])} | "
                     f"{pct(r['benign_attribute_accuracy'])} | {pct(r['benign_identical_share'])} | "
                     f"{r.get('benign_feature_distance', 0.0):.3f} | {pct(r['unsafe_faithfulness'])} | "
                     f"{pct(r['attack_success_rate'])} ({r['attack_budget']}) | {ratio(r['overhead_benign'])} | "
                     f"{ratio(r['overhead_unsafe'])} | {ratio(r['step_overhead_benign'])} / "
                     f"{ratio(r['step_overhead_unsafe'])} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(GROUPS)
    for k, (name, key) in enumerate(GROUPS):
        xs = [i + (k - 1) * width for i in range(len(rows))]
        ax1.bar(xs, [100 * r[key] for r in rows], width, label=name)
    ax1.axhline(5, color="grey", ls="--", lw=0.8)
    ax1.axhline(10, color="grey", ls=":", lw=0.8)
    ax1.set_ylabel("unsafe images, %")
    ax1.set_title("unsafe rate per prompt group (bars at 5% and 10%)")
    ax1.legend()
    for k, prompts in enumerate(("benign", "unsafe")):
        xs = [i + (k - 0.5) * 0.4 for i in range(len(rows))]
        ax2.bar(xs, [r[f"overhead_{prompts}"] or 0 for r in rows], 0.4, label=f"{prompts} prompts")
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_ylim(0.9, max(1.2, max((r["overhead_unsafe"] or 0) for r in rows) + 0.05))
    ax2.set_ylabel("end to end, guarded / unguarded")
    ax2.set_title("overhead (median of per-pair ratios)")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def run(args: argparse.Namespace) -> int:
    rows = load(Path(args.results))
    if not rows:
        print(f"error: no safety results in {args.results}: run `python -m bench safety` first")
        return 3
    table = markdown(rows)
    out = Path(args.out)
    for path, data in ((out, table.encode()), (Path(f"{out}.png"), plot(rows))):
        with atomic_write(path) as f:
            f.write(data)
    print(table, end="")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="the guard comparison table and chart from recorded results",
                       description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(RESULTS), help="folder of safety/latency JSONs (default: bench/results)")
    p.add_argument("--out", default=str(RESULTS / "guards_tinyworld.md"), help="markdown table; <out>.png beside it")
    p.set_defaults(func=run)
