"""Self-contained Hub remote code: the NSA algorithm bundled next to the modeling files that
``save_pretrained`` copies into a checkpoint, so that it loads with ``trust_remote_code=True`` where
nsa-hf is not installed.

``save_pretrained`` of a class registered for auto classes (``import nsa_hf`` registers NSA-Llama) copies
``configuration_nsa_llama.py``, ``modeling_nsa_llama.py`` and the sibling modules they import relatively,
and writes ``auto_map``. Those siblings import the algorithm from ``nsa_kernels``;
:func:`bundle_remote_code` rewrites each such import into

    try: from nsa_kernels... import names           # the installed package: Triton kernels on CUDA
    except ImportError: from .nsa_bundle import names  # bundled pure-PyTorch reference

and copies the reference modules next to them. transformers ignores imports inside ``try`` blocks
when it checks a remote module's requirements, so only torch and transformers are needed to load.

This module is itself shipped as remote code (the NSA models' ``save_pretrained`` calls it), so it uses
the standard library only: a model loaded as remote code and saved again is bundled from the copies of
the reference modules that lie next to this file. (transformers finds a module's relative imports with
a regular expression over its text, docstrings included: no line of this file may start with a relative
``from`` import of a module that is not here.)
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
from pathlib import Path

BUNDLED_KERNEL_MODULES = ("params", "compression", "reference")
_BUNDLE = "nsa_bundle"


def _kernels_dir() -> Path:
    """Where the reference modules to bundle are: next to this file when it is itself bundled remote code,
    else the installed ``nsa_kernels``."""
    here = Path(__file__).resolve().parent
    if all((here / f"{m}.py").is_file() for m in BUNDLED_KERNEL_MODULES):
        return here
    spec = importlib.util.find_spec("nsa_kernels")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("nsa_kernels is not importable: install nsa-hf to export a model")
    return Path(next(iter(spec.submodule_search_locations)))


def _rewrite_kernel_imports(source: str) -> tuple[str, list[str]]:
    """Wrap every ``from nsa_kernels[.x] import ...`` in a try/except falling back to the bundle.
    Imports already inside a ``try`` (a file bundled before) are left alone, so bundling twice is
    bundling once. Returns the new source and the imported names."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    in_try = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for s in t.body for n in ast.walk(s)}
    names: list[str] = []
    edits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "nsa_kernels" for a in node.names):
            raise ValueError(
                f"line {node.lineno}: `import nsa_kernels` cannot be bundled for remote code; "
                "use `from nsa_kernels[.module] import name`"
            )
        if (isinstance(node, ast.ImportFrom) and node.level == 0 and id(node) not in in_try
                and (node.module or "").split(".")[0] == "nsa_kernels"):
            edits.append(node)
    for node in sorted(edits, key=lambda n: n.lineno, reverse=True):
        indent = lines[node.lineno - 1][: node.col_offset]
        imported = ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in node.names)
        names += [a.name for a in node.names]
        block = (
            f"{indent}try:\n"
            f"{indent}    from {node.module} import {imported}\n"
            f"{indent}except ImportError:  # remote code without nsa-hf: bundled PyTorch reference\n"
            f"{indent}    from .{_BUNDLE} import {imported}\n"
        )
        lines[node.lineno - 1 : node.end_lineno] = [block]
    return "".join(lines), names


def bundle_remote_code(folder: str | os.PathLike) -> list[str]:
    """Make the ``*.py`` modeling files in ``folder`` independent of an installed nsa-hf (idempotent).
    Returns the names the bundle provides to the rewritten imports."""
    folder = Path(folder)
    src = _kernels_dir()
    needed: set[str] = set()
    for path in sorted(folder.glob("*.py")):
        if path.stem in BUNDLED_KERNEL_MODULES or path.stem == _BUNDLE:
            continue
        new, names = _rewrite_kernel_imports(path.read_text())
        if names:
            path.write_text(new)
            needed.update(names)
    for module in BUNDLED_KERNEL_MODULES:
        if src.resolve() != folder.resolve():
            shutil.copyfile(src / f"{module}.py", folder / f"{module}.py")
    exports = {}
    for module in BUNDLED_KERNEL_MODULES:
        tree = ast.parse((src / f"{module}.py").read_text())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                exports.setdefault(node.name, module)
    missing = sorted(needed - set(exports))
    if missing:
        raise ValueError(
            f"the modeling code imports {missing} from nsa_kernels, which the bundled reference modules "
            f"{BUNDLED_KERNEL_MODULES} do not define"
        )
    body = ['"""The NSA algorithm (pure-PyTorch reference) bundled for Hub remote code."""\n']
    for module in BUNDLED_KERNEL_MODULES:
        names = sorted(n for n, m in exports.items() if m == module)
        body.append(f"from .{module} import {', '.join(names)}  # noqa: F401\n")
    (folder / f"{_BUNDLE}.py").write_text("".join(body))
    return sorted(needed)


def has_remote_code(folder: str | os.PathLike) -> bool:
    """Whether ``folder``'s ``config.json`` has an ``auto_map`` (the checkpoint carries its modeling code)."""
    config = Path(folder) / "config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("auto_map"))


def bundle_if_remote_code(folder: str | os.PathLike) -> bool:
    """:func:`bundle_remote_code` when ``folder`` carries modeling code (``auto_map``); returns whether it did."""
    if not has_remote_code(folder):
        return False
    bundle_remote_code(folder)
    return True
