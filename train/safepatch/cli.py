"""Train SafePatch (instruction-aware UNet encoder patch + prompt gate) for a backbone.

    python -m train safepatch --model models/tinyworld --out models/guards/tinyworld/safepatch
    python -m train safepatch --model models/tinyworld --out DIR --steps 700 --resume
    accelerate launch --num_processes 2 --cpu -m train safepatch --model ... --out ...

Writes ``config.json`` + ``model.safetensors`` (see :mod:`guards.safepatch`), ``train_log.json`` and
``checkpoint.pt`` (for ``--resume``). VAE latents and text embeddings of the patch examples
are cached under ``--cache`` (default ``.cache/safepatch``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from guards.safepatch import SafePatchConfig
from train.options import add_config_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="backbone (diffusers folder)")
    p.add_argument("--out", type=Path, required=True, help="writes config.json, model.safetensors, train_log.json")
    p.add_argument("--cache", type=Path, default=Path(".cache/safepatch"), help="cached latents/embeddings")
    p.add_argument("--unsafe", type=int, default=2000, help="guard-split counterfactual triplets")
    p.add_argument("--benign", type=int, default=1200, help="guard-split benign scenes (half empty, half wrong instruction)")
    p.add_argument("--gate-prompts", type=int, default=4000, help="distinct guard-split prompts for the gate")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--warmup", type=int, default=50)
    add_config_options(p, SafePatchConfig, {"proj_dim": "instruction projection width"})
    p.add_argument("--threshold", type=float, default=None,
                   help="gate: run the patch when 1 - p(none) >= this (default: calibrated on held-back "
                        "guard-split prompts, train.pick_threshold)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--gate-only", action="store_true", help="retrain only the gate; keep the patch in --out")


def main(args) -> int:
    import torch

    from export.families import BackboneError, load_backbone
    from guards.safepatch import SafePatch, SafePatchGate, save
    from train.loop import setup

    from .data import gate_examples, patch_examples
    from .train import fit_gate, fit_patch, pick_threshold

    setup(args.seed, threads=1)
    start = time.time()
    try:
        backbone = load_backbone(args.model)
    except BackboneError as e:
        print(f"error: {e}")
        return 2
    config = SafePatchConfig.for_unet(backbone.unet, backbone.text_encoders[0].hidden_size, proj_dim=args.proj_dim)

    gate = SafePatchGate(config)
    hidden, eos, labels, _ = gate_examples(backbone, args.gate_prompts, args.seed)
    n_val = len(labels) // 10
    gate_log = fit_gate(gate, (hidden[n_val:], eos[n_val:], labels[n_val:]),
                        (hidden[:n_val], eos[:n_val], labels[:n_val]), seed=args.seed)
    if args.threshold is None:
        args.threshold = pick_threshold(gate_log)
    print(f"gate: {gate_log}, threshold {args.threshold}")

    patch = SafePatch.from_unet(backbone.unet, config)
    config = config.replace(threshold=args.threshold, training={
        "model": str(args.model), "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "weight_decay": args.weight_decay, "warmup": args.warmup, "seed": args.seed,
        "unsafe_triplets": args.unsafe, "benign_scenes": args.benign, "gate": gate_log})
    log_path = args.out / "train_log.json"

    def on_save(module, step, log):
        save(module, gate, args.out, config.replace(trained_steps=step))
        log_path.write_text(json.dumps({"gate": gate_log, "patch": log}, indent=1) + "\n")

    if args.gate_only:  # keep the trained patch in --out, retrain and replace only the gate
        from guards.safepatch import load

        patch, _, old = load(args.out)
        config = old.replace(threshold=args.threshold, training={**old.training, "gate": gate_log})
        patch_log = json.loads(log_path.read_text()).get("patch", []) if log_path.is_file() else []
        on_save(patch, old.trained_steps, patch_log)
        print(f"safepatch: gate retrained -> {args.out}")
        return 0

    args.cache.mkdir(parents=True, exist_ok=True)
    cache = args.cache / f"{args.model.name}_{args.unsafe}_{args.benign}_{args.seed}.pt"
    if cache.is_file():
        data = torch.load(cache)
    else:
        data = patch_examples(backbone, args.unsafe, args.benign, args.seed)
        torch.save(data, cache)
    print(f"safepatch: data ready in {time.time() - start:.0f} s ({len(data['kind'])} patch examples)")

    log = fit_patch(patch, backbone.unet, backbone.pipeline.scheduler, data, args.out, steps=args.steps,
                    batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
                    seed=args.seed, resume=args.resume, save_every=args.save_every, on_save=on_save)
    on_save(patch, args.steps, log)
    last = log[-1] if log else {}
    print(f"safepatch: {args.steps} steps, last losses {last}, {time.time() - start:.0f} s -> {args.out}")
    return 0
