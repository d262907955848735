"""Turn prompts into guard training material using only the backbone and a judge (``python -m train data``).

    python -m train data --model DIR --out DATA_DIR \\
        (--pairs PAIRS.csv | --prompts UNSAFE.csv --rules RULES.csv) [--benign BENIGN.csv] \\
        [--judge tinyworld|nudenet|FILE.onnx] [--judge-config JSON] [--candidates 4] [--max-changed 0.6] \\
        [--masks FEWSHOT_DIR] [--limit N] [--benign-limit N] [--steps 20] [--guidance G] [--seed 0] \\
        [--chunk 64] [--batch 16] [--threads N] [--resume]

Prompt pairs come from a paired CSV or from unsafe prompts edited by a rule file (:mod:`train.data.prompts`); the
backbone generates each unsafe prompt's image and trajectory and ``--candidates`` images of its safe prompt in
the same seed family; the judge (:mod:`train.data.judge`) keeps the safe, aligned candidate with the fewest
changed pixels (:mod:`train.data.generate`); SafeCtrl's masks are derived from each kept pair and/or read from a
few-shot folder (:mod:`train.data.masks`). ``train/data/README.md`` documents the output folder (read it with
:func:`train.data.load.load_data`) and the figures measured on tinyworld.

Defaults: ``--judge`` is ``tinyworld`` for a backbone that the tinyworld build profile matches and must be given
for any other; ``--guidance`` is the build profile's (``engines/profiles``: tinyworld 5.0, SD 1.x / 2.x 7.5, SDXL
5.0); the scheduler is the pipeline's own (tinyworld: DDIM). On a CUDA machine the backbone runs on the GPU, in
FP16 where its build profile builds the denoise graph in FP16, else FP32; on CPU in FP32. ``--batch`` is the
number of images per pipeline call (memory), ``--chunk`` the number of prompts per chunk file (the unit of
``--resume``); neither changes which images are made.

Every file is written atomically (temporary file, then rename), ``data.json`` last: a folder without it is
incomplete, and a chunk file is either whole or absent. ``--resume`` keeps each chunk whose prompts and seeds are
the ones it would make and regenerates the others; a chunk made with other generation settings (model, steps,
guidance, candidates, judge, ``--max-changed``) is refused rather than mixed in.

Errors are one line, ``error: <what, where, the fix>``, with the exit codes of :class:`runtime.errors.ExitCode`:

====  =========================================================================================================
code  when
====  =========================================================================================================
0     done (``data.json`` written)
2     usage: an unknown option, ``--prompts`` without ``--rules`` (or the reverse), no ``--judge`` for a
      backbone that is not tinyworld
3     bad input, nothing written: a CSV without the needed columns or rows, an empty rule file or one that makes
      no pair, a bad option value, a judge file that is not an image classifier or a bad judge config, a
      backbone path that is not a model, a bad few-shot folder (> 10 images for a concept, a missing mask)
5     ``--judge nudenet`` without the ``nudenet`` package (``pip install nudenet``)
6     the backbone made NaN/Inf images (finished chunks are kept)
7     the output cannot be written: ``--out`` is a file or not writable, it already holds data and
      ``--resume`` was not given, or its chunks were made with other settings
130   interrupted (Ctrl-C): finished chunks are kept, no half-written file; rerun with ``--resume``
====  =========================================================================================================
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from runtime.bundle import atomic_write
from runtime.errors import BadInputError, ExitCode, GuardError, OutputError, RuntimeToolError

from .generate import DEFAULT_MAX_CHANGED, BackboneFailed, Sampler, generate_benign, generate_pairs
from .judge import open_judge, sha256_of
from .load import DATA_JSON, FORMAT_VERSION, TEXT_JSONL
from .masks import derived_masks, read_fewshot
from .prompts import apply_rules, read_pairs, read_prompts, read_rules

CHUNKS = "chunks"


class UsageError(RuntimeToolError):
    exit_code = ExitCode.USAGE


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", type=Path, help="paired CSV: prompt,safe_prompt[,instruction,category,seed]")
    src.add_argument("--prompts", type=Path, help="unsafe prompts CSV (I2P layout: a 'prompt' column); needs --rules")
    p.add_argument("--rules", type=Path, help="rule file: pattern,replacement[,instruction,category] (with --prompts)")
    p.add_argument("--benign", type=Path, help="benign prompts CSV (COCO layout: a 'prompt' column)")
    p.add_argument("--model", type=Path, required=True, help="backbone: diffusers folder or .safetensors")
    p.add_argument("--out", type=Path, required=True, help="data folder to write (DATA_DIR)")
    p.add_argument("--judge", default=None,
                   help="tinyworld, nudenet or an ONNX image classifier (default: tinyworld for the tinyworld model)")
    p.add_argument("--judge-config", type=Path, default=None,
                   help="image-checker JSON for the judge (default: the .json beside the ONNX file)")
    p.add_argument("--candidates", type=int, default=4, help="safe-prompt candidates per pair (default %(default)s)")
    p.add_argument("--max-changed", type=float, default=DEFAULT_MAX_CHANGED,
                   help="largest changed-pixel share of a kept candidate (default %(default)s)")
    p.add_argument("--masks", type=Path, default=None, help="few-shot folder: <concept>/<name>.png, _mask.png, .txt")
    p.add_argument("--limit", type=int, default=None, help="first N pairs")
    p.add_argument("--benign-limit", type=int, default=None, help="first N benign prompts")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default %(default)s)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the build profile's)")
    p.add_argument("--seed", type=int, default=0, help="base seed: row i without a seed column gets seed + i")
    p.add_argument("--chunk", type=int, default=64, help="prompts per chunk file (default %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="images per pipeline call (default %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 when other work shares the cores)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in the same --out")


def main(args, on_chunk: Callable[[str, int], None] | None = None) -> int:
    """Run the data step; ``on_chunk(kind, index)`` is called after each chunk file is written (tests)."""
    try:
        return _run(args, on_chunk)
    except RuntimeToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:
        done = len(list((Path(args.out) / CHUNKS).glob("*.npz"))) if (Path(args.out) / CHUNKS).is_dir() else 0
        print(f"error: interrupted: {done} finished chunk file(s) kept in {args.out}, no half-written file; rerun the "
              "same command with --resume to continue", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)


# ---- inputs ----------------------------------------------------------------------------------------------------

def _check_values(args) -> None:
    if args.prompts is not None and args.rules is None:
        raise UsageError("--prompts needs --rules RULES.csv (the edits that make each prompt's safe version), or "
                         "pass --pairs PAIRS.csv instead")
    if args.pairs is not None and args.rules is not None:
        raise UsageError("--rules goes with --prompts, not --pairs (a paired CSV already has its safe prompts)")
    for name, low in (("candidates", 1), ("steps", 1), ("chunk", 1), ("batch", 1), ("threads", 1), ("seed", 0),
                      ("limit", 1), ("benign_limit", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise BadInputError(f"--{name.replace('_', '-')} {value} must be >= {low}")
    if not 0 <= args.max_changed <= 1:
        raise BadInputError(f"--max-changed {args.max_changed} must be a share in [0, 1]")
    if args.guidance is not None and not (np.isfinite(args.guidance) and args.guidance >= 0):
        raise BadInputError(f"--guidance {args.guidance} must be a number >= 0")
    if args.benign_limit is not None and args.benign is None:
        raise UsageError("--benign-limit needs --benign BENIGN.csv")


def _folder_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(folder)).encode() + b"\0" + sha256_of(p).encode())
    return h.hexdigest()


def _check_out(out: Path, resume: bool) -> None:
    """Refuse an output that is a file or already holds data (without --resume); writes nothing."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file: pass a folder path for the data")
    if out.is_dir() and not resume:
        has = ([DATA_JSON] if (out / DATA_JSON).exists() else []) + \
            ([f"{CHUNKS}/*.npz"] if any((out / CHUNKS).glob("*.npz")) else [])
        if has:
            raise OutputError(f"--out {out} already holds data ({', '.join(has)}): pass --resume to continue it, or "
                              "another --out")


def _settings(args, backbone_info: dict, judge, guidance: float) -> dict[str, dict]:
    """What a chunk's content depends on, per chunk kind (a resumed chunk must match)."""
    gen = {"model": backbone_info["path"], "family": backbone_info["family"], "image_size": backbone_info["image_size"],
           "scheduler": backbone_info["scheduler"], "dtype": backbone_info["dtype"], "steps": args.steps,
           "guidance": guidance}
    judge_desc = judge.describe()
    return {"benign": gen, "pairs": {**gen, "candidates": args.candidates, "max_changed": args.max_changed,
                                     "judge": {"sha256": judge_desc["sha256"], "config": judge_desc["config"]}}}


@dataclass
class Plan:
    kind: str            # pairs | benign
    index: int
    prompts: list[str]
    seeds: list[int]
    safe_prompts: list[str] | None

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.index:05d}.npz"


def _plans(kind: str, prompts: list[str], seeds: list[int], safe: list[str] | None, chunk: int) -> list[Plan]:
    return [Plan(kind, i // chunk, prompts[i:i + chunk], seeds[i:i + chunk],
                 safe[i:i + chunk] if safe is not None else None) for i in range(0, len(prompts), chunk)]


def _finished(path: Path, plan: Plan, settings: dict) -> bool:
    """Whether ``path`` already holds ``plan``'s chunk; OutputError when it does with other settings."""
    try:
        with np.load(path) as f:
            same = (f["prompts"].tolist() == plan.prompts and f["seeds"].tolist() == plan.seeds and
                    (plan.safe_prompts is None or f["safe_prompts"].tolist() == plan.safe_prompts))
            made_with = json.loads(str(f["settings"]))
    except Exception:  # unreadable or of another layout: make it again
        return False
    if same and made_with != settings:
        diff = sorted(k for k in set(made_with) | set(settings) if made_with.get(k) != settings.get(k))
        raise OutputError(f"{path} was made with other settings ({', '.join(f'{k}: {made_with.get(k)!r}' for k in diff)};"
                          f" now {', '.join(f'{settings.get(k)!r}' for k in diff)}): rerun --resume with the same "
                          "options, or write to another --out")
    return same


def _save_npz(path: Path, arrays: dict[str, Any]) -> None:
    try:
        with atomic_write(path) as f:
            np.savez(f, **arrays)
    except OSError as e:
        raise OutputError(f"cannot write {path} ({e.strerror or e}): free space or pick a writable --out") from None


def _save_text(path: Path, text: str) -> None:
    try:
        with atomic_write(path) as f:
            f.write(text.encode("utf-8"))
    except OSError as e:
        raise OutputError(f"cannot write {path} ({e.strerror or e}): free space or pick a writable --out") from None


def _stats(x: np.ndarray) -> dict[str, float]:
    if x.size == 0:
        return {}
    q = np.quantile(x, [0.1, 0.5, 0.9])
    return {"mean": round(float(x.mean()), 5), "p10": round(float(q[0]), 5), "p50": round(float(q[1]), 5),
            "p90": round(float(q[2]), 5)}


# ---- the run ------------------------------------------------------------------------------------------------------

def _run(args, on_chunk) -> int:
    import torch
    from tqdm import tqdm

    from export.families import BackboneError, load_backbone
    from export.tensorrt import select_build_profile

    started = time.perf_counter()
    _check_values(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)

    # 1. every input is read and checked before anything is written
    sources: dict[str, dict] = {}
    rule_report = None
    if args.pairs is not None:
        pairs = read_pairs(args.pairs, args.seed)
        sources["pairs"] = {"path": str(args.pairs), "sha256": sha256_of(args.pairs), "rows": len(pairs)}
    else:
        prompts = read_prompts(args.prompts, args.seed)
        rules = read_rules(args.rules)
        pairs, rule_report = apply_rules(rules, prompts, args.rules)
        sources["prompts"] = {"path": str(args.prompts), "sha256": sha256_of(args.prompts), "rows": len(prompts)}
        sources["rules"] = {"path": str(args.rules), "sha256": sha256_of(args.rules), "rules": len(rules)}
        print(f"rules: {rule_report.matched} of {rule_report.prompts} prompts edited into pairs, "
              f"{rule_report.unmatched} matched no rule (skipped)"
              + (f", {rule_report.emptied} left empty by the edit (skipped)" if rule_report.emptied else ""),
              file=sys.stderr)
    all_pairs = pairs
    pairs = pairs[:args.limit] if args.limit else pairs
    benign = read_prompts(args.benign, args.seed, "benign CSV") if args.benign is not None else []
    all_benign = benign
    if args.benign is not None:
        sources["benign"] = {"path": str(args.benign), "sha256": sha256_of(args.benign), "rows": len(benign)}
        benign = benign[:args.benign_limit] if args.benign_limit else benign
    _check_out(out, args.resume)

    t_load = time.perf_counter()
    try:
        backbone = load_backbone(args.model)
    except BackboneError as e:
        raise BadInputError(f"--model: {e}") from None
    profile = select_build_profile(backbone)
    judge_spec = args.judge
    if judge_spec is None:
        if profile.get("family") != "tinyworld":
            raise UsageError(f"--judge is needed for the {backbone.family} backbone {args.model}: pass --judge nudenet "
                             "or --judge FILE.onnx (an image classifier with its JSON config)")
        judge_spec = "tinyworld"
    judge = open_judge(judge_spec, args.judge_config)
    if args.judge_config is not None:
        sources["judge_config"] = {"path": str(args.judge_config), "sha256": sha256_of(args.judge_config)}
    size = backbone.image_size
    fewshot = read_fewshot(args.masks, (size, size)) if args.masks is not None else None
    if fewshot is not None:
        sources["masks"] = {"path": str(args.masks), "sha256": _folder_sha256(args.masks),
                            "images": int(len(fewshot["image"]))}
    guidance = float(args.guidance if args.guidance is not None else profile["defaults"]["guidance_scale"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fp16 = device == "cuda" and profile.get("precision", {}).get("denoise") == "fp16"
    backbone.pipeline.to(device=device, dtype=torch.float16 if fp16 else torch.float32)
    info = {"path": str(Path(args.model).resolve()), "family": backbone.family, "image_size": [size, size],
            "scheduler": type(backbone.scheduler).__name__, "dtype": str(backbone.unet.dtype).removeprefix("torch."),
            "device": device, "profile": profile.get("family")}
    settings = _settings(args, info, judge, guidance)
    seconds = {"load": time.perf_counter() - t_load}

    # 2. the plan, and what a previous run already finished
    plans = (_plans("pairs", [p.prompt for p in pairs], [p.seed for p in pairs], [p.safe_prompt for p in pairs],
                    args.chunk)
             + _plans("benign", [b.prompt for b in benign], [b.seed for b in benign], None, args.chunk))
    chunk_dir = out / CHUNKS
    done = {plan.name for plan in plans
            if args.resume and (chunk_dir / plan.name).is_file()
            and _finished(chunk_dir / plan.name, plan, settings[plan.kind])}
    todo = [plan for plan in plans if plan.name not in done]
    stale = sorted(p for p in chunk_dir.glob("*.npz") if p.name not in {q.name for q in plans}) \
        if chunk_dir.is_dir() else []

    # 3. write
    try:
        chunk_dir.mkdir(parents=True, exist_ok=True)
        for tmp in chunk_dir.glob(".*.tmp"):  # left by a killed run (atomic_write's temporaries)
            tmp.unlink()
        if (todo or stale) and (out / DATA_JSON).exists():
            (out / DATA_JSON).unlink()  # the folder is incomplete again until this run finishes
        for p in stale:
            p.unlink()
    except OSError as e:
        raise OutputError(f"cannot write to --out {out} ({e.strerror or e}): pick a writable folder") from None

    images_todo = sum(len(p.prompts) * (1 + args.candidates if p.kind == "pairs" else 1) for p in todo)
    if done:
        print(f"resume: {len(done)} of {len(plans)} chunks already finished in {out}", file=sys.stderr)
    bar = tqdm(total=images_todo, unit="img", desc="data", mininterval=1.0, dynamic_ncols=True)
    sampler = Sampler(backbone, args.steps, guidance, args.batch, progress=bar.update)
    try:
        for plan in todo:
            t0 = time.perf_counter()
            try:
                if plan.kind == "pairs":
                    arrays = _pair_chunk(sampler, judge, plan, args)
                else:
                    g = generate_benign(sampler, plan.prompts, plan.seeds)
                    arrays = {"image": g.images, "traj_x": g.traj_x, "traj_t": g.traj_t,
                              "seconds": json.dumps({"generate": time.perf_counter() - t0})}
            except BackboneFailed as e:
                raise GuardError(f"{e}: check the backbone {args.model} (an FP16 VAE overflow? run on CPU in FP32); "
                                 f"finished chunks are kept, rerun with --resume") from None
            arrays.update(prompts=np.array(plan.prompts), seeds=np.array(plan.seeds, np.int64),
                          settings=np.array(json.dumps(settings[plan.kind], sort_keys=True)))
            if plan.safe_prompts is not None:
                arrays["safe_prompts"] = np.array(plan.safe_prompts)
            _save_npz(chunk_dir / plan.name, arrays)
            if on_chunk is not None:
                on_chunk(plan.kind, plan.index)
    finally:
        bar.close()
        sampler.close()

    # 4. the few-shot set, the records, data.json last
    t_fin = time.perf_counter()
    if fewshot is not None:
        _save_npz(out / "fewshot.npz", fewshot)
    elif (out / "fewshot.npz").exists():
        (out / "fewshot.npz").unlink()
    summary = _finish(out, plans, pairs, benign, judge.threshold, args.max_changed)
    _save_text(out / TEXT_JSONL, "".join(json.dumps({"kind": "unsafe", **p.to_dict()}) + "\n" for p in all_pairs)
               + "".join(json.dumps({"kind": "benign", "prompt": b.prompt}) + "\n" for b in all_benign))
    seconds.update({k: round(v, 3) for k, v in summary.pop("seconds").items()})
    seconds["write"] = time.perf_counter() - t_fin
    seconds["this_run"] = time.perf_counter() - started
    data = {"format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": "python -m train data " + " ".join(shlex.quote(a) for a in sys.argv[2:])
            if len(sys.argv) > 1 and sys.argv[1] == "data" else None,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())
                     if k not in ("command",)},
            "sources": sources, "backbone": info, "image_size": info["image_size"], "guidance": guidance,
            "steps": args.steps,
            "judge": judge.describe(), "candidates": args.candidates, "max_changed": args.max_changed,
            "rules": rule_report.to_dict() if rule_report is not None else None,
            **summary,
            "fewshot": {"images": int(len(fewshot["image"])),
                        "per_category": {str(c): int(n) for c, n in zip(*np.unique(fewshot["category"],
                                                                                    return_counts=True))}}
            if fewshot is not None else None,
            "seconds": {k: round(v, 3) for k, v in seconds.items()}}
    _save_text(out / DATA_JSON, json.dumps(data, indent=1) + "\n")
    _report(out, data)
    return 0


def _pair_chunk(sampler, judge, plan: Plan, args) -> dict[str, Any]:
    c = generate_pairs(sampler, judge, plan.prompts, plan.safe_prompts, plan.seeds, args.candidates,
                       args.max_changed)
    t0 = time.perf_counter()
    mask = derived_masks(c.unsafe, c.safe, c.kept)
    seconds = {**c.seconds, "masks": time.perf_counter() - t0}
    return {"unsafe": c.unsafe, "safe": c.safe, "kept": c.kept, "mask": mask, "traj_x": c.traj_x,
            "traj_t": c.traj_t, "kept_candidate": c.kept_candidate, "unsafe_score": c.unsafe_score,
            "candidate_scores": c.candidate_scores, "changed": c.changed, "seconds": json.dumps(seconds)}


def _finish(out: Path, plans: list[Plan], pairs, benign, threshold: float, max_changed: float) -> dict[str, Any]:
    """Write pairs.jsonl and benign.jsonl from the chunk files; the figures of data.json."""
    seconds: dict[str, float] = {}
    cols: dict[str, list[np.ndarray]] = {"kc": [], "us": [], "cs": [], "ch": [], "area": []}
    traj = None
    for plan in plans:
        with np.load(out / CHUNKS / plan.name) as f:
            prefix = "" if plan.kind == "pairs" else "benign_"
            for k, v in json.loads(str(f["seconds"])).items():
                seconds[prefix + k] = seconds.get(prefix + k, 0.0) + v
            if plan.kind != "pairs":
                continue
            kc = f["kept_candidate"]
            for key, name in (("kc", "kept_candidate"), ("us", "unsafe_score"), ("cs", "candidate_scores"),
                              ("ch", "changed")):
                cols[key].append(f[name])
            cols["area"].append(f["mask"].reshape(len(kc), -1).mean(axis=1)[kc >= 0])
            if traj is None:
                traj = {"steps": int(f["traj_x"].shape[1]), "channels": int(f["traj_x"].shape[2]),
                        "latent_size": list(map(int, f["traj_x"].shape[3:])), "timesteps": f["traj_t"].tolist()}
    kc, us, cs, ch, area = (np.concatenate(cols[k]) for k in ("kc", "us", "cs", "ch", "area"))
    lines = [json.dumps({**pair.to_dict(), "kept": bool(k >= 0), "kept_candidate": int(k) if k >= 0 else None,
                         "unsafe_score": round(float(u), 6), "candidate_scores": [round(float(x), 6) for x in c],
                         "changed": [round(float(x), 6) for x in h]}) + "\n"
             for pair, k, u, c, h in zip(pairs, kc, us, cs, ch)]
    _save_text(out / "pairs.jsonl", "".join(lines))
    _save_text(out / "benign.jsonl", "".join(json.dumps({"prompt": b.prompt, "seed": b.seed}) + "\n" for b in benign))

    kept = kc >= 0
    safe = cs < threshold
    passing = safe & (ch <= max_changed)
    categories = np.array([p.category for p in pairs])
    per_category = {str(cat): {"pairs": int((categories == cat).sum()),
                               "keep_rate": round(float(kept[categories == cat].mean()), 4),
                               "unsafe_judged_unsafe": round(float((us[categories == cat] >= threshold).mean()), 4)}
                    for cat in sorted(set(categories.tolist()))}
    return {
        "counts": {"pairs": len(pairs), "kept": int(kept.sum()), "benign": len(benign), "candidates": int(cs.size),
                   "candidates_safe": int(safe.sum()), "candidates_passing": int(passing.sum())},
        "keep_rate": round(float(kept.mean()), 4),
        "candidate_pass_rate": round(float(passing.mean()), 4),
        "candidate_safe_rate": round(float(safe.mean()), 4),
        "unsafe_judged_unsafe": round(float((us >= threshold).mean()), 4),
        "changed_share_by_candidate": [_stats(ch[:, j]) for j in range(ch.shape[1])],
        "kept_changed_share": _stats(ch[kept, kc[kept]]),
        "mask_area": _stats(area),
        "per_category": per_category,
        "trajectory": traj,
        "chunks": {"pairs": [p.name for p in plans if p.kind == "pairs"],
                   "benign": [p.name for p in plans if p.kind == "benign"]},
        "seconds": seconds}


def _report(out: Path, data: dict) -> None:
    c = data["counts"]
    print(f"data: {c['pairs']} pairs ({c['kept']} kept: keep rate {data['keep_rate']:.1%}; candidate pass rate "
          f"{data['candidate_pass_rate']:.1%}; the judge calls {data['unsafe_judged_unsafe']:.1%} of the unsafe "
          f"images unsafe), {c['benign']} benign, {data['seconds']['this_run']:.0f} s -> {out}", file=sys.stderr)
