"""Research harnesses for nsa-hf: the experiments behind docs/quality.md and docs/fallback.md, and their
diagnostics. Not part of the installed package; run from the repository root as ``python -m research.<name>``
(research/README.md)."""
