"""``python -m train random-init``: untrained UNet guards at a backbone's size with the per-prompt decision pinned
(used for latency on the real SD 1.5 architecture); checked here on tinyworld in PyTorch."""

from __future__ import annotations

import pytest

from .conftest import TINYWORLD

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("force", ["on", "off"])
def test_pinned_decisions(tmp_path, force):
    from export.families import load_backbone
    from guards.safectrl import SafeCtrl
    from guards.safepatch import load
    from train.__main__ import main

    for guard in ("safepatch", "safectrl"):
        assert main(["random-init", "--guard", guard, "--force", force, "--model", str(TINYWORLD),
                     "--out", str(tmp_path / guard)]) == 0
    backbone = load_backbone(TINYWORLD)
    g = torch.Generator().manual_seed(0)
    patch, gate, _ = load(tmp_path / "safepatch")
    dim = backbone.text_encoders[0].hidden_size
    with torch.no_grad():
        probs = gate(torch.randn(3, 16, dim, generator=g), torch.randn(3, dim, generator=g))
        # the published init: every zero conv starts at zero (the patched UNet equals the base UNet)
        zero_convs = [m for n, m in patch.named_modules() if "zero" in n and isinstance(m, torch.nn.Conv2d)]
        assert zero_convs and all(float(m.weight.abs().max()) == 0.0 for m in zero_convs)
    unsafe = 1.0 - probs[:, 0]
    assert bool((unsafe > 0.99).all()) if force == "on" else bool((unsafe < 0.01).all())

    safectrl = SafeCtrl.from_pretrained(tmp_path / "safectrl", backbone.unet)
    feats = torch.randn(2, 64, int(safectrl.config.feature_dim), generator=g)
    with torch.no_grad():
        _, mask = safectrl.uab(feats)
    tau = float(safectrl.config.mask_threshold)
    assert bool((mask > 0.99).all()) if force == "on" else float(mask.max()) < tau


@pytest.mark.parametrize("force", ["on", "off"])
def test_pinned_text_and_latent_guards(tmp_path, force):
    """SafeGuider flags every prompt (on) or none (off); SafeRedir's classifier fires (on) or never (off)."""
    from export.families import load_backbone
    from guards.safeguider import SafeGuiderClassifier
    from guards.saferedir import SafeRedir
    from train.__main__ import main

    for guard in ("safeguider", "saferedir"):
        assert main(["random-init", "--guard", guard, "--force", force, "--model", str(TINYWORLD),
                     "--out", str(tmp_path / guard)]) == 0
    backbone = load_backbone(TINYWORLD)
    dim, length = backbone.text_encoders[0].hidden_size, backbone.text_encoders[0].max_length
    g = torch.Generator().manual_seed(0)
    classifier = SafeGuiderClassifier.from_pretrained(tmp_path / "safeguider")
    redir = SafeRedir.from_pretrained(tmp_path / "saferedir")
    assert classifier.config.hidden_size == dim and redir.config.hidden_size == backbone.cross_attention_dim
    with torch.no_grad():
        safe = classifier.safe_score(torch.randn(4, dim, generator=g))
        unsafe = torch.softmax(redir.classify(torch.randn(4, 4, 16, 16, generator=g), torch.tensor([500.0]),
                                              torch.randn(4, length, dim, generator=g)), dim=-1)[:, 1]
    threshold = classifier.config.threshold
    assert bool((safe < 1e-3).all()) if force == "on" else bool((safe > threshold).all())
    assert bool((unsafe > 0.99).all()) if force == "on" else bool((unsafe < 0.01).all())
