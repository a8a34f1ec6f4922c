"""Training throughput of a whole model: an NSA-Llama (random init, ~1B shape) against the same Llama
with ``attn_implementation="sdpa"``, one sequence of ``--tokens`` tokens per step, bf16 weights,
gradient checkpointing, AdamW.

Run on a GPU machine:  python benchmarks/bench_model_training.py [--tokens 32768] [--out FILE.md]
Prints (and writes to --out) a markdown table: ms per optimizer step (median of --steps after
--warmup), tokens/s, peak CUDA memory, and the NSA/sdpa ratio. ``--tiny`` runs a small model on CPU
(a smoke test of the script, no timing value).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per training step (one sequence)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-grad-ckpt", action="store_true", help="disable gradient checkpointing")
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke test)")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    return ap.parse_args(argv)


def model_kwargs(args) -> dict:
    if args.tiny:
        args.tokens, args.layers, args.hidden, args.intermediate = 300, 2, 64, 96
        args.heads, args.kv_heads, args.head_dim, args.vocab, args.steps, args.warmup = 4, 2, 16, 128, 1, 1
    return dict(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=max(args.tokens, 4096), rope_theta=500000.0,
        tie_word_embeddings=False, use_cache=False,
    )


def build(kind: str, kwargs: dict, tiny: bool, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from nsa_hf import NSALlamaConfig, NSALlamaForCausalLM

    torch.manual_seed(0)
    if kind == "nsa":
        extra = dict(nsa_cmp_block=8, nsa_cmp_stride=4, nsa_slc_block=16, nsa_slc_count=4, nsa_window=32) if tiny else {}
        model = NSALlamaForCausalLM(NSALlamaConfig(**kwargs, **extra))
    else:
        model = LlamaForCausalLM._from_config(LlamaConfig(**kwargs), attn_implementation="sdpa")
    return model.to(device=device, dtype=dtype).train()


def time_training(model, args, device) -> dict:
    if not args.no_grad_ckpt:
        from nsa_hf.training import enable_activation_checkpointing  # the installed transformers' name

        enable_activation_checkpointing(model, {"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    ids = torch.randint(0, args.vocab, (1, args.tokens), device=device)
    cuda = device.type == "cuda"
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()} at step {step}")
    ms = statistics.median(times) * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {"ms": ms, "tok_s": args.tokens / (ms / 1e3), "peak_gib": peak, "loss": loss.item()}


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    kwargs = model_kwargs(args)
    rows = {}
    for kind in ("nsa", "sdpa"):
        model = build(kind, kwargs, args.tiny, device, dtype)
        params = sum(p.numel() for p in model.parameters())
        try:
            rows[kind] = time_training(model, args, device) | {"params": params}
        except torch.OutOfMemoryError as exc:  # report and go on
            rows[kind] = {"error": f"OOM: {str(exc).splitlines()[0]}", "params": params}
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"[bench_model_training] {kind}: {rows[kind]}", flush=True)

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    lines = [
        f"Training step, {rows['nsa']['params'] / 1e9:.2f}B-parameter NSA-Llama vs Llama (sdpa): "
        f"{args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads, head dim {args.head_dim}, "
        f"{args.tokens} tokens/step, {str(dtype).replace('torch.', '')}, "
        f"gradient checkpointing {'off' if args.no_grad_ckpt else 'on'}, AdamW; {name}.",
        "",
        "| model | ms/step | tokens/s | peak memory (GiB) |",
        "|---|---:|---:|---:|",
    ]
    for kind, label in (("nsa", "NSA-Llama (nsa)"), ("sdpa", "Llama (sdpa)")):
        r = rows[kind]
        if "error" in r:
            lines.append(f"| {label} | {r['error']} | | |")
        else:
            lines.append(f"| {label} | {r['ms']:.0f} | {r['tok_s']:,.0f} | {r['peak_gib']:.1f} |")
    if "ms" in rows["nsa"] and "ms" in rows["sdpa"]:
        lines.append(f"\nNSA / sdpa tokens/s: {rows['nsa']['tok_s'] / rows['sdpa']['tok_s']:.2f}x")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return rows


if __name__ == "__main__":
    main()
