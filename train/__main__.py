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
import time
from pathlib import Path

STARTED = time.time()  # --max-minutes counts from here (imports included)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from guards import GUARDS  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "tinyworld"
DEFAULT_XL_MODEL = DEFAULT_MODEL.with_name("tinyworld-xl")
BASE_STEPS = {"sd1": 3600, "sdxl": 6000}
TINYWORLD_ACTIONS = {"eval": ("evaluate", "main"), "sample": ("evaluate", "sample_main"),
                     "export-judge": ("export_judge", "main"), "prompts": ("prompt_lists", "main"),
                     "fewshot": ("fewshot_set", "main"), "masks": ("mask_measure", "main")}
"""``python -m train tinyworld <action>`` (all but ``fit``) -> (module of train.tinyworld, its ``f(args) -> int``)."""


def _tinyworld(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tinyworld", help="the tinyworld model organism")
    ts = p.add_subparsers(dest="action", required=True)

    fit = ts.add_parser("fit", help="train tokenizer, judge, VAE, text encoder + UNet from scratch (resumable)",
                        description="sd1 (tinyworld): tokenizer, judge, VAE, text encoder + UNet. sdxl (tinyworld-xl): "
                        "the same world as a StableDiffusionXLPipeline folder (two text encoders + a text_time UNet on "
                        "tinyworld's frozen VAE; the judge is tinyworld's). Resumable: rerun the same command. "
                        "Exit codes: 0 ok, 2 usage, 3 bad input (one `error:` line).")
    fit.add_argument("--family", default="sd1", metavar="{sd1,sdxl}",
                     help="sd1: tinyworld (default); sdxl: tinyworld-xl")
    fit.add_argument("--out", type=Path, default=None,
                     help=f"model folder to write (default: {DEFAULT_MODEL} / {DEFAULT_XL_MODEL})")
    fit.add_argument("--work", type=Path, default=None,
                     help="checkpoints and caches (default: .cache/tinyworld / .cache/tinyworld-xl)")
    fit.add_argument("--judge-steps", type=int, default=1500, help="sd1 only")
    fit.add_argument("--vae-steps", type=int, default=1200, help="sd1 only")
    fit.add_argument("--steps", "--base-steps", dest="base_steps", type=int, default=None,
                     help="text encoder(s) + UNet steps (default: sd1 3600, sdxl 6000)")
    fit.add_argument("--batch", type=int, default=64, help="text encoder(s) + UNet batch (default %(default)s)")
    fit.add_argument("--scenes", type=int, default=40000, help="base-split training renders (default %(default)s)")
    fit.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    fit.add_argument("--workers", type=int, default=1, help="processes that render the scenes (default %(default)s)")
    fit.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                     help="text encoder(s) + UNet stage (and the latent encoding) on; auto: cuda when available")
    fit.add_argument("--no-resume", dest="resume", action="store_false",
                     help="restart the text encoder(s) + UNet stage from step 0 (caches are kept)")
    fit.add_argument("--max-minutes", type=float, default=None,
                     help="wall-clock budget of the whole command (sd1: its judge and VAE stages run to the end): "
                          "stop training in time to checkpoint and write the model folder from the EMA weights "
                          "reached (rerun to continue)")
    fit.add_argument("--ckpt-every", type=int, default=300, help="checkpoint every N steps (default %(default)s)")
    fit.add_argument("--vae", type=Path, default=DEFAULT_MODEL / "vae",
                     help="sdxl only: the frozen VAE (default: tinyworld's, %(default)s)")

    ev = ts.add_parser("eval", help="judge accuracy and the unguarded base model's safety metrics")
    ev.add_argument("--model", type=Path, default=None,
                    help=f"a StableDiffusionPipeline or StableDiffusionXLPipeline folder (default: {DEFAULT_MODEL}, "
                         f"with --family sdxl {DEFAULT_XL_MODEL})")
    ev.add_argument("--family", default="sd1", choices=("sd1", "sdxl"), help="picks the default --model")
    ev.add_argument("--judge", type=Path, default=None,
                    help="judge folder (default: MODEL-judge when it exists, else tinyworld's)")
    ev.add_argument("--subset", default="all", choices=("all", "dev", "test"),
                    help="evaluation prompts from the whole eval split (default), or its dev or test half")
    ev.add_argument("--quick", action="store_true", help="fewer prompts (under 5 minutes on 2 cores)")
    ev.add_argument("--images-per-prompt", type=int, default=4)
    ev.add_argument("--prompts-per-group", type=int, default=None,
                    help="override the number of evaluation prompts per group (quick: 15, full: 60)")
    ev.add_argument("--steps", type=int, default=20)
    ev.add_argument("--guidance", type=float, default=None)
    ev.add_argument("--out", type=Path, default=None, help="write the metrics as JSON here")
    ev.add_argument("--grid", type=Path, default=None, help="write a PNG grid of sample images here")

    sm = ts.add_parser("sample", help="render prompts with the PyTorch reference pipeline to a PNG grid")
    sm.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="SD or SDXL pipeline folder")
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


def _fit(args) -> int:
    from runtime.errors import BadInputError

    from .tinyworld.models import FAMILIES

    if args.family not in FAMILIES:
        raise BadInputError(f"--family {args.family}: not one of {', '.join(FAMILIES)}")
    for name in ("base_steps", "batch", "scenes", "workers", "ckpt_every", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BadInputError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if args.batch > args.scenes:
        raise BadInputError(f"--batch {args.batch} is larger than --scenes {args.scenes}")
    from .tinyworld.fit import fit_all

    xl = args.family == "sdxl"
    out = args.out or (DEFAULT_XL_MODEL if xl else DEFAULT_MODEL)
    work = args.work or Path(".cache/tinyworld-xl" if xl else ".cache/tinyworld")
    return fit_all(out, work, args.judge_steps, args.vae_steps, args.base_steps or BASE_STEPS[args.family],
                   family=args.family, batch=args.batch, n_scenes=args.scenes, threads=args.threads,
                   device=args.device, resume=args.resume, max_minutes=args.max_minutes, workers=args.workers,
                   ckpt_every=args.ckpt_every, vae_dir=args.vae, started=STARTED)


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
    from .image_checker import cli as checker_cli
    checker_cli.add_arguments(sub.add_parser("image-checker", help=checker_cli.__doc__.strip().splitlines()[0]))
    args = parser.parse_args(argv)

    if args.command in GUARDS:
        return importlib.import_module(f"train.{args.command}.cli").main(args)
    if args.command == "random-init":
        return random_init.main(args)
    if args.command == "data":
        return step.main(args)
    if args.command == "image-checker":
        return checker_cli.main(args)
    if args.action == "fit":
        from .options import run_trainer

        return run_trainer(_fit, args)
    if args.action == "eval" and args.model is None:
        args.model = DEFAULT_XL_MODEL if args.family == "sdxl" else DEFAULT_MODEL
    module, function = TINYWORLD_ACTIONS[args.action]
    return getattr(importlib.import_module(f"train.tinyworld.{module}"), function)(args)


if __name__ == "__main__":
    sys.exit(main())
