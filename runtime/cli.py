"""The ``runtime`` command: inspect and unpack ``.plan`` engine bundles.

    runtime info PLAN [--json] [--no-verify]   what is in a bundle (checks every payload's sha256)
    runtime unpack PLAN DIR [--force]          write each component as a raw file for trtexec / polygraphy
    runtime generate --prompt TEXT [--engine PLAN] [--out PNG] [--report JSON] [--checker ONNX] ...   generate images
    runtime verify PLAN                        check the hashes and run every graph once (prints OK)
    runtime compare --prompt TEXT --baseline PLAN --out PNG [--engine PLAN]   guarded vs baseline, side by side
    runtime triton-repo --engine PLAN --out REPO [--name NAME] [--instances N] [--gpus 0,1] [--max-batch B] ...
                                               a Triton model repository serving the bundle (runtime/serve/)

Exit codes are documented in ``runtime/errors.py`` and every bad input with its code and message in
``runtime/BAD_INPUT.md`` (0 ok, 2 usage, 3 bad input, 4 bundle, 5 backend,
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

from runtime.bundle import Bundle, replace_dir, staging_dir
from runtime.errors import BadInputError, BundleError, ExitCode, OutputError, RuntimeToolError
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
        staging = staging_dir(dest)
        try:
            for c in bundle.components:
                target = staging / c.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                bundle.extract(c.name, target)
            (staging / "manifest.json").write_text(
                json.dumps(bundle.manifest.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            replace_dir(staging, dest)
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


# -- generate -------------------------------------------------------------------------------------------------

ENGINES = Path(__file__).resolve().parent.parent / "engines"
DEFAULT_PLAN = ENGINES / "tinyworld_stack.plan"  # a guarded runtime's default is its guarded bundle
EXTRA_CHECKER = "image_checker.extra"  # the name a --checker runs under, after the bundle's own guards


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    from runtime.backends import BACKENDS
    from runtime.schedulers import SCHEDULERS

    p.add_argument("--engine", type=str, default=None, metavar="PLAN",
                   help=f"the .plan bundle: a path, or the name of one in {ENGINES} (e.g. tinyworld for the "
                        f"unguarded model; default: {DEFAULT_PLAN.name}, the four-guard stack, built by `make bundle`)")
    p.add_argument("--prompt", required=True, help="what to draw (\"\" generates unconditionally)")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (the uncond half of CFG)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the bundle's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale, <= 1 disables CFG (default: the bundle's)")
    p.add_argument("--seed", type=int, default=0,
                   help="noise seed, 0..4294967295, or -1 for a random one (recorded in the PNG and report; default 0)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the bundle's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the bundle's)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--scheduler", default=None, metavar="{" + ",".join(SCHEDULERS) + "}",
                   help="sampler (default: the bundle's); checked by the pipeline (exit 3 if unknown)")
    p.add_argument("--karras", action="store_true", help="Karras sigmas (euler, euler_a, dpmpp_2m)")
    p.add_argument("--backend", default="auto", metavar="{" + ",".join(BACKENDS) + "}",
                   help="engine backend (default auto); exit 3 if unknown")
    p.add_argument("--out", type=Path, default=None, metavar="PNG",
                   help="output PNG (default out/<seed>.png); with --batch N > 1: NAME-0.png ... NAME-<N-1>.png; "
                        "missing folders are created (only when the run succeeds)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--report", type=Path, default=None, metavar="JSON",
                   help="also write the run report as JSON (also for a run a guard blocks: then with "
                        "\"blocked\": true and no PNG)")
    p.add_argument("--checker", type=Path, default=None, metavar="ONNX",
                   help=f"add a post-hoc image checker (an ONNX image classifier) after the bundle's guards, as "
                        f"{EXTRA_CHECKER!r}; a flagged image is not written (exit 6). It cannot replace or weaken a "
                        "checker the bundle carries. See runtime/guards/image_checker.py")
    p.add_argument("--checker-config", type=Path, default=None, metavar="JSON",
                   help="the checker's config (default: the .json beside the .onnx, if present)")
    p.add_argument("--progress", action="store_true",
                   help="print `step I/N` lines to stderr (a progress bar is shown anyway on a terminal)")


def plan_path(engine: str | Path | None) -> Path:
    """``--engine``: a path, a bundle name in ``engines/`` (``tinyworld`` -> ``engines/tinyworld.plan``), or None
    for the default bundle."""
    if engine is None:
        if not DEFAULT_PLAN.is_file():
            raise BundleError(f"the default bundle {DEFAULT_PLAN} is missing: build it with `make bundle` (or pass "
                              "--engine PLAN)")
        return DEFAULT_PLAN
    path = Path(engine)
    named = ENGINES / f"{engine}.plan"
    if not path.exists() and path.suffix == "" and path.name == str(engine) and named.is_file():
        return named
    return path


class Outputs:
    """The files one run writes: checked once before the (long) run, written to temporary names beside their
    destinations, then all renamed into place, so a failure or Ctrl-C leaves no partial output."""

    def __init__(self, images: list[Path], report: Path | None, overwrite: bool):
        self.images, self.report = images, report
        targets = [(p, "--out") for p in images] + ([(report, "--report")] if report else [])
        if report is not None and report.resolve() in {p.resolve() for p in images}:
            raise OutputError(f"--report {report} is also an image output: choose another file name")
        for path, option in targets:
            _check_output(path, overwrite, option)

    def write(self, images: list, report: dict | None, parameters: str = "") -> None:
        """Write ``images`` (PNG with the ``parameters`` text) and the ``report`` JSON, all or nothing."""
        from runtime.image import png_bytes

        blobs = [(path, png_bytes(image, parameters)) for path, image in zip(self.images, images)]
        if self.report is not None and report is not None:
            blobs.append((self.report, (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8")))
        staged: list[tuple[Path, Path]] = []
        try:
            for dest, data in blobs:
                tmp = _existing_folder(dest) / f".{dest.name}.{os.urandom(4).hex()}.part"
                staged.append((tmp, dest))
                tmp.write_bytes(data)
            for _, dest in staged:
                dest.parent.mkdir(parents=True, exist_ok=True)
            for tmp, dest in staged:
                os.replace(tmp, dest)
        except OSError as e:
            raise OutputError(f"cannot write {dest}: {e.strerror or e}; check the path, permissions and free "
                              "space") from None
        finally:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)


def _output_paths(out: Path, batch: int) -> list[Path]:
    if batch <= 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(batch)]


def _check_output(path: Path, overwrite: bool, option: str) -> None:
    """Fail (OutputError) now, before the run, if ``path`` cannot be written; creates nothing.

    A missing folder is fine if its nearest existing ancestor is a folder we can create files in (it is
    created when the run succeeds). Writability is probed by creating and removing an empty private file,
    which also catches read-only mounts and /proc, where ``os.access`` says yes."""
    if path.is_dir():
        raise OutputError(f"{option} {path} is a directory: pass a file name, e.g. {path / 'image.png'}")
    if path.exists() and not overwrite:
        raise OutputError(f"{option} {path} exists: pass --overwrite or choose another file name")
    ancestor = _existing_folder(path)
    if not ancestor.is_dir():
        raise OutputError(f"{option} {path}: cannot create folder {path.parent} because {ancestor} is not a folder: "
                          "choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".grt-probe.", suffix=".tmp", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{option} {path}: folder {ancestor} is not writable ({e.strerror or e}): check its "
                          "permissions or choose another path") from None


def _existing_folder(path: Path) -> Path:
    """``path``'s folder, or its nearest existing ancestor (where the temporary file can go)."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _checker_config(checker: Path | None, config_path: Path | None) -> dict | None:
    """The added image checker's config from --checker / --checker-config (BadInputError if unusable)."""
    if checker is None:
        if config_path is not None:
            raise BadInputError(f"--checker-config {config_path} needs --checker FILE.onnx: pass the checker graph too")
        return None
    if not checker.is_file():
        raise BadInputError(f"--checker {checker} not found (or not a file): pass an ONNX image classifier, e.g. "
                            "models/tinyworld-judge/checker.onnx")
    if config_path is None:
        beside = checker.with_suffix(".json")
        config_path = beside if beside.is_file() else None
    config: dict = {}
    if config_path is not None:
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BadInputError(f"--checker-config {config_path} not found: check the path") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise BadInputError(f"--checker-config {config_path} is not readable JSON ({e}): fix the file") from None
        if not isinstance(config, dict):
            raise BadInputError(f"--checker-config {config_path} must hold a JSON object, got "
                                f"{type(config).__name__}: see runtime/guards/image_checker.py")
        if "component" in config or "path" in config:
            raise BadInputError(f"--checker-config {config_path}: 'path' and 'component' are set by --checker; "
                                "remove them from the config")
    from runtime.guards.image_checker import check_config

    check_config({**config, "path": str(checker)}, "user", f"--checker-config {config_path or checker}")
    return {**config, "path": str(checker)}


def _progress_callback(pipe, steps: int | None, print_lines: bool):
    """A step callback drawing a tqdm bar on a terminal and/or printing ``step I/N`` lines; (callback, bar)."""
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=steps or pipe.defaults.get("steps"), desc="denoise", unit="step", leave=False)
    if bar is None and not print_lines:
        return None, None

    def on_step(i: int, n: int, t: float) -> None:
        if bar is not None:
            if i == 0 and bar.n:  # a checker asked for a second sampling (runtime/guards Resample)
                bar.reset()
                bar.set_description("denoise (again, guards at full strength)")
            bar.update()
        if print_lines:
            print(f"step {i + 1}/{n}", file=sys.stderr, flush=True)

    return on_step, bar


def run_generate(args: argparse.Namespace) -> int:
    from runtime.guards import ImageBlocked
    from runtime.image import parameters_text
    from runtime.pipeline import Pipeline, resolve_seed

    plan = plan_path(args.engine)
    seed = resolve_seed(args.seed)  # drawn here: it names the default output
    out = args.out if args.out is not None else Path("out") / f"{seed}.png"
    outputs = Outputs(_output_paths(out, args.batch if isinstance(args.batch, int) else 1), args.report,
                      args.overwrite)
    checker = _checker_config(args.checker, args.checker_config)
    settings = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                    guidance=args.guidance, seed=seed, height=args.height, width=args.width,
                    batch=args.batch, scheduler=args.scheduler, karras=args.karras)
    with Pipeline.open(plan, backend=args.backend, extra_guards={EXTRA_CHECKER: checker} if checker else None) as pipe:
        callback, bar = _progress_callback(pipe, args.steps, args.progress)
        try:
            result = pipe.generate(**settings, callback=callback)
        except ImageBlocked as e:  # the report of a blocked run: no image, "blocked": true
            outputs.images = []
            outputs.write([], {**settings, "plan": str(plan), "outputs": [], "blocked": True, "error": str(e),
                               "guards": getattr(e, "guard_report", {})})
            raise
        finally:
            if bar is not None:
                bar.close()
    report = dict(result.report, plan=str(plan), outputs=[str(p) for p in outputs.images])
    outputs.write(result.images, report, parameters_text(report))
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    ms = report["stages_ms"]
    print(f"wrote {', '.join(str(p) for p in outputs.images)} ({report['width']}x{report['height']}, "
          f"{report['steps']} steps {report['scheduler']}, seed {report['seed']}, {ms['total'] / 1000:.2f} s)")
    return ExitCode.OK


# -- compare --------------------------------------------------------------------------------------------------


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--engine", type=str, default=None, metavar="PLAN",
                   help=f"the guarded bundle (path or name in engines/; default: {DEFAULT_PLAN.name})")
    p.add_argument("--baseline", type=str, required=True, metavar="PLAN",
                   help="the bundle to compare with, e.g. tinyworld (the unguarded model)")
    p.add_argument("--seed", type=int, default=0, help="noise seed for both, or -1 for a random one (default 0)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the guarded bundle's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the guarded bundle's)")
    p.add_argument("--out", type=Path, required=True, metavar="PNG", help="the side-by-side PNG")
    p.add_argument("--report", type=Path, default=None, metavar="JSON", help="also write both runs' reports")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def run_compare(args: argparse.Namespace) -> int:
    from runtime.compare import guard_lines, side_by_side
    from runtime.image import parameters_text
    from runtime.pipeline import Pipeline, resolve_seed

    plans = {"guarded": plan_path(args.engine), "baseline": plan_path(args.baseline)}
    outputs = Outputs([args.out], args.report, args.overwrite)
    seed = resolve_seed(args.seed)
    settings = dict(prompt=args.prompt, seed=seed, steps=args.steps, guidance=args.guidance)
    results, lines = {}, {}
    for role in ("guarded", "baseline"):  # the baseline takes the guarded run's resolved settings
        with Pipeline.open(plans[role]) as pipe:
            results[role] = pipe.generate(**settings)
            lines[role] = guard_lines(pipe, results[role].report)
            r = results[role].report
            settings = dict(prompt=r["prompt"], seed=r["seed"], steps=r["steps"], guidance=r["guidance"],
                            scheduler=r["scheduler"], height=r["height"], width=r["width"])
    g, b = results["guarded"].report, results["baseline"].report
    caption = (f"\"{g['prompt']}\"  seed {g['seed']}, {g['scheduler']} {g['steps']} steps, CFG {g['guidance']}, "
               f"{g['width']}x{g['height']}")
    titles = tuple(f"{plans[role].name} ({len(results[role].report['guards']) or 'no'} guard"
                   f"{'' if len(results[role].report['guards']) == 1 else 's'})" for role in ("baseline", "guarded"))
    picture = side_by_side(results["baseline"].images[0], results["guarded"].images[0], titles, caption,
                           lines["guarded"] or ["(no guards)"])
    report = {"prompt": g["prompt"], "seed": g["seed"], "guarded": dict(g, plan=str(plans["guarded"])),
              "baseline": dict(b, plan=str(plans["baseline"])), "outputs": [str(args.out)]}
    outputs.write([picture], report, parameters_text(dict(g, model=f"{plans['guarded'].name} vs "
                                                                   f"{plans['baseline'].name}")))
    print(f"wrote {args.out}: {plans['baseline'].name} (left) vs {plans['guarded'].name} (right), seed {g['seed']}")
    for line in lines["guarded"]:
        print(f"  {line}")
    return ExitCode.OK


# -- verify ---------------------------------------------------------------------------------------------------


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    from runtime.backends import BACKENDS

    p.add_argument("plan", type=Path, help="the .plan bundle")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="engine backend (default auto)")


def run_verify(args: argparse.Namespace) -> int:
    from runtime.pipeline import Pipeline

    with Pipeline.open(args.plan, backend=args.backend, verify=True) as pipe:  # every payload's sha256
        result = pipe.generate("verify", steps=1)  # one step through every graph at the default size
    ms = result.report["stages_ms"]
    print(f"OK {args.plan}: hashes verified, one-step smoke run {result.report['width']}x"
          f"{result.report['height']} in {ms['total']:.0f} ms")
    return ExitCode.OK


# -- triton-repo ----------------------------------------------------------------------------------------------


def add_triton_repo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", type=str, default=None, metavar="PLAN",
                   help=f"the .plan bundle to serve: a path or a name in engines/ (default: {DEFAULT_PLAN.name})")
    p.add_argument("--out", type=Path, required=True, metavar="REPO",
                   help="the model repository folder (created if missing; other models in it are kept)")
    p.add_argument("--name", default=None, help="the model name (default: the bundle's file name without .plan)")
    p.add_argument("--instances", type=int, default=1, help="model instances per group (default 1)")
    p.add_argument("--gpus", default=None, metavar="IDS",
                   help="GPU ids, e.g. 0,1: one KIND_GPU instance group per GPU (default: KIND_CPU; GPU 0 for a "
                        "TensorRT bundle)")
    p.add_argument("--max-batch", type=int, default=None, metavar="B",
                   help="max_batch_size: requests the dynamic batcher hands over at once (default and upper limit: "
                        "the bundle's max batch)")
    p.add_argument("--max-queue-delay-us", type=int, default=0, metavar="U",
                   help="how long the dynamic batcher waits to fill a batch, in microseconds (default 0)")
    p.add_argument("--copy", action="store_true",
                   help="copy the bundle into the repository (REPO/NAME/1/bundle.plan) instead of referencing its "
                        "absolute path")
    p.add_argument("--backend", default="auto", help="engine backend of the served pipeline (default auto)")
    p.add_argument("--overwrite", action="store_true", help="replace REPO/NAME if it exists")


def run_triton_repo(args: argparse.Namespace) -> int:
    from runtime.serve.triton_repo import write_model

    dest = write_model(plan_path(args.engine), args.out, name=args.name, instances=args.instances, gpus=args.gpus,
                       max_batch=args.max_batch, max_queue_delay_us=args.max_queue_delay_us, copy=args.copy,
                       backend=args.backend, overwrite=args.overwrite)
    print(f"wrote Triton model {dest.name!r} in {args.out}: {dest / 'config.pbtxt'}, {dest / '1' / 'model.py'}")
    return ExitCode.OK


# -- entry point ----------------------------------------------------------------------------------------------

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

# name -> (help, add_arguments, run). `generate` and `verify` go here.
SUBCOMMANDS: dict[str, tuple[str, AddArguments, Run]] = {
    "info": ("show what a .plan bundle contains", add_info_arguments, run_info),
    "unpack": ("write a bundle's components as raw files (.onnx, .engine, tokenizer files)",
               add_unpack_arguments, run_unpack),
    "generate": ("generate images from a prompt with a .plan bundle", add_generate_arguments, run_generate),
    "verify": ("check a bundle's hashes and run its graphs once (prints OK)", add_verify_arguments, run_verify),
    "compare": ("one prompt through a guarded and another bundle, side by side in one PNG with what each guard did",
                add_compare_arguments, run_compare),
    "triton-repo": ("write a Triton Inference Server model repository that serves a bundle (Python backend)",
                    add_triton_repo_arguments, run_triton_repo),
}


class _Parser(argparse.ArgumentParser):
    """argparse with a ONE-line usage error (``error: runtime generate: argument --steps: invalid int value:
    '2.5'; see `runtime generate --help```), exit code 2, like every other error of this command."""

    def error(self, message: str):
        self.exit(ExitCode.USAGE, f"error: {self.prog}: {' '.join(message.split())}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
