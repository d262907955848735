"""Pre-build ONNX clean-up that runs without TensorRT: constant folding and shape inference.

This is the library form of ``polygraphy surgeon sanitize --fold-constants``: polygraphy's
``FoldConstants`` (ONNX-GraphSurgeon + ONNX Runtime evaluate every subgraph that depends only on
constants, repeated until nothing changes, with shape inference between passes so ``Shape`` nodes of
static dimensions fold too) followed by a final shape inference. TensorRT's ONNX parser then sees
fewer nodes and more known shapes, which makes parsing faster and builds more predictable.

Requirements (all from PyPI): ``polygraphy``, ``onnx-graphsurgeon`` (polygraphy imports it lazily for
folding) and ``onnxruntime`` (polygraphy evaluates the folded subgraphs with it).

Graphs over the 2 GB protobuf limit stay readable: they are written with all their weights in ONE
external data file next to the graph (``<out>.data``), as is any graph whose input already used external
data. Polygraphy's shape inference goes through a temporary file on its own above 2 GB.

The graph's declared inputs and outputs (names, element types, symbolic dimension names such as
``"N"``, ``"h"``) are kept exactly as exported: the engine build profile and the bundle manifest are
derived from them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

PROTOBUF_LIMIT = 2_000_000_000  # bytes; protobuf refuses to serialise a message of 2 GiB or more


class SanitizeError(RuntimeError):
    """The graph could not be loaded, cleaned or written; the message says which and why."""


@dataclass
class SanitizeReport:
    in_path: str
    out_path: str
    nodes_before: int
    nodes_after: int
    external_data: str | None   # file name of the external data file next to out_path, or None
    folded: bool                # False when constant folding was skipped or failed (the graph is still valid)

    @property
    def nodes_removed(self) -> int:
        return self.nodes_before - self.nodes_after


def _require_polygraphy():
    """Import polygraphy's ONNX loaders, failing with the install command when a piece is missing."""
    missing = []
    for name, pip_name in (("polygraphy", "polygraphy"), ("onnx_graphsurgeon", "onnx-graphsurgeon"),
                           ("onnxruntime", "onnxruntime")):
        try:
            __import__(name)
        except ImportError:
            missing.append(pip_name)
    if missing:
        raise SanitizeError(f"ONNX sanitizing needs {', '.join(missing)}: install with "
                            f"`pip install {' '.join(missing)}` (or `pip install -e '.[train]'`)")
    from polygraphy.backend.onnx import fold_constants, infer_shapes
    from polygraphy.logger import G_LOGGER

    return fold_constants, infer_shapes, G_LOGGER


def _uses_external_data(model) -> bool:
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for t in _all_initializers(model.graph))


def _all_initializers(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None and attr.g.ByteSize():
                yield from _all_initializers(attr.g)
            for g in attr.graphs:
                yield from _all_initializers(g)


def _model_size(model) -> int:
    """Bytes the model would take serialised (ByteSize works on in-memory models above 2 GB too)."""
    try:
        return model.ByteSize()
    except Exception:  # pragma: no cover - some protobuf builds refuse; count weights instead
        return sum(len(t.raw_data) for t in _all_initializers(model.graph))


def _num_nodes(model) -> int:
    from polygraphy.backend.onnx import util as onnx_util

    return onnx_util.get_num_nodes(model)


def _restore_io(model, original_inputs, original_outputs) -> None:
    """Put the exported graph inputs/outputs back (shape inference may rename symbolic dims)."""
    for current, original in ((model.graph.input, original_inputs), (model.graph.output, original_outputs)):
        by_name = {vi.name: vi for vi in original}
        for vi in current:
            if vi.name in by_name:
                vi.CopyFrom(by_name[vi.name])


@contextlib.contextmanager
def _quiet_onnxruntime(quiet: bool):
    """Silence ONNX Runtime's graph-optimiser warnings on the throw-away folding sessions."""
    import onnxruntime

    if quiet:
        onnxruntime.set_default_logger_severity(3)
    try:
        yield
    finally:
        if quiet:
            onnxruntime.set_default_logger_severity(2)  # ONNX Runtime's default: warnings


def sanitize_onnx(in_path: str | os.PathLike, out_path: str | os.PathLike, *, fold: bool = True,
                  fold_size_threshold: int | None = None, external_data: bool | None = None,
                  verbose: bool = False) -> SanitizeReport:
    """Fold constants and infer shapes of ``in_path``; write the result to ``out_path``.

    ``fold_size_threshold``: bytes above which a folded constant is NOT materialised (keeps an
    ``Expand``/``Tile`` of a constant from bloating the file); ``None`` folds everything.
    ``external_data``: ``None`` = automatic (kept if the input had it or the graph is over 2 GB),
    ``True``/``False`` to force. ``out_path`` may equal ``in_path``. The output (and its data file) is
    written to a temporary folder and renamed into place, so an existing file is never half-overwritten.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise SanitizeError(f"ONNX graph not found: {in_path}")
    fold_constants, infer_shapes, G_LOGGER = _require_polygraphy()
    import onnx

    from onnx.external_data_helper import load_external_data_for_model

    try:
        model = onnx.load(str(in_path), load_external_data=False)
        had_external = _uses_external_data(model)
        if had_external:
            load_external_data_for_model(model, str(in_path.parent))
    except Exception as exc:
        raise SanitizeError(f"could not load {in_path} (is its external data file next to it?): {exc}") from exc
    original_inputs = [onnx.ValueInfoProto.FromString(vi.SerializeToString()) for vi in model.graph.input]
    original_outputs = [onnx.ValueInfoProto.FromString(vi.SerializeToString()) for vi in model.graph.output]
    nodes_before = _num_nodes(model)

    folded = False
    severity = G_LOGGER.INFO if verbose else G_LOGGER.ERROR
    with G_LOGGER.verbosity(severity), _quiet_onnxruntime(not verbose):
        if fold:
            try:
                model = fold_constants(model, size_threshold=fold_size_threshold, error_ok=False,
                                       allow_onnxruntime_shape_inference=False)
                folded = True
            except Exception as exc:  # folding is an optimisation: keep the unfolded graph, say why
                if verbose:
                    print(f"sanitize: constant folding skipped for {in_path.name}: {exc}")
        # ONNX's own shape inference, here and between folding passes, not ONNX Runtime's symbolic one: it
        # never invents dimension names, and importing the symbolic one (sympy & co.) took over a minute on
        # the 2-core dev machine. Above 2 GB polygraphy runs it through a temporary file.
        model = infer_shapes(model, allow_onnxruntime=False)
    _restore_io(model, original_inputs, original_outputs)

    size = _model_size(model)
    if external_data is None:
        external_data = had_external or size >= PROTOBUF_LIMIT
    elif not external_data and size >= PROTOBUF_LIMIT:
        raise SanitizeError(f"{out_path.name}: the sanitized graph is {size / 1e9:.1f} GB, over protobuf's "
                            f"2 GB limit; it must be written with external data (external_data=None or True)")
    nodes_after = _num_nodes(model)

    data_name = out_path.name + ".data" if external_data else None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        tmp_model = tmp_dir / out_path.name
        if external_data:
            onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024, convert_attribute=False)
            data_file = tmp_dir / data_name
            if data_file.exists():
                os.replace(data_file, out_path.parent / data_name)
            else:  # every tensor under the size threshold: nothing external after all
                data_name = None
        else:
            onnx.save_model(model, str(tmp_model))
        os.replace(tmp_model, out_path)
    except OSError as exc:
        raise SanitizeError(f"could not write {out_path}: {exc}") from exc
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    return SanitizeReport(in_path=str(in_path), out_path=str(out_path), nodes_before=nodes_before,
                          nodes_after=nodes_after, external_data=data_name, folded=folded)
