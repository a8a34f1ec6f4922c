"""generate() benchmark: an ~1B-shape NSA-Llama (random weights) against the same weights as a plain
``LlamaForCausalLM`` with SDPA attention, both through plain ``model.generate()`` (greedy): time to first
token, decode tokens/s, the extra time of the first call for a new shape (compilation and CUDA-graph
capture) and peak memory.

One command on a GPU machine; each row is printed as it is measured, the tables last:
    python benchmarks/bench_generate.py [--out bench_generate.md]
Default configurations (``--configs BATCHxPROMPT ...``): 1x32768, 1x65536, 1x131072 and 8x32768, with
``--new-tokens 128``. Smoke test on a CPU (tiny model, seconds): ``python benchmarks/bench_generate.py --tiny``.

Variants (``--variants``, comma separated):
* ``nsa``: NSA-Llama, ``model.generate(...)`` as a user calls it. On CUDA that is the fast path: a static
  NSA cache (length rounded up to a bucket) and decoding steps compiled by transformers (``torch.compile``,
  mode ``reduce-overhead``: CUDA graphs);
* ``nsa-dynamic``: NSA-Llama with ``cache_implementation="dynamic"``: the dynamic ``NSACache``, eager steps;
* ``sdpa``: ``LlamaForCausalLM`` (the NSA checkpoint without its ``nsa_*`` modules), ``attn_implementation=
  "sdpa"``, ``model.generate(...)`` as a user calls it (dynamic cache, eager steps);
* ``sdpa-static``: the same with ``cache_implementation="static"`` (transformers compiles its steps too).

Each (variant, configuration) starts from an empty compile cache (``torch._dynamo.reset()``, as a new
process) and runs ``generate()`` twice on the same prompt: the first call (``first call s``: for a compiled
variant it includes compiling and capturing the decoding step for this cache shape), then the measured
call. Time to first token (TTFT) is the time from calling ``generate()`` to the first
new token reaching a streamer (prefill plus one step of bookkeeping); decode tokens/s counts the other
``new_tokens - 1`` tokens of every row over the rest of the call. Peak memory is
``torch.cuda.max_memory_allocated`` over the measured call, model weights included, with only that
variant's model resident. ``same tokens`` compares the greedy tokens of an NSA variant with
``nsa-dynamic``'s (in bf16 the paths may round differently). An out-of-memory configuration is reported
as OOM and the run continues.
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
TINY_NSA = dict(nsa_cmp_block=8, nsa_cmp_stride=4, nsa_slc_block=16, nsa_slc_count=4, nsa_init_blocks=1,
                nsa_local_blocks=2, nsa_window=24)
VARIANTS = {  # name -> (model, generate() kwargs)
    "nsa": ("nsa", {}),
    "nsa-dynamic": ("nsa", dict(cache_implementation="dynamic")),
    "sdpa": ("sdpa", {}),
    "sdpa-static": ("sdpa", dict(cache_implementation="static")),
}
DEFAULT_CONFIGS = ["1x32768", "1x65536", "1x131072", "8x32768"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=None,
                   help="BATCHxPROMPT, default " + " ".join(DEFAULT_CONFIGS) + " (--tiny: 1x40 2x40)")
    p.add_argument("--new-tokens", type=int, default=None, help="greedy tokens per row (default 128, --tiny: 6)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma separated: " + ", ".join(VARIANTS))
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tiny", action="store_true", help="tiny model and prompts: CPU smoke test")
    p.add_argument("--out", default=None, help="also write the tables to this .md file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    configs = args.configs or (["1x40", "2x40"] if args.tiny else DEFAULT_CONFIGS)
    try:
        args.configs = [tuple(int(x) for x in c.lower().split("x")) for c in configs]
        assert all(len(c) == 2 and min(c) > 0 for c in args.configs)
    except (ValueError, AssertionError):
        p.error(f"--configs takes BATCHxPROMPT items such as 8x32768; got {configs}")
    args.new_tokens = args.new_tokens or (6 if args.tiny else 128)
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (the first token measures TTFT, the others the decode rate)")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
    return args


def model_shapes(args) -> dict:
    shapes = dict(TINY if args.tiny else ONE_B)
    if args.layers:
        shapes["num_hidden_layers"] = args.layers
    shapes["max_position_embeddings"] = max(p for _, p in args.configs) + args.new_tokens + 16
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
    ours, theirs = nsa_model.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq
    if not torch.allclose(ours.float().cpu(), theirs.float().cpu()):
        raise RuntimeError("the Llama copy has different rotary frequencies than the NSA model")
    return model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _FirstToken:
    """A streamer that records when the first new token arrives (generate() streams the prompt first)."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


@torch.no_grad()
def timed_generate(model, ids, mask, new_tokens, device, kwargs):
    """One greedy ``generate()``; returns (total s, TTFT s, sequences, cache type name)."""
    streamer = _FirstToken()
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, streamer=streamer, return_dict_in_generate=True, **kwargs)
    _sync(device)
    total = time.perf_counter() - t0
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    return total, streamer.first - t0, out.sequences, type(cache).__name__


def measure(model, variant, batch, length, args, device):
    row = dict(variant=variant, batch=batch, prompt=length)
    kwargs = VARIANTS[variant][1]
    # Each configuration as in a fresh process: no compiled graphs (and their CUDA-graph memory) of other
    # shapes, and transformers' static cache sized for this call, not for the longest call before it.
    torch._dynamo.reset()
    model.__dict__.pop("_previous_max_cache_length", None)
    try:
        gen = torch.Generator().manual_seed(args.seed + length)
        ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=gen).to(device)
        mask = torch.ones_like(ids)
        first, _, _, _ = timed_generate(model, ids, mask, args.new_tokens, device, kwargs)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        total, ttft, seqs, cache = timed_generate(model, ids, mask, args.new_tokens, device, kwargs)
        row.update(first_s=first, ttft_ms=ttft * 1e3, total_s=total, cache=cache,
                   decode_tok_s=batch * (args.new_tokens - 1) / max(total - ttft, 1e-9),
                   tokens=seqs[:, length:].cpu())
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = "OOM"
        print(f"{variant} {batch}x{length}: out of memory ({str(e).splitlines()[0]})", file=sys.stderr)
    except Exception as e:  # noqa: BLE001  (a failing variant is reported, the others still run)
        row["error"] = f"failed ({type(e).__name__})"
        import traceback

        traceback.print_exc()
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def same_tokens(row, rows) -> str:
    """Leading greedy tokens equal to nsa-dynamic's, worst row (``all`` when every token is equal)."""
    if not row["variant"].startswith("nsa") or row["variant"] == "nsa-dynamic":
        return ""
    ref = next((r for r in rows if r["variant"] == "nsa-dynamic" and (r["batch"], r["prompt"]) ==
                (row["batch"], row["prompt"]) and "tokens" in r), None)
    if ref is None:
        return ""
    diff = (row["tokens"] != ref["tokens"]).int()
    if not diff.any():
        return "all"
    return str(int(torch.where(diff.any(1), diff.argmax(1), diff.shape[1]).min()))


def table(rows, args, device, dtype, shapes) -> str:
    head = [
        f"# generate() benchmark ({'tiny, ' if args.tiny else ''}{device.type}"
        f"{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, {str(dtype).split('.')[-1]})",
        "",
        f"Model: {shapes['num_hidden_layers']} layers, hidden {shapes['hidden_size']}, "
        f"{shapes['num_attention_heads']}/{shapes['num_key_value_heads']} heads, head_dim {shapes['head_dim']}, "
        f"intermediate {shapes['intermediate_size']}, vocab {shapes['vocab_size']}; greedy, {args.new_tokens} new "
        "tokens per row. Speed-ups and memory ratio against `sdpa` (plain generate() of the dense model): "
        "higher is better for speed, lower for memory.",
        "",
        "| batch x prompt | variant | cache | first call s | TTFT ms | decode tok/s | peak GiB | TTFT speed-up "
        "| decode speed-up | memory ratio | same tokens as nsa-dynamic |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines = []
    for batch, length in args.configs:
        group = [r for r in rows if (r["batch"], r["prompt"]) == (batch, length)]
        base = next((b for b in group if b["variant"] == "sdpa" and "error" not in b), None)
        for r in group:
            name = f"{batch}x{length}"
            if "error" in r:
                lines.append(f"| {name} | {r['variant']} | {r['error']} | | | | | | | | |")
                continue
            ratio = lambda a, b: None if base is None or r is base or not a or not b else a / b  # noqa: E731
            lines.append(
                f"| {name} | {r['variant']} | {r['cache']} | {r['first_s']:.1f} | {r['ttft_ms']:.0f} | "
                f"{r['decode_tok_s']:.1f} | {fmt(r.get('peak_gib'), '.2f')} | "
                f"{fmt(ratio(base and base['ttft_ms'], r['ttft_ms']), '.2f')} | "
                f"{fmt(ratio(r['decode_tok_s'], base and base['decode_tok_s']), '.2f')} | "
                f"{fmt(ratio(r.get('peak_gib'), base and base.get('peak_gib')), '.2f')} | {same_tokens(r, rows)} |"
            )
    return "\n".join(head + lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes = model_shapes(args)
    print(f"torch {torch.__version__}; configs {args.configs}; variants {args.variants}", flush=True)
    rows = []

    def run(model, kind):
        for variant in (v for v in args.variants if VARIANTS[v][0] == kind):
            for batch, length in args.configs:
                rows.append(measure(model, variant, batch, length, args, device))
                print({k: v for k, v in rows[-1].items() if k != "tokens"}, flush=True)

    nsa_model = build_nsa(args, device, dtype)
    run(nsa_model, "nsa")
    if any(VARIANTS[v][0] == "sdpa" for v in args.variants):
        llama = llama_from_nsa(nsa_model, device, dtype)
        del nsa_model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        run(llama, "sdpa")
    text = table(rows, args, device, dtype, shapes)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return rows


if __name__ == "__main__":
    main()
