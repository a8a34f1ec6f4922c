"""End-to-end NSA demo on a CPU, with no GPU and no network (``make demo``).

1. Real text: long Python standard-library sources found on this machine (held-out files for eval).
2. A byte-level BPE tokenizer trained on them (``tokenizers``).
3. A tiny dense ``LlamaForCausalLM`` (about 4M parameters) trained briefly with ``Trainer``.
4. Conversion to NSA-Llama with ``convert_llama_to_nsa``, using NSA sizes small enough that the
   sparsity bites at the demo's sequence length (512 tokens: compression 16/8, selection 4 blocks
   of 32, window 64).
5. Continued training of the NSA model.
6. ``generate()`` with the KV cache.

It prints the held-out loss before/after each phase, the conversion gap, tokens/s, and how many keys
each NSA branch attends per query on average against dense attention, and writes ``results.json``,
the checkpoints and their model cards under ``--out``. The defaults took 4 min 10 s on 2 CPU cores
(H100 host restricted to 2 cores with taskset, no GPU).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from nsa_hf.sample_data import stdlib_documents, token_blocks, train_tokenizer


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120, help="dense training steps (default 120)")
    ap.add_argument("--nsa-steps", type=int, default=None, help="NSA continued-training steps (default: half of --steps)")
    ap.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per training and held-out block (default 512)")
    ap.add_argument("--batch-size", type=int, default=8, help="blocks per training batch (default 8)")
    ap.add_argument("--lr", type=float, default=2e-3, help="dense learning rate")
    ap.add_argument("--nsa-lr", type=float, default=1e-3, help="NSA continued-training learning rate")
    m = ap.add_argument_group("model and data")
    m.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    m.add_argument("--hidden-size", type=int, default=256, help="model width (default 256)")
    m.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    m.add_argument("--heads", type=int, default=4, help="query heads (default 4)")
    m.add_argument("--kv-heads", type=int, default=2, help="key-value heads (default 2)")
    m.add_argument("--max-chars", type=int, default=3_000_000, help="characters of stdlib source to read")
    m.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks of --seq-len tokens")
    m.add_argument("--gen-tokens", type=int, default=48, help="tokens to generate at the end")
    n = ap.add_argument_group("NSA sizes (tokens)")
    n.add_argument("--cmp-block", type=int, default=16, help="compression block length l (default 16)")
    n.add_argument("--cmp-stride", type=int, default=8, help="compression stride d (default 8)")
    n.add_argument("--slc-block", type=int, default=32, help="selection block length l' (default 32)")
    n.add_argument("--slc-count", type=int, default=4, help="selected blocks per query n (default 4)")
    n.add_argument("--init-blocks", type=int, default=1, help="initial blocks always selected (default 1)")
    n.add_argument("--local-blocks", type=int, default=2, help="local blocks always selected (default 2)")
    n.add_argument("--window", type=int, default=64, help="sliding window w (default 64)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return ap


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.nsa_steps is None:
        args.nsa_steps = max(1, args.steps // 2)
    for name in ("steps", "nsa_steps", "seq_len", "batch_size", "eval_blocks"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


@torch.no_grad()
def held_out_loss(model, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss (nats) of ``model`` on ``blocks``."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i : i + batch_size].to(device)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        n = ids.shape[0] * (ids.shape[1] - 1)
        total += out.loss.item() * n
        count += n
    return total / count


def train(model, blocks: torch.Tensor, out_dir: Path, steps: int, lr: float, batch_size: int, seed: int) -> dict:
    """Train with ``transformers.Trainer`` for ``steps`` steps; returns timing and the loss log."""
    from transformers import Trainer, TrainingArguments

    dataset = [{"input_ids": b, "labels": b} for b in blocks]
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 10),
        weight_decay=0.01,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_drop_last=True,
    )
    model.config.use_cache = False
    model.train()
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = steps * batch_size * blocks.shape[1]
    model.config.use_cache = True
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"steps": steps, "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "train_losses": losses}


def build_dense_model(args, vocab_size: int, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=int(args.hidden_size * 8 / 3 / 16 + 0.5) * 16,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, 2 * args.seq_len),
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return LlamaForCausalLM(config)


def print_keys_table(params, seq_len: int) -> dict:
    from nsa_hf.convert import keys_per_query

    k = keys_per_query(params, seq_len)
    log(f"keys attended per query, mean over the {seq_len} positions of a sequence:")
    for name, label in (("cmp", "compressed tokens (cmp)"), ("slc", "selected-block keys (slc)"),
                        ("win", "window keys (win)"), ("nsa", "NSA total"), ("dense", "dense attention")):
        log(f"  {label:<28} {k[name]:8.1f}")
    log(f"  NSA / dense = {k['nsa'] / k['dense']:.2f} at {seq_len} tokens "
        f"(the ratio falls as sequences grow: slc and win stay bounded)")
    return k


def generate_sample(model, tokenizer, prompt_ids: torch.Tensor, new_tokens: int) -> dict:
    """Greedy continuation with the KV cache; returns the text and tokens/s."""
    model.eval()
    model.config.use_cache = True
    device = next(model.parameters()).device
    ids = prompt_ids[None].to(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    return {"prompt": tokenizer.decode(prompt_ids), "continuation": tokenizer.decode(new),
            "new_tokens": int(new.numel()), "tokens_per_second": new.numel() / seconds}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import nsa_hf  # noqa: F401  (registers NSA-Llama and attn_implementation="nsa")
    from transformers import set_seed

    from nsa_hf.convert import convert_llama_to_nsa
    from nsa_hf.model_card import render_model_card

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)
    t0 = time.perf_counter()
    results = {"args": vars(args)}

    # 1-2. Text and tokenizer.
    train_docs, eval_docs = stdlib_documents(max_chars=args.max_chars)
    log(f"text: {len(train_docs)} training and {len(eval_docs)} held-out Python stdlib files "
        f"({sum(map(len, train_docs)) / 1e6:.1f} + {sum(map(len, eval_docs)) / 1e6:.1f} M characters)")
    tokenizer = train_tokenizer(train_docs, args.vocab_size)
    train_blocks = token_blocks(tokenizer, train_docs, args.seq_len)
    eval_blocks = token_blocks(tokenizer, eval_docs, args.seq_len, max_blocks=args.eval_blocks)
    log(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens; {len(train_blocks)} training and "
        f"{len(eval_blocks)} held-out blocks of {args.seq_len} tokens")
    results["data"] = {"train_blocks": len(train_blocks), "eval_blocks": len(eval_blocks), "vocab": len(tokenizer)}

    # 3. Dense model.
    dense = build_dense_model(args, len(tokenizer), tokenizer.eos_token_id)
    log(f"dense Llama: {sum(p.numel() for p in dense.parameters()) / 1e6:.2f}M parameters")
    loss = {"dense_init": held_out_loss(dense, eval_blocks, args.batch_size)}
    log(f"held-out loss, untrained dense: {loss['dense_init']:.4f} (ln vocab = {math.log(len(tokenizer)):.4f})")
    log(f"training the dense model for {args.steps} steps of {args.batch_size} x {args.seq_len} tokens")
    results["dense_training"] = train(dense, train_blocks, out / "dense-run", args.steps, args.lr,
                                      args.batch_size, args.seed)
    loss["dense_trained"] = held_out_loss(dense, eval_blocks, args.batch_size)
    log(f"held-out loss, trained dense: {loss['dense_trained']:.4f} "
        f"({results['dense_training']['tokens_per_second']:,.0f} training tokens/s)")
    dense_dir = out / "dense"
    dense.save_pretrained(dense_dir)
    tokenizer.save_pretrained(dense_dir)

    # 4. Conversion.
    log("converting to NSA-Llama")
    nsa, report = convert_llama_to_nsa(
        dense_dir, out / "nsa-converted",
        cmp_block=args.cmp_block, cmp_stride=args.cmp_stride, slc_block=args.slc_block,
        slc_count=args.slc_count, init_blocks=args.init_blocks, local_blocks=args.local_blocks,
        window=args.window, dtype="float32", sample_text=eval_docs, eval_len=args.seq_len,
        eval_sequences=min(4, len(eval_blocks)), device="cpu" if not torch.cuda.is_available() else None,
        overwrite=True,  # the demo's own output folder: a re-run replaces it
    )
    print(report.format(), flush=True)
    results["conversion"] = report.to_dict()
    loss["nsa_converted"] = held_out_loss(nsa, eval_blocks, args.batch_size)
    log(f"held-out loss, converted NSA (untrained): {loss['nsa_converted']:.4f} "
        f"(gap to dense {loss['nsa_converted'] - loss['dense_trained']:+.4f})")
    results["keys_per_query"] = print_keys_table(nsa.config.nsa_params(), args.seq_len)

    # 5. Continued training with NSA.
    log(f"continued training of the NSA model for {args.nsa_steps} steps")
    results["nsa_training"] = train(nsa, train_blocks, out / "nsa-run", args.nsa_steps, args.nsa_lr,
                                    args.batch_size, args.seed + 1)
    loss["nsa_trained"] = held_out_loss(nsa, eval_blocks, args.batch_size)
    log(f"held-out loss, trained NSA: {loss['nsa_trained']:.4f} "
        f"({results['nsa_training']['tokens_per_second']:,.0f} training tokens/s)")
    nsa_dir = out / "nsa-trained"
    nsa.save_pretrained(nsa_dir)
    tokenizer.save_pretrained(nsa_dir)
    training = {
        "data": f"{len(train_blocks)} blocks of {args.seq_len} tokens of Python stdlib sources (demo)",
        "steps": f"{args.nsa_steps} x {args.batch_size} sequences, learning rate {args.nsa_lr}, cosine schedule",
        "held-out loss": f"{loss['nsa_converted']:.4f} after conversion -> {loss['nsa_trained']:.4f} after training "
                         f"(dense: {loss['dense_trained']:.4f})",
    }
    render_model_card(nsa.config, report, training=training, model_name="nsa-demo").save(nsa_dir / "README.md")

    # 6. Generation with the cache.
    prompt = eval_blocks[0, : min(64, args.seq_len // 2)]
    gen = generate_sample(nsa, tokenizer, prompt, args.gen_tokens)
    log(f"generate(): {gen['new_tokens']} new tokens at {gen['tokens_per_second']:.1f} tokens/s")
    print("----- prompt -----\n" + gen["prompt"] + "\n----- continuation -----\n" + gen["continuation"] +
          "\n------------------", flush=True)
    results["generation"] = gen

    results["loss"] = loss
    results["seconds"] = time.perf_counter() - t0
    log("held-out loss: " + ", ".join(f"{k} {v:.4f}" for k, v in loss.items()))
    log(f"done in {results['seconds']:.0f} s; checkpoints, model cards and results.json in {out}")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
