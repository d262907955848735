"""Writing the single-file engine bundle (``*.plan``); the layout is documented in ``runtime/bundle.py``.

>>> components, payloads = onnx_component("unet", "denoise", Path("unet.onnx"), precision="fp16")
>>> tok_components, tok_payloads, tok_entry = tokenizer_components(Path("model/tokenizer"))
>>> manifest = Manifest(family="sd1", components=components + tok_components, tokenizers=[tok_entry], ...)
>>> write_bundle("sd1.plan", manifest, payloads | tok_payloads)

Payloads may be GBs: they are streamed in chunks (hashed while copied, never read whole), and the bundle is
written to a temporary file next to ``out_path`` and renamed over it only when complete, so a failure leaves
neither a partial bundle nor a temporary file, and an existing bundle at ``out_path`` untouched.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

from runtime.bundle import HEADER, align, atomic_write, pack_header
from runtime.errors import BadInputError, OutputError
from runtime.manifest import ComponentSpec, Manifest, TensorSpec

Payload = str | os.PathLike | bytes | bytearray | memoryview
Progress = Callable[[int, int], None]  # (bytes written so far, total bytes)

CHUNK = 8 << 20
PROGRESS_BAR_MIN_BYTES = 256 << 20  # show a tqdm bar by default when the payloads add up to this much
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


def write_bundle(out_path: str | os.PathLike, manifest: Manifest, payloads: Mapping[str, Payload],
                 progress: Progress | None = None) -> Path:
    """Write ``manifest`` and one payload per component (a file path or bytes) to the bundle ``out_path``.

    The components' ``offset``, ``size`` and ``sha256`` are computed here (``manifest`` itself is not
    modified). ``progress(done, total)`` is called after every chunk; without it a tqdm bar is shown for
    large bundles. Raises BadInputError for a missing/unreadable payload, OutputError if ``out_path``
    cannot be written.
    """
    out = Path(out_path)
    manifest = copy.deepcopy(manifest)
    sources = _payload_sources(manifest, payloads)
    manifest.validate()
    _check_destination(out)
    data_start = _layout(manifest, {name: size for name, (_, size) in sources.items()})
    total = sum(size for _, size in sources.values())
    advance, finish = _progress_reporter(progress, total, out)
    try:
        with atomic_write(out) as f:
            f.write(bytes(data_start))  # header + manifest + padding: filled in last
            for c in manifest.components:
                f.write(bytes(c.offset - f.tell()))
                source, size = sources[c.name]
                c.sha256 = _copy_payload(c.name, source, size, f, advance)
            manifest_bytes = manifest.to_json()
            if HEADER.size + len(manifest_bytes) > data_start:  # cannot happen: hashes have a fixed length
                raise AssertionError("bundle manifest outgrew its reserved space")
            f.seek(0)
            f.write(pack_header(manifest_bytes) + manifest_bytes)
    except OSError as e:
        raise OutputError(f"cannot write bundle {out}: {e.strerror or e}; check the folder's permissions and "
                          "free space") from None
    finally:
        finish()
    return out


def _payload_sources(manifest: Manifest, payloads: Mapping[str, Payload]) -> dict[str, tuple[Path | memoryview, int]]:
    """Map every component to its payload (a file path or a byte view) and size; exactly one each."""
    names = {c.name for c in manifest.components}
    if unknown := sorted(set(payloads) - names):
        raise BadInputError(f"payloads given for unknown component(s) {', '.join(unknown)}: add them to the "
                            "manifest or drop the payloads")
    sources = {}
    for c in manifest.components:
        if c.name not in payloads:
            raise BadInputError(f"no payload given for component {c.name!r}: pass its file or bytes")
        data = payloads[c.name]
        if isinstance(data, (bytes, bytearray, memoryview)):
            view = memoryview(data).cast("B")
            sources[c.name] = (view, view.nbytes)
        elif isinstance(data, (str, os.PathLike)):
            path = Path(data)
            if not path.is_file():
                raise BadInputError(f"payload file for component {c.name!r} not found: {path}; check the path "
                                    "or re-export that component")
            sources[c.name] = (path, path.stat().st_size)
        else:
            raise BadInputError(f"payload for component {c.name!r} is a {type(data).__name__}: pass a file "
                                "path or bytes")
    return sources


def _check_destination(out: Path) -> None:
    if out.is_dir():
        raise OutputError(f"{out} is a directory: pass a file name such as {out / 'model.plan'}")
    if not out.parent.is_dir():
        raise OutputError(f"folder {out.parent} does not exist: create it or choose another output path")


def _layout(manifest: Manifest, sizes: dict[str, int]) -> int:
    """Give every component its size and a 4096-aligned offset; return the offset of the first payload.

    The offsets are stored in the manifest, whose length decides where the payloads start: iterate until
    the manifest (with placeholder sha256s of the final length) fits before the first payload.
    """
    for c in manifest.components:
        c.size, c.sha256 = sizes[c.name], "0" * 64
    data_start = 0
    while True:
        offset = data_start
        for c in manifest.components:
            c.offset = offset
            offset = align(offset + c.size)
        needed = align(HEADER.size + len(manifest.to_json()))
        if needed <= data_start:
            return data_start
        data_start = needed


def _copy_payload(name: str, source: Path | memoryview, size: int, f: BinaryIO,
                  advance: Callable[[int], None]) -> str:
    """Append ``source`` to ``f`` chunk by chunk; return its sha256 (hex)."""
    digest = hashlib.sha256()
    if isinstance(source, memoryview):
        for start in range(0, size, CHUNK):
            chunk = source[start:start + CHUNK]
            digest.update(chunk)
            f.write(chunk)
            advance(len(chunk))
        return digest.hexdigest()
    try:
        with open(source, "rb") as src:
            done = _stream(src, size, f, digest, advance)
            grew = bool(src.read(1))
    except _ReadError as e:
        raise BadInputError(f"cannot read payload {source} of component {name!r}: {e}; check the file and "
                            "its permissions") from None
    except OSError as e:
        if e.filename is None:
            raise  # a write error: reported by write_bundle
        raise BadInputError(f"cannot open payload {source} of component {name!r}: {e.strerror or e}; check "
                            "the file and its permissions") from None
    if done != size or grew:
        raise BadInputError(f"payload {source} of component {name!r} changed size while being bundled (was "
                            f"{size} bytes): re-run once the file is complete")
    return digest.hexdigest()


class _ReadError(Exception):
    """An OSError while reading a payload (as opposed to writing the bundle)."""


def _stream(src: BinaryIO, size: int, f: BinaryIO, digest, advance: Callable[[int], None]) -> int:
    """Copy at most ``size`` bytes from ``src`` to ``f`` (so a growing file cannot overrun the next payload)."""
    done, buffer = 0, memoryview(bytearray(min(CHUNK, max(size, 1))))
    while done < size:
        try:
            n = src.readinto(buffer[:min(len(buffer), size - done)])
        except OSError as e:
            raise _ReadError(e.strerror or str(e)) from None
        if not n:
            break
        digest.update(buffer[:n])
        f.write(buffer[:n])
        done += n
        advance(n)
    return done


def _progress_reporter(progress: Progress | None, total: int,
                       out: Path) -> tuple[Callable[[int], None], Callable[[], None]]:
    """``advance(n_bytes)`` and ``finish()`` for the caller's callback, or a tqdm bar for large bundles."""
    done = 0
    bar = None
    if progress is None and total >= PROGRESS_BAR_MIN_BYTES:
        try:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"writing {out.name}")
        except ImportError:
            pass

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)
        if bar is not None:
            bar.update(n)

    return advance, (bar.close if bar is not None else lambda: None)


# -- component helpers ----------------------------------------------------------------------------------------

def onnx_component(name: str, kind: str, path: str | os.PathLike, precision: str = "fp32",
                   shared_data: str | None = None, **fields) -> tuple[list[ComponentSpec], dict[str, Path]]:
    """Components and payloads for one ONNX graph file: I/O specs read from the graph, plus its external data.

    A graph saved with external data (required above 2 GB) must keep it in ONE file next to the graph;
    that file becomes a component ``"<name>.data"`` whose ``extra["filename"]`` is the location the graph
    references, so ``runtime unpack`` recreates a loadable pair. ``shared_data`` names an external-data
    component another graph already brings (the idle denoise graph's weights are the full graph's,
    ``export/idle.py``): the graph references it and no data component is added. ``fields`` go to the
    graph's ComponentSpec.
    """
    import onnx  # export-time only

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"ONNX graph for component {name!r} not found: {path}; re-export it")
    model = onnx.load(path, load_external_data=False)
    graph = ComponentSpec(name=name, kind=kind, backend="onnx", precision=precision,
                          inputs=[_tensor_spec(v) for v in model.graph.input],
                          outputs=[_tensor_spec(v) for v in model.graph.output], **fields)
    components, payloads = [graph], {name: path}
    locations = _external_data_locations(model)
    if len(locations) > 1:
        raise BadInputError(f"ONNX graph {path} keeps its weights in {len(locations)} external files: re-save "
                            "it with onnx.save(..., save_as_external_data=True, all_tensors_to_one_file=True)")
    if locations and shared_data is not None:
        graph.external_data = shared_data
    elif locations:
        location = locations.pop()
        data = ComponentSpec(name=f"{name}.data", kind="external_data", backend="file",
                             extra={"filename": location})
        graph.external_data = data.name
        components.append(data)
        payloads[data.name] = path.parent / location
    return components, payloads


def _tensor_spec(value) -> TensorSpec:
    import onnx

    t = value.type.tensor_type
    shape = [d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else "?"
             for d in t.shape.dim]
    return TensorSpec(value.name, shape, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name)


def _external_data_locations(model) -> set[str]:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    locations = set()
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    return locations


def tokenizer_components(directory: str | os.PathLike, name: str = "tokenizer",
                         **entry) -> tuple[list[ComponentSpec], dict[str, Path], dict]:
    """Components, payloads and the manifest ``tokenizers`` entry for a CLIP tokenizer folder.

    Each file (vocab.json, merges.txt, tokenizer_config.json if present) becomes a "file" component
    ``"<name>.<stem>"`` unpacked as ``<name>/<file>``; ``max_length`` and ``pad_id`` come from the lean
    runtime tokenizer itself (``entry`` overrides or adds keys).
    """
    from runtime.tokenizer import CLIPTokenizer

    directory = Path(directory)
    tok = CLIPTokenizer(directory)
    components, payloads, files = [], {}, {}
    for filename in TOKENIZER_FILES:
        if (directory / filename).is_file():
            comp = ComponentSpec(name=f"{name}.{Path(filename).stem}", kind="tokenizer", backend="file",
                                 extra={"filename": f"{name}/{filename}"})
            components.append(comp)
            payloads[comp.name] = directory / filename
            files[filename] = comp.name
    return components, payloads, {"name": name, "files": files, "max_length": tok.max_length,
                                  "pad_id": tok.pad_id, **entry}
