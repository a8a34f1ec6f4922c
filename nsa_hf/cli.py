"""The ``nsa-hf`` command line, as a module of the package: ``python -m nsa_hf.cli`` and
``from nsa_hf.cli import build_parser, main``.

The parser and the entry point live in the top-level module :mod:`nsa_hf_cli`, outside this package, so
that the ``nsa-hf`` script answers ``--help`` and ``--version`` without importing torch and transformers;
this module re-exports them.
"""
from __future__ import annotations

import sys

from nsa_hf_cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
