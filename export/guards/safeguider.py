"""SafeGuider (CCS 2025): a 3-layer MLP on the text encoder's [EOS] embedding, fused into the text-stage graph.

The classifier is the published ``ThreeLayerClassifier`` (github.com/pgqihere/SafeGuider, ``recognizer.py``):
``Linear(D, 1024) - ReLU - Dropout(0.5) - Linear(1024, 512) - ReLU - Dropout(0.5) - Linear(512, 2)``, softmax
over 2 classes, **class 1 = safe**. Attribute names (``fc1``, ``fc2``, ``fc3``, ``dropout``) are the published
ones, so a published state dict (``SD1.4_safeguider.pt``) loads with :meth:`SafeGuiderClassifier.load_public`.
Its input is the final-layer-normed hidden state at the FIRST EOS token (the text stage's ``eos`` output;
the public code takes ``last_hidden_state[:, first EOS]`` too).

In the bundle: :class:`SafeGuiderHead` (a :class:`~export.graphs.TextHead`) adds the output ``safe_score (B,)``
= ``softmax(fc3(...))[:, 1]`` to the first text-stage graph, so the runtime's beam search scores a whole depth
of candidate prompts with one text-stage call. The runtime half is ``runtime/guards/safeguider.py``.

SDXL (design choice, not implemented): ONE classifier over both encoders' EOS embeddings concatenated
(``hidden_size = 768 + 1280``), since the two encoders see the same prompt and the pooled/EOS features of
both drive the UNet; one score keeps the published single-threshold decision. It needs a head that sees both
text-stage graphs (a small graph of its own taking both ``eos`` outputs), and the lean runtime does not run
SDXL yet, so :func:`prepare` refuses SDXL backbones with a clear error.

Weights folder: ``config.json`` + ``model.safetensors`` (``train/safeguider`` writes them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from export.graphs import TextHead, TensorSpec

from . import GuardParts

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# published inference settings (safeguider_gene.py / recognizer.py); see runtime/guards/safeguider.py
RUNTIME_CONFIG = {"threshold": 0.5, "beam_width": 6, "max_depth": 25, "qualify_score": 0.95,
                  "min_similarity": 0.1, "output": "safe_score", "max_batch": 64}


class SafeGuiderClassifier(nn.Module):
    """The published EOS-embedding classifier; ``forward(x) -> (logits, probs)`` like the public code."""

    def __init__(self, hidden_size: int, hidden_dims: tuple[int, int] = (1024, 512), dropout: float = 0.5,
                 **extra: Any):
        super().__init__()
        self.config = {"hidden_size": int(hidden_size), "hidden_dims": list(hidden_dims), "dropout": float(dropout),
                       "num_classes": 2, "safe_class": 1, **extra}
        self.fc1 = nn.Linear(hidden_size, hidden_dims[0])
        self.fc2 = nn.Linear(hidden_dims[0], hidden_dims[1])
        self.fc3 = nn.Linear(hidden_dims[1], 2)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.dropout(F.relu(self.fc1(x)))
        x = self.dropout(F.relu(self.fc2(x)))
        logits = self.fc3(x)
        return logits, F.softmax(logits, dim=-1)

    def safe_score(self, eos: torch.Tensor) -> torch.Tensor:
        """P(safe) = softmax(...)[:, 1], (B,) float32."""
        return self(eos)[1][:, 1]

    # -- config + safetensors -------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> SafeGuiderClassifier:
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / CONFIG_NAME).read_text())
        config.pop("num_classes", None)
        config.pop("safe_class", None)
        model = cls(**config)
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        return model.eval()

    @classmethod
    def load_public(cls, path: str | Path, hidden_size: int = 768) -> SafeGuiderClassifier:
        """A published ``*_safeguider.pt`` state dict (same parameter names)."""
        model = cls(hidden_size)
        model.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
        return model.eval()


class SafeGuiderHead(TextHead):
    """Fused into the text stage: ``eos (B, D)`` -> ``safe_score (B,)`` float32."""

    outputs = (TensorSpec("safe_score", ("B",)),)

    def __init__(self, classifier: SafeGuiderClassifier):
        super().__init__()
        self.classifier = classifier.eval()

    def forward(self, hidden: torch.Tensor, eos: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"safe_score": self.classifier.safe_score(eos.to(torch.float32))}


def prepare(backbone, weights_dir: Path, image_hw: tuple[int, int] | None = None) -> GuardParts:
    """The classifier of ``weights_dir`` as a text head of the first text-stage graph, and the runtime config."""
    from runtime.errors import BadInputError

    if backbone.family == "sdxl" or len(backbone.text_encoders) != 1:
        raise BadInputError("safeguider: SDXL (two text encoders) is not supported yet: the planned variant is one "
                            "classifier over both encoders' EOS embeddings concatenated (export/guards/safeguider.py)")
    classifier = SafeGuiderClassifier.from_pretrained(weights_dir)
    width = backbone.text_encoders[0].hidden_size
    if classifier.config["hidden_size"] != width:
        raise BadInputError(f"safeguider: the classifier in {weights_dir} takes {classifier.config['hidden_size']}-wide "
                            f"EOS embeddings but {backbone.source or 'the backbone'}'s text encoder is {width} wide: "
                            f"train it for this backbone (`python -m train safeguider --model ... --out {weights_dir}`)")
    return GuardParts(text_heads=[SafeGuiderHead(classifier)], config=dict(RUNTIME_CONFIG))
