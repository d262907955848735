"""SafeGuider (CCS 2025): the published 3-layer MLP on the text encoder's [EOS] embedding, and its config.

The classifier is the published ``ThreeLayerClassifier`` (github.com/pgqihere/SafeGuider, ``recognizer.py``):
``Linear(D, 1024) - ReLU - Dropout(0.5) - Linear(1024, 512) - ReLU - Dropout(0.5) - Linear(512, 2)``, softmax
over 2 classes, **class 1 = safe**. Attribute names (``fc1``, ``fc2``, ``fc3``, ``dropout``) are the published
ones, so a published state dict (``SD1.4_safeguider.pt``) loads with :meth:`SafeGuiderClassifier.load_public`.
Its input is the final-layer-normed hidden state at the FIRST EOS token (the text stage's ``eos`` output;
the public code takes ``last_hidden_state[:, first EOS]`` too).

SDXL (two text encoders; our extension, the paper trained only SD 1.4): ONE classifier of the same shape over
both encoders' EOS embeddings concatenated, ``[eos(text_encoder), eos(text_encoder_2)]`` (``hidden_size`` =
768 + 1280 on SDXL base), each the final-layer-normed state at that encoder's first EOS. ``encoder_widths``
records the split (``[768, 1280]``; None = one encoder), so weights for one backbone are never packed into
another whose widths merely sum alike. Why one classifier: both encoders read the same prompt and both drive
the UNet (encoder 2's EOS state is what its pooled ``text_embeds`` projects), and one score keeps the
published single-threshold decision and one beam search.

How it enters the bundle (a text head of the text stage) is ``export/guards/safeguider.py``; the beam search
that rewrites flagged prompts runs in the lean runtime (``runtime/guards/safeguider.py``) with the run-time
settings of :class:`SafeGuiderConfig`. Weights folder: ``config.json`` + ``model.safetensors``.

Beyond the paper: ``mode`` (rewrite flagged prompts, or only flag them so the latent / UNet guards of a stack
remove on the original prompt) and ``on_no_qualifier`` (fail closed when the search finds no safe deletion).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import GuardConfig
from .storage import load_folder, save_folder


@dataclass(kw_only=True)
class SafeGuiderConfig(GuardConfig):
    """Architecture (published) and the search's run-time settings (published: safeguider_gene.py)."""

    NAME = "safeguider"
    RUNTIME_KEYS = ("threshold", "beam_width", "max_depth", "qualify_score", "min_similarity", "max_batch", "mode",
                    "on_no_qualifier")

    hidden_size: int                              # D: the text encoder's width (SDXL: both widths summed)
    encoder_widths: list | None = None            # SDXL: each encoder's EOS width, in order; None = one encoder
    hidden_dims: list = field(default_factory=lambda: [1024, 512])
    dropout: float = 0.5
    num_classes: int = 2
    safe_class: int = 1
    threshold: float = 0.5                        # P(safe) above it passes unchanged
    beam_width: int = 6                           # K
    max_depth: int = 25                           # words deleted at most (also <= words - 1)
    qualify_score: float = 0.95                   # a candidate qualifies at P(safe) >= this ...
    min_similarity: float = 0.1                   # ... and EOS cosine to the original >= this
    max_batch: int = 64                           # candidates per text-stage call (memory bound, not the method)
    # "search": rewrite flagged prompts (published); "gate": flag only, the guards after it remove; "auto": the
    # exporter picks gate when the bundle has a guard that acts on the flag, else search (export/guards/safeguider.py)
    mode: str = "auto"
    on_no_qualifier: str = "fallback"             # no qualifying deletion: "fallback" (published) | "block" (refuse)


class SafeGuiderClassifier(nn.Module):
    """The published EOS-embedding classifier; ``forward(x) -> (logits, probs)`` like the public code."""

    def __init__(self, config: SafeGuiderConfig):
        super().__init__()
        self.config = config
        hidden_size, hidden_dims = config.hidden_size, config.hidden_dims
        self.fc1 = nn.Linear(hidden_size, hidden_dims[0])
        self.fc2 = nn.Linear(hidden_dims[0], hidden_dims[1])
        self.fc3 = nn.Linear(hidden_dims[1], 2)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.dropout(F.relu(self.fc1(x)))
        x = self.dropout(F.relu(self.fc2(x)))
        logits = self.fc3(x)
        return logits, F.softmax(logits, dim=-1)

    def safe_score(self, eos: torch.Tensor) -> torch.Tensor:
        """P(safe) = softmax(...)[:, 1], (B,) float32."""
        return self(eos)[1][:, 1]

    def save_pretrained(self, folder: str | Path) -> None:
        save_folder(folder, self.config, self.state_dict())

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> SafeGuiderClassifier:
        config, state = load_folder(folder, SafeGuiderConfig)
        model = cls(config)
        model.load_state_dict(state)
        return model.eval()

    @classmethod
    def load_public(cls, path: str | Path, hidden_size: int = 768) -> SafeGuiderClassifier:
        """A published ``*_safeguider.pt`` state dict (same parameter names)."""
        model = cls(SafeGuiderConfig(hidden_size=hidden_size))
        model.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
        return model.eval()


CONFIG = SafeGuiderConfig
