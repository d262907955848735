"""Train SafeCtrl (Unsafe Attention Block: mask CE + MSE; Safety Guidance Block: Diffusion-DPO).

``python -m train safectrl --model DIR --data DATA_DIR --out DIR [--resume]`` (default path: a data folder of
``python -m train data``: few-shot exact masks for the detector, judge-kept safe/unsafe image pairs for DPO) or
``--renderer`` (tinyworld only, for comparison: rendered counterfactuals with exact masks) writes
``config.json`` + ``model.safetensors`` + ``train_log.json`` into ``--out`` (checkpoints and the tensor caches
in ``--work``, default ``.cache/safectrl``, keyed by the data folder's data.json; not committed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from guards.safectrl import SafeCtrlConfig
from train.options import add_config_options, add_source_options, run_trainer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=Path("models/tinyworld"))
    add_source_options(p)
    p.add_argument("--out", type=Path, default=Path("models/guards/tinyworld/safectrl"))
    p.add_argument("--work", type=Path, default=Path(".cache/safectrl"), help="data cache and checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in WORK")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pairs", type=int, default=None,
                   help="cap on the kept pairs used (default: all; --renderer: 800 guard-split renders)")
    p.add_argument("--benign", type=int, default=None,
                   help="cap on the benign images (detector negatives; default: all, a tenth held back for the "
                        "false-coverage figure; --renderer: 600)")
    p.add_argument("--eval-pairs", type=int, default=240, help="--renderer: eval-split pairs for mask IoU")
    p.add_argument("--fewshot-draws", type=int, default=0,
                   help="noise/t draws per few-shot positive (and its mirror image); 0: so that positives are ~30%% "
                        "of the stage-1 features")
    p.add_argument("--detector-masks", choices=("fewshot", "fewshot+derived", "fewshot+refined"),
                   default="fewshot+refined",
                   help="stage-1 positives: the few-shot masks only; also every kept pair's unsafe image with its "
                        "derived difference mask; or (default, chosen on dev) with that mask cut to where a detector "
                        "trained on the few-shot set responds (--refine-share)")
    p.add_argument("--refine-share", type=float, default=0.5,
                   help="fewshot+refined: keep the derived mask's pixels where the few-shot detector reaches this "
                        "share of its peak inside the mask")
    p.add_argument("--stage2-mask", choices=("detector", "derived"), default="detector",
                   help="stage-2 blend: the trained detector's mask on the rejected image (what the runtime blends "
                        "with) or the data step's derived difference mask, area-pooled")
    p.add_argument("--stage2-target", choices=("removed", "aligned"), default="removed",
                   help="stage-2 preferred image (the data path): the unsafe image with the object inpainted away by "
                        "the backbone (default, chosen on dev; train/data/removal.py) or the data step's kept "
                        "safe-prompt image (a confuser drawn where the object was)")
    p.add_argument("--t-max", type=int, default=700, help="train on DDPM timesteps t < T_MAX (the active steps)")
    p.add_argument("--feature-draws", type=int, default=2, help="noise/t draws per sample for stage 1")
    p.add_argument("--stage1-steps", type=int, default=1500)
    p.add_argument("--stage1-batch", type=int, default=64)
    p.add_argument("--stage1-lr", type=float, default=2e-3)
    p.add_argument("--lambda-ce", type=float, default=1.0)
    p.add_argument("--lambda-mse", type=float, default=10.0)
    p.add_argument("--stage2-steps", type=int, default=1500)
    p.add_argument("--stage2-batch", type=int, default=16)
    p.add_argument("--stage2-lr", type=float, default=5e-3)
    p.add_argument("--beta", type=float, default=5000.0, help="Diffusion-DPO beta (Wallace et al.: 5000 for SD)")
    p.add_argument("--sft-weight", type=float, default=1.0,
                   help="redirect term: the rejected sample denoised towards the preferred one (0: pure DPO)")
    p.add_argument("--stage2-t-max", type=int, default=1000,
                   help="stage 2 trains on t < this (the guidance block acts from step 20%% on, t ~ 750 at 20 steps)")
    p.add_argument("--uncond-prob", type=float, default=0.0,
                   help="share of stage-2 pairs with the empty prompt (only useful with blend_uncond: true, where the "
                        "CFG unconditional row is blended too)")
    p.add_argument("--blend-layers", default=None,
                   help="the cross-attention layers with a Safety Guidance Block: 'all' or a comma list of module "
                        "prefixes (default, guards.safectrl.default_layers: up_blocks.1 on SD 1.x / 2.x, tinyworld's "
                        "two up-path layers at 1/2 resolution; SDXL: the up level mirroring the detect layer, "
                        "up_blocks.1 on real SDXL; each blended layer costs graph time on every blending step)")
    add_config_options(p, SafeCtrlConfig, {  # run-time settings, written into the config
        "start_step_fraction": "suppression from step ceil(F * steps)",
        "mask_threshold": "tau of the hard threshold",
        "mask_gain": "blend weight min(1, gain * M_bar) above tau",
        "latch_threshold": "hysteresis: pixels whose smoothed mask reached it keep blending",
        "latch_floor": "hysteresis in an image whose mask never reached --latch-threshold: pixels that reached "
                       "this keep blending (thin objects; equal to --latch-threshold: off)",
        "mask_dilate": "blend from the mask's (2r+1)^2 max filter, r latent pixels (thin objects)"})


def main(args: argparse.Namespace) -> int:
    from train.safectrl.train import run

    summary = run_trainer(run, args)
    if isinstance(summary, int):
        return summary
    print(json.dumps({"mask_eval": summary["mask_eval"], "timings": summary["timings"],
                      "last": summary["log"][-1] if summary["log"] else None}, indent=1))
    return 0
