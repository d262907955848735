"""Train the SafeGuider EOS-embedding classifier (published recipe) for a backbone.

    python -m train safeguider --model models/tinyworld --out models/guards/tinyworld/safeguider
    python -m train safeguider --model /models/sd15 --csv prompts.csv --out models/guards/sd15/safeguider
    python -m train safeguider --model /models/sdxl --csv prompts.csv --out models/guards/sdxl/safeguider  # both EOS
    python -m train safeguider --model models/tinyworld-xl --mine-rounds 2 --mine-judge tinyworld --out DIR  # mining.py
    accelerate launch --num_processes 2 --cpu -m train safeguider --model ... --out ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from guards.safeguider import SafeGuiderConfig
from train.options import add_config_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="backbone (diffusers folder or single file)")
    p.add_argument("--out", type=Path, required=True, help="writes config.json, model.safetensors, train_log.json")
    p.add_argument("--csv", type=Path, help="prompt,label CSV (0 unsafe / 1 safe); default: tinyworld guard split")
    p.add_argument("--i2p", type=Path, help="I2P CSV (unsafe source; with --coco, instead of --csv)")
    p.add_argument("--coco", type=Path, help="COCO-30k prompts CSV (benign source; with --i2p)")
    p.add_argument("--prompts", type=int, default=12000, help="tinyworld: distinct guard-split prompts (default %(default)s)")
    p.add_argument("--deletions", type=int, default=3,
                   help="tinyworld: word-deleted variants per training caption, labelled by what is left (default "
                        "%(default)s; 0 = only full captions)")
    p.add_argument("--noun-deletions", type=int, default=0,
                   help="tinyworld: more deletion variants per unsafe training caption, each without part of every "
                        "unsafe phrase (its noun, or a place's 'at the') and 0-2 other words: labelled unsafe, the "
                        "search's dangling ends (default %(default)s)")
    p.add_argument("--adversarial", type=int, default=0,
                   help="tinyworld: attack-style variants per unsafe training caption (misspellings, splits, "
                        "fragments, reorders, inserted words; train/safeguider/adversarial.py; default %(default)s = "
                        "none)")
    p.add_argument("--mine-rounds", type=int, default=0,
                   help="rounds of hard negatives found by the search itself (train, search unsafe training captions, "
                        "add the prompts it settles on, labelled by --mine-judge or tinyworld's phrase rule, train "
                        "again; train/safeguider/mining.py; default %(default)s)")
    p.add_argument("--mine-prompts", type=int, default=2000,
                   help="unsafe training captions searched per mining round (default %(default)s)")
    p.add_argument("--mine-judge", default=None,
                   help="label what the search settles on by the backbone's images and this judge (tinyworld, "
                        "nudenet or an ONNX image classifier, as `train data --judge`); any prompt source. Default: "
                        "tinyworld's unsafe-phrase rule")
    p.add_argument("--mine-images", type=int, default=2,
                   help="--mine-judge: images per mined prompt; unsafe when the judge finds any (default %(default)s)")
    add_config_options(p, SafeGuiderConfig, {
        "min_similarity": "the search's EOS-cosine floor (the paper's, set on CLIP): mining searches with it and "
                          "config.json records it, so the bundle runs the search the classifier was mined on"})
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out validation share (default %(default)s)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")


def augment(captions: list, val_rows: list, args, backbone) -> tuple[list, int, int, dict]:
    """tinyworld: the training captions with their word-deletion and attack-style variants (none of them a
    validation caption); the counts of each, and the held-out sets to check at the end (``val_adversarial``)."""
    from .adversarial import adversarial_variants
    from .data import deletion_variants

    val_words = {p for p, _ in val_rows}
    deleted = deletion_variants(captions, args.deletions, args.seed, noun_deletions=args.noun_deletions
                                ) if args.deletions > 0 else []
    deleted = [r for r in deleted if r[0] not in val_words]
    rows, checks, attacked = captions + deleted, {}, []
    if args.adversarial > 0:
        vocab = list(backbone.pipeline.tokenizer.get_vocab())
        seen = {p for p, _ in rows} | val_words
        attacked = [r for r in adversarial_variants(captions, args.adversarial, args.seed, vocab=vocab)
                    if r[0] not in seen]
        # the held-out captions' own variants: how the classifier reads attack-style edits it never saw
        checks["val_adversarial"] = adversarial_variants(val_rows, args.adversarial, args.seed + 1, vocab=vocab)
    return rows + attacked, len(deleted), len(attacked), checks


def main(args) -> int:
    import torch

    from export.families import BackboneError, load_backbone
    from train.loop import seed_everything, setup

    from .data import csv_prompts, encoder_widths, eos_embeddings, i2p_coco_prompts, split, tinyworld_prompts
    from .train import fit

    accelerator = setup(args.seed, threads=1)
    try:
        backbone = load_backbone(args.model)
    except BackboneError as e:
        print(f"error: {e}")
        return 2
    if args.csv:
        rows, source = csv_prompts(args.csv), str(args.csv)
    elif args.i2p or args.coco:
        if not (args.i2p and args.coco):
            print("error: --i2p and --coco go together (unsafe and benign sources)")
            return 2
        rows, source = i2p_coco_prompts(args.i2p, args.coco, seed=args.seed), f"{args.i2p} + {args.coco}"
    else:
        rows, source = tinyworld_prompts(args.prompts, args.seed), "tinyworld guard split"
    if args.mine_images < 1:
        print(f"error: --mine-images {args.mine_images} must be at least 1 (images the judge reads per mined prompt)")
        return 2
    if args.mine_rounds > 0 and source != "tinyworld guard split" and args.mine_judge is None:
        print("error: --mine-rounds with --csv / --i2p needs --mine-judge (tinyworld's unsafe-phrase rule labels "
              "only its own captions): add --mine-judge nudenet or --mine-judge FILE.onnx")
        return 2
    judge, guidance = None, 5.0  # guidance: the judged images' CFG scale, the build profile's
    if args.mine_rounds > 0 and args.mine_judge is not None:
        from export.tensorrt import select_build_profile
        from runtime.errors import RuntimeToolError
        from train.data.judge import open_judge

        try:
            judge = open_judge(args.mine_judge)
        except RuntimeToolError as e:
            print(f"error: --mine-judge: {e}")
            return int(e.exit_code)
        guidance = float(select_build_profile(backbone)["defaults"]["guidance_scale"])
    captions, val_rows = split(rows, args.val_fraction, args.seed)
    train_rows, augmented, adversarial, checks = list(captions), 0, 0, {}
    if source == "tinyworld guard split":
        train_rows, augmented, adversarial, checks = augment(captions, val_rows, args, backbone)

    def tensors(rs):
        x = eos_embeddings(backbone, [p for p, _ in rs])
        return x, torch.tensor([label for _, label in rs], dtype=torch.long)

    (tx, ty), (vx, vy) = tensors(train_rows), tensors(val_rows)
    search = {"min_similarity": args.min_similarity}
    train_kwargs = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                        seed=args.seed, encoder_widths=encoder_widths(backbone), search=search)
    mined = []
    if args.mine_rounds > 0:
        from .adversarial import allowed as guard_split_only
        from .mining import mine_rounds

        def fit_round(folder, x, y, k):
            seed_everything(args.seed)  # every fit starts from the same seed, as a fresh run would
            fit(accelerator, x, y, vx, vy, folder, resume=True, meta={"mine_round": k, "train_prompts": len(y)},
                **train_kwargs)

        (tx, ty), mined = mine_rounds(args.mine_rounds, args.out / "mining", fit_round, tensors, (tx, ty), backbone,
                                      captions, {p for p, _ in train_rows} | {p for p, _ in val_rows},
                                      prompts=args.mine_prompts, seed=args.seed, judge=judge,
                                      images=args.mine_images, guidance=guidance,
                                      **({"allowed": guard_split_only} if source == "tinyworld guard split" else {}))
        seed_everything(args.seed)
    meta = {"model": str(args.model), "source": source,
            "prompts": len(rows), "train_prompts": len(train_rows) + len(mined), "val_prompts": len(val_rows),
            "unsafe_prompts": sum(1 for _, label in rows if label == 0), "seed": args.seed,
            "deletion_variants": augmented, "deletions": args.deletions, "noun_deletions": args.noun_deletions,
            "adversarial_variants": adversarial, "mined_variants": len(mined),
            "mined_unsafe": sum(1 for _, label in mined if label == 0), "mine_rounds": args.mine_rounds,
            "mine_label": ({k: judge.describe()[k] for k in ("spec", "sha256", "threshold")} if judge is not None
                           else "unsafe-phrase rule") if mined else None, "mine_images": args.mine_images if judge else None}
    log = fit(accelerator, tx, ty, vx, vy, args.out, resume=args.resume, meta=meta,
              checks={name: tensors(rs) for name, rs in checks.items()}, **train_kwargs)
    if args.mine_rounds > 0:
        import shutil

        shutil.rmtree(args.out / "mining", ignore_errors=True)
    print(f"safeguider: train acc {log['train'].get('accuracy', 0):.4f}, val acc {log['val'].get('accuracy', 0):.4f} "
          f"({len(val_rows)} held-out prompts)" + "".join(f", {name} acc {log[name].get('accuracy', 0):.4f}"
                                                          for name in checks) + f" -> {args.out}")
    return 0
