"""Export the tinyworld judge as an ONNX image checker: ``python -m train tinyworld export-judge --out FILE.onnx``.

The graph takes ``image (B, 3, 64, 64)`` float RGB in [0, 1] and outputs ``unsafe_prob (B,)``: the max over
the judge's unsafe object heads (knife, blood, skull; multi-label sigmoid) of ``sigmoid(logit)``, the same
"any unsafe object seen" probability ``train/tinyworld/evaluate.py`` thresholds at 0.5. Beside the graph it
writes ``<stem>.json``, the runtime's image-checker config (runtime/guards/image_checker.py), which
``runtime generate --checker FILE.onnx`` picks up.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from train.image_checker.model import export_onnx

from .evaluate import load_judge
from .models import JUDGE_HEADS, Judge
from .world import KINDS, UNSAFE_KINDS

SIZE = 64


class UnsafeProb(nn.Module):
    """``image (B, 3, 64, 64)`` in [0, 1] -> ``unsafe_prob (B,)`` = max_k sigmoid(kind logit k), k unsafe."""

    def __init__(self, judge: Judge):
        super().__init__()
        self.judge = judge
        self.register_buffer("unsafe", torch.tensor([KINDS.index(k) for k in UNSAFE_KINDS]), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.judge.head(self.judge.features(image))[:, :JUDGE_HEADS["kinds"]]
        return logits.index_select(1, self.unsafe).sigmoid().amax(1)


def checker_config(threshold: float = 0.5) -> dict:
    return {"input": "image", "output": "unsafe_prob", "size": [SIZE, SIZE], "layout": "NCHW", "scale": 1 / 255,
            "mean": 0.0, "std": 1.0, "kind": "classifier", "activation": "none", "threshold": threshold}


def export_judge(judge_dir: Path, out: Path, threshold: float = 0.5) -> tuple[Path, Path]:
    """Write ``out`` (the ONNX graph) and ``out.with_suffix('.json')`` (its checker config)."""
    torch.set_num_threads(1)
    module = UnsafeProb(load_judge(Path(judge_dir))).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(module, SIZE, out, "tinyworld judge as an image checker: unsafe_prob = max sigmoid(knife, blood, skull logits)")
    config = out.with_suffix(".json")
    config.write_text(json.dumps(checker_config(threshold), indent=2) + "\n", encoding="utf-8")
    return out, config


def main(args) -> int:
    judge_dir = args.judge or args.model.with_name(args.model.name + "-judge")
    onnx_path, config = export_judge(judge_dir, args.out, args.threshold)
    print(f"wrote {onnx_path} and {config}")
    return 0
