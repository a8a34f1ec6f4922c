"""nsa_kernels reads top to bottom: every module imports (at module level or inside functions) only
modules below it in LAYERS, so there is no import cycle, and each imports alone in a fresh interpreter."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "kernels" / "nsa_kernels"
# Bottom to top; modules on one line may not import each other.
LAYERS = [
    ["params"],
    ["compression", "reference"],
    ["primitives"],
    ["cmp", "sel", "slc", "win", "gate", "decode"],
    ["ops"],
    ["parallel"],
    ["nsa"],
    ["__init__"],
]
LEVEL = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def _sibling_imports(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(node.module.split(".")[0])
            else:
                names.update(a.name for a in node.names)
        elif isinstance(node, (ast.ImportFrom, ast.Import)):
            mods = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            names.update(m.split(".")[1] for m in mods if m and m.startswith("nsa_kernels."))
    return names


def test_every_module_has_a_layer():
    assert {p.stem for p in PKG.glob("*.py")} == set(LEVEL)


@pytest.mark.parametrize("module", sorted(LEVEL))
def test_imports_point_down(module):
    for dep in _sibling_imports(PKG / f"{module}.py"):
        assert LEVEL[dep] < LEVEL[module], f"{module} imports {dep}, which is not below it"


def test_each_module_imports_alone():
    """In one fresh interpreter (torch loaded once), each module imported with no nsa_kernels module loaded."""
    code = (
        "import importlib, sys, torch\n"
        "for m in sys.argv[1:]:\n"
        "    for k in [k for k in sys.modules if k.startswith('nsa_kernels')]: del sys.modules[k]\n"
        "    importlib.import_module('nsa_kernels.' + m)\n"
    )
    modules = sorted(set(LEVEL) - {"__init__"})
    subprocess.run([sys.executable, "-c", code, *modules], check=True, cwd=PKG.parents[1],
                   env={"PYTHONPATH": str(PKG.parent), "TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"})
