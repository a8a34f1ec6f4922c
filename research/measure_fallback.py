"""How far is the parameter-free NSA fallback from dense attention?

A stock ``LlamaForCausalLM`` run with ``attn_implementation="nsa"`` (no NSA weights) uses mean-pool
compression and fixed gates (cmp 0, slc 0.5, win 0.5). This script compares its logits and loss with
``sdpa`` on the same weights, on byte-level text from the Python standard library's sources, for

* a tiny randomly initialised Llama, and
* the same Llama after ``--train-steps`` steps of dense (sdpa) training on that text (attention
  patterns of a trained model are peakier than a random one's, so the gap is more telling).

Usage::

    python -m research.measure_fallback --lengths 256 1024 2048 --train-steps 300

Prints one markdown table row per (model, NSA sizes, length): mean/max |logit difference|, dense and NSA
losses (nats per byte) and top-1 agreement.
"""
from __future__ import annotations

import argparse
import sysconfig
import time
import warnings
from pathlib import Path

import torch

import nsa_hf  # noqa: F401  (registers the "nsa" attention implementation)
from transformers import LlamaConfig, LlamaForCausalLM

NSA_SIZES = {
    # Small sizes so that sparsity bites at a few hundred tokens.
    "small (cmp 16/8, slc 32x8, win 64)": dict(nsa_cmp_block=16, nsa_cmp_stride=8, nsa_slc_block=32,
                                               nsa_slc_count=8, nsa_init_blocks=1, nsa_local_blocks=2,
                                               nsa_window=64),
    # The paper's sizes: dense up to 512 tokens apart (window), 1024 tokens of selected blocks.
    "paper (cmp 32/16, slc 64x16, win 512)": dict(nsa_cmp_block=32, nsa_cmp_stride=16, nsa_slc_block=64,
                                                  nsa_slc_count=16, nsa_init_blocks=1, nsa_local_blocks=2,
                                                  nsa_window=512),
}


def stdlib_bytes(limit: int = 8_000_000) -> torch.Tensor:
    """The standard library's ``.py`` sources (sorted paths), concatenated, as byte ids."""
    root = Path(sysconfig.get_paths()["stdlib"])
    data = bytearray()
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        data += path.read_bytes() + b"\n"
        if len(data) >= limit:
            break
    return torch.tensor(list(data[:limit]), dtype=torch.long)


def tiny_llama(max_len: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")


def train(model, data: torch.Tensor, steps: int, seq_len: int, batch: int, lr: float, device) -> float:
    """Dense (sdpa) next-byte training; returns the final loss."""
    model.set_attn_implementation("sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch,))
        ids = torch.stack([data[s : s + seq_len] for s in starts]).to(device)
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return loss.item()


@torch.no_grad()
def compare(model, windows: torch.Tensor, sizes: dict) -> dict:
    """Dense vs fallback NSA on ``windows`` (B, T): logit gap, losses, top-1 agreement."""
    for key, value in sizes.items():
        setattr(model.config, key, value)
    out = {}
    for impl in ("sdpa", "nsa"):
        model.set_attn_implementation(impl)
        logits = torch.cat([model(w[None], use_cache=False).logits.float() for w in windows])
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), windows[:, 1:].reshape(-1))
        out[impl] = (logits, loss.item())
    diff = (out["nsa"][0] - out["sdpa"][0]).abs()
    agree = (out["nsa"][0].argmax(-1) == out["sdpa"][0].argmax(-1)).float().mean().item()
    return dict(mean=diff.mean().item(), max=diff.max().item(), dense=out["sdpa"][1], nsa=out["nsa"][1],
                agree=agree)


def parse_args(argv=None):
    """The command line (``argv``: the arguments after the program name; ``None``: ``sys.argv``)."""
    parser = argparse.ArgumentParser(prog="python -m research.measure_fallback", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows per length")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--train-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*without NSA weights.*")
    torch.manual_seed(args.seed)
    data = stdlib_bytes()
    split = int(data.numel() * 0.9)
    train_data, eval_data = data[:split], data[split:]
    model = tiny_llama(max(args.lengths + [args.train_len])).to(args.device)
    print(f"device={args.device} torch={torch.__version__} stdlib bytes={data.numel()} "
          f"(train {train_data.numel()}, eval {eval_data.numel()})")

    print("| model | NSA sizes | T | mean abs logit diff | max abs logit diff | dense loss | NSA loss | top-1 agree |")
    print("|---|---|---|---|---|---|---|---|")
    for stage in ("random init", f"trained {args.train_steps} steps (T={args.train_len})"):
        if stage != "random init":
            if args.train_steps <= 0:
                break
            t0 = time.time()
            final = train(model, train_data, args.train_steps, args.train_len, args.batch, args.lr, args.device)
            print(f"<!-- trained in {time.time() - t0:.0f}s, final train loss {final:.3f} -->")
        for name, sizes in NSA_SIZES.items():
            for length in args.lengths:
                g = torch.Generator().manual_seed(args.seed + length)
                starts = torch.randint(0, eval_data.numel() - length, (args.windows,), generator=g)
                windows = torch.stack([eval_data[s : s + length] for s in starts]).to(args.device)
                r = compare(model, windows, sizes)
                print(f"| {stage} | {name} | {length} | {r['mean']:.4f} | {r['max']:.3f} | {r['dense']:.3f} | "
                      f"{r['nsa']:.3f} | {r['agree']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
