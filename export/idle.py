"""The idle denoise graph of a guarded bundle: the UNet step without the guards' per-step inputs, over the
same weights.

A guard fused into the denoise graph adds inputs that are zero whenever it has nothing to do: SafePatch's
residuals when its gate is off (benign prompts), SafeCtrl's blend weight ``safectrl_blend`` whenever the fed mask is
below ``tau`` everywhere or the step is before the active ones. With those inputs at zero the graph still pays
for them: zero-residual Adds (with an NCHWc reorder each on ONNX Runtime's CPU provider), and SafeCtrl's
Safety Guidance branch in every attn2, which is computed and then weighted by 0. ``denoise_idle`` is that
graph with those inputs gone: the plain UNet for SafePatch; the UNet plus SafeCtrl's detector and mask state
(``SafeCtrlExtension(blend=False)``) for SafeCtrl: cheaper than the full graph (figures in
bench/results/design_measurements.md). Which bundles carry it: :func:`wants_idle_graph`.

**Contract** (checked by the runtime when it opens the bundle, ``runtime/pipeline.py``): the inputs of
``denoise_idle`` are a subset of ``denoise``'s and its outputs are the same; with every input it lacks all
zeros, ``denoise`` computes what ``denoise_idle`` computes. The runtime runs ``denoise_idle`` for a step only
when the feeds it would drop are all zero, by value, so a guard that wants its work done always gets the full
graph (fail closed).

**No second copy of the weights** (:func:`share_weights`): the two graphs keep their initializers in ONE
external-data file, ``denoise.onnx.data``; every initializer of the idle graph whose bytes equal one of the
full graph's points at the same bytes of that file (both graphs are exported from the same modules; small
constants, below ``size_threshold`` bytes, stay in each graph). With SafeCtrl the idle graph keeps its attn2
``W_K`` / ``W_V`` (transposed by the exporter) of its own: the full graph holds them only as part of the
concatenated ``[W_K; W_K']``; on tinyworld that is 0.9 MB of the 27.9 MB of weights.

Built for the ONNX backend only, when a guard asks for it (:func:`wants_idle_graph`; ``export build
--idle-graph always|never`` overrides): two TensorRT engines would each hold a copy of the weights on the GPU.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

IDLE_GRAPH = "denoise_idle"


IDLE_MODES = ("auto", "always", "never")


def wants_idle_graph(guards, mode: str = "auto") -> bool:
    """Whether a bundle with these guards (``{name: GuardParts}``) gets ``denoise_idle``. ``"never"``: no;
    ``"always"``: whenever a guard adds per-step inputs to the denoise graph; ``"auto"``: when a guard asks for it
    (``GuardParts.idle_graph``; SafePatch, whose residuals are zero on every step of a gated-off prompt).

    SafeCtrl alone does not ask: the prompts that blend would switch sessions mid-call, which cost more than the
    idle steps saved (bench/results/design_measurements.md)."""
    if mode not in IDLE_MODES:
        raise ValueError(f"idle graph mode {mode!r}: choose one of {', '.join(IDLE_MODES)}")
    stepped = [g for g in guards.values() if g.residual_inputs or g.extensions]
    if mode == "never" or not stepped:
        return False
    return mode == "always" or any(g.idle_graph for g in stepped)


def export_idle_graph(backbone, guards, out_dir: Path, common: dict) -> dict:
    """Export ``denoise_idle`` (no residual inputs; each guard's ``idle_extensions``) into ``out_dir``."""
    from .graphs import export_denoise

    extensions = [e for g in guards.values() for e in g.idle_extensions]
    return export_denoise(backbone, Path(out_dir) / f"{IDLE_GRAPH}.onnx", residual_inputs=False,
                          extensions=extensions, name=IDLE_GRAPH, **common)


def share_weights(graph: str | Path, variant: str | Path, out_dir: str | Path,
                  size_threshold: int = 1024) -> tuple[Path, Path, dict]:
    """Write ``graph`` and ``variant`` (ONNX files) into ``out_dir`` with ONE external-data file,
    ``<graph file name>.data``, holding ``graph``'s initializers of ``size_threshold`` bytes or more; each
    initializer of ``variant`` with the same dtype, shape and bytes as one of them references it there.
    Returns the two new paths and ``{"shared": n, "shared_bytes": b, "own": n, "own_bytes": b}`` for the
    variant (``own``: initializers it keeps inline)."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data, set_external_data

    graph, variant, out_dir = Path(graph), Path(variant), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    location = graph.name + ".data"

    full = onnx.load(str(graph), load_external_data=True)
    keys = {t.name: _key(t) for t in full.graph.initializer if t.HasField("raw_data")}
    convert_model_to_external_data(full, all_tensors_to_one_file=True, location=location,
                                   size_threshold=size_threshold)
    graph_out = out_dir / graph.name
    (out_dir / location).unlink(missing_ok=True)
    onnx.save_model(full, str(graph_out))
    where = {}  # content key -> (offset, length) in the data file
    for t in onnx.load(str(graph_out), load_external_data=False).graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        if info.get("location") == location and t.name in keys:
            where.setdefault(keys[t.name], (int(info.get("offset", 0)), int(info["length"])))

    model = onnx.load(str(variant), load_external_data=True)
    stats = {"shared": 0, "shared_bytes": 0, "own": 0, "own_bytes": 0}
    for t in model.graph.initializer:
        if not t.HasField("raw_data") or len(t.raw_data) < size_threshold:
            continue
        found = where.get(_key(t))
        if found is None:
            stats["own"] += 1
            stats["own_bytes"] += len(t.raw_data)
            continue
        set_external_data(t, location, offset=found[0], length=found[1])
        stats["shared"] += 1
        stats["shared_bytes"] += len(t.raw_data)
        t.ClearField("raw_data")  # the bytes are in the full graph's data file
    variant_out = out_dir / variant.name
    onnx.save_model(model, str(variant_out))
    return graph_out, variant_out, stats


def _key(tensor) -> tuple:
    return tensor.data_type, tuple(tensor.dims), hashlib.sha256(tensor.raw_data).hexdigest()

