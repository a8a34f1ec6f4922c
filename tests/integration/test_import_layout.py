"""The repository root must not shadow HF's ``kernels`` package, which ``import transformers`` needs
(transformers >= 5.25 imports it): ``python -m pytest``, ``python -c`` and a REPL put the root first on
``sys.path``. ``kernels/`` is a plain folder holding ``nsa_kernels``; a folder without ``__init__.py`` is
only a namespace portion, which loses to an installed regular package of that name."""
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import importlib.util, json, sys
import transformers, nsa_hf, nsa_kernels
spec = importlib.util.find_spec("kernels")
print(json.dumps({
    "path0": sys.path[0],
    "nsa_kernels": nsa_kernels.__file__,
    "kernels_origin": spec.origin if spec else None,
    "kernels_locations": list(spec.submodule_search_locations or []) if spec else [],
}))
"""


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_no_importable_kernels_package_at_the_root():
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/ must stay a plain folder (see pyproject.toml)"
    assert not (ROOT / "kernels.py").exists()
    assert (ROOT / "kernels" / "nsa_kernels" / "__init__.py").exists()


def test_transformers_and_nsa_hf_import_from_the_repository_root():
    """A Python started in the repository root (as `python -c` and a REPL are: '' first on sys.path)."""
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["path0"] in ("", str(ROOT))
    assert Path(seen["nsa_kernels"]).resolve().is_relative_to(ROOT / "kernels" / "nsa_kernels") or "site-packages" in seen["nsa_kernels"]
    if _hf_kernels_installed():
        # HF's package, not our folder.
        assert seen["kernels_origin"] is not None
        assert not Path(seen["kernels_origin"]).resolve().is_relative_to(ROOT), seen
    else:
        # At most a harmless namespace portion: no module code of ours runs as `kernels`.
        assert seen["kernels_origin"] in (None, "namespace"), seen


def test_pytest_collects_from_the_repository_root():
    """`python -m pytest` from the root (the README's command) imports transformers through a test module."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "tests/hf/test_hf_config.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "error" not in done.stdout.lower().split("\n")[-2], done.stdout[-2000:]
