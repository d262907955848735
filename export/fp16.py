"""FP32 ONNX graph -> FP16 graph with the precision-sensitive parts kept in FP32.

TensorRT 11 networks are strongly typed: the engine computes in the types the ONNX graph states, so FP16
must be written into the graph before the engine build (DESIGN.md section 3). The conversion is ONNX
Runtime's maintained ``onnxruntime.transformers.float16.convert_float_to_float16`` (the onnxconverter-common
converter that ORT ships and maintains; no extra dependency): it turns float initializers and values into
float16 and inserts ``Cast`` nodes around blocked nodes, which stay FP32.

What stays FP32 (``block_ops`` by op type, plus nodes found by pattern):

- ``LayerNormalization``, ``GroupNormalization``, ``InstanceNormalization`` and, for the exporters' GroupNorm
  pattern ``Reshape -> InstanceNormalization -> Reshape -> Mul -> Add``, the reshapes and the affine around
  it (casts then sit at the pattern's borders, so TensorRT can still recognise and fuse the norm);
- ``Softmax`` (attention), and ``ReduceMean`` / ``Pow`` / ``Sqrt`` / ``Reciprocal`` / ``Div`` inside decomposed
  norms (a hand-written norm in a guard module: ``ReduceMean`` is blocked by type, the rest by pattern);
- the sinusoidal timestep embeddings: every ancestor of a ``Sin`` / ``Cos`` node (timestep * frequencies),
  because FP16 spacing at t ~ 1000 is 0.5 and the phase error would be ~0.5 rad;
- ORT's own default block list (``Range``, ``CumSum``, ``TopK``, ``Min``/``Max``, ...).

I/O types: ``keep_io_types=True`` (default) keeps every float input and output FP32, with a Cast inside
the graph. The host loop (numpy, fp32 latents and scheduler) and the bundle's I/O description then do not
depend on the precision, the casts cost nothing measurable next to a UNet, and the FP32 output of the
denoise graph is what the scheduler's arithmetic wants. ``keep_io_types=False`` gives FP16 I/O.

Refusals: a graph whose ``grt.fp16`` metadata (written by ``export.graphs``) is not ``allowed`` — SDXL's
VAE decoder, which overflows in FP16 — is refused with ``FP16Refused`` unless ``force=True``;
``fp16_allowed(path)`` tells a build tool to skip it (and keep it FP32) with the note.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import onnx

DEFAULT_BLOCK_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax", "ReduceMean",
                     "Pow")
"""Op types always kept FP32 (on top of ORT's default block list)."""

EXTERNAL_DATA_THRESHOLD = 1_800_000_000


class FP16Refused(ValueError):
    """The graph must stay FP32 (its ``grt.fp16`` metadata says why)."""


def fp16_allowed(onnx_path: str | Path) -> tuple[bool, str]:
    """(allowed, note) from the graph's ``grt.fp16`` metadata; graphs without it are allowed."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    note = meta.get("grt.fp16", "allowed")
    return note == "allowed", note


def convert_to_fp16(onnx_in: str | Path, onnx_out: str | Path, *, keep_io_types: bool = True,
                     block_ops: Iterable[str] = DEFAULT_BLOCK_OPS, block_patterns: bool = True,
                     force: bool = False) -> dict:
    """Convert ``onnx_in`` to FP16 at ``onnx_out`` (external data ``<name>.onnx.data`` above ~1.8 GB).

    ``block_ops``: op types kept FP32; ``block_patterns``: also keep the GroupNorm patterns, decomposed
    norms and timestep embeddings FP32 (see the module docstring). Returns a report
    ``{"path", "external_data", "blocked_nodes", "block_ops", "keep_io_types", "casts"}``.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    allowed, note = fp16_allowed(onnx_in)
    if not allowed and not force:
        raise FP16Refused(f"{onnx_in.name}: not converted to FP16 ({note}); keep this graph FP32")
    block_ops = tuple(block_ops)
    model = onnx.load(str(onnx_in), load_external_data=True)
    _name_nodes(model.graph)
    # the dynamo exporter writes value_info for every intermediate; the converter re-infers types but can
    # leave some of these stale (float where it made float16): drop them, shape inference rebuilds them
    del model.graph.value_info[:]
    blocked = sorted(_pattern_nodes(model.graph, block_ops)) if block_patterns else []
    casts_before = sum(n.op_type == "Cast" for n in model.graph.node)
    with tempfile.TemporaryDirectory(prefix=".fp16_", dir=onnx_out.parent if onnx_out.parent.exists() else None) as tmp:
        staged = Path(tmp) / "model.onnx"  # a path lets ORT's converter run shape inference on > 2 GB graphs
        onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        del model
        converted = convert_float_to_float16(str(staged), keep_io_types=keep_io_types,
                                             op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(block_ops)),
                                             node_block_list=blocked)
    meta = {p.key: p.value for p in converted.metadata_props}
    meta.update({"grt.precision": "fp16", "grt.fp16_keep_io_types": str(keep_io_types).lower(),
                 "grt.fp16_block_ops": ",".join(block_ops), "grt.fp16_blocked_nodes": str(len(blocked))})
    del converted.metadata_props[:]
    for key, value in meta.items():
        entry = converted.metadata_props.add()
        entry.key, entry.value = key, value
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    data_name = onnx_out.name + ".data"
    (onnx_out.parent / data_name).unlink(missing_ok=True)
    weight_bytes = sum(t.ByteSize() for t in converted.graph.initializer)
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(converted, str(onnx_out), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    return {"path": str(onnx_out), "external_data": data_name if external else None, "blocked_nodes": len(blocked),
            "block_ops": list(block_ops), "keep_io_types": keep_io_types,
            "casts": sum(n.op_type == "Cast" for n in converted.graph.node) - casts_before}


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give unnamed nodes unique names (the converter's node block list works by name)."""
    used = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_fp16_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def _pattern_nodes(graph: onnx.GraphProto, block_ops: tuple[str, ...]) -> set[str]:
    """Names of nodes to keep FP32 beyond ``block_ops``: GroupNorm patterns, decomposed-norm arithmetic,
    timestep embeddings (see the module docstring)."""
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for inp in node.input:
            consumers[inp].append(node)
    constants = {t.name for t in graph.initializer}
    blocked: set[str] = set()

    def only_consumer(node, op_types):
        users = consumers.get(node.output[0], []) if node.output else []
        return users[0] if len(users) == 1 and users[0].op_type in op_types else None

    for node in graph.node:
        if node.op_type == "InstanceNormalization":  # Reshape -> IN -> Reshape -> Mul -> Add
            before = producer.get(node.input[0])
            if before is not None and before.op_type == "Reshape":
                blocked.add(before.name)
            after = only_consumer(node, {"Reshape"})
            if after is not None:
                blocked.add(after.name)
                mul = only_consumer(after, {"Mul"})
                if mul is not None:
                    blocked.add(mul.name)
                    add = only_consumer(mul, {"Add"})
                    if add is not None:
                        blocked.add(add.name)
        elif node.op_type == "ReduceMean" and "ReduceMean" in block_ops:
            # x - mean(x); (..)^2; mean; + eps; sqrt; reciprocal/div: the arithmetic of a decomposed norm
            frontier = [node]
            for _ in range(6):
                nxt = []
                for n in frontier:
                    for user in consumers.get(n.output[0], []) if n.output else []:
                        if user.op_type in {"Sub", "Pow", "Mul", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Div"} \
                                and user.name not in blocked:
                            blocked.add(user.name)
                            nxt.append(user)
                frontier = nxt
        elif node.op_type in ("Sin", "Cos"):  # timestep * frequencies: every ancestor stays FP32
            blocked.add(node.name)
            stack = [i for i in node.input if i and i not in constants]
            seen = set()
            while stack:
                value = stack.pop()
                if value in seen:
                    continue
                seen.add(value)
                parent = producer.get(value)
                if parent is None:
                    continue
                blocked.add(parent.name)
                if parent.op_type != "Shape":  # a Shape reads only the shape: do not climb into its input
                    stack += [i for i in parent.input if i and i not in constants]
    return blocked
