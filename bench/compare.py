"""``python -m bench compare``: the README's guard table and chart from the recorded safety and latency results.

Reads ``bench/results/safety_<world>_<name>.json`` (the full run, else ``..._quick.json``),
``bench/results/latency_<world>_<bundle>_{benign,unsafe}.json`` and ``attack_adaptive_<name>.json`` (on
tinyworld-xl ``attack_adaptive_tinyworld_xl_<name>.json``) for the unguarded bundle, each guard, the two text
guards together and the four-guard stack; writes ``--out`` (markdown: a
note naming the split and counting rule, then the table, with the blocked and errored images of each row),
``<out>.png`` (unsafe rates per group and end-to-end overhead per bundle) and, where adaptive results exist,
``attack_adaptive.png`` and ``attack_adaptive.md`` beside ``--out`` (tinyworld-xl: ``attack_adaptive_tinyworld_xl.*``;
their ASR against the query budget; per row the ASR at 20 / 50 / 200 queries). Nothing is measured here: run
``bench safety`` / ``bench latency`` / ``bench adaptive`` first.

One table holds one protocol: results of different splits (dev / test / the old whole eval split) or counting
rules (any unsafe kind / own category, see :func:`bench.safety.protocol`) are refused, naming the files.

``--before DIR`` prints, and writes nothing, an old-vs-new table: per guard row the unsafe rates, benign accuracy,
identical share, faithfulness and attack success of DIR's results (e.g. ``bench/results/before_dev_test``: eval split, own-category counting)
next to ``--results``'s (test split, any-unsafe counting), each side's protocol in the header.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

from bench import adaptive_bench
from bench.safety import count_cell, counting_words, protocol
from runtime.bundle import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = (("none (unguarded)", "none", None), ("SafeGuider", "safeguider", "safeguider"),
        ("SafeRedir", "saferedir", "saferedir"), ("SafePatch", "safepatch", "safepatch"),
        ("SafeCtrl", "safectrl", "safectrl"), ("SafeGuider + SafeRedir", "text", "text"),
        ("all four (stack)", "stack", "stack"))
GROUPS = (("explicit", "unsafe_rate_explicit"), ("held-out", "unsafe_rate_heldout"),
          ("implicit", "unsafe_rate_implicit"))


class MixedResults(ValueError):
    """Results of more than one split or counting rule in one table."""


def load(results: Path, world: str = "tinyworld") -> list[dict]:
    stem = world.replace("-", "_")  # file names: tinyworld_xl
    rows = []
    for label, safety, latency in ROWS:
        full, quick = results / f"safety_{stem}_{safety}.json", results / f"safety_{stem}_{safety}_quick.json"
        path = full if full.is_file() else quick
        if not path.is_file():
            continue
        row = {"label": label, "run": "full" if path == full else "quick", "path": path.name,
               **json.loads(path.read_text())}
        for prompts in ("benign", "unsafe"):
            lat = results / f"latency_{stem}_{latency}_{prompts}.json"
            measured = json.loads(lat.read_text()) if latency is not None and lat.is_file() else {}
            row[f"overhead_{prompts}"] = 1.0 if latency is None else measured.get("ratio_vs_baseline")
            row[f"step_overhead_{prompts}"] = 1.0 if latency is None else measured.get("step_ratio_vs_baseline")
        attacked = safety if world == "tinyworld" else f"{stem}_{safety}"
        row["adaptive"] = adaptive_bench.load(results, [attacked]).get(attacked)
        row["world"] = world
        rows.append(row)
    return rows


def one_protocol(rows: list[dict]) -> tuple[str, str]:
    """The (split, counting) all ``rows`` share; :class:`MixedResults` naming each file's when they differ."""
    seen = {protocol(r) for r in rows}
    if len(seen) > 1:
        files = "; ".join(f"{r['path']}: {' split, '.join(protocol(r))} counting" for r in rows)
        raise MixedResults(f"results of different splits or counting rules cannot share one table ({files}): "
                           "re-run the odd ones with `python -m bench safety` or move them to another folder")
    return seen.pop()


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(rows: list[dict]) -> str:
    def ratio(x):
        return "-" if x is None else f"{x:.3f}"

    split, counting = one_protocol(rows)
    attacked = [r["adaptive"] for r in rows if r["adaptive"]]
    adaptive_note = "" if not attacked else (
        f"; adaptive ASR = `bench adaptive` (beam search over prompt edits, {attacked[0]['targets']['split']} split, "
        f"{sum(attacked[0]['targets']['prompts'].values())} targets, one fixed seed each) at 50 queries per target, "
        "at its largest budget in parentheses")
    lines = [f"Guards on the {rows[0]['world']} {split} split; {counting_words(counting)}; blocked = images a guard refused "
             f"(safe), errors = images a guard failed on (attack queries in parentheses){adaptive_note}.", "",
             "| guards | run | unsafe explicit | held-out | implicit | benign accuracy | identical | feature dist. | "
             "faithfulness | ASR (budget) | adaptive ASR @50 | blocked | errors | overhead benign | overhead unsafe | "
             "per step benign / unsafe |",
             "|---" * 16 + "|"]
    for r in rows:
        fd = r.get("benign_feature_distance", 0.0)
        lines.append(f"| {r['label']} | {r['run']}, {protocol(r)[0]}, {r['images']} img | "
                     f"{_pct(r['unsafe_rate_explicit'])} | {_pct(r['unsafe_rate_heldout'])} | "
                     f"{_pct(r['unsafe_rate_implicit'])} | {_pct(r['benign_attribute_accuracy'])} | "
                     f"{_pct(r['benign_identical_share'])} | {'-' if fd is None else f'{fd:.3f}'} | "
                     f"{_pct(r['unsafe_faithfulness'])} | {_pct(r['attack_success_rate'])} ({r['attack_budget']}) | "
                     f"{adaptive_bench.cell(r['adaptive'])} | "
                     f"{count_cell(r.get('blocked'))} | {count_cell(r.get('errors'))} | "
                     f"{ratio(r['overhead_benign'])} | {ratio(r['overhead_unsafe'])} | "
                     f"{ratio(r['step_overhead_benign'])} / {ratio(r['step_overhead_unsafe'])} |")
    return "\n".join(lines) + "\n"


BEFORE_COLUMNS = (("unsafe explicit", "unsafe_rate_explicit"), ("held-out", "unsafe_rate_heldout"),
                  ("implicit", "unsafe_rate_implicit"), ("benign accuracy", "benign_attribute_accuracy"),
                  ("identical", "benign_identical_share"), ("faithfulness", "unsafe_faithfulness"),
                  ("ASR", "attack_success_rate"))


def before_after(old: list[dict], new: list[dict], old_dir: Path, new_dir: Path) -> str:
    """Per guard row, ``old`` and ``new`` results side by side (``old -> new``; ``-`` where a side has none)."""
    def side(rows, folder):
        if not rows:
            return f"none in {folder}"
        split, counting = one_protocol(rows)
        return f"{split} split, {counting_words(counting)} ({folder})"

    by_label = [({r["label"]: r for r in old}.get(label), {r["label"]: r for r in new}.get(label))
                for label, _, _ in ROWS]
    lines = [f"Old: {side(old, old_dir)}. New: {side(new, new_dir)}. Cells: old -> new.", "",
             "| guards | images | " + " | ".join(c for c, _ in BEFORE_COLUMNS) + " |",
             "|---" * (2 + len(BEFORE_COLUMNS)) + "|"]
    for (label, _, _), (a, b) in zip(ROWS, by_label):
        if a is None and b is None:
            continue
        cells = [f"{_pct(a and a[k])} -> {_pct(b and b[k])}" for _, k in BEFORE_COLUMNS]
        lines.append(f"| {label} | {a['images'] if a else '-'} -> {b['images'] if b else '-'} | "
                     + " | ".join(cells) + " |")
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
    split, counting = protocol(rows[0])
    ax1.set_title(f"unsafe rate per prompt group, {split} split, {counting} (bars at 5% and 10%)", fontsize=9)
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
    results = Path(args.results)
    rows = load(results, args.world)
    try:
        if args.before:
            old = load(Path(args.before), args.world)
            if not old:
                print(f"error: no safety results in {args.before}: pass the folder the old results were moved to")
                return 3
            print(before_after(old, rows, Path(args.before), results), end="")
            return 0
        if not rows:
            print(f"error: no safety results in {args.results}: run `python -m bench safety` first")
            return 3
        table = markdown(rows)
    except MixedResults as e:
        print(f"error: {e}")
        return 3
    out = Path(args.out or RESULTS / f"guards_{args.world.replace('-', '_')}.md")
    blobs = [(out, table.encode()), (Path(f"{out}.png"), plot(rows))]
    attacked = {r["label"]: r["adaptive"] for r in rows if r["adaptive"]}
    if attacked:  # one chart per world (tinyworld's keeps its name)
        name = "attack_adaptive" + ("" if args.world == "tinyworld" else f"_{args.world.replace('-', '_')}")
        blobs += [(out.parent / f"{name}.png", adaptive_bench.plot(attacked)),
                  (out.parent / f"{name}.md", adaptive_bench.table(attacked).encode())]
    for path, data in blobs:
        with atomic_write(path) as f:
            f.write(data)
    print(table, end="")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="the guard comparison table and chart from recorded results",
                       description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(RESULTS), help="folder of safety/latency JSONs (default: bench/results)")
    p.add_argument("--world", choices=("tinyworld", "tinyworld-xl"), default="tinyworld",
                   help="whose results: tinyworld (SD 1.x) or tinyworld-xl (SDXL), their file name prefix")
    p.add_argument("--out", help="markdown table; <out>.png beside it (default: bench/results/guards_<world>.md)")
    p.add_argument("--before", help="folder of earlier safety results (e.g. bench/results/before_dev_test): print "
                                    "old vs new per guard row instead of writing the table")
    p.set_defaults(func=run)
