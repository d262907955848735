"""SafeCtrl (detect-then-suppress): the Unsafe Attention Block, the Safety Guidance Block and their config.

Two blocks, both living inside the UNet's cross-attention layers (``attn2``; ``attn1`` keeps its stock
processor, and nothing is passed through ``cross_attention_kwargs``, so stock processors never see extra
arguments):

- **Unsafe Attention Block** (:class:`UnsafeAttentionBlock`): learnable unsafe-concept tokens (``tokens_per
  category`` per unsafe category, plus one "safe" token). Queries come from the UNet's image features at the
  first cross-attention layer (``detect_layer``, 1/2 latent resolution): the features entering ``attn2`` and
  that layer's own text attention output ``Z`` (before any blending), concatenated per pixel. Keys/values
  come from the tokens. ``A_cross = softmax(Q K_tok^T)`` over the tokens gives each pixel's unsafe
  probability ``p = 1 - A_cross[safe]``; a self-attention map of the features ``A_self = softmax(Q_s K_s^T)``
  spreads it over similar pixels: ``M = A_self @ vec(p)`` (values in [0, 1]), upsampled to the latent
  resolution.
- **Safety Guidance Block** (:class:`SafetyGuidanceProcessor`, one per ``attn2`` in ``blend_layers``, default
  every attn2; tinyworld blends the two up-path layers at 1/2 resolution, see train/safectrl/README.md): a
  parallel attention with its own ``W_K'``, ``W_V'`` (initialised from the layer's ``W_K``, ``W_V``) over the
  same text features and the same query, blended before ``to_out``: ``Z_new = Z * (1 - M_bar) + Z' * M_bar``,
  ``M_bar`` area-pooled to the layer's resolution. ``M_bar`` is the smoothed mask hard-thresholded at ``tau``
  and, above it, scaled by ``mask_gain`` (clamped to 1; gain 1 is the published blend; tinyworld's 10 makes it
  near-binary inside the detected region, bench/results/design_measurements.md).

While exporting, each blended layer is ONE attention over both key sets (``[K; K']``, ``[V; V']``, 2 S keys):
a softmax per key set, each set's probabilities scaled by its blend weight per pixel (``1 - M_bar``,
``M_bar``), one value product: ``(1 - M_bar) P V + M_bar P' V'`` per head, the explicit processor's blend. The
detect layer, when it blends, also needs the unblended Z for the detector's features: it computes Z and Z' as
one attention over twice the heads and blends them with one weighted sum. The pooled blend weights are computed
once per resolution and shared by the layers at it. Why: graph nodes, not FLOPs, dominate the guidance branch's
cost on a small UNet (bench/results/design_measurements.md, "SafeCtrl graph"). Eager PyTorch keeps the two
attentions (SDPA).

Per step (the graph's state, ``export/guards/safectrl.py``; the host half, ``runtime/guards/safectrl.py``): the
blend weight is :meth:`SafeCtrl.blend_weight` of the previous smoothed mask (``active * min(1, gain *
hard_threshold(mask_prev, tau))``, active 1 in the later steps, 0 before), and the new smoothed mask is
``ema * prev + (1 - ema) * M_t`` (``ema_alpha``, the weight of the previous mask). Below ``tau`` the blend
weight is exactly 0, so ``Z * 1 + Z' * 0 == Z`` bit for bit: a benign prompt whose mask stays below ``tau``
gives the base UNet's output exactly. The one-step lag (blend with the mask of the previous step) keeps the
detector's features free of the blend's effect and makes the state the only coupling between steps.

Weights: ``config.json`` + ``model.safetensors`` (:meth:`SafeCtrl.save_pretrained` / ``from_pretrained``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import CATEGORIES
from .config import GuardConfig
from .storage import load_folder, save_folder


@dataclass(kw_only=True)
class SafeCtrlConfig(GuardConfig):
    """Defaults: what the committed tinyworld SafeCtrl was trained and measured with."""

    NAME = "safectrl"
    RUNTIME_KEYS = ("ema_alpha", "start_step_fraction", "mask_threshold", "mask_gain", "coverage_threshold",
                    "blend_uncond", "latch_threshold", "latch_floor", "mask_dilate", "categories")

    categories: list = field(default_factory=lambda: list(CATEGORIES))
    tokens_per_category: int = 2
    token_dim: int = 64
    detect_layer: str = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    feature_dim: int = 256              # attn2 input channels + Z channels at detect_layer
    ema_alpha: float = 0.3              # weight of the previous smoothed mask
    start_step_fraction: float = 0.2    # blending on from step index >= fraction * steps
    mask_threshold: float = 0.07        # tau: smoothed mask values below it blend with weight exactly 0
    mask_gain: float = 10.0             # blend weight = min(1, gain * M_bar) above tau (1: the published blend)
    coverage_threshold: float = 0.5     # the report's coverage: share of pixels above it
    blend_uncond: bool = False          # CFG: the unconditional row stays the plain UNet (suppression x guidance)
    latch_threshold: float | None = 0.5  # run-time hysteresis: a pixel that reached it keeps blending (None: off)
    latch_floor: float = 0.25           # ... or this, in an image whose mask never reached latch_threshold: a knife's
                                        # mask peaks at 0.3-0.49 and came back between blends (= latch_threshold: off)
    mask_dilate: int = 1                # blend from a (2r+1)^2 max filter of the mask: thin objects (knives);
                                        # the prompt-only recipe's dev choice (renderer-trained weights: 0)
    blend_layers: list = field(default_factory=list)  # attn2 processor names with W_K'/W_V' ([]: every attn2)


def default_layers(unet: nn.Module) -> tuple[str, list[str]]:
    """``(detect_layer, blend-layer prefixes)`` for ``unet``: the config's ``detect_layer`` when the UNet has it (its
    first cross-attention layer at 1/2 latent resolution on tinyworld, SD 1.x/2.x and SDXL alike), else the first
    attn2. Blend layers, SD 1.x / 2.x: ``up_blocks.1`` (tinyworld's choice, unchanged). SDXL (``text_time`` UNets):
    the up-path level mirroring the detect layer's down level, i.e. the cross-attention layers at the detect layer's
    resolution on the way up (real SDXL: ``up_blocks.1``, 3 x 2 attn2 at 1/2 resolution, not ``up_blocks.0``'s
    3 x 10 at 1/4; the tiny fixture: ``up_blocks.0``). Why: the blend acts where the mask is read, at the finest
    cross-attention level, and measured on an H200 at 1024 px SDXL on ``up_blocks.1`` only costs 1.016x the plain
    UNet per step against 1.088x on every attn2 (bench/results/gpu_guard_overhead_h200.md)."""
    cross = [n for n in unet.attn_processors if ".attn2." in n]
    modules = dict(unet.named_modules())
    detect = SafeCtrlConfig.detect_layer
    if detect.rsplit(".processor", 1)[0] not in modules:
        detect = cross[0]
    if getattr(unet.config, "addition_embed_type", None) != "text_time":
        return detect, ["up_blocks.1"]
    if not detect.startswith("down_blocks."):
        return detect, [detect.split(".attentions.")[0]]
    level = int(detect.split(".")[1])
    mirror = f"up_blocks.{len(unet.up_blocks) - 1 - level}"
    if not any(n.startswith(mirror + ".") for n in cross):
        raise ValueError(f"SafeCtrl: {mirror} (the up level mirroring {detect}) has no cross-attention layer: pass "
                         "the blend layers explicitly")
    return detect, [mirror]


def _safe_name(layer: str) -> str:
    return layer.replace(".", "__")


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(rows: list, like: torch.Tensor) -> torch.Tensor:
    """A small constant matrix on ``like``'s device and dtype. Eager: made once per value and device and reused,
    so a CUDA graph captured after a warm-up call copies nothing from the host (bench/gpu_guard_overhead.py);
    while exporting: made in place, a plain graph constant."""
    if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return torch.tensor(rows, dtype=like.dtype, device=like.device)
    key = (str(rows), like.dtype, like.device)
    if key not in _CONSTANTS:
        with torch.inference_mode(False):  # a plain tensor: one made under inference_mode could not enter autograd
            _CONSTANTS[key] = torch.tensor(rows, dtype=like.dtype, device=like.device)
    return _CONSTANTS[key]


class SafeCtrlState:
    """Per-forward scratch shared by the extension and the processors (plain Python, traced through)."""

    def __init__(self):
        self.blend: torch.Tensor | None = None   # (N, 1, h, w) blend weight at latent resolution, or None
        self.features: torch.Tensor | None = None  # (N, P, C) detector features of the current call
        self.stop_after_detect = False           # training: stop the UNet once the features are captured
        self.pooled: dict[int, torch.Tensor] = {}   # P -> the blend weight pooled to P pixels
        self.weights: dict[int, torch.Tensor] = {}  # P -> (1 - m, m) at P pixels

    def reset(self):
        self.blend, self.features, self.pooled, self.weights = None, None, {}, {}

    def blend_at(self, p: int) -> torch.Tensor:
        """The blend weight area-pooled to a layer's ``p`` pixels, (N, 1, P): computed once per resolution and
        shared by the layers at it (one pooling per resolution in the exported graph, not one per layer)."""
        if p not in self.pooled:
            blend = self.blend
            factor = int(round(math.sqrt(blend.shape[-2] * blend.shape[-1] / p)))
            if factor > 1:
                blend = F.avg_pool2d(blend, factor)
            self.pooled[p] = blend.flatten(2)
        return self.pooled[p]

    def key_set_weights_at(self, p: int) -> torch.Tensor:
        """``(1 - m, m)`` per pixel as (N, 1, P, 2, 1): the scale of each key set's attention probabilities in
        :meth:`SafetyGuidanceProcessor._attend_blended` (once per resolution, like :meth:`blend_at`)."""
        if p not in self.weights:
            m = self.blend_at(p)[..., None, None]                                   # (N, 1, P, 1, 1)
            # m * (-1, 1) + (1, 0): exactly (1 - m, m) in IEEE arithmetic, two graph nodes instead of a stack's five
            sign = torch.tensor([[-1.0], [1.0]], dtype=m.dtype, device=m.device)
            offset = torch.tensor([[1.0], [0.0]], dtype=m.dtype, device=m.device)
            self.weights[p] = m * sign + offset
        return self.weights[p]


class DetectorFeaturesReady(Exception):
    """Raised by the detect layer when ``state.stop_after_detect``: the rest of the UNet is not needed."""


class UnsafeAttentionBlock(nn.Module):
    """Features (N, P, C) -> token logits (N, P, 1 + K) and risk mask M (N, P) = A_self @ (1 - A_cross[safe])."""

    def __init__(self, feature_dim: int, num_tokens: int, token_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim)
        self.tokens = nn.Parameter(torch.randn(1 + num_tokens, token_dim) * 0.02)  # row 0: "safe"
        self.to_q = nn.Linear(feature_dim, token_dim)
        self.to_k = nn.Linear(token_dim, token_dim)
        self.to_v = nn.Linear(token_dim, token_dim)  # value of the tokens (unused by the mask; kept as published)
        self.self_q = nn.Linear(feature_dim, token_dim)
        self.self_k = nn.Linear(feature_dim, token_dim)
        self.scale = token_dim ** -0.5

    def masks(self, features: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (N, P, C) -> (token logits (N, P, 1 + K), ``scale * M`` as a column (N, P, 1))."""
        x = self.norm(features)
        if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
            # one projection for the three linears of the features (fewer graph nodes; same products)
            layers = (self.to_q, self.self_q, self.self_k)
            q, sq, sk = F.linear(x, torch.cat([m.weight for m in layers]),
                                 torch.cat([m.bias for m in layers])).split(self.to_q.out_features, dim=-1)
        else:
            q, sq, sk = self.to_q(x), self.self_q(x), self.self_k(x)
        logits = q @ self.to_k(self.tokens).transpose(0, 1) * self.scale               # (N, P, 1+K)
        # vec(A_cross) = 1 - A_cross[safe] = the unsafe tokens' probabilities summed: one product with the
        # constant column (0, s, ..., s), s = scale (the graph has no slice, subtract, unsqueeze or squeeze)
        column = _constant([[0.0]] + [[float(scale)]] * (logits.shape[-1] - 1), logits)
        unsafe = logits.softmax(dim=-1) @ column                                        # (N, P, 1)
        a_self = (sq @ sk.transpose(1, 2) * self.scale).softmax(dim=-1)                  # (N, P, P)
        return logits, a_self @ unsafe

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, mask = self.masks(features)
        return logits, mask[..., 0]


class SafetyGuidanceProcessor(nn.Module):
    """attn2 processor: the stock attention (AttnProcessor2_0 in eager PyTorch, the explicit-softmax
    AttnProcessor while exporting, as the backbone's own graph) plus the parallel W_K'/W_V' branch, blended by
    ``state.blend`` before ``to_out``. With no blend set it is the stock processor exactly."""

    def __init__(self, name: str, state: SafeCtrlState, to_k: nn.Linear, to_v: nn.Linear, detect: bool,
                 blend: bool = True):
        super().__init__()
        self.name = name
        self.state = [state]  # a list: not a submodule / not in the state dict
        self.detect = detect
        self.blend = blend  # False: the detect layer outside blend_layers (features only, no W_K'/W_V')
        if blend:
            self.to_k_safe = nn.Linear(to_k.in_features, to_k.out_features, bias=to_k.bias is not None)
            self.to_v_safe = nn.Linear(to_v.in_features, to_v.out_features, bias=to_v.bias is not None)
            with torch.no_grad():
                self.to_k_safe.load_state_dict(to_k.state_dict())
                self.to_v_safe.load_state_dict(to_v.state_dict())

    @staticmethod
    def _attend(attn, query, key, value, batch_size, explicit: bool):
        if explicit:  # diffusers AttnProcessor
            q, k, v = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
            probs = attn.get_attention_scores(q, k, None)
            return attn.batch_to_head_dim(torch.bmm(probs, v))
        inner_dim = key.shape[-1]  # diffusers AttnProcessor2_0
        head_dim = inner_dim // attn.heads
        q = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        k = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        v = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

    def _attend_both(self, attn, query, context):
        """Z and Z' as ONE attention over 2 x heads (the stock heads, then the safe ones): one projection with
        ``[W_K; W_K']`` / ``[W_V; W_V']`` (concatenated constants, folded when the session loads), the query
        repeated per head group, one score / softmax / value product. Returns ``(N, 2, heads, P, d)``: index 0
        on axis 1 is Z, 1 is Z'. Each head's arithmetic is the explicit processor's (``get_attention_scores``,
        then ``bmm``); what it saves is graph nodes, which dominate the guidance branch's cost on small UNets."""
        heads = attn.heads
        n, p, inner = query.shape
        d = inner // heads

        def both(base: nn.Linear, safe: nn.Linear) -> torch.Tensor:
            bias = None if base.bias is None else torch.cat([base.bias, safe.bias])
            return F.linear(context, torch.cat([base.weight, safe.weight]), bias)

        def split_heads(x: torch.Tensor) -> torch.Tensor:  # (N, S, 2*inner) -> (N*2*heads, S, d)
            return x.reshape(n, -1, 2 * heads, d).permute(0, 2, 1, 3).reshape(n * 2 * heads, -1, d)

        q4 = query.reshape(n, p, heads, d)
        q = torch.cat([q4, q4], dim=2).permute(0, 2, 1, 3).reshape(n * 2 * heads, p, d)
        probs = attn.get_attention_scores(q, split_heads(both(attn.to_k, self.to_k_safe)), None)
        return torch.bmm(probs, split_heads(both(attn.to_v, self.to_v_safe))).reshape(n, 2, heads, p, d)

    def _attend_blended(self, attn, query, context, weights):
        """``Z (1 - m) + Z' m`` without forming Z and Z': the two key sets as one attention over ``2 S`` keys
        (``[K; K']``, ``[V; V']``), a softmax per key set, each set's probabilities scaled by its blend weight
        per query pixel (``1 - m``, ``m``), one value product. Per head: ``(1 - m) P V + m P' V'``, the explicit
        processor's blend. ``m == 0`` scales ``P'`` to exact zeros, so the result is ``P V`` plus zero products.
        ``weights``: (N, 1, P, 2, 1), :meth:`SafeCtrlState.key_set_weights_at`. Fewer graph nodes than
        :meth:`_attend_both` (no repeated query, no head-group sum)."""
        heads = attn.heads
        n, p, inner = query.shape
        d = inner // heads

        def both(base: nn.Linear, safe: nn.Linear) -> torch.Tensor:  # (N, S, 2*inner) -> (N*heads, 2*S, d)
            bias = None if base.bias is None else torch.cat([base.bias, safe.bias])
            x = F.linear(context, torch.cat([base.weight, safe.weight]), bias)
            return x.reshape(n, -1, 2, heads, d).permute(0, 3, 2, 1, 4).reshape(n * heads, -1, d)

        q = query.reshape(n, p, heads, d).permute(0, 2, 1, 3).reshape(n * heads, p, d)
        k = both(attn.to_k, self.to_k_safe)
        # bmm then scale: get_attention_scores' baddbmm(empty, beta=0) adds an Expand of zeros and an Add of them
        scores = torch.bmm(q, k.transpose(-1, -2)) * attn.scale
        probs = scores.reshape(n, heads, p, 2, -1).softmax(dim=-1)
        probs = (probs * weights).reshape(n * heads, p, -1)
        out = torch.bmm(probs, both(attn.to_v, self.to_v_safe))             # (N*heads, P, d)
        return out.reshape(n, heads, p, d).permute(0, 2, 1, 3).reshape(n, p, inner)

    @staticmethod
    def _merge_heads(x: torch.Tensor) -> torch.Tensor:  # (N, heads, P, d) -> (N, P, heads*d)
        n, heads, p, d = x.shape
        return x.permute(0, 2, 1, 3).reshape(n, p, heads * d)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None \
                or attn.norm_q is not None or attn.norm_k is not None or encoder_hidden_states is None:
            raise NotImplementedError("SafetyGuidanceProcessor supports plain SD cross-attention layers only")
        state = self.state[0]
        explicit = torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = encoder_hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        p = hidden_states.shape[1]
        blending = self.blend and state.blend is not None
        if explicit and blending and not self.detect:
            z = self._attend_blended(attn, query, encoder_hidden_states, state.key_set_weights_at(p))
        elif explicit and blending:
            # the detect layer in the exported graph: one attention for Z (the detector's features) and Z', the
            # blend one weighted sum over the two head groups, Z (1 - m) + Z' m (m == 0 gives Z exactly)
            both = self._attend_both(attn, query, encoder_hidden_states)
            state.features = torch.cat([hidden_states, self._merge_heads(both[:, 0])], dim=-1)
            m = state.blend_at(p)                                                # (N, 1, P)
            weights = torch.cat([1.0 - m, m], dim=1)[:, :, None, :, None]         # (N, 2, 1, P, 1)
            z = self._merge_heads((both * weights).sum(dim=1))
        else:
            z = self._attend(attn, query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states),
                             batch_size, explicit)
            if self.detect:
                state.features = torch.cat([hidden_states, z], dim=-1)
                if state.stop_after_detect:
                    raise DetectorFeaturesReady
            if blending:
                z_safe = self._attend(attn, query, self.to_k_safe(encoder_hidden_states),
                                      self.to_v_safe(encoder_hidden_states), batch_size, explicit)
                m = state.blend_at(p).transpose(1, 2)                               # (N, P, 1)
                z = z * (1.0 - m) + z_safe * m
        hidden_states = attn.to_out[0](z)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class SafeCtrl(nn.Module):
    """The trainable SafeCtrl parameters for one UNet: the Unsafe Attention Block and one Safety Guidance
    processor (W_K', W_V') per attn2 layer. ``install(unet)`` puts the processors on the UNet."""

    def __init__(self, config: SafeCtrlConfig, unet: nn.Module | None = None):
        super().__init__()
        c = config
        self.state = SafeCtrlState()
        num_tokens = len(c.categories) * int(c.tokens_per_category)
        self.uab = UnsafeAttentionBlock(int(c.feature_dim), num_tokens, int(c.token_dim))
        self.processors = nn.ModuleDict()
        if unet is not None:
            cross = [n for n in dict(unet.attn_processors) if ".attn2." in n]
            layers = list(c.blend_layers or cross)
            c = c.replace(blend_layers=layers)
            for name in [*layers, c.detect_layer]:
                if name not in cross:
                    raise ValueError(f"SafeCtrl layer {name!r} is not a cross-attention (attn2) processor of this "
                                     f"UNet: pick blend_layers / detect_layer among {cross}")
            modules = dict(unet.named_modules())
            # the detect layer gets a processor (it captures the detector's features) even where it does not blend
            for name in layers + ([] if c.detect_layer in layers else [c.detect_layer]):
                attn = modules[name.rsplit(".processor", 1)[0]]
                self.processors[_safe_name(name)] = SafetyGuidanceProcessor(
                    name, self.state, attn.to_k, attn.to_v, detect=name == c.detect_layer,
                    blend=name in layers)
        self.config = c

    @classmethod
    def for_unet(cls, unet: nn.Module, **settings) -> "SafeCtrl":
        """Processors on ``unet``'s attn2 layers; ``settings``: config fields other than the defaults."""
        return cls(SafeCtrlConfig.from_dict(settings, source="SafeCtrl settings"), unet)

    def install(self, unet: nn.Module) -> None:
        """Safety Guidance processors on every blended attn2; every other processor left as it is."""
        processors = dict(unet.attn_processors)  # set_attn_processor empties the dict it is given: copy
        for proc in self.processors.values():
            processors[proc.name] = proc
        unet.set_attn_processor(dict(processors))

    def token_categories(self) -> torch.Tensor:
        """Class of each token row: 0 = safe, 1 + category index otherwise."""
        per = int(self.config.tokens_per_category)
        return torch.tensor([0] + [1 + i for i in range(len(self.config.categories)) for _ in range(per)])

    def detect(self, features: torch.Tensor, hw: tuple[int, int], latent_hw: tuple[int, int], scale: float = 1.0):
        """Features (N, P, C) at ``hw`` -> (class logits (N, P, 1 + categories), mask (N, 1, *latent_hw)).
        ``scale``: the mask comes out multiplied by it (in [0, scale]; folded into the detector's constants, so
        a scaled mask costs no graph node)."""
        logits, mask = self.uab.masks(features, scale)
        cats = self.token_categories().tolist()
        onehot = _constant([[float(c == k) for k in range(len(self.config.categories) + 1)] for c in cats], logits)
        class_probs = logits.softmax(-1) @ onehot  # (N, P, 1 + categories)
        n = features.shape[0]
        mask = mask.reshape(n, 1, *hw)
        if tuple(hw) != tuple(latent_hw):
            mask = F.interpolate(mask, size=tuple(latent_hw), mode="bilinear", align_corners=False)
        return class_probs, mask.clamp(0.0, float(scale))

    def blend_weight(self, mask_prev: torch.Tensor, active: torch.Tensor, dilate: int | None = None) -> torch.Tensor:
        """``active * min(1, gain * hard_threshold(max_filter(mask_prev), tau))``: exactly 0 below tau. The graph's
        ``safectrl_blend`` input; the runtime computes it in numpy with the same float32 operations. ``dilate``:
        the max filter's radius (None: the config's ``mask_dilate``)."""
        tau = float(self.config.mask_threshold)
        r = int(self.config.mask_dilate if dilate is None else dilate)
        if r:  # max filter, zero padding: below tau everywhere stays below tau everywhere
            mask_prev = F.max_pool2d(mask_prev, 2 * r + 1, stride=1, padding=r)
        kept = torch.where(mask_prev >= tau, mask_prev, 0.0)
        gain = float(self.config.mask_gain)
        if gain != 1.0:
            kept = (kept * gain).clamp(max=1.0)
        return kept * active  # active (1,) broadcasts

    def hold(self, mask: torch.Tensor, held: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The hysteresis the host applies to each smoothed mask (N, 1, h, w) from the call that feeds the first
        active step: ``held`` is the running elementwise maximum; an image whose held mask reached
        ``latch_threshold`` keeps blending its held pixels >= that, one that has not those >= ``latch_floor``.
        Returns (the mask fed to the next call, the new held). The runtime does the same in numpy."""
        latch = self.config.latch_threshold
        if latch is None:
            return mask, held
        held = mask if held is None else torch.maximum(held, mask)
        latch, floor = (torch.tensor(v, dtype=held.dtype) for v in (latch, self.config.latch_floor))  # float32
        level = torch.where(held.amax(dim=(1, 2, 3), keepdim=True) >= latch, latch, floor)
        return torch.maximum(mask, torch.where(held >= level, held, 0.0)), held

    def save_pretrained(self, out: str | Path) -> None:
        save_folder(out, self.config, self.state_dict())

    @classmethod
    def from_pretrained(cls, path: str | Path, unet: nn.Module) -> "SafeCtrl":
        config, state = load_folder(path, SafeCtrlConfig)
        model = cls(config, unet)
        model.load_state_dict(state)
        return model.eval()


CONFIG = SafeCtrlConfig
