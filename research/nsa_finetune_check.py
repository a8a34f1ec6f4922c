"""Does a converted NSA model get better at copying from beyond its window when fine-tuned on it? The CPU
check behind run 4 of the quality experiment (research/RUNS.md), where the NSA needle fine-tune on the GPU
made retrieval worse.

1. A 2-layer dense ``LlamaForCausalLM`` (hidden 128, 4 query / 2 KV heads) learns to copy on synthetic
   sequences (``quality.induction_batch``: 192 random tokens from a vocabulary of 128, a 48-token span
   repeated at a random earlier offset, loss on the repeats; the copy circuit forms at ~900 steps).
2. It is converted to NSA (``quality.convert``: compression 8/4, selection 4 blocks of 16 (1 initial +
   2 local forced), window 16), so copies from 32+ tokens back need the compressed/selected branches.
3. The NSA model and, as a control, the dense one are fine-tuned on the copies (all at distances >= 48,
   beyond the window; ``--answers-per-row 16 --batch 8``, the default: the last 16 per sequence, 128
   supervised tokens per step, as in the GPU needle fine-tune; ``--answers-per-row 0``: all 47),
   with the AdamW / master-weights loop of ``quality.Run`` (``--dtype bfloat16``: bf16 working copy).

Reports the copy accuracy by copy distance (``quality.CopyProbe``) before and after, and the mean
fine-tune loss over its first and last tenth. The warm-up takes ~5 min on 2 CPU threads; ``--dense``
reuses a saved warm-up model.

    python -m research.nsa_finetune_check --out /tmp/nsa_ft --dtype bfloat16
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from . import quality

VOCAB, LENGTH, SPAN, WINDOW = 128, 192, 48, 16
NSA_FLAGS = ["--hidden-size", "128", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--window", str(WINDOW),
             "--cmp-block", "8", "--cmp-stride", "4", "--slc-block", "16", "--slc-count", "4"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m research.nsa_finetune_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/nsa_finetune_check", help="results.json and the warm-up model go here")
    ap.add_argument("--warmup-steps", type=int, default=1100, help="dense copy warm-up steps (batches of 32)")
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--finetune-lr", type=float, default=5e-4)
    ap.add_argument("--nsa-lr-mult", type=float, default=10.0, help="LR multiplier of the new NSA modules")
    ap.add_argument("--batch", type=int, default=8, help="fine-tune sequences per step")
    ap.add_argument("--answers-per-row", type=int, default=16,
                    help="supervised copies per sequence (the last ones); 0 = all of them")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="fine-tune working copy")
    ap.add_argument("--dense", default=None, help="state dict of a warmed-up dense model (skips the warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    for name in ("warmup_steps", "finetune_steps", "batch"):
        if getattr(args, name) < (0 if name == "warmup_steps" else 1):
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: out of range")
    if args.answers_per_row < 0:
        ap.error(f"--answers-per-row {args.answers_per_row}: must be >= 0")
    return args


def far_copy_batch(vocab_ids, batch: int, answers_per_row: int, step: int):
    """Fine-tune batch ``step``: copy sequences and the mask of the supervised positions (copies from at
    least twice the window back, which with spans of 48 is all of them; the last ``answers_per_row`` of
    them per row, or all)."""
    g = torch.Generator().manual_seed(50_000 + step)
    ids, mask, distance = quality.induction_batch(vocab_ids, batch, LENGTH, SPAN, g)
    far = mask & (distance >= 2 * WINDOW)
    if answers_per_row:
        keep = torch.zeros_like(far)
        for row in range(batch):
            keep[row, torch.nonzero(far[row]).flatten()[-answers_per_row:]] = True
        far = keep
    return ids, far


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    qargs = quality.parse_args(["--tiny", "--seq-len", str(LENGTH), *NSA_FLAGS])
    vocab_ids = torch.arange(1, VOCAB + 1)
    dense = quality.build_dense(qargs, VOCAB + 1, 0)
    t0 = time.perf_counter()
    if args.dense:
        dense.load_state_dict(torch.load(args.dense))
    else:
        run = quality.Run(dense, torch.float32, 1e-3, args.warmup_steps, qargs)
        for i in range(args.warmup_steps):
            g = torch.Generator().manual_seed(10_000 + i)
            ids, mask, _ = quality.induction_batch(vocab_ids, 32, LENGTH, SPAN, g)
            loss = run.step(quality.copy_loss(ids, mask))
            if i % 100 == 0 or i == args.warmup_steps - 1:
                print(f"warm-up step {i + 1}/{args.warmup_steps}: copy loss {loss:.3f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
        dense = run.master
        torch.save(dense.state_dict(), out / "dense_warmup.pt")
    probe = quality.CopyProbe(vocab_ids, 32, LENGTH, SPAN, 1, WINDOW, seed=1)
    dtype = getattr(torch, args.dtype)
    results = {"args": vars(args), "warmup_copy_accuracy": probe.accuracy(dense, "cpu"), "finetune": {}}
    print("dense after the warm-up:", json.dumps(results["warmup_copy_accuracy"]), flush=True)
    qargs.nsa_lr_mult = args.nsa_lr_mult
    for name in ("nsa", "dense"):
        torch.manual_seed(1)  # the new NSA modules' initialisation, whether or not the warm-up ran here
        model = quality.convert(copy.deepcopy(dense), qargs) if name == "nsa" else copy.deepcopy(dense)
        before = probe.accuracy(copy.deepcopy(model).to(dtype), "cpu")
        run = quality.Run(model, dtype, args.finetune_lr, args.finetune_steps, qargs)
        for i in range(args.finetune_steps):
            ids, far = far_copy_batch(vocab_ids, args.batch, args.answers_per_row, i)
            run.step(quality.copy_loss(ids, far))
        k = max(1, len(run.losses) // 10)
        results["finetune"][name] = {
            "before": before, "after": probe.accuracy(run.model, "cpu"),
            "loss_first_tenth": sum(run.losses[:k]) / k, "loss_last_tenth": sum(run.losses[-k:]) / k,
        }
        print(name, json.dumps(results["finetune"][name]), flush=True)
    results["seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
