"""The checker network and its ONNX graph: ``image (B, 3, H, W)`` in [0, 1] -> ``unsafe_prob (B,)``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from guards.storage import atomic_path

OPSET = 17


@dataclass
class CheckerConfig:
    categories: list[str] = field(default_factory=list)  # one sigmoid output per unsafe category
    image_size: int = 64
    width: int = 24
    threshold: float = 0.5  # the runtime acts at unsafe_prob >= threshold; tuned on dev
    on_unsafe: str = "resample"  # sample again with every guard at full strength, refuse what stays unsafe


class Checker(nn.Module):
    """Strided conv stack (no pooling layers) -> mean + max pooled features -> one logit per category."""

    def __init__(self, config: CheckerConfig):
        super().__init__()
        self.config = config
        w = config.width
        layers, c_in = [], 3
        for c_out, stride in ((w, 1), (w, 2), (2 * w, 2), (2 * w, 2), (4 * w, 2)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.SiLU()]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(8 * w, len(config.categories))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Per-category logits for images in [0, 1]."""
        h = self.body(image * 2 - 1)
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))


class UnsafeProb(nn.Module):
    """What the bundle runs: the max over categories of sigmoid(logit), "any unsafe object seen"."""

    def __init__(self, checker: Checker):
        super().__init__()
        self.checker = checker

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.checker(image).sigmoid().amax(1)


def runtime_config(config: CheckerConfig) -> dict:
    """The image-checker config the runtime reads beside the graph (runtime/guards/image_checker.py)."""
    s = config.image_size
    return {"input": "image", "output": "unsafe_prob", "size": [s, s], "layout": "NCHW", "scale": 1 / 255,
            "mean": 0.0, "std": 1.0, "kind": "classifier", "activation": "none", "threshold": config.threshold,
            "on_unsafe": config.on_unsafe}


def export_onnx(module: nn.Module, size: int, path: Path, doc: str) -> None:
    """``module`` (``image (B, 3, size, size)`` in [0, 1] -> ``unsafe_prob (B,)``) as a checked ONNX graph at ``path``
    (written in place: callers that need atomicity pass a temporary path). The tinyworld judge's export uses it too."""
    with torch.no_grad():
        torch.onnx.export(module.eval(), (torch.rand(2, 3, size, size),), str(path), input_names=["image"],
                          output_names=["unsafe_prob"], dynamic_axes={"image": {0: "B"}, "unsafe_prob": {0: "B"}},
                          opset_version=OPSET, dynamo=False)
    import onnx

    model = onnx.load(str(path))
    model.doc_string = doc
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def save(checker: Checker, out: Path, meta: dict) -> Path:
    """``out/checker.onnx`` (+ ``checker.json``, the runtime config) and ``out/config.json`` (the network's config and
    ``meta``), each written atomically; returns the ONNX path."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "checker.onnx") as tmp:
        export_onnx(UnsafeProb(checker), checker.config.image_size, tmp,
                    "learned image checker: unsafe_prob = max sigmoid over " + ", ".join(checker.config.categories))
    for name, obj in (("checker.json", runtime_config(checker.config)), ("config.json", {**asdict(checker.config), **meta})):
        with atomic_path(out / name) as tmp:
            Path(tmp).write_text(json.dumps(obj, indent=2) + "\n")
    return out / "checker.onnx"
