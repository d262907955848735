"""``python -m export build --model DIR --out engines/NAME.plan [...]`` (exit codes: runtime/errors.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from runtime.errors import BadInputError, ExitCode, RuntimeToolError  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="diffusers model -> one .plan bundle (ONNX graphs or TensorRT engines)")
    b.add_argument("--model", type=Path, required=True, help="local diffusers folder or .safetensors file")
    b.add_argument("--out", type=Path, required=True, help="bundle to write, e.g. engines/sd15.plan")
    b.add_argument("--backend", default="onnx", choices=("onnx", "tensorrt"))
    b.add_argument("--precision", choices=("fp32", "fp16"), default=None,
                   help="all components (default: the build profile's per-component choice)")
    b.add_argument("--height", type=int, default=None, help="image height (default: the model's own)")
    b.add_argument("--width", type=int, default=None, help="image width (default: the model's own)")
    b.add_argument("--dynamic-hw", action="store_true", help="graphs take any multiple-of-8 size")
    b.add_argument("--batch", default=None, help="MIN:OPT:MAX prompts per call (TensorRT profile)")
    b.add_argument("--profile", default=None, help="engines/profiles name or JSON path (default: the first profile whose "
                   "'match' fits the model, else the family's)")
    b.add_argument("--guards", default="", help="comma list of guards to fuse: safeguider,saferedir,safepatch,safectrl")
    b.add_argument("--guard-dir", type=Path, default=None,
                   help="root of trained guard weights, <root>/<model name>/<guard>/ (default: models/guards)")
    b.add_argument("--guard-weights", action="append", default=[], metavar="GUARD=DIR",
                   help="one guard's weights folder instead of --guard-dir's (repeatable), e.g. "
                        "safepatch=models/guards_renderer/tinyworld/safepatch")
    b.add_argument("--guard-setting", action="append", default=[], metavar="GUARD.KEY=VALUE",
                   help="a run-time setting written into the manifest instead of the guard config's (repeatable; "
                        "VALUE is JSON or a word), e.g. safeguider.mode=search")
    b.add_argument("--exporter", choices=("dynamo", "legacy"), default=None)
    b.add_argument("--timing-cache", type=Path, default=None)
    b.add_argument("--config", type=Path, default=None, help="local diffusers folder for an original-layout checkpoint")
    b.add_argument("--family", choices=("sd1", "sd2", "sdxl"), default=None, help="override family detection")
    b.add_argument("--checker", type=Path, default=None, metavar="ONNX",
                   help="embed a post-hoc image checker (an ONNX image classifier) as component image_checker")
    b.add_argument("--checker-config", type=Path, default=None, metavar="JSON",
                   help="its config (default: the .json beside the .onnx; see runtime/guards/image_checker.py)")
    b.add_argument("--idle-graph", choices=("auto", "always", "never"), default="auto",
                   help="guarded ONNX bundles: add denoise_idle, the denoise graph without the guards' step inputs "
                        "that runs while they are zero (export/idle.py); auto: when a guard asks for it (SafePatch)")
    b.add_argument("--no-idle-graph", dest="idle_graph", action="store_const", const="never",
                   help="the same as --idle-graph never")
    return p


def guard_settings(items: list[str]) -> dict[str, dict]:
    """``GUARD.KEY=VALUE`` strings -> ``{guard: {key: value}}`` (VALUE parsed as JSON, else kept as a word)."""
    out: dict[str, dict] = {}
    for item in items:
        target, eq, text = item.partition("=")
        guard, dot, key = target.partition(".")
        if not (eq and dot and guard and key):
            raise BadInputError(f"--guard-setting {item!r}: write GUARD.KEY=VALUE, e.g. safeguider.mode=search")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        out.setdefault(guard, {})[key] = value
    return out


def guard_weights(items: list[str]) -> dict[str, Path]:
    """``GUARD=DIR`` strings -> ``{guard: folder}``."""
    out = {}
    for item in items:
        guard, eq, folder = item.partition("=")
        if not (eq and guard and folder):
            raise BadInputError(f"--guard-weights {item!r}: write GUARD=DIR, e.g. safepatch=models/guards_renderer/"
                                "tinyworld/safepatch")
        out[guard] = Path(folder)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .build import BuildOptions, build

    try:
        opts = BuildOptions(model=args.model, out=args.out, backend=args.backend, precision=args.precision,
                            height=args.height, width=args.width, batch=args.batch, dynamic_hw=args.dynamic_hw,
                            profile=args.profile, guards=[g for g in args.guards.split(",") if g],
                            guard_dir=args.guard_dir, guard_settings=guard_settings(args.guard_setting),
                            guard_weights=guard_weights(args.guard_weights),
                            exporter=args.exporter, timing_cache=args.timing_cache, config=args.config,
                            family=args.family, checker=args.checker, checker_config=args.checker_config,
                            idle_graph=args.idle_graph)
        path = build(opts)
    except RuntimeToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
