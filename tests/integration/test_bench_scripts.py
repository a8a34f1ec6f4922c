"""Smoke tests of the GPU benchmark scripts in their CPU ``--tiny`` mode (they get one shot on the GPU)."""
import importlib.util
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_model_training_tiny(tmp_path):
    out = tmp_path / "table.md"
    rows = load("bench_model_training").main(["--tiny", "--out", str(out)])
    for kind in ("nsa", "sdpa"):
        assert rows[kind]["ms"] > 0 and math.isfinite(rows[kind]["loss"])
    assert rows["nsa"]["params"] > rows["sdpa"]["params"]  # the compressors and gates
    text = out.read_text()
    assert "NSA-Llama (nsa)" in text and "Llama (sdpa)" in text
