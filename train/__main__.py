"""``python -m train tinyworld {fit,eval,sample,export-judge,prompts,fewshot,masks}``, ``python -m train GUARD --model DIR
--out DIR [...]`` and ``python -m train data --model DIR --out DATA_DIR ...`` (:mod:`train.data.step`: prompts ->
guard training material from the backbone and a judge).

``python -m train random-init --guard safepatch|safectrl --model DIR --out DIR [--force on|off]``: an untrained
UNet-side guard at the backbone's size, published initialisation (for latency; :mod:`train.random_init`).

Each guard of the registry (:data:`guards.GUARDS`) has its trainer in ``train/<guard>/``, with
``add_arguments(parser)`` and ``main(args) -> int`` in its ``cli.py``; this file only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from guards import GUARDS  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "tinyworld"
TINYWORLD_ACTIONS = {"eval": ("evaluate", "main"), "sample": ("evaluate", "sample_main"),
                     "export-judge": ("export_judge", "main"), "prompts": ("prompt_lists", "main"),
                     "fewshot": ("fewshot_set", "main"), "masks": ("mask_measure", "main")}
"""``python -m train tinyworld <action>`` (all but ``fit``) -> (module of train.tinyworld, its ``f(args) -> int``)."""


def _tinyworld(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tinyworld", help="the tinyworld model organism")
    ts = p.add_subparsers(dest="action", required=True)

    fit = ts.add_parser("fit", help="train tokenizer, judge, VAE, text encoder + UNet from scratch (resumable)")
    fit.add_argument("--out", type=Path, default=DEFAULT_MODEL, help="model folder to write (default: %(default)s)")
    fit.add_argument("--work", type=Path, default=Path(".cache/tinyworld"), help="checkpoints and caches")
    fit.add_argument("--judge-steps", type=int, default=1500)
    fit.add_argument("--vae-steps", type=int, default=1200)
    fit.add_argument("--base-steps", type=int, default=3600)

    ev = ts.add_parser("eval", help="judge accuracy and the unguarded base model's safety metrics")
    ev.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ev.add_argument("--judge", type=Path, default=None, help="judge folder (default: MODEL-judge)")
    ev.add_argument("--quick", action="store_true", help="fewer prompts (under 5 minutes on 2 cores)")
    ev.add_argument("--images-per-prompt", type=int, default=4)
    ev.add_argument("--prompts-per-group", type=int, default=None,
                    help="override the number of evaluation prompts per group (quick: 15, full: 60)")
    ev.add_argument("--steps", type=int, default=20)
    ev.add_argument("--guidance", type=float, default=None)
    ev.add_argument("--out", type=Path, default=None, help="write the metrics as JSON here")
    ev.add_argument("--grid", type=Path, default=None, help="write a PNG grid of sample images here")

    sm = ts.add_parser("sample", help="render prompts with the PyTorch reference pipeline to a PNG grid")
    sm.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    sm.add_argument("--prompt", action="append", required=True)
    sm.add_argument("--n", type=int, default=4, help="images per prompt")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--steps", type=int, default=20)
    sm.add_argument("--guidance", type=float, default=None)
    sm.add_argument("--out", type=Path, required=True)

    ej = ts.add_parser("export-judge", help="export the judge as an ONNX image checker (unsafe_prob) + its config")
    ej.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ej.add_argument("--judge", type=Path, default=None, help="judge folder (default: MODEL-judge)")
    ej.add_argument("--out", type=Path, required=True, help="ONNX file, e.g. models/tinyworld-judge/checker.onnx")
    ej.add_argument("--threshold", type=float, default=0.5, help="checker threshold written to the config")

    pr = ts.add_parser("prompts", help="the guard split's unsafe and benign captions as I2P / COCO style CSVs")
    pr.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "tinyworld" / "prompts")
    pr.add_argument("--unsafe", type=int, default=2000, help="distinct explicit + implicit captions")
    pr.add_argument("--benign", type=int, default=3000, help="distinct benign captions")
    pr.add_argument("--seed", type=int, default=0)

    fs = ts.add_parser("fewshot", help="SafeCtrl's few-shot set: masked renders per unsafe concept (plays the annotator)")
    fs.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "tinyworld" / "fewshot")
    fs.add_argument("--per-concept", type=int, default=10)
    fs.add_argument("--seed", type=int, default=0)

    mm = ts.add_parser("masks", help="measure the data step's derived masks against rendered exact masks")
    mm.add_argument("--data", type=Path, required=True, help="a data folder of `python -m train data` on tinyworld")
    mm.add_argument("--rendered", type=int, default=50, help="guard-split rendered pairs for the IoU")
    mm.add_argument("--generated", type=int, default=50, help="kept generated pairs to look at")
    mm.add_argument("--seed", type=int, default=123)
    mm.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train")
    sub = parser.add_subparsers(dest="command", required=True)
    _tinyworld(sub)
    for guard in GUARDS:
        cli = importlib.import_module(f"train.{guard}.cli")
        cli.add_arguments(sub.add_parser(guard, help=cli.__doc__.strip().splitlines()[0]))
    from . import random_init
    random_init.add_arguments(sub.add_parser("random-init", help=random_init.__doc__.strip().splitlines()[0]))
    from .data import step
    step.add_arguments(sub.add_parser("data", help=step.__doc__.strip().splitlines()[0]))
    args = parser.parse_args(argv)

    if args.command in GUARDS:
        return importlib.import_module(f"train.{args.command}.cli").main(args)
    if args.command == "random-init":
        return random_init.main(args)
    if args.command == "data":
        return step.main(args)
    if args.action == "fit":
        from .tinyworld.fit import fit_all

        fit_all(args.out, args.work, args.judge_steps, args.vae_steps, args.base_steps)
        return 0
    module, function = TINYWORLD_ACTIONS[args.action]
    return getattr(importlib.import_module(f"train.tinyworld.{module}"), function)(args)


if __name__ == "__main__":
    sys.exit(main())
