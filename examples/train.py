"""Continued training of an NSA model with `transformers.Trainer`.

    python examples/train.py --model CONVERTED_DIR --data a.txt b.txt --output-dir runs/nsa \
        --seq-len 4096 --nsa-only-steps 200 --max-steps 2000 --bf16 --gradient-checkpointing

Documents are cut into pieces of at most --seq-len tokens; each batch is packed into one row by
`DataCollatorWithFlattening` with `cu_seq_lens` so NSA never attends across documents. With
--nsa-only-steps N the first N steps train only the new NSA modules (compressors, gates), then all
weights train. --resume continues from the last checkpoint in --output-dir.
"""
from __future__ import annotations

import argparse
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorWithFlattening, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

import nsa_hf  # noqa: F401  (registers NSA-Llama and attn_implementation="nsa")
from nsa_hf.training import ThroughputCallback, chunk_documents, load_text_dataset, set_trainable


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="NSA-Llama checkpoint directory (see `nsa-hf convert`)")
    ap.add_argument("--data", nargs="+", required=True, help="local .txt/.py/.json/.jsonl/.parquet files, or a Hub dataset name")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=1, help="documents pieces per device batch (packed into one row)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--nsa-only-steps", type=int, default=0, help="first train only the NSA modules for this many steps")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--nsa-lr", type=float, default=None, help="learning rate of the NSA-only phase (default --lr x 10)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--logging-steps", type=int, default=10)
    ap.add_argument("--save-steps", type=int, default=500)
    ap.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def training_args(args, output_dir, max_steps, lr):
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        learning_rate=lr,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        lr_scheduler_type="cosine",
        warmup_steps=min(100, max_steps // 10),
        include_num_input_tokens_seen=True,
        report_to=[],
        seed=args.seed,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
    )


def main(argv=None):
    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="nsa")
    model.config.use_cache = False  # packed training: the nsa backend reads cu_seq_lens, no cache
    pieces = chunk_documents(load_text_dataset(args.data), tokenizer, args.seq_len, args.text_column)
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    history = []

    phases = []
    if args.nsa_only_steps > 0:
        phases.append(("nsa", os.path.join(args.output_dir, "phase1-nsa-only"), args.nsa_only_steps, args.nsa_lr or args.lr * 10))
    phases.append(("all", os.path.join(args.output_dir, "phase2-all"), args.max_steps, args.lr))
    for which, out, steps, lr in phases:
        n = set_trainable(model, which)
        print(f"[train] phase '{which}': {n:,} trainable parameters, {steps} steps, lr {lr}")
        trainer = Trainer(model=model, args=training_args(args, out, steps, lr), train_dataset=pieces,
                          data_collator=collator, callbacks=[ThroughputCallback()])
        resume = get_last_checkpoint(out) if args.resume and os.path.isdir(out) else None
        trainer.train(resume_from_checkpoint=resume)
        history += [h for h in trainer.state.log_history if "loss" in h]
    final = os.path.join(args.output_dir, "final")
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    print(f"[train] saved {final}")
    return history


if __name__ == "__main__":
    main()
