"""Decode benchmark: one NSA attention layer for one new token per sequence, reading a KV cache of S
tokens, vs dense attention over the whole cache (SDPA, flash backend, GQA) and fla-core's
``parallel_nsa`` given the same single query (without its window branch, which needs flash-attn).

Run on a GPU machine:  python benchmarks/bench_decode.py [--seqlens 16384 65536 131072] [--batch 1 16]
Prints a markdown table (also written to --out/bench_decode.md). Times are medians of
``triton.testing.do_bench`` (L2 flushed between runs; Python launch cost included where the GPU
would wait for it) and, with --graph, of CUDA-graph replays (launch cost excluded).
"Bytes" is what each method must read at least: dense, K+V of the whole cache; NSA, the compressed
cache, n*l' selected and w window tokens (per KV head, bf16).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

LAYOUTS = [(64, 4), (32, 8)]  # (query heads, KV heads)


def nsa_bytes(bsz, hkv, s, d, dv, params, elt=2):
    n_cmp = (s - params.cmp_block) // params.cmp_stride + 1
    toks = n_cmp + min(params.slc_count * params.slc_block, s) + min(params.window, s)
    return bsz * hkv * toks * (d + dv) * elt


def timeit(fn, graph: bool):
    import triton

    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[16384, 65536, 131072])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tq", type=int, default=1, help="query tokens per sequence")
    ap.add_argument("--graph", action="store_true", help="also time CUDA-graph replays")
    ap.add_argument("--profile", action="store_true", help="print per-kernel CUDA times of ours")
    ap.add_argument("--skip", nargs="*", default=[], help="methods to skip: ours dense fla")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--sweep", action="store_true",
                    help="also time CUDA-graph replays of ours for other compressed-pass tilings (chunk, stages, warps)")
    args = ap.parse_args(argv)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nsa_kernels import NSAParams
    from nsa_kernels.decode import nsa_decode

    try:
        from fla.ops.nsa import parallel_nsa
    except Exception as exc:  # noqa: BLE001 - reported in the output
        print(f"fla-core not importable ({exc}); skipping it", file=sys.stderr)
        parallel_nsa = None

    params = NSAParams()
    d = dv = args.head_dim
    dt = torch.bfloat16
    dev = "cuda"
    tq = args.tq
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    rows = []
    hdr = ("| S | B | Hq/Hkv | NSA MB | ours us | ours GB/s | dense us | dense GB/s | speed-up | fla us |"
           + (" ours graph us | dense graph us | graph speed-up |" if args.graph else ""))
    sep = "|" + "---|" * (hdr.count("|") - 1)
    for s in args.seqlens:
        for bsz in args.batch:
            for hq, hkv in LAYOUTS:
                torch.cuda.empty_cache()
                g = hq // hkv
                n_cmp = (s - params.cmp_block) // params.cmp_stride + 1
                q = torch.randn(bsz, tq, hq, d, dtype=dt, device=dev)
                k = torch.randn(bsz, hkv, s, d, dtype=dt, device=dev)
                v = torch.randn(bsz, hkv, s, dv, dtype=dt, device=dev)
                ck = torch.randn(bsz, hkv, n_cmp, d, dtype=dt, device=dev)
                cv = torch.randn(bsz, hkv, n_cmp, dv, dtype=dt, device=dev)
                gates = torch.rand(bsz, tq, hq, 3, dtype=dt, device=dev)
                zeros = torch.zeros(bsz, dtype=torch.int32, device=dev)
                k_len = torch.full((bsz,), s, dtype=torch.int32, device=dev)
                c_len = torch.full((bsz,), n_cmp, dtype=torch.int32, device=dev)

                def ours():
                    return nsa_decode(q, k, v, ck, cv, gates, zeros, k_len, zeros, c_len, params, check_lengths=False)

                qd = q.transpose(1, 2)  # (B, Hq, Tq, D)

                def dense():
                    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                        return torch.nn.functional.scaled_dot_product_attention(qd, k, v, enable_gqa=True)

                res = {}
                if args.profile:
                    ours()
                    torch.cuda.synchronize()
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        for _ in range(20):
                            ours()
                        torch.cuda.synchronize()
                    print(f"S={s} B={bsz} {hq}/{hkv}")
                    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=40))
                if "ours" not in args.skip:
                    ours()
                    res["ours"] = timeit(ours, False)
                if "dense" not in args.skip:
                    try:
                        dense()
                        res["dense"] = timeit(dense, False)
                    except RuntimeError as exc:
                        print(f"dense failed: {exc}", file=sys.stderr)
                if args.graph and "ours" in res:
                    res["ours_g"] = timeit(ours, True)
                    if "dense" in res:
                        res["dense_g"] = timeit(dense, True)
                if args.sweep:
                    for chunk in (64, 128, 256, 512, 1024):
                        for stages, warps in ((2, 4), (3, 4), (4, 4), (3, 8)):
                            def tuned():
                                return nsa_decode(q, k, v, ck, cv, gates, zeros, k_len, zeros, c_len, params,
                                                  check_lengths=False, _cmp_chunk=chunk, _cmp_stages=stages,
                                                  _cmp_warps=warps)
                            try:
                                tuned()
                                ms = timeit(tuned, True)
                                print(f"sweep S={s} B={bsz} {hq}/{hkv} cmp_chunk={chunk} stages={stages} "
                                      f"warps={warps}: {ms * 1e3:.1f} us", flush=True)
                            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                                print(f"sweep chunk={chunk} stages={stages} warps={warps} failed: {exc}", flush=True)
                if parallel_nsa is not None and g >= 16 and "fla" not in args.skip:
                    try:
                        kf, vf = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
                        g_cmp, g_slc, g_swa = (gates[..., i].contiguous() for i in range(3))

                        def fla():  # no window branch: fla-core computes it with flash-attn (absent here)
                            return parallel_nsa(q, kf, vf, g_cmp=g_cmp, g_slc=g_slc,
                                                block_counts=params.slc_count, block_size=params.slc_block)

                        fla()
                        res["fla"] = timeit(fla, False)
                        del kf, vf
                    except Exception as exc:  # noqa: BLE001
                        print(f"fla failed: {exc}", file=sys.stderr)
                nb = nsa_bytes(bsz, hkv, s, d, dv, params)
                db = bsz * hkv * s * (d + dv) * 2
                f = lambda key, fmt="{:.1f}": fmt.format(res[key] * 1e3) if key in res else "-"  # noqa: E731
                bw = lambda key, nbytes: f"{nbytes / (res[key] * 1e-3) / 1e9:.0f}" if key in res else "-"  # noqa: E731
                sp = f"{res['dense'] / res['ours']:.1f}x" if "dense" in res and "ours" in res else "-"
                row = (f"| {s} | {bsz} | {hq}/{hkv} | {nb / 2**20:.1f} | {f('ours')} | {bw('ours', nb)} | {f('dense')} | "
                       f"{bw('dense', db)} | {sp} | {f('fla')} |")
                if args.graph:
                    gsp = f"{res['dense_g'] / res['ours_g']:.1f}x" if "dense_g" in res and "ours_g" in res else "-"
                    row += f" {f('ours_g')} | {f('dense_g')} | {gsp} |"
                rows.append(row)
                print(row, flush=True)
                del q, k, v, ck, cv
    table = "\n".join([hdr, sep, *rows])
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_decode.md"), "w") as fh:
        fh.write(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, D={d}, Tq={tq}\n\n{table}\n")


if __name__ == "__main__":
    main()
