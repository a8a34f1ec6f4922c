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
from nsa_hf.training import (
    ThroughputCallback,
    add_training_flags,
    check_training_flags,
    chunk_documents,
    load_text_dataset,
    training_arguments,
)

from train import usage_error  # noqa: E402  (examples/train.py)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_flags(ap)  # --model, --data, --seq-len, --batch-size, --bf16, ... (shared with train.py)
    ap.add_argument("--output-dir", required=True, help="directory for checkpoints, OUTPUT_DIR/adapter and OUTPUT_DIR/merged")
    ap.add_argument("--max-steps", type=int, default=500, help="optimizer steps (default 500)")
    ap.add_argument("--lr", type=float, default=2e-4, help="learning rate (default 2e-4)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank r (default 16)")
    ap.add_argument("--alpha", type=int, default=32, help="LoRA scaling alpha (default 32)")
    ap.add_argument("--resume", action="store_true", help="resume from the last checkpoint in OUTPUT_DIR/checkpoints")
    return ap


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_training_flags(args, counts=("max_steps", "rank"))
    except ValueError as err:
        usage_error(str(err), "lora.py")
    return args


def main(argv=None):
    from peft import PeftModel, get_peft_model

    args = parse_args(argv)
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
    trainer = Trainer(model=model, args=training_arguments(args, checkpoints, args.max_steps, args.lr),
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
