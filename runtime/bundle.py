"""Reading the single-file engine bundle (``*.plan``) and checking it before anything runs.

Layout (format version 1; all integers little-endian; see also ``engines/BUNDLE.md``)::

    offset  size  field
    0       8     magic            b"GRTPLAN\\x00"
    8       4     format version   uint32, 1
    12      4     flags            uint32, 0 (no flag is defined yet)
    16      8     manifest length  uint64, in bytes
    24      32    manifest sha256  sha256 of the manifest bytes
    56      n     manifest         UTF-8 JSON (runtime/manifest.py)
    56+n    ...   zero padding to the next multiple of 4096
    ...           payloads, each starting at a multiple of 4096 (zero padding between them), at the
                  offset and of the size recorded in the manifest, with their sha256 there too

Payloads are aligned so they can be memory-mapped: :meth:`Bundle.payload` returns a zero-copy
``memoryview`` of the mapped file. The writer lives in ``export/bundle.py``.

:meth:`Bundle.open` refuses a file that is not a bundle, of another format version, truncated, or whose
manifest or (with ``verify=True``) payload hashes do not match, with a one-line
:class:`~runtime.errors.BundleError` that says what to do. :func:`check_engine_compat` refuses a TensorRT
engine built for another TensorRT version or GPU with a :class:`~runtime.errors.BackendError`.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import secrets
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from runtime.errors import BackendError, BundleError, OutputError
from runtime.manifest import FORMAT_VERSION, ComponentSpec, Manifest

MAGIC = b"GRTPLAN\x00"
HEADER = struct.Struct("<8sIIQ32s")  # magic, format version, flags, manifest length, manifest sha256
ALIGNMENT = 4096
CHUNK = 16 << 20  # bytes hashed / copied at a time

BUILD_HINT = "build one with `python -m export build --model DIR --out FILE.plan`"
REBUILD_HINT = "re-copy the file or rebuild it with `python -m export build`"
TRT_REBUILD_HINT = "rebuild the engines on this machine with `python -m export build --backend tensorrt`"


def align(offset: int, alignment: int = ALIGNMENT) -> int:
    """The smallest multiple of ``alignment`` that is >= ``offset``."""
    return -(-offset // alignment) * alignment


def pack_header(manifest_bytes: bytes, version: int = FORMAT_VERSION, flags: int = 0) -> bytes:
    """The fixed-size header that precedes ``manifest_bytes``."""
    return HEADER.pack(MAGIC, version, flags, len(manifest_bytes), hashlib.sha256(manifest_bytes).digest())


class Bundle:
    """An open, checked ``.plan`` bundle: its manifest and memory-mapped payloads.

    >>> with Bundle.open("tinyworld.plan") as bundle:
    ...     unet = bundle.payload("unet")          # memoryview, zero copy
    ...     bundle.extract("tokenizer.vocab", "vocab.json")
    """

    def __init__(self, path: Path, mm: mmap.mmap, manifest: Manifest, version: int):
        self.path = path
        self.manifest = manifest
        self.format_version = version
        self._mm: mmap.mmap | None = mm

    # -- opening --------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> Bundle:
        """Open and check a bundle; with ``verify`` also the sha256 of every payload (reads the whole file)."""
        path = Path(path)
        mm = _map_file(path)
        try:
            version, manifest, data_start = _read_manifest(path, mm)
            _check_ranges(path, manifest, data_start, mm.size())
        except BaseException:
            mm.close()
            raise
        bundle = cls(path, mm, manifest, version)
        if verify:
            try:
                bundle.verify()
            except BaseException:
                bundle.close()
                raise
        return bundle

    @property
    def file_size(self) -> int:
        return self._map().size()

    @property
    def manifest_sha256(self) -> str:
        """The header's sha256 of the manifest (checked at open): it names this build's exact contents, since
        the manifest holds every payload's sha256."""
        return HEADER.unpack_from(self._map(), 0)[4].hex()

    @property
    def components(self) -> list[ComponentSpec]:
        return self.manifest.components

    # -- payloads -------------------------------------------------------------------------------------------

    def payload(self, name: str) -> memoryview:
        """The bytes of component ``name``: a read-only, zero-copy view of the mapped file.

        Release views (``view.release()`` or drop them) before :meth:`close` unmaps the file.
        """
        c = self.manifest.component(name)
        return memoryview(self._map())[c.offset:c.offset + c.size]

    def verify(self, names: Iterable[str] | None = None) -> None:
        """Check the sha256 of the named components (default: all); BundleError on the first mismatch."""
        for name in names if names is not None else [c.name for c in self.components]:
            c = self.manifest.component(name)
            digest = hashlib.sha256()
            for chunk in self._chunks(c):
                digest.update(chunk)
            self._check_digest(c, digest.hexdigest())

    def extract(self, name: str, dest: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write component ``name`` to ``dest`` (atomically, checking its sha256 on the way) and return it."""
        c, dest = self.manifest.component(name), Path(dest)
        if dest.exists() and not overwrite:
            raise OutputError(f"{dest} exists: remove it or choose another destination")
        digest = hashlib.sha256()
        try:
            with atomic_write(dest) as f:
                for chunk in self._chunks(c):
                    digest.update(chunk)
                    f.write(chunk)
                self._check_digest(c, digest.hexdigest())  # inside: a bad payload leaves nothing behind
        except OSError as e:
            raise OutputError(f"cannot write {dest}: {e.strerror or e}; check the path, permissions and "
                              "free space") from None
        return dest

    def _chunks(self, c: ComponentSpec) -> Iterator[memoryview]:
        view = memoryview(self._map())
        try:
            for start in range(c.offset, c.offset + c.size, CHUNK):
                chunk = view[start:min(start + CHUNK, c.offset + c.size)]
                yield chunk
                chunk.release()
        finally:
            view.release()

    def _check_digest(self, c: ComponentSpec, actual: str) -> None:
        if actual != c.sha256:
            raise BundleError(f"{self.path}: component {c.name!r} fails its sha256 check (expected "
                              f"{c.sha256[:12]}..., got {actual[:12]}...): the file is corrupt or was tampered "
                              f"with; {REBUILD_HINT}")

    # -- lifetime -------------------------------------------------------------------------------------------

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            raise BundleError(f"{self.path} is closed: open the bundle again")
        return self._mm

    def close(self) -> None:
        """Unmap the file. If payload views are still alive, the mapping goes when the last one does."""
        if self._mm is not None:
            mm, self._mm = self._mm, None
            try:
                mm.close()
            except BufferError:  # exported memoryviews still alive: garbage collection unmaps later
                pass

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, family={self.manifest.family!r}, components={len(self.components)})"


def _map_file(path: Path) -> mmap.mmap:
    """Memory-map ``path`` read-only, after checking it is a regular file big enough for a header."""
    if not path.exists():
        raise BundleError(f"bundle not found: {path}; check the path or {BUILD_HINT}")
    if not path.is_file():
        what = "a directory" if path.is_dir() else "not a regular file"
        raise BundleError(f"{path} is {what}, not a bundle: pass the .plan file itself")
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
            if not head.startswith(MAGIC[:len(head)]) or not head:
                raise BundleError(f"{path} is not a bundle (no {MAGIC[:7].decode()} magic): {BUILD_HINT}")
            if len(head) < HEADER.size:
                raise BundleError(f"{path} is truncated: {len(head)} bytes, shorter than the "
                                  f"{HEADER.size}-byte bundle header; {REBUILD_HINT}")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise BundleError(f"cannot read bundle {path}: {e.strerror or e}; check the path and permissions") from None


def _read_manifest(path: Path, mm: mmap.mmap) -> tuple[int, Manifest, int]:
    """Parse and check the header, then the manifest; return the version, manifest and first payload offset."""
    _, version, flags, length, digest = HEADER.unpack_from(mm, 0)  # magic checked by _map_file
    if version != FORMAT_VERSION:
        newer = version > FORMAT_VERSION
        raise BundleError(
            f"{path} has bundle format version {version}, {'newer' if newer else 'older'} than the version "
            f"{FORMAT_VERSION} this runtime reads: "
            + ("upgrade the runtime or rebuild the bundle with this version's exporter" if newer
               else "rebuild the bundle with `python -m export build`"))
    if flags != 0:
        raise BundleError(f"{path} sets header flags {flags:#x} this runtime does not know: upgrade the "
                          "runtime or rebuild the bundle")
    end = HEADER.size + length
    if end > mm.size():
        raise BundleError(f"{path} is truncated: the manifest needs {end} bytes, the file has {mm.size()}; "
                          f"{REBUILD_HINT}")
    data = mm[HEADER.size:end]
    if hashlib.sha256(data).digest() != digest:
        raise BundleError(f"{path}: manifest fails its sha256 check: the file is corrupt or was tampered "
                          f"with; {REBUILD_HINT}")
    manifest = Manifest.from_json(data)
    if manifest.format_version != version:
        raise BundleError(f"{path}: manifest format version {manifest.format_version} disagrees with header "
                          f"version {version}: the bundle is corrupt; rebuild it")
    return version, manifest, align(end)


def _check_ranges(path: Path, manifest: Manifest, data_start: int, file_size: int) -> None:
    """Every payload lies aligned, after the manifest, inside the file and apart from the others."""
    previous: ComponentSpec | None = None
    for c in sorted(manifest.components, key=lambda c: (c.offset, c.size)):
        if c.offset % ALIGNMENT or c.offset < data_start:
            where = (f"is not {ALIGNMENT}-byte aligned" if c.offset % ALIGNMENT
                     else f"overlaps {previous.name!r}" if previous else "overlaps the manifest")
            raise BundleError(f"{path}: component {c.name!r} at offset {c.offset} {where}: the bundle is "
                              "corrupt; rebuild it")
        end = c.offset + c.size
        if end > file_size:
            expected = max(x.offset + x.size for x in manifest.components)
            raise BundleError(f"{path} is truncated: component {c.name!r} needs bytes {c.offset}-{end}, the "
                              f"file has {file_size} of the expected {expected} bytes; {REBUILD_HINT}")
        data_start, previous = end, c


def check_engine_compat(component: ComponentSpec, trt_version: str | None, compute_capability: str | None) -> None:
    """Refuse a TensorRT engine built for another TensorRT version or another GPU.

    TensorRT engines load only on the exact TensorRT release (major.minor.patch) that built them, unless
    built version-compatible (``extra["version_compatible"]``: then any later release of the same major).
    ``trt_version`` / ``compute_capability`` describe this machine (``None``: TensorRT / a CUDA GPU is not
    available). Components of other backends always pass.
    """
    if component.backend != "tensorrt":
        return
    name = component.name
    built_trt, built_cc = component.tensorrt_version, component.compute_capability
    if not built_trt or not built_cc:
        raise BundleError(f"engine {name!r} does not record the TensorRT version and GPU it was built for: "
                          f"{TRT_REBUILD_HINT}")
    if trt_version is None:
        raise BackendError(f"engine {name!r} was built with TensorRT {built_trt} for a GPU of compute capability "
                           f"{built_cc}; TensorRT is not installed here: install the `gpu` extra (pip install "
                           "'.[gpu]') on such a GPU, or rebuild the bundle with `python -m export build --backend "
                           "onnx`")
    if compute_capability is None:
        raise BackendError(f"engine {name!r} was built with TensorRT {built_trt} for a GPU of compute capability "
                           f"{built_cc}; no CUDA GPU was found here: check the driver (nvidia-smi), or rebuild the "
                           "bundle with `python -m export build --backend onnx`")
    built_v, have_v = _release(built_trt, name), _release(trt_version, "this machine's TensorRT")
    compatible = (have_v[0] == built_v[0] and have_v >= built_v) if component.extra.get("version_compatible") \
        else have_v == built_v
    if not compatible:
        raise BackendError(f"engine {name!r} was built with TensorRT {built_trt}, this machine has TensorRT "
                           f"{trt_version}: {TRT_REBUILD_HINT}")
    if _capability(built_cc, name) != _capability(compute_capability, "this GPU"):
        raise BackendError(f"engine {name!r} was built for GPU compute capability {built_cc}, this GPU has "
                           f"{compute_capability}: {TRT_REBUILD_HINT}")


def _release(version: str, what: str) -> tuple[int, int, int]:
    """``"10.9.0.34"`` -> ``(10, 9, 0)`` (the build number does not matter)."""
    parts = (version.split(".") + ["0", "0"])[:3]
    try:
        return int(parts[0]), int(parts[1]), int(parts[2])
    except ValueError:
        raise BundleError(f"{what}: TensorRT version {version!r} is not like '10.9.0': {TRT_REBUILD_HINT}") from None


def _capability(cc: str, what: str) -> tuple[int, int]:
    """``"9.0"``, ``"sm_90"`` or ``"90"`` -> ``(9, 0)``."""
    text = cc.lower().removeprefix("sm_")
    try:
        if "." in text:
            major, minor = text.split(".", 1)
            return int(major), int(minor)
        return int(text[:-1]), int(text[-1])
    except ValueError:
        raise BundleError(f"{what}: compute capability {cc!r} is not like '9.0': {TRT_REBUILD_HINT}") from None


@contextmanager
def atomic_write(dest: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file that becomes ``dest`` only if the ``with`` block succeeds.

    Writes a temporary file in ``dest``'s folder, fsyncs it and ``os.replace``-s it onto ``dest``; on any
    error (or Ctrl-C) the temporary file is removed and an existing ``dest`` is left untouched.
    """
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, like open()
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def staging_dir(dest: Path) -> Path:
    """A new, private folder next to ``dest`` (same file system, so it can be renamed onto ``dest``)."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the result should look like mkdir's
        return staging
    except OSError as e:
        raise OutputError(f"cannot create a folder next to {dest}: {e.strerror or e}; check permissions") from None


def replace_dir(staging: Path, dest: Path) -> None:
    """Rename ``staging`` to ``dest``; an existing ``dest`` is moved aside first and removed after."""
    try:
        if not dest.exists():
            staging.rename(dest)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
        dest.rename(old / dest.name)
        staging.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise OutputError(f"cannot move the new files into {dest}: {e.strerror or e}; check permissions") from None
