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

import nsa_hf  # noqa: F401
from nsa_hf.lora import merge_to_standalone, nsa_lora_config
from nsa_hf.training import ThroughputCallback, chunk_documents, load_text_dataset

from train import training_args  # noqa: E402  (examples/train.py)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--logging-steps", type=int, default=10)
    ap.add_argument("--save-steps", type=int, default=500)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


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
    trainer = Trainer(model=model, args=training_args(args, os.path.join(args.output_dir, "checkpoints"), args.max_steps, args.lr),
                      train_dataset=pieces, data_collator=DataCollatorWithFlattening(return_flash_attn_kwargs=True),
                      callbacks=[ThroughputCallback()])
    trainer.train()
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
