"""LoRA fine-tuning of an NSA model with PEFT and the Trainer, then merge into a standalone checkpoint.

    python examples/lora.py --model CONVERTED_DIR --data a.txt --output-dir runs/lora --max-steps 500

Writes OUTPUT_DIR/adapter (the LoRA adapter + the fully trained NSA modules) and OUTPUT_DIR/merged
(a standalone NSA-Llama checkpoint that loads without peft).
"""
from __future__ import annotations

import argparse
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorWithFlattening, Trainer
from transformers.trainer_utils import get_last_checkpoint

import nsa_hf  # noqa: F401
from nsa_hf.lora import merge_to_standalone, nsa_lora_config
from nsa_hf.training import ThroughputCallback, check_data, chunk_documents, load_text_dataset

from train import training_args, usage_error  # noqa: E402  (examples/train.py)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="NSA-Llama checkpoint directory (see `nsa-hf convert`)")
    ap.add_argument("--data", nargs="+", required=True, help="local .txt/.py/.json/.jsonl/.parquet files, or a Hub dataset name")
    ap.add_argument("--text-column", default="text", help="column holding the text in .json/.jsonl/.parquet/.csv data (default text)")
    ap.add_argument("--output-dir", required=True, help="directory for checkpoints, OUTPUT_DIR/adapter and OUTPUT_DIR/merged")
    ap.add_argument("--seq-len", type=int, default=4096, help="tokens per document piece (default 4096)")
    ap.add_argument("--batch-size", type=int, default=1, help="document pieces per device batch (packed into one row)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches accumulated per optimizer step (default 1)")
    ap.add_argument("--max-steps", type=int, default=500, help="optimizer steps (default 500)")
    ap.add_argument("--lr", type=float, default=2e-4, help="learning rate (default 2e-4)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank r (default 16)")
    ap.add_argument("--alpha", type=int, default=32, help="LoRA scaling alpha (default 32)")
    ap.add_argument("--bf16", action="store_true", help="load the model in bfloat16 and train in bf16 mixed precision")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute activations in the backward pass (less memory, slower)")
    ap.add_argument("--logging-steps", type=int, default=10, help="log the loss every this many steps (default 10)")
    ap.add_argument("--save-steps", type=int, default=500, help="save a checkpoint every this many steps (default 500)")
    ap.add_argument("--resume", action="store_true", help="resume from the last checkpoint in OUTPUT_DIR/checkpoints")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return ap


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "logging_steps", "save_steps", "rank"):
        if getattr(args, name) < 1:
            usage_error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1", "lora.py")
    return args


def main(argv=None):
    from peft import PeftModel, get_peft_model

    args = parse_args(argv)
    try:
        check_data(args.data)
    except (FileNotFoundError, ValueError) as err:
        usage_error(f"--data: {err}", "lora.py")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="nsa")
    base.config.use_cache = False
    model = get_peft_model(base, nsa_lora_config(r=args.rank, alpha=args.alpha))
    model.print_trainable_parameters()
    if args.gradient_checkpointing:
        model.enable_input_require_grads()
    pieces = chunk_documents(load_text_dataset(args.data), tokenizer, args.seq_len, args.text_column)
    checkpoints = os.path.join(args.output_dir, "checkpoints")
    trainer = Trainer(model=model, args=training_args(args, checkpoints, args.max_steps, args.lr),
                      train_dataset=pieces, data_collator=DataCollatorWithFlattening(return_flash_attn_kwargs=True),
                      callbacks=[ThroughputCallback()])
    resume = get_last_checkpoint(checkpoints) if args.resume and os.path.isdir(checkpoints) else None
    trainer.train(resume_from_checkpoint=resume)
    adapter_dir = os.path.join(args.output_dir, "adapter")
    model.save_pretrained(adapter_dir)
    # Reload the adapter onto a fresh base model, then merge: proves the saved adapter is complete.
    fresh = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="nsa")
    reloaded = PeftModel.from_pretrained(fresh, adapter_dir)
    merged_dir = os.path.join(args.output_dir, "merged")
    merge_to_standalone(reloaded, merged_dir, tokenizer)
    print(f"[lora] adapter: {adapter_dir}\n[lora] merged standalone checkpoint: {merged_dir}")
    return trainer.state.log_history


if __name__ == "__main__":
    main()
