"""Train SafePatch (instruction-aware UNet encoder patch + prompt gate) for a backbone.

    python -m train safepatch --model models/tinyworld --data .cache/data/tinyworld --out DIR
    python -m train safepatch --model DIR --data DATA_DIR --out DIR --steps 700 --resume
    python -m train safepatch --model models/tinyworld --renderer --out DIR     # tinyworld's renderer (comparison)
    accelerate launch --num_processes 2 --cpu -m train safepatch --model ... --data ... --out ...

``--data``: a folder of the prompt-only data step (``python -m train data``; :mod:`train.safepatch.data`), the
default path. ``--renderer``: tinyworld's renderer builds the examples (:mod:`train.safepatch.renderer`, imported
only then). Writes ``config.json`` + ``model.safetensors`` (see :mod:`guards.safepatch`), ``train_log.json`` and
``checkpoint.pt`` (for ``--resume``). VAE latents and text embeddings of the patch examples are cached under
``--cache`` (default ``.cache/safepatch``), keyed by the model name, the data folder's data.json sha256 and the
counts. SDXL backbones train the same way (text = both encoders side by side, the UNet's text_time
conditioning fed to the patch and the UNet). Bad input (not a finished data folder, one made for another backbone,
no kept pair):
``error: <message>`` on one line, exit code 3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from guards.safepatch import SafePatchConfig
from runtime.errors import BadInputError, ExitCode
from train.options import add_config_options, add_source_options

RENDERER_DEFAULTS = {"unsafe": 2000, "benign": 1200, "gate_prompts": 4000}
"""--renderer: how many examples to render when --unsafe / --benign / --gate-prompts are not given."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="backbone (diffusers folder)")
    add_source_options(p)  # exactly one of --data DATA_DIR (default recipe) / --renderer (tinyworld, comparison)
    p.add_argument("--out", type=Path, required=True, help="writes config.json, model.safetensors, train_log.json")
    p.add_argument("--cache", type=Path, default=Path(".cache/safepatch"), help="cached latents/embeddings")
    p.add_argument("--unsafe", type=int, default=None,
                   help="cap: the first N kept pairs as triplets (default all; --renderer: %d rendered)"
                   % RENDERER_DEFAULTS["unsafe"])
    p.add_argument("--benign", type=int, default=None,
                   help="cap: the first N benign images, half with instruction \"\", half a wrong one (default all; "
                        "--renderer: %d rendered scenes)" % RENDERER_DEFAULTS["benign"])
    p.add_argument("--gate-prompts", type=int, default=None,
                   help="cap: distinct text prompts for the gate (default all of the data's text lists; "
                        "--renderer: %d guard-split captions)" % RENDERER_DEFAULTS["gate_prompts"])
    p.add_argument("--target", choices=("aligned", "removed"), default="aligned",
                   help="--data: the unsafe triplets' target image, the data step's kept safe-prompt image (default) "
                        "or the unsafe image with the object inpainted away by the backbone (train/data/removal.py)")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--warmup", type=int, default=50)
    add_config_options(p, SafePatchConfig, {"proj_dim": "instruction projection width"})
    p.add_argument("--threshold", type=float, default=None,
                   help="gate: run the patch when 1 - p(none) >= this (default: calibrated on the held-back 10%% "
                        "of the gate prompts, train.pick_threshold)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--gate-only", action="store_true", help="retrain only the gate; keep the patch in --out")


def _bad(message: str) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return int(ExitCode.BAD_INPUT)


def main(args) -> int:
    import torch

    from export.families import BackboneError, load_backbone
    from guards.safepatch import SafePatch, SafePatchGate, save, text_dim
    from train.loop import setup

    from .data import categories_and_instructions
    from .train import fit_gate, fit_patch, pick_threshold

    setup(args.seed, threads=args.threads)
    start = time.time()
    data = None
    if args.data is not None:
        from train.data.load import load_data

        try:
            data = load_data(args.data)
        except BadInputError as e:
            return _bad(str(e))
    try:
        backbone = load_backbone(args.model)
    except BackboneError as e:
        return _bad(str(e))
    if data is not None:
        from train.data.load import check_backbone

        try:  # family, image size, latent channels, a kept pair
            check_backbone(data, backbone)
        except BadInputError as e:
            return _bad(str(e))
        categories, instructions = categories_and_instructions(data)
        sha = data.sha256
        source = {"data": str(data.folder), "data_sha256": sha}  # as given: no machine paths in committed configs
    else:
        from export.tensorrt import select_build_profile

        if backbone.family == "sdxl" or select_build_profile(backbone).get("family") != "tinyworld":
            return _bad(f"--renderer renders tinyworld scenes, {args.model} is not a tinyworld backbone: make a data "
                        "folder with `python -m train data --model` and pass --data")
        from guards import CATEGORIES
        from guards.safepatch import INSTRUCTIONS

        from . import renderer

        categories, instructions, sha = list(CATEGORIES), dict(INSTRUCTIONS), None
        source = {"renderer": "tinyworld guard split"}
        for key, default in RENDERER_DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, default)

    config = SafePatchConfig.for_unet(backbone.unet, text_dim(backbone), proj_dim=args.proj_dim,
                                      categories=categories, instructions=instructions)

    gate = SafePatchGate(config)
    if data is not None:
        from .data import gate_examples

        hidden, eos, labels, _ = gate_examples(backbone, data, categories, args.gate_prompts, args.seed)
    else:
        hidden, eos, labels, _ = renderer.gate_examples(backbone, args.gate_prompts, args.seed)
    n_val = len(labels) // 10
    gate_log = fit_gate(gate, (hidden[n_val:], eos[n_val:], labels[n_val:]),
                        (hidden[:n_val], eos[:n_val], labels[:n_val]), seed=args.seed)
    if args.threshold is None:
        args.threshold = pick_threshold(gate_log)
    print(f"gate: {gate_log}, threshold {args.threshold}")
    counts = {"gate_prompts": len(labels), "gate_val_prompts": n_val}
    record = {**source, "counts": counts}

    old_training = None  # --gate-only: the patch's training record, kept

    def training(seconds: float) -> dict:
        if old_training is not None:
            return {**old_training, "gate_data": source, "gate_prompts": len(labels), "gate": gate_log,
                    "gate_seconds": round(seconds, 1)}
        return {"model": str(args.model), **source, "target": args.target, "steps": args.steps,
                "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
                "warmup": args.warmup, "seed": args.seed,
                "unsafe_triplets": counts.get("triplets", args.unsafe),
                "benign_scenes": counts.get("benign", args.benign), "gate_prompts": len(labels),
                "seconds": round(seconds, 1), "gate": gate_log}

    patch = SafePatch.from_unet(backbone.unet, config)
    config = config.replace(threshold=args.threshold, training=training(time.time() - start))
    log_path = args.out / "train_log.json"

    def on_save(module, step, log):
        seconds = round(time.time() - start, 1)
        save(module, gate, args.out, config.replace(trained_steps=step, training=training(seconds)))
        log_path.write_text(json.dumps({**record, "seconds": seconds, "gate": gate_log, "patch": log}, indent=1)
                            + "\n")

    if args.gate_only:  # keep the trained patch in --out, retrain and replace only the gate
        from guards.safepatch import load

        patch, _, old = load(args.out)
        if data is not None and (old.categories != categories or old.instructions != instructions):
            print(f"note: the data's categories {categories} / instructions differ from the patch's "
                  f"{old.categories}: the new gate's are written")
        config = old.replace(threshold=args.threshold, categories=categories, instructions=instructions)
        old_training = dict(old.training)
        patch_log = json.loads(log_path.read_text()).get("patch", []) if log_path.is_file() else []
        on_save(patch, old.trained_steps, patch_log)
        print(f"safepatch: gate retrained -> {args.out}")
        return 0

    args.cache.mkdir(parents=True, exist_ok=True)
    if data is not None:
        from .data import patch_examples

        n_unsafe = min(int(data.kept.sum()), args.unsafe if args.unsafe is not None else len(data.pairs))
        n_benign = min(len(data.benign), args.benign if args.benign is not None else len(data.benign))
        tag = "" if args.target == "aligned" else f"_{args.target}"
        cache = args.cache / f"{args.model.name}_data-{sha[:16]}_{n_unsafe}_{n_benign}_{args.seed}{tag}.pt"
        build = lambda: patch_examples(backbone, data, instructions, n_unsafe, n_benign, args.seed,  # noqa: E731
                                       args.target)
    else:
        cache = args.cache / f"{args.model.name}_{args.unsafe}_{args.benign}_{args.seed}.pt"
        build = lambda: renderer.patch_examples(backbone, args.unsafe, args.benign, args.seed)  # noqa: E731
    if cache.is_file():
        examples = torch.load(cache)
    else:
        examples = build()
        torch.save(examples, cache)
    kinds = examples["kind"]
    counts.update(triplets=int((kinds == 0).sum()), benign=int((kinds > 0).sum()),
                  benign_empty=int((kinds == 1).sum()), benign_wrong=int((kinds == 2).sum()))
    print(f"safepatch: data ready in {time.time() - start:.0f} s ({len(kinds)} patch examples: {counts})")
    if len(kinds) < args.batch_size:
        return _bad(f"{args.data or 'the renderer'} gives {len(kinds)} patch examples, fewer than --batch-size "
                    f"{args.batch_size}: pass a smaller --batch-size or make more data")

    log = fit_patch(patch, backbone.unet, backbone.pipeline.scheduler, examples, args.out, steps=args.steps,
                    batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
                    seed=args.seed, resume=args.resume, save_every=args.save_every, on_save=on_save,
                    vae_scale_factor=backbone.vae_scale_factor)
    on_save(patch, args.steps, log)
    last = log[-1] if log else {}
    print(f"safepatch: {args.steps} steps, last losses {last}, {time.time() - start:.0f} s -> {args.out}")
    return 0
