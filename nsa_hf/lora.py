"""LoRA for NSA models with PEFT: adapters on the Llama projections, the new NSA modules fully
trained and saved with the adapter (they start from scratch after conversion, so a low-rank update
of them would be the wrong tool)."""
from __future__ import annotations

from .training import NSA_MODULE_NAMES

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def nsa_lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.0, target_modules=LLAMA_PROJECTIONS, **kwargs):
    """A `peft.LoraConfig` for NSA-Llama: LoRA on ``target_modules``, NSA modules in ``modules_to_save``."""
    from peft import LoraConfig

    if r < 1:
        raise ValueError(f"r={r}: the LoRA rank must be >= 1")
    overlap = set(target_modules) & set(NSA_MODULE_NAMES)
    if overlap:
        raise ValueError(f"target_modules {sorted(overlap)} are NSA modules: they are trained fully via modules_to_save")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        modules_to_save=list(NSA_MODULE_NAMES),
        task_type="CAUSAL_LM",
        **kwargs,
    )


def merge_to_standalone(peft_model, out_dir: str, tokenizer=None):
    """Merge the LoRA weights into the base NSA model and save a plain NSA-Llama checkpoint."""
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return merged
