"""``python -m bench latency``: per-stage and end-to-end latency of the lean runtime.

* the lean ONNX Runtime pipeline (``--engine``): tokenize, text encoder, every denoise step (per-step
  min/median/max, plus the median over all steps), denoise total, VAE decoder and end to end, over ``--runs``
  timed runs after ``--warmup`` untimed ones;
* guard stages, when the bundle has guards: ``guard_text.<name>`` (a text guard's host work, e.g.
  SafeGuider's beam search, once per call), ``guard_steps.<name>`` (a step guard's host work and own graphs
  summed over the steps) and ``guard_image.<name>`` (a post-hoc checker); ``guard_vs_denoise_step`` gives
  each as a multiple of one denoise step's median;
* optionally a baseline plan (``--baseline``, e.g. the unguarded bundle) and the PyTorch eager reference
  (``--reference``: a diffusers ``StableDiffusionPipeline`` folder on CPU, by default the bundle manifest's
  ``created_by.source``), run *alternately* with the engine in the same process with the same prompts and
  seeds; the ratios are medians of per-pair ratios, which cancels most of the drift of a shared machine.

Writes ``--out`` (JSON), ``<out>.md`` (a markdown table, also printed) and ``<out>.png`` (median stage times,
lean vs baseline vs reference), each atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import statistics
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from runtime.bundle import atomic_write

ROOT = Path(__file__).resolve().parent.parent
QUICK = (6, 1)  # runs, warm-up (even: the two-runner alternation AB, BA, ... stays balanced)
DEFAULT = (20, 2)
STAGES = ("tokenize", "text_encoder", "denoise_step", "denoise_total", "vae_decoder")


# -- statistics ------------------------------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float]:
    """``{min, median, max}`` in ms, rounded to microseconds."""
    if not values:
        return {}
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3), "max": round(max(values), 3)}


# -- prompts -----------------------------------------------------------------------------------------------------


def load_prompts(prompt_set: str, csv_path: str | None) -> list[str]:
    """``--prompts-csv`` (a ``prompt`` column, else the first column) or a tinyworld evaluation set."""
    if csv_path:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if not rows:
            raise SystemExit(f"error: {csv_path} is empty")
        header = [h.strip().lower() for h in rows[0]]
        col, body = (header.index("prompt"), rows[1:]) if "prompt" in header else (0, rows)
        prompts = [r[col].strip() for r in body if len(r) > col and r[col].strip()]
        if not prompts:
            raise SystemExit(f"error: {csv_path} has no prompts")
        return prompts
    from train.tinyworld.world import evaluation_prompts

    groups = evaluation_prompts(3)
    if prompt_set == "benign":
        return [s.caption for s in groups["benign"]]
    # unsafe: one explicit, one held-out-vocabulary and one implicit caption
    return [groups[g][0].caption for g in ("explicit", "heldout", "implicit")]


# -- machine -----------------------------------------------------------------------------------------------------


def machine_info(note: str | None, with_torch: bool) -> dict[str, Any]:
    import onnxruntime

    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    cores = os.cpu_count()
    info = {"description": note or f"{cores}-core CPU", "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "machine": platform.machine(),
            "cores": cores, "ram_gib": round(ram / 2**30, 2) if ram else None, "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "onnxruntime_device": onnxruntime.get_device()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    if with_torch:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        try:
            import diffusers

            info["diffusers"] = diffusers.__version__
        except ImportError:
            pass
    return info


# -- runners -----------------------------------------------------------------------------------------------------


class Lean:
    """One opened bundle; ``run`` returns the report's stage times plus the wall-clock end to end."""

    def __init__(self, plan: str, backend: str):
        from runtime.pipeline import Pipeline

        self.pipe = Pipeline.open(plan, backend=backend)
        self.plan = plan

    def run(self, prompt: str, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
        from runtime.guards import ImageBlocked

        t0 = time.perf_counter()
        try:
            result = self.pipe.generate(prompt, steps=settings["steps"], guidance=settings["guidance"], seed=seed,
                                        scheduler=settings["scheduler"], height=settings["height"],
                                        width=settings["width"])
        except ImageBlocked as e:  # a refusal has no denoise stage to compare: say which prompt, and the way round
            raise SystemExit(f"error: the bundle refused the prompt {prompt!r} ({e}); bench latency "
                             "times generated images: pass --prompts-csv with prompts the bundle generates, or "
                             "time a build that does not refuse (e.g. --guard-setting "
                             "safeguider.on_no_qualifier=fallback)") from None
        e2e = (time.perf_counter() - t0) * 1000
        ms = dict(result.report["stages_ms"])
        ms["end_to_end"] = e2e
        return ms

    def close(self) -> None:
        self.pipe.close()


class Reference:
    """diffusers' ``StableDiffusionPipeline`` on CPU in eager mode, timed per stage with hooks."""

    CLASSES = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
               "euler_a": "EulerAncestralDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}

    def __init__(self, model_dir: Path, scheduler: str, scheduler_config: dict[str, Any], karras: bool = False):
        import diffusers
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        self.torch = torch
        self.pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True,
                                                                      dtype=torch.float32)
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.to("cpu")
        cls = getattr(diffusers, self.CLASSES[scheduler])
        self.pipe.scheduler = cls.from_config(scheduler_config)
        self.model_dir = model_dir
        self._marks: dict[str, float] = {}
        te = self.pipe.text_encoder
        te.register_forward_pre_hook(lambda *a: self._mark("te_start"))
        te.register_forward_hook(lambda *a: self._te_end())  # CFG encodes prompt and negative: two calls
        vae_decode = self.pipe.vae.decode

        def timed_decode(*args, **kwargs):
            self._mark("vae_start")
            out = vae_decode(*args, **kwargs)
            self._mark("vae_end")
            return out

        self.pipe.vae.decode = timed_decode

    def _mark(self, name: str) -> None:
        self._marks[name] = time.perf_counter()

    def _te_end(self) -> None:
        self._mark("te_end")
        self._marks["te_ms"] = self._marks.get("te_ms", 0.0) + (self._marks["te_end"] - self._marks["te_start"]) * 1000

    def run(self, prompt: str, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
        torch = self.torch
        self._marks.clear()
        steps: list[float] = []

        def on_step_end(pipe, i, t, kwargs):
            now = time.perf_counter()
            prev = self._marks.get("step_prev", self._marks.get("te_end", now))
            steps.append(round((now - prev) * 1000, 3))
            self._marks["step_prev"] = now
            return kwargs

        generator = torch.Generator("cpu").manual_seed(seed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.pipe(prompt, num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                      height=settings["height"], width=settings["width"], generator=generator, output_type="np",
                      callback_on_step_end=on_step_end)
        t1 = time.perf_counter()
        m = self._marks
        ms: dict[str, Any] = {"end_to_end": (t1 - t0) * 1000, "denoise_steps": steps}
        if "te_ms" in m:
            ms["text_encoder"] = round(m["te_ms"], 3)
        if "te_end" in m and "step_prev" in m:
            ms["denoise_total"] = round((m["step_prev"] - m["te_end"]) * 1000, 3)
        if "vae_start" in m and "vae_end" in m:
            ms["vae_decoder"] = round((m["vae_end"] - m["vae_start"]) * 1000, 3)
        return ms

    def close(self) -> None:
        pass


def aggregate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-stage ``{min, median, max}``, per-step summaries and the step median over all steps."""
    stages: dict[str, Any] = {}
    guard_stages = sorted({k for s in samples for k in s if k.startswith("guard_")})
    for name in ("tokenize", "text_encoder", "denoise_total", "vae_decoder", "total", *guard_stages):
        values = [s[name] for s in samples if name in s]
        if values:
            stages[name] = summary(values)
    per_step = [s.get("denoise_steps") or [] for s in samples]
    n_steps = min((len(p) for p in per_step), default=0)
    if n_steps:
        stages["denoise_steps"] = [summary([p[i] for p in per_step]) for i in range(n_steps)]
        stages["denoise_step"] = summary([x for p in per_step for x in p])  # median over every step of every run
    idle = [len(s["denoise_idle_steps"]) / len(s["denoise_steps"]) for s in samples
            if "denoise_idle_steps" in s and s.get("denoise_steps")]
    if idle:  # share of steps that ran the bundle's denoise_idle graph (export/idle.py)
        stages["denoise_idle_share"] = round(sum(idle) / len(idle), 4)
    return {"stages_ms": stages, "end_to_end_ms": summary([s["end_to_end"] for s in samples])}


def ratio_summary(num: list[float], den: list[float]) -> dict[str, float]:
    ratios = [a / b for a, b in zip(num, den) if b > 0]
    if not ratios:
        return {}
    return {"min": round(min(ratios), 4), "median": round(statistics.median(ratios), 4),
            "max": round(max(ratios), 4)}


# -- reporting ---------------------------------------------------------------------------------------------------


def _cell(d: dict[str, Any] | None, key: str) -> str:
    if not d or key not in d or not d[key]:
        return "-"
    s = d[key]
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def markdown(result: dict[str, Any]) -> str:
    cols = [("lean", result)]
    if "baseline" in result:
        cols.append(("baseline", result["baseline"]))
    if "reference" in result:
        cols.append(("PyTorch reference", result["reference"]))
    st = result["settings"]
    lines = [f"Latency, ms: median (min-max) over {st['runs']} runs after {st['warmup']} warm-up; "
             f"{st['steps']} steps, {st['scheduler']}, CFG {st['guidance']}, {st['height']}x{st['width']}, "
             f"prompt set {st['prompt_set']}; {result['machine']['description']}, backend {result['backend']}",
             "", "| stage | " + " | ".join(c[0] for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    guard_stages = sorted({k for c in cols for k in c[1].get("stages_ms", {}) if k.startswith("guard_")})
    for stage in (*STAGES, *guard_stages):
        lines.append(f"| {stage} | " + " | ".join(_cell(c[1].get("stages_ms"), stage) for c in cols) + " |")
    lines.append("| end to end | " + " | ".join(_cell(c[1], "end_to_end_ms") for c in cols) + " |")
    if "ratio_vs_baseline" in result:
        lines.append("")
        lines.append(f"ratio_vs_baseline (engine / baseline, median of per-pair ratios): "
                     f"{result['ratio_vs_baseline']:.3f}")
    if "step_ratio_vs_baseline" in result:
        lines.append(f"step_ratio_vs_baseline (one denoise step incl. guard step hooks, median of per-pair ratios): "
                     f"{result['step_ratio_vs_baseline']:.3f}")
    share = result.get("stages_ms", {}).get("denoise_idle_share")
    if share is not None:
        lines.append(f"denoise steps on the idle graph (denoise_idle, no guard step inputs): {share:.1%}")
    for name, ratio in result.get("guard_vs_denoise_step", {}).items():
        lines.append(f"{name} / one denoise step at CFG batch (medians): {ratio:.3f}")
    if "ratio_lean_vs_reference" in result:
        if "ratio_vs_baseline" not in result:
            lines.append("")
        lines.append(f"ratio_lean_vs_reference (lean / PyTorch eager, median of per-pair ratios): "
                     f"{result['ratio_lean_vs_reference']:.3f} "
                     f"(speed-up x{1 / result['ratio_lean_vs_reference']:.2f})")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(STAGES) + ["end_to_end"]
    series = [("lean", result)]
    if "baseline" in result:
        series.append(("baseline", result["baseline"]))
    if "reference" in result:
        series.append(("PyTorch reference", result["reference"]))

    def med(r: dict[str, Any], label: str) -> float:
        d = r.get("end_to_end_ms") if label == "end_to_end" else r.get("stages_ms", {}).get(label)
        return float(d["median"]) if d else 0.0

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(series)
    for k, (name, r) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [med(r, lab) for lab in labels], width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20)
    ax.set_ylabel("median ms")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_title(f"latency per stage ({result['machine']['description']})")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


# -- command -----------------------------------------------------------------------------------------------------


def _default_reference(plan: str) -> Path | None:
    from runtime.bundle import Bundle

    with Bundle.open(plan, verify=False) as b:
        source = (b.manifest.created_by or {}).get("source")
    if not source:
        return None
    for cand in (Path(source), Path.cwd() / source, ROOT / source):
        if (cand / "model_index.json").is_file():
            return cand
    return None


def run_latency(args: argparse.Namespace) -> int:
    runs, warmup = QUICK if args.quick else DEFAULT
    runs = args.runs if args.runs is not None else runs
    warmup = args.warmup if args.warmup is not None else warmup
    if runs < 1 or warmup < 0:
        print("error: --runs must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(args.prompt_set, args.prompts_csv)

    engine = Lean(args.engine, args.backend)
    runners: dict[str, Any] = {"engine": engine}
    try:
        d = engine.pipe.defaults
        settings = {"steps": args.steps or int(d.get("steps", 20)),
                    "guidance": float(args.guidance if args.guidance is not None else d.get("guidance_scale", 7.5)),
                    "scheduler": args.scheduler or d.get("scheduler", "ddim"),
                    "height": engine.pipe._default_size(0), "width": engine.pipe._default_size(1),
                    "runs": runs, "warmup": warmup, "seed": args.seed, "prompt_set":
                    "csv:" + Path(args.prompts_csv).name if args.prompts_csv else args.prompt_set,
                    "prompts": prompts, "alternation": "per iteration, rotating order"}
        if args.baseline:
            runners["baseline"] = Lean(args.baseline, args.backend)
        ref_dir = None
        if not args.no_reference:
            ref_dir = Path(args.reference) if args.reference else _default_reference(args.engine)
            if args.reference and not (ref_dir / "model_index.json").is_file():
                print(f"error: --reference {ref_dir} is not a diffusers pipeline folder (no model_index.json)",
                      file=sys.stderr)
                return 2
            if ref_dir is not None:
                runners["reference"] = Reference(ref_dir, settings["scheduler"], engine.pipe.scheduler_config)
        settings["baseline"] = args.baseline
        settings["reference"] = str(ref_dir) if ref_dir else None

        names = list(runners)
        samples: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for it in range(warmup + runs):
            prompt, seed = prompts[it % len(prompts)], args.seed + it
            order = names[it % len(names):] + names[:it % len(names)]  # rotate who goes first
            for name in order:
                ms = runners[name].run(prompt, seed, settings)
                if it >= warmup:
                    samples[name].append(ms)
            if not args.quiet:
                print(f"\r{'warm-up' if it < warmup else 'run'} {it + 1}/{warmup + runs}", end="",
                      file=sys.stderr, flush=True)
        if not args.quiet:
            print(file=sys.stderr)

        result: dict[str, Any] = {"command": "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                                  "backend": engine.pipe.backend, "providers": engine.pipe.providers,
                                  "engine": str(args.engine),
                                  "machine": machine_info(args.machine_note, "reference" in runners),
                                  "settings": settings}
        result.update(aggregate(samples["engine"]))
        e2e = [s["end_to_end"] for s in samples["engine"]]
        stages = result["stages_ms"]
        if "denoise_step" in stages:  # a guard's per-call cost in units of one UNet step (CFG batch)
            result["guard_vs_denoise_step"] = {
                k: round(v["median"] / stages["denoise_step"]["median"], 4)
                for k, v in stages.items() if k.startswith("guard_") and stages["denoise_step"]["median"] > 0}
        if "baseline" in runners:
            base = aggregate(samples["baseline"])
            result["baseline_end_to_end_ms"] = base["end_to_end_ms"]
            result["baseline"] = {"plan": str(args.baseline), **base}
            pair = ratio_summary(e2e, [s["end_to_end"] for s in samples["baseline"]])
            result["ratio_vs_baseline"] = pair["median"]
            result["ratio_vs_baseline_range"] = pair
            # per denoise step (a step includes the guards' step hooks): each run's median step, paired
            step = ratio_summary(*([statistics.median(s["denoise_steps"]) if s.get("denoise_steps") else 0.0
                                    for s in samples[k]] for k in ("engine", "baseline")))
            if step:
                result["step_ratio_vs_baseline"] = step["median"]
                result["step_ratio_vs_baseline_range"] = step
        if "reference" in runners:
            ref = aggregate(samples["reference"])
            result["reference_end_to_end_ms"] = ref["end_to_end_ms"]
            result["reference"] = {"model": str(ref_dir), "device": "cpu", "mode": "eager fp32", **ref}
            pair = ratio_summary(e2e, [s["end_to_end"] for s in samples["reference"]])
            result["ratio_lean_vs_reference"] = pair["median"]
            result["ratio_lean_vs_reference_range"] = pair
    finally:
        for r in runners.values():
            r.close()

    table = markdown(result)
    png = plot(result)
    md_path, png_path = Path(f"{out}.md"), Path(f"{out}.png")
    for path, data in ((out, (json.dumps(result, indent=2) + "\n").encode()), (md_path, table.encode()),
                       (png_path, png)):
        with atomic_write(path) as f:
            f.write(data)
    print(table, end="")
    print(f"wrote {out}, {md_path}, {png_path}", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("latency", help="per-stage and end-to-end latency of a plan (vs baseline and PyTorch)",
                       description=__doc__.splitlines()[0])
    p.add_argument("--engine", required=True, help="the bundle (.plan) to measure")
    p.add_argument("--baseline", help="a second bundle (e.g. unguarded) run alternately with the engine")
    p.add_argument("--reference", help="diffusers model folder for the PyTorch eager reference "
                                       "(default: the manifest's created_by.source, if it exists)")
    p.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--prompt-set", choices=("benign", "unsafe"), default="benign")
    p.add_argument("--prompts-csv", help="prompts from a CSV (a 'prompt' column, else the first column)")
    p.add_argument("--runs", type=int, help=f"timed runs (default {DEFAULT[0]}, quick {QUICK[0]})")
    p.add_argument("--warmup", type=int, help=f"untimed warm-up runs (default {DEFAULT[1]}, quick {QUICK[1]})")
    p.add_argument("--quick", action="store_true", help=f"{QUICK[0]} runs after {QUICK[1]} warm-up")
    p.add_argument("--steps", type=int, help="denoise steps (default: the bundle's)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: the bundle's)")
    p.add_argument("--scheduler", choices=("ddim", "euler", "euler_a", "dpmpp_2m"),
                   help="sampler (default: the bundle's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first run (run i uses seed + i)")
    p.add_argument("--backend", default="auto", help="runtime backend: auto|onnxruntime|tensorrt")
    p.add_argument("--machine-note", help="free-text machine description for the report")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--out", required=True, help="the JSON report; <out>.md and <out>.png are written next to it")
    p.set_defaults(func=run_latency)
