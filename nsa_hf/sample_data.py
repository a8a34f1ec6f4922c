"""Sample data for demos and checks: real text that is on every machine with Python (the standard
library's sources), a small byte-level BPE tokenizer trained on it, and fixed-length token blocks.

Used by ``examples/demo.py``, the FSDP recipe (``examples/fsdp_check.sh``) and the research harnesses.
Nothing here touches the network.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from nsa_hf.convert import stdlib_python_files

EOS = "<|endoftext|>"


def stdlib_documents(
    min_chars: int = 8000, max_chars: int = 3_000_000, held_out_every: int = 10
) -> tuple[list[str], list[str]]:
    """Long ``.py`` files of the Python standard library as documents, split into ``(train, held_out)``.

    A file is held out when the CRC32 of its name modulo ``held_out_every`` is 0, so the split is the
    same on every run and machine with the same Python. Files are taken in a fixed order until
    ``max_chars`` characters are collected (held-out ones included); past that budget only a first
    held-out file is still looked for, so neither split is empty.
    """
    if held_out_every < 2:
        raise ValueError(f"held_out_every={held_out_every}: must be >= 2 (one file in N is held out)")
    train, held_out, total = [], [], 0
    for path in stdlib_python_files(min_chars):
        is_held_out = zlib.crc32(path.name.encode()) % held_out_every == 0
        if total >= max_chars and not is_held_out:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        (held_out if is_held_out else train).append(text)
        total += len(text)
        if total >= max_chars and held_out:
            break
    if not train or not held_out:
        raise RuntimeError(
            f"found {len(train)} training and {len(held_out)} held-out stdlib files of >= {min_chars} characters; "
            "lower min_chars or raise max_chars"
        )
    return train, held_out


def train_tokenizer(texts: Sequence[str], vocab_size: int = 4096):
    """A byte-level BPE tokenizer (``PreTrainedTokenizerFast``, EOS ``<|endoftext|>``) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size}: must be >= 300 (256 byte symbols plus merges)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def token_blocks(tokenizer, texts: Sequence[str], seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """``(N, seq_len)`` token ids: each document (EOS appended) cut into whole blocks of ``seq_len``
    tokens, the shorter tail dropped, so no block spans two documents."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: must be >= 2")
    blocks = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids = ids + [tokenizer.eos_token_id]
        blocks += [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
        if max_blocks is not None and len(blocks) >= max_blocks:
            blocks = blocks[:max_blocks]
            break
    if not blocks:
        raise ValueError(f"no document has {seq_len} tokens: use a shorter seq_len or longer documents")
    return torch.tensor(blocks, dtype=torch.long)
