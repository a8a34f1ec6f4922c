"""Time NSA's compressed attention (fwd, fwd+bwd) and block selection (Triton) on the GPU.

Paper setting: bf16, D=128, B=1, l=32, d=16, l'=64, n=16; layouts Hq/Hkv = 64/4 (G=16) and 32/8 (G=4).
Medians of ``triton.testing.do_bench``. TFLOP/s count useful work only: the forward does two matmuls
over the visible (query, compressed key) pairs, the backward 2.5x that (flash-attention convention),
selection one (the scores).

    python benchmarks/bench_cmp_sel.py [--seqlens 8192 16384 32768 65536] [--sweep]

Measured on one H100 80GB HBM3 (torch 2.11, triton 3.6), 2026-11-23, ms (TFLOP/s):

| T | Hq/Hkv | cmp fwd | cmp bwd | cmp fwd+bwd | select |
|---|---|---|---|---|---|
| 8192 | 64/4 | 0.32 (216) | 0.97 (177) | 1.72 (139) | 0.36 (96) |
| 16384 | 64/4 | 0.87 (316) | 2.74 (250) | 4.24 (226) | 1.18 (116) |
| 32768 | 64/4 | 2.77 (396) | 9.28 (296) | 14.21 (270) | 4.29 (128) |
| 65536 | 64/4 | 9.97 (441) | 36.27 (303) | 46.31 (332) | 16.47 (133) |
| 8192 | 32/8 | 0.16 (210) | 0.57 (150) | 1.17 (102) | 0.22 (78) |
| 16384 | 32/8 | 0.45 (307) | 1.56 (220) | 2.43 (197) | 0.70 (98) |
| 32768 | 32/8 | 1.44 (380) | 5.09 (270) | 7.57 (254) | 2.50 (110) |
| 65536 | 32/8 | 5.14 (427) | 19.63 (280) | 26.07 (295) | 9.43 (117) |

Selection at 64k splits into scores (q.k, exp, sum over the group) 5.8 / 3.4 ms, spreading onto
selection blocks +4.1 / +1.8 ms and the running top-n +6.6 / +4.2 ms (G=16 / G=4).
"""
from __future__ import annotations

import argparse

import torch
import triton

from nsa_kernels import sel as bs
from nsa_kernels import cmp as ca
from nsa_kernels.parallel import parallel_cmp
from nsa_kernels.params import NSAParams, num_cmp_blocks

LAYOUTS = ((64, 4), (32, 8))


def visible_pairs(t: int, params: NSAParams) -> int:
    """Number of (query, compressed token) pairs with the token visible, one sequence of ``t``."""
    pos = torch.arange(t, dtype=torch.int64)
    n = torch.where(pos >= params.cmp_block - 1, (pos - params.cmp_block + 1) // params.cmp_stride + 1, 0)
    return int(n.sum())


def make_inputs(t: int, hq: int, hkv: int, d: int, params: NSAParams, device="cuda", dtype=torch.bfloat16):
    nc = num_cmp_blocks(t, params.cmp_block, params.cmp_stride)
    q = torch.randn(t, hq, d, device=device, dtype=dtype)
    ck = torch.randn(nc, hkv, d, device=device, dtype=dtype)
    cv = torch.randn(nc, hkv, d, device=device, dtype=dtype)
    cu = torch.tensor([0, t], dtype=torch.int32, device=device)
    cu_c = torch.tensor([0, nc], dtype=torch.int32, device=device)
    return q, ck, cv, cu, cu_c


def bench_one(t, hq, hkv, d, params):
    q, ck, cv, cu, cu_c = make_inputs(t, hq, hkv, d, params)
    l, s = params.cmp_block, params.cmp_stride
    scale = d**-0.5
    qg, ckg, cvg = (x.clone().requires_grad_() for x in (q, ck, cv))
    o, lse = parallel_cmp(qg, ckg, cvg, cu, cu, cu_c, l, s)
    do = torch.randn_like(o)
    max_c = ck.shape[0]

    def fwd():
        return ca._fwd(q, ck, cv, cu, cu, cu_c, t, l, s, scale)

    def bwd():
        return ca._bwd(q, ck, cv, o, lse, do, cu, cu, cu_c, t, max_c, l, s, scale)

    def fwd_bwd():
        out, _ = parallel_cmp(qg, ckg, cvg, cu, cu, cu_c, l, s)
        out.backward(do)

    def select():
        return bs._fwd(q, ck, lse, cu, cu, cu_c, t, l, s, params.slc_block, params.slc_count,
                       params.init_blocks, params.local_blocks, scale)

    def select_part(work):
        return lambda: bs._fwd(q, ck, lse, cu, cu, cu_c, t, l, s, params.slc_block, params.slc_count,
                               params.init_blocks, params.local_blocks, scale, _work=work)

    res = {}
    for name, fn in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd), ("select", select)):
        res[name] = triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")
    # Where selection's time goes: scores + exp only, + block scores (no top-n), everything.
    parts = [triton.testing.do_bench(select_part(w), warmup=50, rep=200, return_mode="median") for w in (1, 2)]
    no_skip = triton.testing.do_bench(
        lambda: bs._fwd(q, ck, lse, cu, cu, cu_c, t, l, s, params.slc_block, params.slc_count,
                        params.init_blocks, params.local_blocks, scale, _skip=False),
        warmup=50, rep=200, return_mode="median")
    print(f"   select stages: scores {parts[0]:.3f} ms, +block scores {parts[1]:.3f} ms, +top-n {res['select']:.3f} ms"
          f" (merging every tile, no cut-off skip: {no_skip:.3f} ms)")
    pairs = visible_pairs(t, params) * hq
    flops = {"fwd": 4 * d * pairs, "bwd": 10 * d * pairs, "fwd+bwd": 14 * d * pairs, "select": 2 * d * pairs}
    return res, {k: flops[k] / res[k] * 1e-9 for k in res}


def _time(fn) -> str:
    try:
        return f"{triton.testing.do_bench(fn, return_mode='median'):.3f} ms"
    except Exception as err:  # a config can run out of registers / shared memory
        return f"failed ({type(err).__name__})"


def sweep(t, hq, hkv, d, params):
    """Try a few tile configurations at one size (monkeypatching the launch configs)."""
    q, ck, cv, cu, cu_c = make_inputs(t, hq, hkv, d, params)
    l, s, scale = params.cmp_block, params.cmp_stride, d**-0.5
    group = hq // hkv
    o, lse = ca._fwd(q, ck, cv, cu, cu, cu_c, t, l, s, scale)
    do = torch.randn_like(o)
    base_fwd, base_bwd, base_sel = ca._fwd_config, ca._bwd_configs, bs._select_config
    out = []
    try:
        # H100 T=64k (2026-11-23): BM=128 BN=64 w=8 st=3 best (9.7 / 5.0 ms at G=16 / 4); BN=128, BM=64 or
        # 256 within 1-10%; 4 warps at BM=128 60% slower.
        for bm, bn, w, st in ((128, 64, 8, 3),):
            bmm, tok = ca._row_tiling(group, bm)
            ca._fwd_config = lambda q_, g_: dict(BLOCK_M=bmm, TOK=tok, BLOCK_N=bn, num_warps=w, num_stages=st)
            ms = _time(lambda: ca._fwd(q, ck, cv, cu, cu, cu_c, t, l, s, scale))
            out.append(f"fwd  BM={bm} BN={bn} w={w} st={st}: {ms}")
        ca._fwd_config = base_fwd
        for (dbm, dw, dst), (kbm, kbn, kw, kst) in (
            ((128, 8, 2), (64, 64, 8, 2)), ((128, 8, 2), (128, 64, 8, 2)), ((64, 4, 2), (64, 64, 4, 2)),
            ((128, 8, 2), (128, 64, 8, 3)), ((128, 8, 2), (128, 32, 4, 2)), ((128, 8, 2), (256, 64, 8, 2)),
        ):
            a, ta = ca._row_tiling(group, dbm)
            b, tb = ca._row_tiling(group, kbm)
            ca._bwd_configs = lambda q_, g_: (
                dict(BLOCK_M=a, TOK=ta, BLOCK_N=64, num_warps=dw, num_stages=dst),
                dict(BLOCK_M=b, TOK=tb, BLOCK_N=kbn, num_warps=kw, num_stages=kst),
            )
            ms = _time(lambda: ca._bwd(q, ck, cv, o, lse, do, cu, cu, cu_c, t, ck.shape[0], l, s, scale))
            out.append(f"bwd  dq(BM={dbm},w={dw},st={dst}) dkdv(BM={kbm},BN={kbn},w={kw},st={kst}): {ms}")
        ca._bwd_configs = base_bwd
        for rows, w in ((128, 4), (256, 8), (256, 4), (512, 8)):
            gp = triton.next_power_of_2(group)
            bs._select_config = lambda q_, g_: dict(TOK=max(1, rows // gp), num_warps=w, num_stages=2)
            ms = _time(lambda: bs._fwd(q, ck, lse, cu, cu, cu_c, t, l, s, params.slc_block, params.slc_count,
                                       params.init_blocks, params.local_blocks, scale))
            out.append(f"sel  rows={rows} w={w}: {ms}")
    finally:
        ca._fwd_config, ca._bwd_configs, bs._select_config = base_fwd, base_bwd, base_sel
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--sweep", action="store_true", help="also try tile configs at the longest length")
    args = ap.parse_args()
    params = NSAParams()
    print(f"{torch.cuda.get_device_name()}  bf16 D={args.head_dim} l={params.cmp_block} d={params.cmp_stride} "
          f"l'={params.slc_block} n={params.slc_count}")
    if args.sweep:
        for hq, hkv in LAYOUTS:
            print(f"-- sweep T={max(args.seqlens)} Hq/Hkv={hq}/{hkv}")
            for line in sweep(max(args.seqlens), hq, hkv, args.head_dim, params):
                print("  " + line, flush=True)
    rows = []
    for hq, hkv in LAYOUTS:
        for t in args.seqlens:
            ms, tf = bench_one(t, hq, hkv, args.head_dim, params)
            rows.append((t, hq, hkv, ms, tf))
            print(f"T={t:6d} Hq/Hkv={hq}/{hkv}: " + "  ".join(f"{k} {ms[k]:.3f} ms ({tf[k]:.0f} TF/s)" for k in ms),
                  flush=True)
    print("\n| T | Hq/Hkv | cmp fwd ms (TF/s) | cmp bwd ms (TF/s) | cmp fwd+bwd ms (TF/s) | select ms (TF/s) |")
    print("|---|---|---|---|---|---|")
    for t, hq, hkv, ms, tf in rows:
        cells = " | ".join(f"{ms[k]:.2f} ({tf[k]:.0f})" for k in ("fwd", "bwd", "fwd+bwd", "select"))
        print(f"| {t} | {hq}/{hkv} | {cells} |")


if __name__ == "__main__":
    main()
