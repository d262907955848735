"""Train a post-hoc image checker from a data folder (prompt-only; issue 20).

    python -m train image-checker --data .cache/data/tinyworld --out models/checkers/tinyworld

Writes ``checker.onnx`` + ``checker.json`` (``python -m export build --checker OUT/checker.onnx``) and ``config.json``
(the network, the training figures). Bad input (not a finished data folder): ``error: <message>`` on one line, exit 3.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .model import CheckerConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, nargs="+", required=True, metavar="DATA_DIR",
                   help="one or more folders of `python -m train data` with the same categories (one model family's "
                        "folder, or several backbones' drawing the same concepts)")
    p.add_argument("--out", type=Path, required=True, help="writes checker.onnx, checker.json, config.json")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--blend-share", type=float, default=0.25,
                   help="share of each batch that is a kept pair blended inside its mask (default %(default)s)")
    p.add_argument("--width", type=int, default=CheckerConfig.width, help="conv width (default %(default)s)")
    p.add_argument("--threshold", type=float, default=CheckerConfig.threshold,
                   help="written to checker.json: the runtime acts at unsafe_prob >= this (default %(default)s; tune on dev)")
    p.add_argument("--on-unsafe", choices=("block", "resample"), default=CheckerConfig.on_unsafe,
                   help="written to checker.json: what the runtime does with an image read unsafe (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default %(default)s)")


def main(args) -> int:
    from runtime.errors import BadInputError
    from train.data.load import load_data
    from train.loop import seed_everything
    from train.options import run_trainer

    from .data import categories
    from .model import save
    from .train import fit

    def run(args) -> int:
        if not 0 <= args.blend_share < 1:
            raise BadInputError(f"--blend-share {args.blend_share}: must be in [0, 1)")
        seed_everything(args.seed, args.threads)
        start = time.time()
        datas = [load_data(d) for d in args.data]
        for d in datas[1:]:
            if categories(d) != categories(datas[0]) or d.image_size != datas[0].image_size:
                raise BadInputError(f"--data {d.folder}: categories {categories(d)} at {d.image_size} px, but "
                                    f"{datas[0].folder} has {categories(datas[0])} at {datas[0].image_size} px; "
                                    "pass folders of the same concepts and image size")
        h, w = datas[0].image_size
        config = CheckerConfig(categories=categories(datas[0]), image_size=h, width=args.width, threshold=args.threshold,
                               on_unsafe=args.on_unsafe)
        checker, metrics = fit(datas, config, args.steps, args.batch_size, args.lr, args.blend_share, args.seed)
        metrics["seconds"] = round(time.time() - start, 1)
        one = len(datas) == 1  # a single folder keeps its config.json as before
        path = save(checker, args.out, {"data": str(args.data[0]) if one else [str(d) for d in args.data],
                                        "data_sha256": datas[0].sha256 if one else [d.sha256 for d in datas],
                                        "steps": args.steps, "blend_share": args.blend_share, "seed": args.seed,
                                        "metrics": metrics})
        print(f"image checker: {path} (val recall {metrics['val_recall@0.5']}, false positives "
              f"{metrics['val_false_positive@0.5']}, {metrics['seconds']} s)")
        return 0

    return run_trainer(run, args)
