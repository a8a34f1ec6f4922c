"""Smoke tests of the GPU benchmark scripts in their CPU ``--tiny`` mode (they get one shot on the GPU)."""
import importlib.util
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def test_bench_slc_win_kv_outer_rows_cpu():
    """The ``--kv-outer`` rows of bench_slc_win (the script needs CUDA; its helpers run in the interpreter)."""
    import time

    import torch

    bench = load("bench_slc_win")
    t, hq, hkv, d, n, block = 70, 4, 2, 16, 3, 16
    q, k, v = torch.randn(t, hq, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    cu = torch.tensor([0, t], dtype=torch.int32)
    bi = bench.make_block_indices(t, hkv, n, block, "random", "cpu")
    o, lse = bench.slc._fwd(q, k, v, bi, cu, cu, block, d**-0.5)

    def once(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    cfgs = [dict(), dict(chunk_tokens=5, block_rows=16), dict(max_partial_bytes=1000)]
    rows = bench.kv_outer_rows(q, k, v, bi, cu, block, d**-0.5, o, lse, 1.0, 4.0 * n * block * d * hq * t, cfgs, once)
    assert [r["op"] for r in rows] == ["slc kv-outer fwd default", "slc kv-outer fwd chunk_tokens=5,block_rows=16",
                                       "slc kv-outer fwd max_partial_bytes=1000"]
    for r in rows:
        assert r["fwd_ms"] > 0 and r["speedup_vs_qc"] > 0 and math.isfinite(r["fwd_tflops"])
        assert r["max_abs_diff_o"] < 1e-5 and r["max_abs_diff_lse"] < 1e-5
