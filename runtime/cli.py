"""The ``runtime`` command: inspect and unpack ``.plan`` engine bundles.

    runtime info PLAN [--json] [--no-verify]   what is in a bundle (checks every payload's sha256)
    runtime unpack PLAN DIR [--force]          write each component as a raw file for trtexec / polygraphy

Exit codes are documented in ``runtime/errors.py`` (0 ok, 2 usage, 3 bad input, 4 bundle, 5 backend,
6 guard, 7 output, 130 interrupted). Errors print one line, ``error: <message>``, to stderr.

Adding a subcommand: write ``add_<name>_arguments(parser)`` and ``run_<name>(args) -> int`` and list them in
``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from runtime.bundle import Bundle
from runtime.errors import ExitCode, OutputError, RuntimeToolError
from runtime.manifest import ComponentSpec, Manifest

# -- info -----------------------------------------------------------------------------------------------------


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", type=Path, help="the .plan bundle")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the sha256 check of the payloads (faster on multi-GB bundles)")


def run_info(args: argparse.Namespace) -> int:
    with Bundle.open(args.plan, verify=args.verify) as bundle:
        if args.json:
            print(json.dumps(bundle.manifest.to_dict(), indent=2, ensure_ascii=False))
        else:
            checked = "payload hashes verified" if args.verify else "payload hashes NOT verified"
            print(f"bundle      {bundle.path} ({_size(bundle.file_size)}, format {bundle.format_version}, {checked})")
            print(describe(bundle.manifest))
    return ExitCode.OK


def describe(m: Manifest) -> str:
    """A human summary of a manifest: settings, then one row per component with its I/O below it."""
    lines = [f"family      {m.family}",
             f"defaults    {_pairs(m.defaults)}",
             f"latent      {_pairs(m.latent)}",
             f"scheduler   {_pairs(m.scheduler)}",
             f"guards      {_pairs(m.guards) if m.guards else 'none (unguarded bundle)'}"]
    for tok in m.tokenizers:
        rest = {k: v for k, v in tok.items() if k not in ("name", "files")}
        lines.append(f"tokenizer   {tok.get('name', '?')}: {_pairs(rest)}, files {', '.join(tok.get('files', {}))}")
    if m.created_by:
        lines.append(f"created_by  {_pairs(m.created_by)}")
    header = ("name", "kind", "backend", "precision", "size", "sha256", "TensorRT / GPU")
    rows = [header] + [_component_row(c) for c in m.components]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines.append(f"\ncomponents ({len(m.components)})")
    for row, c in zip(rows, [None] + m.components):
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if c is not None:
            lines += [f"      in   {t.describe()}" for t in c.inputs]
            lines += [f"      out  {t.describe()}" for t in c.outputs]
            if c.external_data:
                lines.append(f"      external data in {c.external_data!r}")
    return "\n".join(lines)


def _component_row(c: ComponentSpec) -> tuple[str, ...]:
    target = f"{c.tensorrt_version or '?'} / sm {c.compute_capability or '?'}" if c.backend == "tensorrt" else "-"
    return (c.name, c.kind, c.backend, c.precision or "-", _size(c.size), c.sha256[:12], target)


def _pairs(d: dict) -> str:
    if not d:
        return "-"
    return " ".join(f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, (dict, list)) else v}"
                    for k, v in d.items())


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


# -- unpack ---------------------------------------------------------------------------------------------------


def add_unpack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", type=Path, help="the .plan bundle")
    p.add_argument("dir", type=Path, help="folder to create with one file per component and manifest.json")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists and is not empty")


def run_unpack(args: argparse.Namespace) -> int:
    dest: Path = args.dir
    _check_unpack_destination(dest, args.force)
    # Payload hashes are checked while extracting, so the file is read once.
    with Bundle.open(args.plan, verify=False) as bundle:
        staging = _staging_dir(dest)
        try:
            for c in bundle.components:
                target = staging / c.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                bundle.extract(c.name, target)
            (staging / "manifest.json").write_text(
                json.dumps(bundle.manifest.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            _replace_dir(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    print(f"unpacked {len(bundle.components)} components of {args.plan} into {dest}")
    for c in bundle.components:
        print(f"  {dest / c.filename}")
    return ExitCode.OK


def _check_unpack_destination(dest: Path, force: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"{dest} exists and is not a directory: choose another DIR")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise OutputError(f"{dest} is not empty: choose an empty or new DIR, or pass --force to replace it")


def _staging_dir(dest: Path) -> Path:
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


def _replace_dir(staging: Path, dest: Path) -> None:
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
        raise OutputError(f"cannot move the unpacked files into {dest}: {e.strerror or e}; check permissions") from None


# -- entry point ----------------------------------------------------------------------------------------------

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

# name -> (help, add_arguments, run). `generate` and `verify` go here.
SUBCOMMANDS: dict[str, tuple[str, AddArguments, Run]] = {
    "info": ("show what a .plan bundle contains", add_info_arguments, run_info),
    "unpack": ("write a bundle's components as raw files (.onnx, .engine, tokenizer files)",
               add_unpack_arguments, run_unpack),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runtime", description="Guarded text-to-image runtime for .plan engine bundles.",
        epilog="exit codes: 0 ok, 1 internal error, 2 usage, 3 bad input, 4 bundle, 5 backend/GPU, 6 guard "
               "failed, 7 output, 130 interrupted")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (errors go to stderr as one ``error: ...`` line)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.run(args))
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else ExitCode.USAGE
    except RuntimeToolError as e:
        return _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted", ExitCode.INTERRUPTED)
    except BrokenPipeError:  # e.g. `runtime info x.plan | head`: stop quietly, like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    except Exception as e:  # a bug: one line by default, the traceback with RUNTIME_DEBUG=1
        if os.environ.get("RUNTIME_DEBUG"):
            raise
        return _fail(f"internal error {type(e).__name__}: {e} (a bug: please report it; set RUNTIME_DEBUG=1 "
                     "for the traceback)", ExitCode.FAILURE)


def _fail(message: str, code: int) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
