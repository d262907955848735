"""SafeGuider in the bundle: the EOS classifier (``guards/safeguider.py``) fused into the text-stage graph.

:class:`SafeGuiderHead` (a :class:`~export.graphs.TextHead`) adds the output ``safe_score (B,)`` =
``softmax(fc3(...))[:, 1]`` to the first text-stage graph, so the runtime's beam search scores a whole depth
of candidate prompts with one text-stage call. The runtime half is ``runtime/guards/safeguider.py``. Its
``mode`` is settled here (:func:`settle`): a SafeGuider-only bundle searches as published, a stack gates.

SDXL (design choice, not implemented): ONE classifier over both encoders' EOS embeddings concatenated
(``hidden_size = 768 + 1280``), since the two encoders see the same prompt and the pooled/EOS features of
both drive the UNet; one score keeps the published single-threshold decision. It needs a head that sees both
text-stage graphs (a small graph of its own taking both ``eos`` outputs), and the lean runtime does not run
SDXL yet, so :func:`prepare` refuses SDXL backbones with a clear error.
"""

from __future__ import annotations

from pathlib import Path

import torch

from export.graphs import TextHead, TensorSpec
from guards.safeguider import SafeGuiderClassifier
from runtime.errors import BadInputError

from . import GuardParts

OUTPUT = "safe_score"


class SafeGuiderHead(TextHead):
    """Fused into the text stage: ``eos (B, D)`` -> ``safe_score (B,)`` float32."""

    outputs = (TensorSpec(OUTPUT, ("B",)),)

    def __init__(self, classifier: SafeGuiderClassifier):
        super().__init__()
        self.classifier = classifier.eval()

    def forward(self, hidden: torch.Tensor, eos: torch.Tensor) -> dict[str, torch.Tensor]:
        return {OUTPUT: self.classifier.safe_score(eos.to(torch.float32))}


def prepare(backbone, weights_dir: Path, image_hw: tuple[int, int] | None = None) -> GuardParts:
    """The classifier of ``weights_dir`` as a text head of the first text-stage graph, and its manifest entry."""
    if backbone.family == "sdxl" or len(backbone.text_encoders) != 1:
        raise BadInputError("safeguider: SDXL (two text encoders) is not supported yet: the planned variant is one "
                            "classifier over both encoders' EOS embeddings concatenated (export/guards/safeguider.py)")
    classifier = SafeGuiderClassifier.from_pretrained(weights_dir)
    width = backbone.text_encoders[0].hidden_size
    if classifier.config.hidden_size != width:
        raise BadInputError(f"safeguider: the classifier in {weights_dir} takes {classifier.config.hidden_size}-wide "
                            f"EOS embeddings but {backbone.source or 'the backbone'}'s text encoder is {width} wide: "
                            f"train it for this backbone (`python -m train safeguider --model ... --out {weights_dir}`)")
    return GuardParts(text_heads=[SafeGuiderHead(classifier)], config={**classifier.config.runtime(), "output": OUTPUT})


def settle(own: GuardParts, bundle: dict[str, GuardParts]) -> None:
    """``mode: auto`` -> ``gate`` when another guard of the bundle removes on the flag (the classifier gates and
    scores, the latent / UNet guards remove on the original prompt: the scene is kept), else ``search``. A gate
    that no guard acts on would remove nothing: refused."""
    removers = any(parts.acts_on_flags for parts in bundle.values() if parts is not own)
    if own.config["mode"] == "auto":
        own.config["mode"] = "gate" if removers else "search"
    if own.config["mode"] == "gate" and not removers:
        raise BadInputError("--guard-setting safeguider.mode=gate: no guard of the bundle removes on its flag (add "
                            "saferedir or safepatch to --guards), so a flagged prompt would be generated as it is")
