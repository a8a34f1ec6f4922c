"""The installed nsa-hf version, read from the distribution's metadata (the single source: pyproject)."""
from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "nsa-hf"


def installed_version() -> str:
    """Version of the installed ``nsa-hf`` distribution; ``"0+unknown"`` when it is not installed
    (e.g. the sources used from a checkout on ``PYTHONPATH``)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = installed_version()
