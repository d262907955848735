"""SafeGuider in the bundle: the EOS classifier (``guards/safeguider.py``) fused into the text-stage graph.

:class:`SafeGuiderHead` (a :class:`~export.graphs.TextHead`) adds the output ``safe_score (B,)`` =
``softmax(fc3(...))[:, 1]`` to the first text-stage graph, so the runtime's beam search scores a whole depth
of candidate prompts with one text-stage call. The runtime half is ``runtime/guards/safeguider.py``. Its
``mode`` is settled here (:func:`settle`): a SafeGuider-only bundle searches as published, a stack gates.

SDXL (two text encoders): ONE classifier over both encoders' EOS embeddings concatenated (``hidden_size =
768 + 1280`` on SDXL base, ``guards/safeguider.py`` says why). Neither text-stage graph sees both EOS states, so
the classifier is a small graph of its own, ``safeguider`` (kind ``guard``): ``eos (B, D1)``, ``eos_2 (B, D2)``
-> ``safe_score (B,)``, concatenating inside. The text-stage graphs stay the plain backbone's (no extra input
wiring one stage into the other, nothing in the pipeline changes), and the search stays batched: one depth =
one call of each text stage on all candidates + one call of this graph. Manifest entry: the SD 1.x keys plus
``graph`` (``safeguider``) and ``inputs`` (``["eos", "eos_2"]``: the ``ctx.text`` keys fed to it, named as the
graph inputs). SD 1.x bundles are unchanged (head fused into the text stage, no ``graph``/``inputs`` keys).

:func:`prepare` refuses weights whose EOS width (or per-encoder split) is not the backbone's, in one line.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from export.graphs import TextHead, TensorSpec
from guards.safeguider import SafeGuiderClassifier
from runtime.errors import BadInputError

from . import GuardParts

OUTPUT = "safe_score"
GRAPH = "safeguider"  # SDXL: the classifier's own graph


class SafeGuiderHead(TextHead):
    """Fused into the text stage: ``eos (B, D)`` -> ``safe_score (B,)`` float32."""

    outputs = (TensorSpec(OUTPUT, ("B",)),)

    def __init__(self, classifier: SafeGuiderClassifier):
        super().__init__()
        self.classifier = classifier.eval()

    def forward(self, hidden: torch.Tensor, eos: torch.Tensor) -> dict[str, torch.Tensor]:
        return {OUTPUT: self.classifier.safe_score(eos.to(torch.float32))}


class SafeGuiderGraph(nn.Module):
    """SDXL: ``(eos, eos_2)`` -> ``safe_score`` = the classifier on their concatenation, float32."""

    def __init__(self, classifier: SafeGuiderClassifier):
        super().__init__()
        self.classifier = classifier.eval()

    def forward(self, *eos: torch.Tensor) -> torch.Tensor:
        return self.classifier.safe_score(torch.cat([e.to(torch.float32) for e in eos], dim=-1))


def eos_names(backbone) -> list[str]:
    """The ``ctx.text`` keys of each text stage's ``eos`` (the pipeline's suffixes: ``eos``, ``eos_2``, ...)."""
    return ["eos" if i == 0 else f"eos_{i + 1}" for i in range(len(backbone.text_encoders))]


def export_classifier(backbone, classifier: SafeGuiderClassifier, out_path: str | Path, *, batch: int = 2,
                      exporter: str | None = None, opset: int | None = None, progress=None) -> dict:
    """The ``safeguider`` graph (SDXL): one ``eos*`` input per text encoder -> ``safe_score (B,)``."""
    from export.graphs import DEFAULT_EXPORTER, OPSET, _export_graph

    widths = [spec.hidden_size for spec in backbone.text_encoders]
    inputs = tuple(TensorSpec(name, ("B", w)) for name, w in zip(eos_names(backbone), widths))
    g = torch.Generator().manual_seed(0)
    args = tuple(torch.randn(batch, w, generator=g) for w in widths)
    metadata = {"graph": GRAPH, "guard": "safeguider", "fp16": "allowed"}
    return _export_graph(backbone, GRAPH, SafeGuiderGraph(classifier), args, inputs, (TensorSpec(OUTPUT, ("B",)),),
                         out_path, sizes={"B": batch}, exporter=exporter or DEFAULT_EXPORTER, opset=opset or OPSET,
                         metadata=metadata, progress=progress)


def check_widths(classifier: SafeGuiderClassifier, backbone, weights_dir: Path) -> None:
    """One-line BadInputError when the classifier was trained on EOS embeddings of another width or split."""
    c = classifier.config
    widths = [spec.hidden_size for spec in backbone.text_encoders]
    trained = list(c.encoder_widths) if c.encoder_widths else [c.hidden_size]
    if c.hidden_size == sum(widths) and trained == widths:
        return
    split = lambda ws: f" ({' + '.join(map(str, ws))})" if len(ws) > 1 else ""  # noqa: E731
    raise BadInputError(f"--guards safeguider: the classifier in {weights_dir} takes hidden size {c.hidden_size}"
                        f"{split(trained)} (EOS embeddings of {len(trained)} text encoder(s)) but the "
                        f"{backbone.family} backbone{' ' + backbone.source if backbone.source else ''} gives {sum(widths)}{split(widths)}: train "
                        f"it for this backbone (`python -m train safeguider --model ... --out {weights_dir}`)")


def prepare(backbone, weights_dir: Path, image_hw: tuple[int, int] | None = None) -> GuardParts:
    """The classifier of ``weights_dir``, and its manifest entry: a text head of the first text-stage graph (one
    text encoder), or its own ``safeguider`` graph over every encoder's ``eos`` (SDXL)."""
    classifier = SafeGuiderClassifier.from_pretrained(weights_dir)
    check_widths(classifier, backbone, weights_dir)
    config = {**classifier.config.runtime(), "output": OUTPUT}
    if len(backbone.text_encoders) == 1:
        return GuardParts(text_heads=[SafeGuiderHead(classifier)], config=config)

    def graph(out_dir: Path, common: dict) -> dict:
        return export_classifier(backbone, classifier, Path(out_dir) / f"{GRAPH}.onnx",
                                 exporter=common.get("exporter"), opset=common.get("opset"),
                                 progress=common.get("progress"))

    return GuardParts(graphs=[graph], config={**config, "graph": GRAPH, "inputs": eos_names(backbone)})


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
