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
