"""Training-kernel benchmark: one NSA attention layer (cmp + slc + win + gates) vs dense attention
(SDPA flash and cuDNN backends), flash_nsa (optional, see ``flash_nsa_column.py``) and fla-core's
``parallel_nsa``, forward and forward+backward.

Run on a GPU machine:  python benchmarks/bench_training.py [--seqlens 8192 16384 ...] [--out DIR]
Writes a markdown table (and a PNG plot when matplotlib is present) to --out, and prints the table.
Medians from ``triton.testing.do_bench``. FLOPs counted for the work each method does (causal dense:
2*2*T^2/2*D per head; NSA: per query, visible compressed tokens twice (attention + selection scores),
min(n*l', t+1) selected keys and min(w, t+1) window keys), backward taken as 2.5x forward.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

LAYOUTS = [(64, 4), (32, 8)]  # (query heads, KV heads): group 16 (paper) and group 4 (Llama-3)


def nsa_flops(t: int, hq: int, d: int, params) -> float:
    pos = torch.arange(t, dtype=torch.float64)
    n_cmp = torch.clamp((pos + 1 - params.cmp_block) // params.cmp_stride + 1, min=0)
    slc = torch.clamp(pos + 1, max=params.slc_count * params.slc_block)
    win = torch.clamp(pos + 1, max=params.window)
    # cmp attention (QK + PV) + selection score recompute (QK only) + slc + win
    per_head = 4 * d * n_cmp.sum() + 2 * d * n_cmp.sum() + 4 * d * slc.sum() + 4 * d * win.sum()
    return float(per_head) * hq


def dense_flops(t: int, hq: int, d: int) -> float:
    return 4 * d * t * (t + 1) / 2 * hq


def bench(fn, backward: bool, grads_of):
    import triton

    if backward:
        out = fn()
        grad = torch.randn_like(out)

        def step():
            for x in grads_of:
                x.grad = None
            fn().backward(grad)

        run = step
    else:
        def run():
            with torch.no_grad():
                fn()

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = triton.testing.do_bench(run, warmup=50, rep=200, return_mode="median")
    peak = torch.cuda.max_memory_allocated() - base
    return ms, peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--skip", nargs="*", default=[], help="methods to skip: ours sdpa-flash sdpa-cudnn flash_nsa fla")
    ap.add_argument("--layouts", nargs="*", default=None, help="query/KV heads, e.g. 64/4 32/8 (default both)")
    args = ap.parse_args(argv)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nsa_kernels import MLPCompressor, NSAParams, compress_varlen
    from nsa_kernels.nsa import nsa_attention_varlen

    try:
        from fla.ops.nsa import parallel_nsa
    except Exception as exc:  # noqa: BLE001 - reported in the output
        print(f"fla-core not importable ({exc}); skipping it", file=sys.stderr)
        parallel_nsa = None

    params = NSAParams()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import flash_nsa_column

    make_flash_nsa = flash_nsa_column.load(params)
    if make_flash_nsa is not None and make_flash_nsa.substituted_window:
        print("flash_nsa: flash_attn missing, its window branch runs our window kernel", flush=True)
    layouts = LAYOUTS if not args.layouts else [tuple(int(x) for x in s.split("/")) for s in args.layouts]
    d = args.head_dim
    dev = "cuda"
    dt = torch.bfloat16
    rows = []
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    for hq, hkv in layouts:
        comp_k = MLPCompressor(d, params.cmp_block).to(dev, dt)
        comp_v = MLPCompressor(d, params.cmp_block).to(dev, dt)
        for t in args.seqlens:
            torch.manual_seed(t + hq)
            q = torch.randn(t, hq, d, device=dev, dtype=dt, requires_grad=True)
            k = torch.randn(t, hkv, d, device=dev, dtype=dt, requires_grad=True)
            v = torch.randn(t, hkv, d, device=dev, dtype=dt, requires_grad=True)
            gates = torch.rand(t, hq, 3, device=dev, dtype=dt, requires_grad=True)
            cu = torch.tensor([0, t], device=dev, dtype=torch.int32)

            def ours():  # as the HF backend calls it: offsets and lengths known on the host (no sync)
                ck, cu_c = compress_varlen(k, cu, comp_k, params.cmp_block, params.cmp_stride, bounds=[0, t])
                cv, _ = compress_varlen(v, cu, comp_v, params.cmp_block, params.cmp_stride, bounds=[0, t])
                return nsa_attention_varlen(q, k, v, ck, cv, gates, cu, cu, cu_c, params,
                                            max_seqlen_q=t, max_seqlen_k=t)

            qd, kd, vd = (x.detach().transpose(0, 1).unsqueeze(0).requires_grad_() for x in (q, k, v))

            def dense(backend):
                def f():
                    with sdpa_kernel(backend):
                        return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
                return f

            qf, kf, vf = (x.detach().unsqueeze(0).requires_grad_() for x in (q, k, v))
            g_cmp, g_slc = (gates.detach()[None, :, :, i].contiguous().requires_grad_() for i in (0, 1))

            def fla():
                return parallel_nsa(qf, kf, vf, g_cmp=g_cmp, g_slc=g_slc, block_counts=params.slc_count,
                                    block_size=params.slc_block)

            methods = [("ours", ours, [q, k, v, gates], nsa_flops(t, hq, d, params)),
                       ("sdpa-flash", dense(SDPBackend.FLASH_ATTENTION), [qd, kd, vd], dense_flops(t, hq, d)),
                       ("sdpa-cudnn", dense(SDPBackend.CUDNN_ATTENTION), [qd, kd, vd], dense_flops(t, hq, d))]
            if make_flash_nsa is not None:
                methods.append(("flash_nsa", make_flash_nsa(q, k, v, gates, cu), [q, k, v, gates], None))
            if parallel_nsa is not None and hq // hkv >= 16:
                # fla-core: cmp + slc only (its window needs flash_attn), mean-pool compression, l = l' = 64
                methods.append(("fla", fla, [qf, kf, vf, g_cmp, g_slc], None))
            for name, fn, leaves, flops in methods:
                if name in args.skip:
                    continue
                for backward in (False, True):
                    try:
                        ms, peak = bench(fn, backward, leaves)
                    except Exception as exc:  # noqa: BLE001 - an OOM or unsupported backend is a result
                        print(f"{name} T={t} {hq}/{hkv} bwd={backward}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                        torch.cuda.empty_cache()
                        continue
                    tf = None if flops is None else flops * (3.5 if backward else 1.0) / ms / 1e9
                    rows.append(dict(method=name, T=t, heads=f"{hq}/{hkv}", pass_="fwd+bwd" if backward else "fwd",
                                     ms=ms, tflops=tf, peak_gib=peak / 2**30))
                    print(f"{name:11s} T={t:6d} {hq}/{hkv} {'fwd+bwd' if backward else 'fwd':7s} {ms:9.3f} ms "
                          f"{'' if tf is None else f'{tf:6.1f} TFLOP/s'} peak {peak / 2**30:.2f} GiB", flush=True)
            del q, k, v, gates, qd, kd, vd, qf, kf, vf, methods
            torch.cuda.empty_cache()
    write_report(rows, args.out)


def write_report(rows, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    lines = ["| heads | T | pass | ours ms | flash_nsa ms | sdpa-flash ms | sdpa-cudnn ms | fla ms | flash_nsa/ours "
             "| cudnn/ours | fla/ours | ours TFLOP/s | ours peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["heads"], r["T"], r["pass_"]) for r in rows}, key=lambda k: (k[0], k[2], k[1]))
    for heads, t, p in keys:
        get = {r["method"]: r for r in rows if (r["heads"], r["T"], r["pass_"]) == (heads, t, p)}
        ms = {m: get[m]["ms"] if m in get else math.nan for m in ("ours", "flash_nsa", "sdpa-flash", "sdpa-cudnn", "fla")}
        ours = get.get("ours", {})
        lines.append(
            f"| {heads} | {t} | {p} | {ms['ours']:.2f} | {ms['flash_nsa']:.2f} | {ms['sdpa-flash']:.2f} "
            f"| {ms['sdpa-cudnn']:.2f} | {ms['fla']:.2f} | {ms['flash_nsa'] / ms['ours']:.2f}x "
            f"| {ms['sdpa-cudnn'] / ms['ours']:.2f}x | {ms['fla'] / ms['ours']:.2f}x "
            f"| {ours.get('tflops') or math.nan:.0f} | {ours.get('peak_gib', math.nan):.2f} |"
        )
    table = "\n".join(lines)
    with open(os.path.join(out_dir, "bench_training.md"), "w") as f:
        f.write(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
        for ax, (heads, p) in zip(axes, [(h, p) for h in ("64/4", "32/8") for p in ("fwd", "fwd+bwd")]):
            for m in ("ours", "flash_nsa", "sdpa-flash", "sdpa-cudnn", "fla"):
                pts = sorted((r["T"], r["ms"]) for r in rows if r["method"] == m and r["heads"] == heads and r["pass_"] == p)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m)
            ax.set(xscale="log", yscale="log", title=f"{heads} heads, {p}", xlabel="T", ylabel="ms")
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "bench_training.png"), dpi=90)
    except Exception as exc:  # noqa: BLE001
        print(f"no plot: {exc}", file=sys.stderr)
    print(table)


if __name__ == "__main__":
    main()
