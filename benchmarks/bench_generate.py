"""End-to-end generation benchmark: an ~1B-shape NSA-Llama (random weights) against the same weights as
a plain ``LlamaForCausalLM`` with SDPA attention: prefill time, greedy decode tokens/s and peak memory
for long prompts.

Run on a GPU machine:
    python benchmarks/bench_generate.py [--prompt-lens 32768 65536] [--new-tokens 64] [--out bench_generate.md]
Smoke test on CPU (tiny model, seconds):
    python benchmarks/bench_generate.py --tiny

Variants (``--variants``, comma separated):
* ``nsa``: NSA-Llama, decode steps through the Triton decode kernels (decode backend ``"auto"``);
* ``nsa-varlen``: NSA-Llama, decode steps through the varlen training kernels (``nsa_backend(decode="off")``);
* ``sdpa``: ``LlamaForCausalLM`` (the NSA checkpoint without its ``nsa_*`` modules), ``attn_implementation="sdpa"``;
* ``nsa-graph`` / ``sdpa-graph``: the same two models decoding on a static cache with one decoding step
  captured in a CUDA graph and replayed (:class:`nsa_hf.generation.StaticGreedyDecoder`; NSA takes its
  graph-safe static decode path). The decode time counts replays only (the eager warm-up steps and the
  capture run first, untimed); speed-ups of a ``-graph`` variant are against ``sdpa-graph``.

Each (variant, prompt length) runs once to warm up and once measured: prefill = one forward over the
prompt into a fresh cache (logits of the last position only), decode = ``--new-tokens`` greedy steps
fed one token at a time with the cache (a manual loop: no generate() overhead in the numbers). Times
from ``time.perf_counter`` around ``torch.cuda.synchronize()``. Peak memory is
``torch.cuda.max_memory_allocated`` over prefill + decode with only that variant's model resident.
An out-of-memory configuration is reported as OOM and the run continues.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

ONE_B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, head_dim=64)
TINY = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
VARIANTS = ("nsa", "nsa-varlen", "sdpa", "nsa-graph", "sdpa-graph")
TINY_NSA = dict(nsa_cmp_block=8, nsa_cmp_stride=4, nsa_slc_block=16, nsa_slc_count=4, nsa_init_blocks=1,
                nsa_local_blocks=2, nsa_window=24)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-lens", type=int, nargs="+", default=None, help="default 32768 65536 (--tiny: 40)")
    p.add_argument("--new-tokens", type=int, default=None, help="greedy tokens to decode (default 64, --tiny: 4)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--variants", default="nsa,sdpa", help="comma separated: " + ", ".join(VARIANTS))
    p.add_argument("--head-dim", type=int, default=None, help="override head_dim (default 64; hidden stays 2048)")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tiny", action="store_true", help="tiny model and prompt: CPU smoke test")
    p.add_argument("--out", default=None, help="write the markdown table to this .md file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="after each measurement, profile 8 decode steps and print the top operators")
    args = p.parse_args(argv)
    args.prompt_lens = args.prompt_lens or ([40] if args.tiny else [32768, 65536])
    args.new_tokens = args.new_tokens or (4 if args.tiny else 64)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
    return args


def model_shapes(args) -> dict:
    shapes = dict(TINY if args.tiny else ONE_B)
    if args.head_dim:
        shapes["head_dim"] = args.head_dim
    if args.layers:
        shapes["num_hidden_layers"] = args.layers
    shapes["max_position_embeddings"] = max(args.prompt_lens) + args.new_tokens + 16
    return shapes


def build_nsa(args, device, dtype):
    from nsa_hf import NSALlamaConfig, NSALlamaForCausalLM

    nsa = TINY_NSA if args.tiny else {}  # the 1B runs use the paper settings (NSALlamaConfig defaults)
    cfg = NSALlamaConfig(**model_shapes(args), pad_token_id=0, bos_token_id=1, eos_token_id=None, **nsa)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = NSALlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def llama_from_nsa(nsa_model, device, dtype):
    """A plain LlamaForCausalLM (SDPA) holding the NSA model's weights minus its ``nsa_*`` modules."""
    from transformers import LlamaConfig, LlamaForCausalLM

    skip = ("model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype")
    fields = {k: v for k, v in nsa_model.config.to_dict().items() if not k.startswith("nsa_") and k not in skip}
    cfg = LlamaConfig(**fields)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    state = {k: v for k, v in nsa_model.state_dict().items() if ".nsa_" not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"weight copy NSA -> Llama: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.to(device=device, dtype=dtype).eval()
    # compared after the cast: .to(dtype) rounds the inv_freq buffer of both models alike
    ours, theirs = nsa_model.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq
    if not torch.allclose(ours.float().cpu(), theirs.float().cpu()):
        raise RuntimeError("the Llama copy has different rotary frequencies than the NSA model")
    return model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_cache(model):
    """An empty cache of the kind ``generate()`` would make: :class:`NSACache` for NSA-Llama."""
    from nsa_hf import NSACache
    from transformers import DynamicCache

    return NSACache(config=model.config) if hasattr(model.config, "nsa_params") else DynamicCache()


def greedy_step(model, ids, cache):
    """One cached forward over ``ids``; the greedy next token ``(B, 1)``."""
    from nsa_hf.cache import cache_kwarg  # `cache=` from transformers 5.24 on, `past_key_values=` before

    out = model(ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    return out.logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def run_once(model, ids, new_tokens, device):
    """Prefill then ``new_tokens`` greedy steps; returns (prefill s, decode s, tokens)."""
    cache = new_cache(model)
    _sync(device)
    t0 = time.perf_counter()
    token = greedy_step(model, ids, cache)
    _sync(device)
    t1 = time.perf_counter()
    tokens = [token]
    for _ in range(new_tokens):
        token = greedy_step(model, token, cache)
        tokens.append(token)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, torch.cat(tokens, dim=1)


@torch.no_grad()
def run_once_static(model, ids, new_tokens, device):
    """Prefill into a static cache, the eager warm-up steps and the capture (untimed), then ``new_tokens``
    replayed steps (eager static steps off CUDA); returns (prefill s, decode s, tokens)."""
    from nsa_hf.generation import StaticGreedyDecoder

    graph = device.type == "cuda"
    decoder = StaticGreedyDecoder(model, ids.shape[1] + new_tokens + 4, cuda_graph=graph, warmup_steps=2)
    _sync(device)
    t0 = time.perf_counter()
    first = decoder.prefill(ids)
    _sync(device)
    t1 = time.perf_counter()
    warm = decoder.decode(3)  # 2 eager warm-up steps + the capture's replay
    _sync(device)
    t2 = time.perf_counter()
    rest = decoder.decode(new_tokens)
    _sync(device)
    t3 = time.perf_counter()
    return t1 - t0, t3 - t2, torch.cat([first[:, None], warm, rest], dim=1)


@torch.no_grad()
def profile_steps(model, ids, device, steps: int = 8):
    """Print the operators that take the most host (CPU) and device time over ``steps`` decode steps."""
    from torch.profiler import ProfilerActivity, profile

    cache = new_cache(model)
    token = greedy_step(model, ids, cache)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            token = greedy_step(model, token, cache)
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15), flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15), flush=True)


def measure(model, variant, length, args, device):
    import nsa_hf.decoding as nsa_decoding
    from nsa_hf import nsa_backend

    row = dict(variant=variant, prompt=length)
    calls = [0]
    original = nsa_decoding._nsa_decode

    def counted(*a, **k):
        calls[0] += 1
        return original(*a, **k)

    scope = nsa_backend(decode="off" if variant == "nsa-varlen" else None)
    scope.__enter__()
    nsa_decoding._nsa_decode = counted
    try:
        gen = torch.Generator().manual_seed(args.seed + length)
        ids = torch.randint(3, model.config.vocab_size, (args.batch, length), generator=gen).to(device)
        # Warm-up over the same lengths as the measured run: the Triton kernels specialise on some
        # integer arguments, so the first pass over new cache lengths also compiles kernel variants.
        runner = run_once_static if variant.endswith("-graph") else run_once
        runner(model, ids, args.new_tokens, device)
        calls[0] = 0
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        prefill, decode, _ = runner(model, ids, args.new_tokens, device)
        if args.profile and runner is run_once:
            profile_steps(model, ids, device)
        row.update(prefill_ms=prefill * 1e3, decode_tok_s=args.batch * args.new_tokens / decode,
                   step_ms=decode / args.new_tokens * 1e3, decode_calls=calls[0])
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = "OOM"
        print(f"{variant} prompt {length}: out of memory ({str(e).splitlines()[0]})", file=sys.stderr)
    except (RuntimeError, ValueError) as e:  # e.g. a model whose step cannot be captured in a CUDA graph
        if not variant.endswith("-graph"):
            raise
        row["error"] = f"failed ({type(e).__name__})"
        import traceback

        traceback.print_exc()
    finally:
        nsa_decoding._nsa_decode = original
        scope.__exit__(None, None, None)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows, args, device, dtype, shapes) -> str:
    head = [
        f"# Generation benchmark ({'tiny, ' if args.tiny else ''}{device.type}"
        f"{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, {str(dtype).split('.')[-1]})",
        "",
        f"Model: {shapes['num_hidden_layers']} layers, hidden {shapes['hidden_size']}, "
        f"{shapes['num_attention_heads']}/{shapes['num_key_value_heads']} heads, head_dim {shapes['head_dim']}, "
        f"intermediate {shapes['intermediate_size']}, vocab {shapes['vocab_size']}; batch {args.batch}, "
        f"{args.new_tokens} greedy tokens after the prompt. Ratios: NSA variant / sdpa (speed: higher is better "
        "for NSA; memory: lower is better).",
        "",
        "| prompt | variant | prefill ms | decode tok/s | ms/step | peak GiB | decode-kernel calls | prefill speed-up | decode speed-up | memory ratio |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines = []
    for length in args.prompt_lens:
        for r in (r for r in rows if r["prompt"] == length):
            if "error" in r:
                lines.append(f"| {length} | {r['variant']} | {r['error']} | | | | | | | |")
                continue
            base_name = "sdpa-graph" if r["variant"].endswith("-graph") else "sdpa"
            base = next((b for b in rows if b["prompt"] == length and b["variant"] == base_name and "error" not in b),
                        None)
            ratio = lambda a, b: None if base is None or r is base or not a or not b else a / b  # noqa: E731
            lines.append(
                f"| {length} | {r['variant']} | {r['prefill_ms']:.1f} | {r['decode_tok_s']:.1f} | {r['step_ms']:.2f} | "
                f"{fmt(r.get('peak_gib'), '.2f')} | {r['decode_calls']} | "
                f"{fmt(ratio(base and base['prefill_ms'], r['prefill_ms']), '.2f')} | "
                f"{fmt(ratio(r['decode_tok_s'], base and base['decode_tok_s']), '.2f')} | "
                f"{fmt(ratio(r.get('peak_gib'), base and base.get('peak_gib')), '.2f')} |"
            )
    return "\n".join(head + lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes = model_shapes(args)
    rows = []
    nsa_model = build_nsa(args, device, dtype)
    for variant in (v for v in args.variants if not v.startswith("sdpa")):
        for length in args.prompt_lens:
            rows.append(measure(nsa_model, variant, length, args, device))
            print(rows[-1], flush=True)
    dense = [v for v in args.variants if v.startswith("sdpa")]
    if dense:
        llama = llama_from_nsa(nsa_model, device, dtype)
        del nsa_model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for variant in dense:
            for length in args.prompt_lens:
                rows.append(measure(llama, variant, length, args, device))
                print(rows[-1], flush=True)
    text = table(rows, args, device, dtype, shapes)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return rows


if __name__ == "__main__":
    main()
