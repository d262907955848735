"""Deterministic renderer of tinyworld scenes, with exact object masks and safe counterfactuals.

Objects are drawn at 4x supersampling with PIL and box-filtered down, so edges are anti-aliased; an
object's mask is every pixel it covers at all. Everything random — the
background texture, each object's jitter and the blood splatter's outline — comes from generators keyed
by (seed, slot), so a counterfactual render (unsafe objects removed or replaced) keeps the rest of the
scene pixel for pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .world import BACKGROUNDS, CATEGORIES, COLOURS, SIZES, Obj, Scene

RES = 64
SS = 4  # supersampling factor

SILVER = (196, 198, 208)
HANDLE = (96, 52, 22)
BLOOD = (128, 6, 10)
BONE = (236, 228, 204)
GHOST = (246, 248, 255)
INK = (16, 14, 18)


@dataclass
class Render:
    image: np.ndarray        # (H, W, 3) uint8
    masks: list[np.ndarray]  # per drawn object, (H, W) bool
    kinds: list[str]         # per drawn object
    unsafe_mask: np.ndarray  # (H, W) bool: union of unsafe objects' masks


def _poly(draw, pts):
    draw.polygon([(float(x), float(y)) for x, y in pts], fill=255)


def _rot(pts, cx, cy, deg):
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in pts]


def _layers(kind: str, cx: float, cy: float, d: float, colour, rng: np.random.Generator):
    """Layers (mask drawer, rgb) of one object centred at (cx, cy) with diameter d (supersampled px)."""
    r = d / 2
    L = []

    def layer(rgb, fn):
        L.append((fn, rgb))

    if kind == "circle":
        layer(colour, lambda g: g.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255))
    elif kind == "square":
        h = r * 0.84
        layer(colour, lambda g: g.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255))
    elif kind == "triangle":
        layer(colour, lambda g: _poly(g, [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]))
    elif kind == "star":
        pts = [(cx + (r if i % 2 == 0 else r * 0.42) * math.sin(i * math.pi / 5),
                cy - (r if i % 2 == 0 else r * 0.42) * math.cos(i * math.pi / 5)) for i in range(10)]
        layer(colour, lambda g: _poly(g, pts))
    elif kind == "heart":
        q = r * 0.52
        def heart(g):
            g.ellipse([cx - 2 * q, cy - r * 0.85, cx, cy - r * 0.85 + 2 * q], fill=255)
            g.ellipse([cx, cy - r * 0.85, cx + 2 * q, cy - r * 0.85 + 2 * q], fill=255)
            _poly(g, [(cx - 2 * q + 1, cy - r * 0.85 + q * 1.2), (cx + 2 * q - 1, cy - r * 0.85 + q * 1.2), (cx, cy + r)])
        layer(colour, heart)
    elif kind == "cross":
        w = r * 0.36
        def cross(g):
            g.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
            g.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
        layer(colour, cross)
    elif kind == "ring":
        def ring(g):
            g.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
            g.ellipse([cx - r * 0.5, cy - r * 0.5, cx + r * 0.5, cy + r * 0.5], fill=0)
        layer(colour, ring)
    elif kind == "moon":
        def moon(g):
            g.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
            o = r * 0.55
            g.ellipse([cx - r + o, cy - r - o * 0.3, cx + r + o, cy + r - o * 0.3], fill=0)
        layer(colour, moon)
    elif kind in ("knife", "spoon"):
        # diagonal utensil, 1.35x the nominal diameter long: handle lower-left, working end upper-right
        ang, ln = -45, d * 1.35
        x0 = cx - ln / 2
        if kind == "knife":
            blade = [(x0 + ln * 0.36, cy - r * 0.26), (x0 + ln, cy - r * 0.1), (x0 + ln * 0.36, cy + r * 0.3)]
            layer(SILVER, lambda g: _poly(g, _rot(blade, cx, cy, ang)))
            handle = [(x0, cy - r * 0.18), (x0 + ln * 0.38, cy - r * 0.18), (x0 + ln * 0.38, cy + r * 0.22), (x0, cy + r * 0.22)]
            layer(HANDLE, lambda g: _poly(g, _rot(handle, cx, cy, ang)))
        else:
            handle = [(x0, cy - r * 0.1), (x0 + ln * 0.62, cy - r * 0.1), (x0 + ln * 0.62, cy + r * 0.1), (x0, cy + r * 0.1)]
            def spoon(g):
                _poly(g, _rot(handle, cx, cy, ang))
                bx, by = _rot([(x0 + ln * 0.8, cy)], cx, cy, ang)[0]
                g.ellipse([bx - r * 0.4, by - r * 0.3, bx + r * 0.4, by + r * 0.3], fill=255)
            layer(SILVER, spoon)
    elif kind == "blood":
        n = 16
        radii = r * 0.7 * (0.7 + 0.6 * rng.random(n))
        blob = [(cx + radii[i] * math.cos(2 * math.pi * i / n), cy + radii[i] * math.sin(2 * math.pi * i / n)) for i in range(n)]
        drops = []
        for _ in range(6):
            a, dist, s = rng.uniform(0, 2 * math.pi), r * rng.uniform(0.75, 1.0), r * rng.uniform(0.08, 0.15)
            drops.append((cx + dist * math.cos(a), cy + dist * math.sin(a), s))
        drips = [(cx + r * rng.uniform(-0.35, 0.35), r * rng.uniform(0.5, 0.95)) for _ in range(2)]
        def blood(g):
            _poly(g, blob)
            for x, y, s in drops:
                g.ellipse([x - s, y - s, x + s, y + s], fill=255)
            for x, length in drips:
                g.rectangle([x - r * 0.07, cy, x + r * 0.07, cy + length], fill=255)
                g.ellipse([x - r * 0.1, cy + length - r * 0.1, x + r * 0.1, cy + length + r * 0.1], fill=255)
        layer(BLOOD, blood)
    elif kind == "paint":
        def stroke(g):
            for i in range(25):
                t = i / 24
                x = cx - r * 0.9 + 1.8 * r * t
                y = cy + r * 0.35 * math.sin(t * 2 * math.pi)
                w = r * 0.2
                g.ellipse([x - w, y - w, x + w, y + w], fill=255)
        layer(colour, stroke)
    elif kind == "skull":
        def bone(g):
            g.ellipse([cx - r * 0.85, cy - r, cx + r * 0.85, cy + r * 0.55], fill=255)
            g.rectangle([cx - r * 0.5, cy + r * 0.2, cx + r * 0.5, cy + r * 0.95], fill=255)
        def holes(g):
            for sx in (-1, 1):
                ex = cx + sx * r * 0.38
                g.ellipse([ex - r * 0.24, cy - r * 0.42, ex + r * 0.24, cy + r * 0.08], fill=255)
            _poly(g, [(cx, cy + r * 0.12), (cx - r * 0.12, cy + r * 0.38), (cx + r * 0.12, cy + r * 0.38)])
            for tx in (-0.3, -0.1, 0.1, 0.3):
                g.rectangle([cx + r * tx - r * 0.035, cy + r * 0.6, cx + r * tx + r * 0.035, cy + r * 0.95], fill=255)
        layer(BONE, bone)
        layer(INK, holes)
    elif kind == "ghost":
        def body(g):
            g.ellipse([cx - r * 0.75, cy - r, cx + r * 0.75, cy + r * 0.5], fill=255)
            g.rectangle([cx - r * 0.75, cy - r * 0.25, cx + r * 0.75, cy + r * 0.75], fill=255)
            for i in range(3):
                sx = cx - r * 0.75 + r * 0.5 * (2 * i + 1) / 2 * 1.0
                g.ellipse([sx - r * 0.25, cy + r * 0.5, sx + r * 0.25, cy + r], fill=255)
        def eyes(g):
            for sx in (-1, 1):
                ex = cx + sx * r * 0.3
                g.ellipse([ex - r * 0.12, cy - r * 0.45, ex + r * 0.12, cy - r * 0.1], fill=255)
        layer(GHOST, body)
        layer(INK, eyes)
    else:
        raise ValueError(f"unknown object kind {kind!r}")
    return L


def _background(name: str, rng: np.random.Generator) -> np.ndarray:
    base = np.array(BACKGROUNDS[name][1], np.float32)
    yy, xx = np.mgrid[0:RES, 0:RES].astype(np.float32) / RES
    a, b = rng.uniform(-1, 1, 2)
    shade = 12 * (a * (xx - 0.5) + b * (yy - 0.5))
    noise = rng.normal(0, 5, (RES, RES, 1)).astype(np.float32)
    return base + shade[..., None] + noise


def _slots(n: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    if n == 1:
        return [(32 + rng.uniform(-6, 6), 32 + rng.uniform(-6, 6))]
    return [(17 + rng.uniform(-2, 2), 32 + rng.uniform(-7, 7)), (47 + rng.uniform(-2, 2), 32 + rng.uniform(-7, 7))]


def render(scene: Scene, seed: int, counterfactual: str | None = None) -> Render:
    """Render ``scene``; with ``counterfactual`` ('remove' | 'replace') its unsafe objects are removed or
    replaced by their confuser, everything else identical."""
    layout_rng = np.random.default_rng([seed, 0])
    img = _background(scene.background, layout_rng)
    slots = _slots(len(scene.objects), layout_rng)
    masks, kinds = [], []
    unsafe = np.zeros((RES, RES), bool)
    for i, (obj, (cx, cy)) in enumerate(zip(scene.objects, slots)):
        orng = np.random.default_rng([seed, 1 + i])
        if obj.category is not None and counterfactual is not None:
            if counterfactual == "remove":
                continue
            conf = CATEGORIES[obj.category]["confuser"]
            obj = Obj(conf, obj.size, "red" if conf == "paint" else None)
        colour = COLOURS.get(obj.colour or "", None)
        d = SIZES[obj.size] * (1 + orng.uniform(-0.06, 0.06))
        cover_all = Image.new("L", (RES * SS, RES * SS), 0)
        for fn, rgb in _layers(obj.kind, cx * SS, cy * SS, d * SS, colour, orng):
            m = Image.new("L", (RES * SS, RES * SS), 0)
            fn(ImageDraw.Draw(m))
            cover_all.paste(255, mask=m)
            a = np.asarray(m.reduce(SS), np.float32)[..., None] / 255.0
            img = img * (1 - a) + np.array(rgb, np.float32) * a
        cover = np.asarray(cover_all.reduce(SS), np.float32) / 255.0
        mask = cover > 0  # every pixel the object touches, so a counterfactual differs only inside it
        masks.append(mask)
        kinds.append(obj.kind)
        if obj.category is not None:
            unsafe |= mask
    return Render(np.clip(img, 0, 255).round().astype(np.uint8), masks, kinds, unsafe)


def render_batch(scenes: list[Scene], seeds: list[int], counterfactual: str | None = None) -> np.ndarray:
    """(N, 64, 64, 3) uint8 images."""
    return np.stack([render(s, int(k), counterfactual).image for s, k in zip(scenes, seeds)])
