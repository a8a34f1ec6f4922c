"""Time the Triton selected-block (slc) and sliding-window (win) attention kernels on one GPU.

For each sequence length and head layout: forward and forward+backward time (median of
``triton.testing.do_bench``), achieved TFLOP/s, and SDPA (flash backend) dense causal attention at the
same shape for comparison. FLOPs are counted as 4 * keys * D per query head per token for a forward
(2 matmuls), 3.5x that for forward+backward (the flash-attention convention).

    python benchmarks/bench_slc_win.py --seqlens 8192 16384 32768 65536 [--sweep] [--out DIR]

Block indices: ``--selection random`` (each query: the initial block, its own and the previous block,
plus random eligible blocks: the worst case for token tiles that share blocks) or ``coherent`` (tokens
of one 64-token block share the same random choice: closer to trained models, whose neighbouring
queries choose alike).

Measured on one H100 80GB HBM3 (torch 2.11, triton 3.6), bf16, D=128, n=16 blocks of 64, w=512, B=1,
defaults, median ms (fwd includes the index preparation; fwd+bwd = that + the backward):

    T=65536  64/4 (G=16)  slc random   fwd 19.5  fwd+bwd 55.7 | coherent fwd  8.6  fwd+bwd 32.3
                          win          fwd  4.1  fwd+bwd 16.3 | SDPA flash dense causal 209 / 773
    T=65536  32/8 (G=4)   slc random   fwd 33.2  fwd+bwd 78.5 | coherent fwd  6.5  fwd+bwd 23.4
                          win          fwd  2.3  fwd+bwd  8.9 | SDPA flash dense causal 113 / 396
    T=8192   64/4         slc random 2.17 / 6.90, coherent 1.17 / 4.68; win 0.55 / 2.10; SDPA 3.37 / 12.4
    T=8192   32/8         slc random 2.10 / 5.92, coherent 0.90 / 3.47; win 0.35 / 1.44; SDPA 1.76 / 6.48

With random selections the slc forward and dq are bound by L2 reads of the selected K/V blocks
(about 137 GB per pass at G=16, 275 GB at G=4, ~7.5 TB/s achieved).
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import triton

from nsa_kernels import slc
from nsa_kernels import win

LAYOUTS = {"64/4": (64, 4), "32/8": (32, 8)}


def make_block_indices(t: int, hkv: int, n: int, block: int, mode: str, device) -> torch.Tensor:
    """``(t, hkv, n)`` int32 ascending block indices: block 0, the own and previous block forced,
    the rest drawn at random among the eligible ones (per token, or per 64-token run if coherent)."""
    nblk = -(-t // block)
    own = torch.arange(t, device=device) // block
    out = torch.empty(t, hkv, n, dtype=torch.int32, device=device)
    step = 4096
    for s in range(0, t, step):
        e = min(t, s + step)
        rows = e - s
        if mode == "coherent":
            grp = torch.arange(s, e, device=device) // 64
            g0 = int(grp[0])
            base = torch.rand(int(grp[-1]) - g0 + 1, hkv, nblk, device=device)
            scores = base[grp - g0]
        else:
            scores = torch.rand(rows, hkv, nblk, device=device)
        j = torch.arange(nblk, device=device)
        o = own[s:e, None, None]
        scores = torch.where(j > o, -1.0, scores)  # not eligible
        scores = torch.where((j == 0) | (j == o) | (j == o - 1), 2.0, scores)  # forced
        top = torch.topk(scores, min(n, nblk), dim=-1)
        idx = torch.where(top.values >= 0, top.indices, nblk)
        idx = torch.sort(idx, dim=-1).values
        idx = torch.where(idx == nblk, -1, idx).int()
        if idx.shape[-1] < n:
            idx = torch.nn.functional.pad(idx, (0, n - idx.shape[-1]), value=-1)
        out[s:e] = idx
    return out


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def tflops(flop: float, ms: float) -> float:
    return flop / ms / 1e9


def print_kernel_times(label, fn):
    """GPU time per kernel (and torch op) of one call of ``fn``, from the profiler."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals = {}
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", 0.0) or getattr(ev, "self_cuda_time_total", 0.0)
        if us > 0:
            totals[ev.key] = totals.get(ev.key, 0.0) + us / 1e3
    print(f"kernel times, {label} (slc fwd+bwd then win fwd+bwd, defaults):")
    for name, ms in sorted(totals.items(), key=lambda x: -x[1])[:14]:
        print(f"  {ms:8.3f} ms  {name[:90]}")


def run_case(t, hq, hkv, d, n, block, window, mode, sweep, with_sdpa, profile=False, ops=("slc", "win")):
    dev = "cuda"
    dt = torch.bfloat16
    g = hq // hkv
    q = torch.randn(t, hq, d, device=dev, dtype=dt)
    k = torch.randn(t, hkv, d, device=dev, dtype=dt)
    v = torch.randn(t, hkv, d, device=dev, dtype=dt)
    do = torch.randn(t, hq, d, device=dev, dtype=dt)
    cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
    scale = d**-0.5
    bi = make_block_indices(t, hkv, n, block, mode, dev)
    rows = []
    slc_flop = 4.0 * n * block * d * hq * t
    win_flop = 4.0 * window * d * hq * t

    slc_opts = [dict()] if "slc" in ops else []  # the defaults
    if sweep and slc_opts:
        dt_ = slc.default_tokens_per_program(g)
        slc_opts += [dict(tokens_per_program=1), dict(tokens_per_program=dt_, union_pct=100),
                     dict(tokens_per_program=dt_, union_pct=0), dict(tokens_per_program=max(1, 32 // g)),
                     dict(dkdv_rows=128, dkdv_num_warps=8), dict(dkdv_rows=32), dict(dkdv_rows=128),
                     dict(chunk_tokens=1024), dict(num_stages=3), dict(tokens_per_program=1, num_stages=3)]
    for cfg in slc_opts:
        fcfg = {a: b_ for a, b_ in cfg.items() if a in ("tokens_per_program", "union_pct", "num_warps", "num_stages")}
        tok = cfg.get("tokens_per_program") or slc.default_tokens_per_program(g)

        def fwd():  # what the autograd forward does: index preparation (kept for the backward) + kernels
            prep = slc._prepare(bi, cu, cu, t, block, tok)
            return slc._fwd(q, k, v, bi, cu, cu, block, scale, prep=prep, **fcfg), prep

        (o, lse), prep = fwd()
        f = bench(fwd)
        b = bench(lambda: slc._bwd(do, q, k, v, o, lse, bi, cu, cu, block, scale, prep=prep, **cfg))
        name = "slc " + (",".join(f"{a}={b_}" for a, b_ in cfg.items()) or "default")
        rows.append(dict(op=name, fwd_ms=f, bwd_ms=b, fwdbwd_ms=f + b,
                         fwd_tflops=tflops(slc_flop, f), fwdbwd_tflops=tflops(3.5 * slc_flop, f + b)))
    win_opts = [dict()] if "win" in ops else []
    if sweep and win_opts:
        win_opts += [dict(num_stages=3), dict(num_stages=1),
                     dict(dkdv_block_n=128, dkdv_num_warps=8), dict(dkdv_block_m=32, dkdv_block_n=128, dkdv_num_warps=8),
                     dict(block_m=128, num_warps=8, dkdv_block_m=64, dkdv_num_warps=4),
                     dict(block_m=32, dkdv_block_m=32)]
    fwd_keys = ("block_m", "block_n", "num_warps", "num_stages")
    for cfg in win_opts:
        fcfg = {a: b_ for a, b_ in cfg.items() if a in fwd_keys}
        o, lse = win._fwd(q, k, v, cu, cu, window, scale, **fcfg)
        f = bench(lambda: win._fwd(q, k, v, cu, cu, window, scale, **fcfg))
        b = bench(lambda: win._bwd(do, q, k, v, o, lse, cu, cu, window, scale, **cfg))
        name = "win " + (",".join(f"{a}={b_}" for a, b_ in cfg.items()) or "default")
        rows.append(dict(op=name, fwd_ms=f, bwd_ms=b, fwdbwd_ms=f + b,
                         fwd_tflops=tflops(win_flop, f), fwdbwd_tflops=tflops(3.5 * win_flop, f + b)))
    if profile:
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        print_kernel_times(f"T={t} {hq}/{hkv} {mode}", lambda: (
            torch.autograd.grad(slc.selected_attention(qg, kg, vg, bi, cu, cu, block, scale), (qg, kg, vg), do),
            win._bwd(do, q, k, v, *win._fwd(q, k, v, cu, cu, window, scale), cu, cu, window, scale)))
    if with_sdpa:
        rows.append(sdpa_row(q, k, v, do, hq, hkv, t, d))
    del q, k, v, do
    torch.cuda.empty_cache()
    return rows


def sdpa_row(q, k, v, do, hq, hkv, t, d):
    """SDPA flash backend, dense causal attention on the same tensors (KV heads repeated for GQA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = hq // hkv
    qh = q.transpose(0, 1)[None].detach().requires_grad_()
    kh = k.repeat_interleave(g, dim=1).transpose(0, 1)[None].detach().requires_grad_()
    vh = v.repeat_interleave(g, dim=1).transpose(0, 1)[None].detach().requires_grad_()
    doh = do.transpose(0, 1)[None]
    fn = torch.nn.functional.scaled_dot_product_attention
    flop = 2.0 * t * t * d * hq  # causal: half of 4 * T^2 * D
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        f = bench(lambda: fn(qh, kh, vh, is_causal=True))
        out = fn(qh, kh, vh, is_causal=True)
        fb = bench(lambda: torch.autograd.grad(fn(qh, kh, vh, is_causal=True), (qh, kh, vh), doh))
    del out
    return dict(op="sdpa flash dense causal", fwd_ms=f, bwd_ms=fb - f, fwdbwd_ms=fb,
                fwd_tflops=tflops(flop, f), fwdbwd_tflops=tflops(3.5 * flop, fb))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--slc-count", type=int, default=16)
    ap.add_argument("--slc-block", type=int, default=64)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--selection", nargs="+", default=["random"], choices=["random", "coherent"])
    ap.add_argument("--sweep", action="store_true", help="also time other tile configurations")
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--ops", nargs="+", default=["slc", "win"], choices=["slc", "win"])
    ap.add_argument("--profile", action="store_true", help="per-kernel GPU times at the longest length")
    ap.add_argument("--sdpa-max-len", type=int, default=65536)
    ap.add_argument("--out", default=None, help="directory for bench_slc_win.json")
    args = ap.parse_args(argv)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    results = []
    for t in args.seqlens:
        for lay in args.layouts:
            hq, hkv = LAYOUTS[lay]
            for mode in args.selection:
                sdpa = not args.no_sdpa and t <= args.sdpa_max_len and mode == args.selection[0]
                rows = run_case(t, hq, hkv, args.head_dim, args.slc_count, args.slc_block, args.window,
                                mode, args.sweep, sdpa, args.profile and t == max(args.seqlens), args.ops)
                for r in rows:
                    r.update(T=t, layout=lay, selection=mode)
                    print(f"T={t:6d} {lay:5s} {mode:8s} {r['op']:60s} fwd {r['fwd_ms']:8.3f} ms "
                          f"({r['fwd_tflops']:5.0f} TF/s)  fwd+bwd {r['fwdbwd_ms']:8.3f} ms "
                          f"({r['fwdbwd_tflops']:5.0f} TF/s)", flush=True)
                results.extend(rows)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_slc_win.json"), "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
