"""Write an untrained guard sized from a backbone, with the published initialisation (for latency).

    python -m train random-init --guard safepatch --model .cache/sd15-architecture \\
        --out .cache/sd15-guards/safepatch_on/sd15-architecture/safepatch --force on

Writes ``config.json`` + ``model.safetensors`` in the layout the guard's ``guards.<guard>.load`` /
``from_pretrained`` reads, so ``python -m export build --guards <guard> --guard-dir ROOT`` builds a bundle of
real size without any training (e.g. the real SD 1.5 architecture with random weights, ``make
bench-sd15-guards``). Initialisation as published:

- **safepatch**: ``SafePatch.from_unet``: the UNet encoder (conv_in, time embedding, down blocks, mid block)
  cloned, zero-initialised 1x1 convolutions on every residual, instruction projection with a zero output
  conv (the patched UNet equals the base UNet); gate head ``SafePatchGate`` default-initialised.
- **safectrl**: ``SafeCtrl.for_unet``: a Safety Guidance processor on every ``attn2`` with ``W_K'``, ``W_V'``
  copied from the layer's ``W_K``, ``W_V``; the Unsafe Attention Block default-initialised, its
  ``feature_dim`` (attn2 input channels + attention output channels at ``detect_layer``) read from the UNet
  (``detect_layer``: ``guards.safectrl.default_layers``, the config's where the UNet has it, else its first attn2).
- **safeguider**: the published 3-layer MLP on the text encoder's EOS embedding, default-initialised.
- **saferedir**: ``SafeRedir.for_backbone`` (classifier + delta generator sized from the text width, prompt length
  and latent channels), default-initialised.

SDXL backbones work the same way: SafePatch's clone takes the UNet's ``text_time`` embedding and reads text
``cross_attention_dim`` wide (both encoders side by side, ``guards.safepatch.text_dim``); SafeCtrl sits on SDXL's
attn2 layers (every one of them here; the trainer's default blends only the mirror up level); SafeGuider reads
both encoders' EOS concatenated; SafeRedir gets its pooled head.

``--force`` (measurement only): with a random text encoder, whether the gate fires or the mask passes its
threshold would be arbitrary per prompt, so it can be pinned. Graph shapes and operations are unchanged;
only the outputs of the deciding layer are:

- ``on``: SafePatch's gate output layer gets weight 0 and bias ``(-8, +8, -8, -8)`` over ``(none, weapon,
  gore, shocking)``: ``1 - p(none) ~ 1`` for every prompt, so the runtime runs the patch graph every step
  with the "weapon" instruction. SafeCtrl's detector gets a constant query (``to_q`` weight 0) aligned with
  every unsafe token and opposed to the "safe" token (``to_k`` = identity): ``A_cross[safe] ~ 2e-8``, so
  ``M = A_self @ (1 - A_cross[safe]) ~ 1`` at every pixel, above ``mask_threshold``: the blend is on at
  every active step.
  SafeGuider's output layer gets weight 0 and bias ``(+8, -8)`` over ``(unsafe, safe)``: ``P(safe) ~ 1e-7``,
  every prompt is flagged (a search finds no qualifying deletion; a gate flags). SafeRedir's classifier output
  layer gets weight 0 and bias ``(-8, +8)`` over ``(safe, unsafe)``: it fires at its first check.
- ``off``: the opposite signs: the gate never fires (``p(none) ~ 1``; zero residuals, no patch graph call),
  the mask is ~7e-7 everywhere, below ``mask_threshold``: blend weight exactly 0; SafeGuider passes every prompt
  unchanged, SafeRedir never fires.
"""

from __future__ import annotations

import argparse
from pathlib import Path

GUARDS = ("safeguider", "saferedir", "safepatch", "safectrl")
LOGIT = 8.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guard", choices=GUARDS, required=True)
    p.add_argument("--model", type=Path, required=True, help="backbone (diffusers folder) the guard is sized from")
    p.add_argument("--out", type=Path, required=True, help="writes config.json + model.safetensors here")
    p.add_argument("--force", choices=("on", "off"), default=None,
                   help="pin the per-prompt decision: flagged / fires / mask above threshold (on) or never (off)")
    p.add_argument("--seed", type=int, default=0)


def _force_gate(gate, on: bool) -> None:
    _force_logits(gate.out[-1], 1 if on else 0)   # (none, weapon, ...): "weapon" or "none"


def _force_logits(layer, hot: int) -> None:
    """A constant output: weight 0, bias +LOGIT at index ``hot`` and -LOGIT elsewhere."""
    import torch

    bias = torch.full_like(layer.bias, -LOGIT)
    bias[hot] = LOGIT
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(bias)


def _force_mask(uab, on: bool) -> None:
    import torch

    sign = 1.0 if on else -1.0
    with torch.no_grad():
        uab.to_q.weight.zero_()
        uab.to_q.bias.zero_()
        uab.to_q.bias[0] = LOGIT
        uab.to_k.weight.copy_(torch.eye(uab.to_k.out_features, uab.to_k.in_features))
        uab.to_k.bias.zero_()
        uab.tokens.zero_()
        uab.tokens[0, 0] = -sign * LOGIT   # the "safe" token
        uab.tokens[1:, 0] = sign * LOGIT


def main(args) -> int:
    from export.families import BackboneError, load_backbone
    from train.loop import seed_everything

    seed_everything(args.seed)
    try:
        backbone = load_backbone(args.model)
    except BackboneError as e:
        print(f"error: {e}")
        return 2
    unet = backbone.unet
    provenance = {"random_init": {"model": str(args.model), "force": args.force, "seed": args.seed}}
    if args.guard == "safeguider":
        from guards.safeguider import SafeGuiderClassifier, SafeGuiderConfig

        widths = [spec.hidden_size for spec in backbone.text_encoders]   # SDXL: both encoders' EOS concatenated
        config = SafeGuiderConfig(hidden_size=sum(widths), encoder_widths=widths if len(widths) > 1 else None,
                                  training=provenance)
        model = SafeGuiderClassifier(config)
        if args.force:
            _force_logits(model.fc3, 1 - config.safe_class if args.force == "on" else config.safe_class)
        model.save_pretrained(args.out)
        size = f"{sum(p.numel() for p in model.parameters()):,} parameters"
    elif args.guard == "saferedir":
        from guards.saferedir import SafeRedir

        model = SafeRedir.for_backbone(backbone, training=provenance)
        if args.force:
            _force_logits(model.classifier[-1], 1 if args.force == "on" else 0)   # (safe, unsafe)
        model.save_pretrained(args.out)
        size = f"{sum(p.numel() for p in model.parameters()):,} parameters"
    elif args.guard == "safepatch":
        from guards.safepatch import SafePatch, SafePatchConfig, SafePatchGate, save, text_dim

        config = SafePatchConfig.for_unet(unet, text_dim(backbone), training=provenance)
        patch, gate = SafePatch.from_unet(unet, config), SafePatchGate(config)
        if args.force:
            _force_gate(gate, args.force == "on")
        save(patch, gate, args.out)
        size = f"{patch.num_parameters():,} patch parameters"
    else:
        from guards.safectrl import SafeCtrl, default_layers

        detect, _ = default_layers(unet)  # SafeCtrlConfig's detect layer where the UNet has it, else its first attn2
        attn = dict(unet.named_modules())[detect.rsplit(".processor", 1)[0]]
        safectrl = SafeCtrl.for_unet(unet, detect_layer=detect, feature_dim=attn.to_q.in_features
                                     + attn.to_v.out_features, training=provenance)
        if args.force:
            _force_mask(safectrl.uab, args.force == "on")
        safectrl.save_pretrained(args.out)
        size = f"{sum(p.numel() for p in safectrl.parameters()):,} parameters, {len(safectrl.processors)} attn2 layers"
    print(f"{args.guard} (untrained, force {args.force}) for {args.model}: {size} -> {args.out}")
    return 0
