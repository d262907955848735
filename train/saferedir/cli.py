"""Train SafeRedir (latent-aware classifier + token-level delta generator) for a backbone.

    python -m train saferedir --model models/tinyworld --data .cache/data/tinyworld --out DIR [--resume]
    python -m train saferedir --model models/tinyworld --renderer --out DIR   # tinyworld's renderer (comparison)
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m train saferedir ...   # same loop, 2 CPU processes (gloo)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from guards.saferedir import SafeRedirConfig
from train.options import add_config_options, add_source_options, run_trainer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="backbone folder (diffusers layout)")
    p.add_argument("--out", type=Path, required=True, help="write config.json + model.safetensors + train_log.json")
    add_source_options(p)
    p.add_argument("--cache", type=Path, default=Path(".cache/saferedir"), help="cached data and checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from <cache>/stage1.pt, stage2.pt")
    p.add_argument("--prompts", type=int, default=None,
                   help="at most N trajectories per class (default: all of --data; --renderer: 150)")
    p.add_argument("--pairs", type=int, default=None,
                   help="at most N kept pairs for the redirect (default: all of --data; --renderer: 384)")
    p.add_argument("--cls-steps", type=int, default=600)
    p.add_argument("--gen-steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=128, help="classifier batch")
    p.add_argument("--gen-batch", type=int, default=16, help="delta-generator batch (unsafe; same benign)")
    p.add_argument("--cls-lr", type=float, default=1e-3)
    p.add_argument("--gen-lr", type=float, default=2e-3)
    p.add_argument("--text-prompts", type=int, default=1500,
                   help="stage 1: prompts per class of the whole lists seen with step-0 noise (a quarter of each batch)")
    p.add_argument("--prompt-dropout", type=float, default=0.3,
                   help="stage 1: share of samples whose prompt is replaced by the empty prompt (latent-only)")
    p.add_argument("--adversarial", type=int, default=0,
                   help="stage 2 (tinyworld): N attack-style variants (misspellings, splits, fragments, inserted or moved "
                        "words; train/saferedir/adversarial.py) of each pair's unsafe prompt, redirected toward the pair's "
                        "safe image; default %(default)s = off")
    p.add_argument("--adversarial-share", type=float, default=0.5,
                   help="stage 2: share of the unsafe rows given as one of their pair's variants (default %(default)s)")
    add_config_options(p, SafeRedirConfig, {
        "alpha": "redirection strength",
        "check_every": "runtime: check the latent every N steps",
        "first_check": "runtime: first step checked",
        "threshold": "runtime: unsafe probability that triggers"})
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")


def main(args) -> int:
    from .train import fit

    if args.renderer:
        from .renderer import RendererSource as source
    else:
        from .data import DataSource as source
    metrics = run_trainer(lambda a: fit(a, source), args)
    if isinstance(metrics, int):
        return metrics
    print({k: v for k, v in metrics.items() if k != "val_acc_per_step"})
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m train.saferedir.cli")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
