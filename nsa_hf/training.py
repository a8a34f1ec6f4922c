"""Helpers for continued training of NSA models with `transformers.Trainer`: datasets from local
files, document chunking for packed batches, staged trainability, a throughput log, activation
checkpointing under the installed transformers' names, the command-line flags and `TrainingArguments`
shared by the training scripts (``examples/train.py``, ``examples/lora.py``), and saving a model trained
in one process, under DDP or sharded by FSDP2."""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Sequence

from transformers import TrainerCallback, TrainingArguments

NSA_MODULE_NAMES = ("nsa_cmp_k", "nsa_cmp_v", "nsa_gate")
"""Names of the modules NSA adds to each attention layer (new weights after conversion)."""

_BUILDERS = {".txt": "text", ".text": "text", ".py": "text", ".md": "text", ".json": "json",
             ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def is_nsa_parameter(name: str) -> bool:
    return any(f".{m}." in f".{name}" for m in NSA_MODULE_NAMES)


def set_trainable(model, which: str) -> int:
    """Make only the NSA modules (``which="nsa"``) or every parameter (``"all"``) trainable.
    Returns the number of trainable parameters."""
    if which not in ("nsa", "all"):
        raise ValueError(f"which={which!r}: expected 'nsa' (only the new NSA modules) or 'all'")
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(which == "all" or is_nsa_parameter(name))
        count += param.numel() if param.requires_grad else 0
    if count == 0:
        raise ValueError("no trainable parameters: the model has no NSA modules (convert it with `nsa-hf convert`)")
    return count


def _looks_like_a_file(name: str) -> bool:
    """Whether ``name`` reads as a local path rather than a Hub dataset id (``name`` or ``owner/name``)."""
    return (os.path.splitext(name)[1].lower() in _BUILDERS or name.startswith((".", "/", "~"))
            or name.count("/") > 1 or (os.sep != "/" and os.sep in name))


def check_data(data: Sequence[str]) -> None:
    """Raise ``FileNotFoundError`` naming the first entry of ``data`` that is a missing local file: every
    entry when there are several, or a single one that looks like a path (an extension such as ``.txt``,
    a leading ``.``, ``/`` or ``~``). A single name without one is taken for a Hub dataset id."""
    paths = [os.fspath(p) for p in data]
    if not paths:
        raise ValueError("no data given: name local files or one Hub dataset")
    for p in paths:
        if not os.path.exists(p) and (len(paths) > 1 or _looks_like_a_file(p)):
            raise FileNotFoundError(
                f"data file {p!r} not found: give existing local files "
                f"({', '.join(sorted(_BUILDERS))}) or a single Hub dataset id such as 'owner/name'"
            )


def load_text_dataset(data: Sequence[str], split: str = "train"):
    """A `datasets.Dataset` from local files (.txt/.py/.md one document per file, .json/.jsonl/.parquet/.csv
    rows) or, when ``data`` is a single name that is not a local path, a dataset from the Hub.
    A missing local file raises ``FileNotFoundError`` (see :func:`check_data`)."""
    import datasets

    check_data(data)
    paths = [os.fspath(p) for p in data]
    if len(paths) == 1 and not os.path.exists(paths[0]):
        return datasets.load_dataset(paths[0], split=split)
    kinds = {os.path.splitext(p)[1].lower() for p in paths}
    unknown = kinds - set(_BUILDERS)
    if unknown or len({_BUILDERS[k] for k in kinds}) != 1:
        raise ValueError(f"data files must share one supported type ({sorted(_BUILDERS)}); got {sorted(kinds)}")
    builder = _BUILDERS[kinds.pop()]
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files=paths, split="train", **kwargs)


def chunk_documents(dataset, tokenizer, seq_len: int, text_column: str = "text", num_proc: int | None = None):
    """Tokenise each document (EOS appended) and cut it into pieces of at most ``seq_len`` tokens.

    Every piece belongs to one document, so `DataCollatorWithFlattening(return_flash_attn_kwargs=True)`
    can pack a batch into one row whose `cu_seq_lens` keep NSA from attending across documents."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: must be >= 2")
    if text_column not in dataset.column_names:
        raise ValueError(f"text_column={text_column!r} not in the dataset's columns {dataset.column_names}")
    eos = tokenizer.eos_token_id

    def split(batch):
        pieces = []
        for text in batch[text_column]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            pieces += [ids[i : i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i : i + seq_len]) > 1]
        return {"input_ids": pieces}

    return dataset.map(split, batched=True, remove_columns=dataset.column_names, num_proc=num_proc,
                       desc=f"tokenising into pieces of <= {seq_len} tokens")


class ThroughputCallback(TrainerCallback):
    """Adds ``tokens_per_second`` (input tokens since the previous log over the wall time) to each log
    with a loss: to the log history and to the line the Trainer prints for it (its progress callback runs
    after the callbacks given to the Trainer). Needs ``TrainingArguments(include_num_input_tokens_seen=True)``."""

    def __init__(self):
        self._last = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        now, seen = time.perf_counter(), state.num_input_tokens_seen
        if logs is None or "loss" not in logs or self._last is None or now <= self._last[0]:
            return
        rate = round((seen - self._last[1]) / (now - self._last[0]), 1)
        self._last = (now, seen)
        logs["tokens_per_second"] = rate
        if state.log_history:
            state.log_history[-1]["tokens_per_second"] = rate


def checkpointing_argument(enabled: bool) -> dict:
    """``TrainingArguments``' activation-checkpointing switch under the installed transformers' name
    (``activation_checkpointing`` since 5.23, which warns on the old ``gradient_checkpointing``)."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


COUNT_FLAGS = ("seq_len", "batch_size", "grad_accum", "logging_steps", "save_steps")
"""The flags of :func:`add_training_flags` that count something and must be >= 1."""


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """Add the flags shared by the training scripts to ``parser``: the model (``--model``), the data and
    its pieces (``--data``, ``--text-column``, ``--seq-len``), the batch (``--batch-size``, ``--grad-accum``),
    ``--bf16``, ``--gradient-checkpointing``, ``--logging-steps``, ``--save-steps`` and ``--seed``. What
    differs between scripts (``--output-dir``, ``--max-steps``, ``--lr``, ``--resume``) the script adds.
    :func:`check_training_flags` validates them, :func:`training_arguments` turns them into the Trainer's
    arguments."""
    parser.add_argument("--model", required=True, help="NSA-Llama checkpoint directory (see `nsa-hf convert`)")
    parser.add_argument("--data", nargs="+", required=True,
                        help="local .txt/.py/.json/.jsonl/.parquet files, or a Hub dataset name")
    parser.add_argument("--text-column", default="text",
                        help="column holding the text in .json/.jsonl/.parquet/.csv data (default text)")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per document piece (default 4096)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="document pieces per device batch (packed into one row)")
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="micro-batches accumulated per optimizer step (default 1)")
    parser.add_argument("--bf16", action="store_true",
                        help="load the model in bfloat16 and train in bf16 mixed precision")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass (less memory, slower)")
    parser.add_argument("--logging-steps", type=int, default=10,
                        help="log the loss every this many steps (default 10)")
    parser.add_argument("--save-steps", type=int, default=500,
                        help="save a checkpoint every this many steps (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def check_training_flags(args: argparse.Namespace, counts: Sequence[str] = ()) -> None:
    """Raise ``ValueError`` naming the flag (``"--seq-len 0: must be >= 1"``, ``"--data: data file ...
    not found"``) when a count flag of :func:`add_training_flags` or one of ``counts`` (further attribute
    names, e.g. ``"max_steps"``) is below 1, or when ``--data`` names a missing file (:func:`check_data`).
    Nothing is loaded."""
    for name in (*COUNT_FLAGS, *counts):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    try:
        check_data(args.data)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"--data: {err}") from None


def training_arguments(args: argparse.Namespace, output_dir: str, max_steps: int, lr: float) -> TrainingArguments:
    """The ``TrainingArguments`` of the training scripts from the flags of :func:`add_training_flags`, for
    ``max_steps`` optimizer steps at learning rate ``lr`` (cosine schedule, warm-up over a tenth of the steps,
    at most 100), writing checkpoints to ``output_dir``. The loss is the mean over all tokens of the global
    batch with any number of processes; activation checkpointing goes under the installed transformers' name
    (:func:`checkpointing_argument`); on a machine without CUDA the Trainer runs on the CPU."""
    import torch

    return TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        learning_rate=lr,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        bf16=args.bf16,
        **checkpointing_argument(args.gradient_checkpointing),
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        lr_scheduler_type="cosine",
        warmup_steps=min(100, max_steps // 10),
        include_num_input_tokens_seen=True,
        average_tokens_across_devices=True,  # loss = mean over all tokens of the global batch, any process count
        report_to=[],
        seed=args.seed,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
    )


def enable_activation_checkpointing(model, checkpoint_kwargs: dict | None = None) -> None:
    """Turn on activation checkpointing of ``model`` under the installed transformers' name
    (``activation_checkpointing_enable`` since 5.23, which warns on the old ``gradient_checkpointing_enable``).
    ``checkpoint_kwargs`` go to ``torch.utils.checkpoint.checkpoint`` (default ``use_reentrant=False``)."""
    kwargs = {"use_reentrant": False} if checkpoint_kwargs is None else dict(checkpoint_kwargs)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)



def fsdp_units(model) -> int:
    """Modules of ``model`` sharded by FSDP2 (``fully_shard`` turns them into ``FSDPModule`` instances);
    0 without FSDP."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return 0
    return sum(isinstance(m, FSDPModule) for m in model.modules()) if model is not None else 0


def share_tied_entries(model, state_dict: dict) -> None:
    """Point the names of one shared parameter (tied embeddings) at one tensor of ``state_dict``. A gathered
    full state dict holds a separate copy per name; ``save_pretrained`` recognises tied weights by shared
    storage, so without this it would write the tied copy too (one more embedding matrix in the file)."""
    first_name_of = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in state_dict:
            first = first_name_of.setdefault(id(param), name)
            if first != name:
                state_dict[name] = state_dict[first]


def save_trained_model(model, output_dir, tokenizer=None) -> None:
    """``save_pretrained`` of a trained model, written once: in one process, under DDP (every process
    holds all weights; rank 0 writes) and under FSDP2 with any number of processes, one included (the
    full state dict is gathered to CPU on rank 0 and written as an ordinary checkpoint). Under
    ``torch.distributed`` every process must call it (the gathering is a collective; all wait for rank 0)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    state_dict = None
    if fsdp_units(model) > 0:  # sharded parameters are DTensors: safetensors cannot write them as they are
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        share_tied_entries(model, state_dict)
    if rank == 0:
        model.save_pretrained(output_dir, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
    if distributed:
        dist.barrier()
