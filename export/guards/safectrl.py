"""SafeCtrl in the bundle: its blocks (``guards/safectrl.py``) fused into the denoise graph, with the mask as state.

Per-step state (graph inputs/outputs of :class:`SafeCtrlExtension`): the runtime feeds the previous smoothed
mask ``safectrl_mask_prev (N, 1, h, w)`` and the blend weight made from it, ``safectrl_blend (N, 1, h, w)`` =
:meth:`~guards.safectrl.SafeCtrl.blend_weight`, computed by the host (``runtime/guards/safectrl.py``) with the
same float32 operations: fewer graph nodes per step, and an all-zero blend is what lets the runtime run the
idle graph. The graph outputs ``safectrl_mask = ema * prev + (1 - ema) * M_t``.

SDXL: the same graph contract; the blocks sit on SDXL's attn2 layers (the UNet's text is both encoders side by
side, ``cross_attention_dim`` wide) as the weights' config names them (defaults, ``guards.safectrl.default_layers``:
detect on ``down_blocks.1``'s first attn2, blend the up level mirroring it, ``up_blocks.1`` on real SDXL).
Weights made for another backbone (SD 1.x into an SDXL bundle or the reverse) are refused by :func:`prepare` in
one line (BadInputError, exit 3) naming the weights' text hidden size and layers and the backbone's.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from export.graphs import DenoiseExtension, TensorSpec
from guards.safectrl import SafeCtrl, SafeCtrlConfig
from guards.storage import load_folder
from runtime.errors import BadInputError

from . import GuardParts

STATE_INPUT, STATE_OUTPUT, BLEND_INPUT = "safectrl_mask_prev", "safectrl_mask", "safectrl_blend"


class SafeCtrlExtension(DenoiseExtension):
    """The denoise-graph hooks: the blend weight (``safectrl_blend``, :meth:`SafeCtrl.blend_weight` of the state,
    made by the host) before the UNet, the new smoothed mask after.

    ``blend=False`` is the form in the bundle's idle denoise graph (``export/idle.py``): no ``safectrl_blend``
    input and no Safety Guidance branch (every attn2 the stock attention), only the detector and the mask
    state. It computes what the full graph computes with ``safectrl_blend`` all zeros; the runtime runs it
    whenever the blend weight it would feed is all zeros (before the active steps, or no pixel of the fed mask
    reaches ``tau``)."""

    inputs = (TensorSpec(STATE_INPUT, ("N", 1, "h", "w")), TensorSpec(BLEND_INPUT, ("N", 1, "h", "w")))
    outputs = (TensorSpec(STATE_OUTPUT, ("N", 1, "h", "w")),)

    def __init__(self, safectrl: SafeCtrl, latent_hw: tuple[int, int] | None = None, blend: bool = True):
        super().__init__()
        self.safectrl = safectrl
        self.blend = blend
        hw = ("h", "w") if latent_hw is None else tuple(int(v) for v in latent_hw)  # static: the latent's size
        self.inputs = (TensorSpec(STATE_INPUT, ("N", 1, *hw)),
                       *((TensorSpec(BLEND_INPUT, ("N", 1, *hw)),) if blend else ()))
        self.outputs = (TensorSpec(STATE_OUTPUT, ("N", 1, *hw)),)

    def dummy(self, spec: TensorSpec, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(shape, generator=torch.Generator().manual_seed(0))

    def before_unet(self, inputs, unet_kwargs):
        state = self.safectrl.state
        state.reset()
        if self.blend:
            state.blend = inputs[BLEND_INPUT]
        return {}

    def after_unet(self, inputs, noise_pred):
        state = self.safectrl.state
        feats = state.features
        prev = inputs[STATE_INPUT]
        h, w = prev.shape[-2], prev.shape[-1]
        p = feats.shape[1]
        f = int(round(math.sqrt(h * w / p)))
        alpha = float(self.safectrl.config.ema_alpha)
        _, mask = self.safectrl.detect(feats, (h // f, w // f), (h, w), scale=1.0 - alpha)  # (1 - alpha) M_t
        new = alpha * prev + mask
        state.reset()
        return noise_pred, {STATE_OUTPUT: new}


def check_fits(backbone, weights_dir: Path) -> None:
    """One-line BadInputError when the weights were trained on another backbone: W_K' / W_V' must read this UNet's
    text width (``cross_attention_dim``), and the detect / blend layers must be attn2 layers of this UNet with the
    detector's feature width."""
    config, state = load_folder(weights_dir, SafeCtrlConfig)
    unet = backbone.unet
    cross = [n for n in unet.attn_processors if ".attn2." in n]
    modules = dict(unet.named_modules())
    widths = {int(v.shape[1]) for k, v in state.items() if k.endswith(".to_k_safe.weight")}
    hidden = int(unet.config.cross_attention_dim)
    layers = [*config.blend_layers, config.detect_layer]
    missing = [n for n in layers if n not in cross]
    problem = None
    if widths and widths != {hidden}:
        problem = f"hidden size {', '.join(map(str, sorted(widths)))}"
    elif missing:
        problem = f"layer {missing[0].rsplit('.processor', 1)[0]}, which is not an attn2 layer of this UNet"
    else:
        attn = modules[config.detect_layer.rsplit(".processor", 1)[0]]
        feat = attn.to_q.in_features + attn.to_v.out_features
        if int(config.feature_dim) != feat:
            problem = f"detector feature width {config.feature_dim} (this UNet's {feat} at {config.detect_layer})"
    if problem is not None:
        where = f"{len(config.blend_layers)} blend layer(s) from {config.blend_layers[0].split('.attentions')[0]}" \
            if config.blend_layers else "no blend layer"
        raise BadInputError(
            f"--guards safectrl: the weights in {weights_dir} were trained for {problem} ({where}, detect "
            f"{config.detect_layer.rsplit('.processor', 1)[0]}); the {backbone.family} backbone has hidden size "
            f"{hidden} (cross_attention_dim): train SafeCtrl for this backbone (`python -m train safectrl --model ...`)")


def prepare(backbone, weights_dir: Path, image_hw: tuple[int, int] | None = None) -> GuardParts:
    """``image_hw``: the build's image size in pixels (the mask state has the latent's size); default the
    backbone's native size."""
    unet = backbone.unet
    check_fits(backbone, weights_dir)
    safectrl = SafeCtrl.from_pretrained(weights_dir, unet)
    safectrl.install(unet)
    f = backbone.vae_scale_factor
    h, w = image_hw or (backbone.image_size, backbone.image_size)
    latent_hw = (h // f, w // f)
    config = {**safectrl.config.runtime(), "state_input": STATE_INPUT, "state_output": STATE_OUTPUT,
              "blend_input": BLEND_INPUT}
    return GuardParts(extensions=[SafeCtrlExtension(safectrl, latent_hw)], config=config,
                      idle_extensions=[SafeCtrlExtension(safectrl, latent_hw, blend=False)])
