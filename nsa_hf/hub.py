"""Hub export: a checkpoint folder whose modeling code loads with ``trust_remote_code=True`` where
nsa-hf is not installed, plus a model card; and the upload of that folder.

``save_pretrained`` already copies ``configuration_nsa_llama.py``, ``modeling_nsa_llama.py`` and the
sibling modules they import relatively, and writes ``auto_map``. Those siblings import the algorithm
from ``nsa_kernels``; :func:`bundle_remote_code` rewrites each such import into

    try:
        from nsa_kernels... import names      # the installed package: Triton kernels on CUDA
    except ImportError:
        from .nsa_bundle import names          # bundled pure-PyTorch reference

and copies the reference modules next to them. transformers ignores imports inside ``try`` blocks
when it checks a remote module's requirements, so only torch and transformers are needed to load.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import shutil
from pathlib import Path

BUNDLED_KERNEL_MODULES = ("params", "compression", "reference")
_BUNDLE = "nsa_bundle"


def _kernels_dir() -> Path:
    spec = importlib.util.find_spec("nsa_kernels")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("nsa_kernels is not importable: install nsa-hf to export a model")
    return Path(next(iter(spec.submodule_search_locations)))


def _rewrite_kernel_imports(source: str) -> tuple[str, list[str]]:
    """Wrap every ``from nsa_kernels[.x] import ...`` in a try/except falling back to the bundle.
    Returns the new source and the imported names."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    names: list[str] = []
    edits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "nsa_kernels" for a in node.names):
            raise ValueError(
                f"line {node.lineno}: `import nsa_kernels` cannot be bundled for remote code; "
                "use `from nsa_kernels[.module] import name`"
            )
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "nsa_kernels":
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
    """Make the ``*.py`` modeling files in ``folder`` independent of an installed nsa-hf.
    Returns the names the bundle provides."""
    folder = Path(folder)
    needed: set[str] = set()
    for path in sorted(folder.glob("*.py")):
        if path.stem in BUNDLED_KERNEL_MODULES or path.stem == _BUNDLE:
            continue
        new, names = _rewrite_kernel_imports(path.read_text())
        if names:
            path.write_text(new)
            needed.update(names)
    src = _kernels_dir()
    for module in BUNDLED_KERNEL_MODULES:
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


def export_for_hub(model, folder: str | os.PathLike, tokenizer=None, card=None, **save_kwargs) -> Path:
    """Write ``model`` (safetensors, config with ``auto_map``, self-contained modeling code),
    ``tokenizer`` and a model card (a ``huggingface_hub.ModelCard``, or a string) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, **save_kwargs)
    if "auto_map" not in model.config.to_dict():
        raise ValueError(
            f"{type(model).__name__} has no auto_map: its classes were not registered for auto classes "
            "(import nsa_hf registers NSA-Llama)"
        )
    bundle_remote_code(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if card is not None:
        (folder / "README.md").write_text(card if isinstance(card, str) else str(card))
    return folder


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False,
                       commit_message: str = "Upload NSA model") -> str:
    """Upload an exported folder (needs network and a token with write access). Returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message)
    return getattr(info, "commit_url", str(info))
