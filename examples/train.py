"""Continued training of an NSA model with `transformers.Trainer`.

    python examples/train.py --model CONVERTED_DIR --data a.txt b.txt --output-dir runs/nsa \
        --seq-len 4096 --nsa-only-steps 200 --max-steps 2000 --bf16 --gradient-checkpointing

Documents are cut into pieces of at most --seq-len tokens; each batch is packed into one row by
`DataCollatorWithFlattening` with `cu_seq_lens` so NSA never attends across documents. With
--nsa-only-steps N the first N of the --max-steps steps train only the new NSA modules (compressors,
gates), then all weights train. --resume continues from the last checkpoint in --output-dir.

Selection alignment (for a converted dense model): --align-weight W adds W x a KL term that moves NSA's
block selection toward where full attention looks (nsa_hf.alignment; --align-rows query rows per sequence);
with --align-in warmup only the --nsa-only-steps phase has it (a warm-up of the NSA modules), with
--align-in all (default) every step. --attn-implementation sdpa trains a dense model with the same script
(the dense reference of a conversion; packed documents stay separate through their position ids).

Multi-GPU: the same script under `accelerate launch` (FSDP: see docs/multi_gpu.md and
examples/fsdp.yaml). --log-file writes every logged step's loss as JSON (main process), and
--sequential makes the data order independent of the number of processes: the pieces are shuffled
once with --seed and read in order, so `--batch-size 1 --grad-accum 2` on one GPU and `--batch-size 1`
on each of two GPUs train on the same two pieces in every optimizer step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorWithFlattening, Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

import nsa_hf  # noqa: F401  (registers NSA-Llama and attn_implementation="nsa")
from nsa_hf.training import (
    ThroughputCallback,
    add_training_flags,
    check_training_flags,
    chunk_documents,
    fsdp_units,
    load_text_dataset,
    save_trained_model,
    set_trainable,
    training_arguments,
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_flags(ap)  # --model, --data, --seq-len, --batch-size, --bf16, ... (shared with lora.py)
    ap.add_argument("--output-dir", required=True, help="directory for checkpoints and the final model (OUTPUT_DIR/final)")
    ap.add_argument("--max-steps", type=int, default=1000, help="optimizer steps in all, --nsa-only-steps included (default 1000)")
    ap.add_argument("--nsa-only-steps", type=int, default=0,
                    help="train only the NSA modules for the first this many of the --max-steps steps (default 0)")
    ap.add_argument("--lr", type=float, default=1e-4, help="learning rate when all weights train (default 1e-4)")
    ap.add_argument("--nsa-lr", type=float, default=None, help="learning rate of the NSA-only phase (default --lr x 10)")
    ap.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    ap.add_argument("--log-file", default=None, help="write the logged losses (every --logging-steps) as JSON here")
    ap.add_argument("--sequential", action="store_true",
                    help="shuffle the pieces once with --seed and read them in order (same order for any process count)")
    ap.add_argument("--no-save", action="store_true", help="do not save the final model")
    ap.add_argument("--align-weight", type=float, default=0.0, metavar="W",
                    help="add W x the selection alignment term (KL from full attention's block mass to NSA's "
                         "selection scores) to the training loss (default 0: off)")
    ap.add_argument("--align-rows", type=int, default=64, metavar="R",
                    help="query rows per sequence and layer sampled for the alignment term (default 64)")
    ap.add_argument("--attn-implementation", default="nsa", choices=("nsa", "sdpa", "eager"),
                    help="attention the model is loaded with (default nsa; sdpa or eager train a dense model, e.g. "
                         "the dense reference of a conversion: no NSA modules, so no --nsa-only-steps or "
                         "--align-weight)")
    ap.add_argument("--align-in", choices=("warmup", "all"), default="all",
                    help="steps that have the alignment term: 'warmup' = the --nsa-only-steps phase only, "
                         "'all' = every step (default all)")
    return ap


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        check_training_flags(args, counts=("max_steps",))
    except ValueError as err:
        usage_error(str(err))
    if not 0 <= args.nsa_only_steps < args.max_steps:
        usage_error(f"--nsa-only-steps {args.nsa_only_steps}: must be >= 0 and below --max-steps {args.max_steps} "
                    "(the total; the rest train all weights)")
    if not args.align_weight >= 0 or args.align_weight == float("inf"):
        usage_error(f"--align-weight {args.align_weight}: must be a finite number >= 0 (0 switches the term off)")
    if args.align_rows < 1:
        usage_error(f"--align-rows {args.align_rows}: must be >= 1 (query rows per sequence)")
    if args.attn_implementation != "nsa" and (args.nsa_only_steps or args.align_weight):
        usage_error(f"--attn-implementation {args.attn_implementation}: trains a dense model, which has no NSA modules "
                    "to train alone or to align; drop --nsa-only-steps and --align-weight (or use nsa)")
    if args.align_in == "warmup" and args.nsa_only_steps == 0:
        usage_error("--align-in warmup: needs --nsa-only-steps N > 0 (the warm-up phase that has the term)")
    return args


def usage_error(message: str, prog: str = "train.py"):
    """One line on stderr and exit status 2, as argparse does for a bad command line."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class LossLogCallback(TrainerCallback):
    """Appends ``{phase, step, loss, grad_norm, learning_rate, tokens_per_second, world_size, fsdp_units}``
    for every log with a loss and rewrites ``path`` as a JSON list each time (main process only), so a
    crash later keeps the losses so far. ``fsdp_units`` (FSDP2-sharded modules) shows that a run really was sharded."""

    def __init__(self, path, phase, records):
        self.path, self.phase, self.records = path, phase, records

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        self.records.append({"phase": self.phase, "step": state.global_step, "loss": logs["loss"],
                             "grad_norm": logs.get("grad_norm"), "learning_rate": logs.get("learning_rate"),
                             "tokens_per_second": logs.get("tokens_per_second"), "world_size": args.world_size,
                             "fsdp_units": fsdp_units(kwargs.get("model"))})
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "w") as f:
            json.dump(self.records, f, indent=1)


class SequentialTrainer(Trainer):
    """A Trainer that reads the training set in order (no sampler shuffling)."""

    def _get_train_sampler(self, *args, **kwargs):
        dataset = args[0] if args and args[0] is not None else kwargs.get("train_dataset") or self.train_dataset
        return torch.utils.data.SequentialSampler(dataset)


def main(argv=None):
    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn_implementation)
    model.config.use_cache = False  # packed training: the nsa backend reads cu_seq_lens, no cache
    from accelerate import PartialState

    with PartialState().main_process_first():  # under accelerate launch: tokenise once, the others read the cache
        pieces = chunk_documents(load_text_dataset(args.data), tokenizer, args.seq_len, args.text_column)
        if args.sequential:
            pieces = pieces.shuffle(seed=args.seed).flatten_indices()
    trainer_cls = SequentialTrainer if args.sequential else Trainer
    records = []
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    history = []

    phases = []
    if args.nsa_only_steps > 0:
        phases.append(("nsa", os.path.join(args.output_dir, "phase1-nsa-only"), args.nsa_only_steps, args.nsa_lr or args.lr * 10))
    phases.append(("all", os.path.join(args.output_dir, "phase2-all"), args.max_steps - args.nsa_only_steps, args.lr))
    for which, out, steps, lr in phases:
        n = set_trainable(model, which)
        align = args.align_weight if args.align_in == "all" or which == "nsa" else 0.0
        # the model adds the term to the loss it returns while training (nsa_hf.alignment)
        model.config.nsa_align_weight, model.config.nsa_align_rows = align, args.align_rows
        print(f"[train] phase '{which}': {n:,} trainable parameters, {steps} steps, lr {lr}"
              + (f", selection alignment weight {align}" if align else ""))
        callbacks = [ThroughputCallback()]
        if args.log_file:
            callbacks.append(LossLogCallback(args.log_file, which, records))
        trainer = trainer_cls(model=model, args=training_arguments(args, out, steps, lr), train_dataset=pieces,
                              data_collator=collator, callbacks=callbacks)
        resume = get_last_checkpoint(out) if args.resume and os.path.isdir(out) else None
        trainer.train(resume_from_checkpoint=resume)
        history += [h for h in trainer.state.log_history if "loss" in h]
    for name in ("nsa_align_weight", "nsa_align_rows"):  # a training setting: not saved with the model
        if hasattr(model.config, name):
            delattr(model.config, name)
    if args.no_save:
        return history
    final = os.path.join(args.output_dir, "final")
    save_trained_model(trainer.model, final, tokenizer)  # under FSDP2 the sharded weights are gathered first
    print(f"[train] saved {final}")
    return history


if __name__ == "__main__":
    try:
        main()
    finally:  # under torchrun/accelerate: leave the process group cleanly (gloo aborts at exit otherwise)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
