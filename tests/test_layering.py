"""The pipeline's import rules: runtime is lean, and nothing imports upstream (guards -> train -> export -> runtime)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

FORBIDDEN = {
    "runtime": {"torch", "diffusers", "transformers", "train", "export", "bench"},
    "export": {"train", "bench"},
    "guards": {"train", "export", "bench", "runtime"},
}


def _modules(path: Path) -> set[str]:
    """The absolute module names ``path`` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _imports(path: Path) -> set[str]:
    return {name.split(".")[0] for name in _modules(path)}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upstream_or_heavy_imports(package):
    bad = {str(p.relative_to(ROOT)): sorted(_imports(p) & FORBIDDEN[package])
           for p in (ROOT / package).rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}


def test_guards_import_only_stdlib_torch_diffusers_safetensors():
    allowed = set(sys.stdlib_module_names) | {"__future__", "guards", "torch", "diffusers", "safetensors"}
    bad = {str(p.relative_to(ROOT)): sorted(_imports(p) - allowed) for p in (ROOT / "guards").rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}


def test_runtime_cli_process_never_loads_torch():
    code = ("import sys, runtime.cli, runtime.bundle, runtime.tokenizer, runtime.schedulers, runtime.backends; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'train', 'export', 'tensorrt') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


SERVING = {"tritonclient", "pytriton", "grpc", "gevent", "triton_python_backend_utils"}


def test_triton_imports_stay_in_the_served_model():
    """Only the Triton model (runtime/serve/model.py) imports Triton's Python-backend module, no runtime file
    imports a Triton client or server package, and the model imports nothing but the lean runtime and numpy."""
    users = {str(p.relative_to(ROOT)): sorted(_imports(p) & SERVING) for p in (ROOT / "runtime").rglob("*.py")}
    assert {k: v for k, v in users.items() if v} == {"runtime/serve/model.py": ["triton_python_backend_utils"]}
    allowed = set(sys.stdlib_module_names) | {"__future__", "numpy", "runtime", "triton_python_backend_utils"}
    assert _imports(ROOT / "runtime" / "serve" / "model.py") <= allowed


def test_runtime_generate_never_loads_serving_modules(tinyworld_plan, tmp_path):
    code = ("import sys; from runtime import cli; rc = cli.main(sys.argv[1:]); "
            f"print(rc, sorted(m for m in sys.modules if m.split('.')[0] in {sorted(SERVING)!r} "
            "or m.startswith('runtime.serve')))")
    out = subprocess.run([sys.executable, "-c", code, "generate", "--engine", str(tinyworld_plan), "--prompt", "x",
                          "--steps", "1", "--out", str(tmp_path / "x.png")], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0 []"
