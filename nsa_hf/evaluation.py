"""How far a converted (untrained NSA) model is from its dense original: the sample text (the
Python standard library's sources by default), the sparsity arithmetic (from which position NSA stops
being dense-equivalent, keys attended per query) and the comparison of the two models' logits."""
from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from nsa_kernels.params import NSAParams, num_cmp_blocks

_SKIP_STDLIB_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo"}


# ---------------------------------------------------------------------------------------------
# Sample text


def stdlib_python_files(min_chars: int = 0) -> Iterator[Path]:
    """The Python standard library's ``.py`` sources on this machine (test suites and site-packages
    excluded), in a fixed order, that have at least ``min_chars`` bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_STDLIB_DIRS)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.endswith(".py") and path.stat().st_size >= min_chars:
                yield path


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _default_documents(min_chars: int, count: int) -> tuple[list[str], str]:
    docs, names = [], []
    for path in stdlib_python_files(min_chars):
        docs.append(_read(path))
        names.append(path.name)
        if len(docs) == count:
            break
    if not docs:
        raise RuntimeError(
            f"no Python standard library source of >= {min_chars} characters found under "
            f"{sysconfig.get_paths()['stdlib']}; pass sample_text="
        )
    return docs, f"Python stdlib sources ({', '.join(names)})"


def _encode(text: str, tokenizer, vocab_size: int) -> list[int]:
    if tokenizer is not None:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return [b % vocab_size for b in text.encode("utf-8")]


def _looks_like_a_path(text: str) -> bool:
    """A string that names a file rather than holding text: an existing file, or one word with a
    directory separator or a file suffix (``corpus.txt``)."""
    if "\n" in text or len(text) > 4096:
        return False
    if os.path.isfile(text):
        return True
    return not any(c.isspace() for c in text) and ("/" in text or os.sep in text or bool(Path(text).suffix))


def sample_sequences(sample_text, tokenizer, vocab_size: int, eval_len: int, count: int) -> tuple[list[list[int]], str]:
    """Up to ``count`` token sequences of ``eval_len`` tokens (fewer when the text is too short) and a
    description of where they came from.

    ``sample_text`` is ``None`` (long Python stdlib sources found on this machine), a path
    (``os.PathLike``, or a one-line string naming an existing file), a string of text, or a list of
    documents. Without a ``tokenizer`` the UTF-8 bytes (mod ``vocab_size``) are the token ids."""
    if sample_text is None:
        # Byte-level BPE on code gives about 3-4 characters per token; ask for generous files.
        docs, desc = _default_documents(min_chars=max(eval_len * 6, 16_000), count=count)
        seqs = [_encode(d, tokenizer, vocab_size)[:eval_len] for d in docs]
        return [s for s in seqs if len(s) >= 2], desc
    if isinstance(sample_text, os.PathLike) or (isinstance(sample_text, str) and _looks_like_a_path(sample_text)):
        path = Path(sample_text)
        if not path.is_file():
            raise ValueError(
                f"sample_text={os.fspath(sample_text)!r} names no existing file: pass the path of a text file, "
                "or the text itself"
            )
        text, desc = _read(path), os.fspath(sample_text)
    elif isinstance(sample_text, str):
        text, desc = sample_text, f"given text ({len(sample_text):,} characters)"
    else:
        text, desc = "\n\n".join(sample_text), f"{len(sample_text)} given document(s)"
    ids = _encode(text, tokenizer, vocab_size)
    if len(ids) < 2:
        raise ValueError(f"sample_text gives {len(ids)} token(s); it needs at least 2 to measure a loss")
    seqs = [ids[i : i + eval_len] for i in range(0, len(ids), eval_len)][:count]
    return [s for s in seqs if len(s) >= 2], desc


# ---------------------------------------------------------------------------------------------
# Lengths and attended keys


def sparse_from_position(params: NSAParams) -> int:
    """First query position (0-based) at which NSA differs from dense attention: from there on the
    window or the selection branch no longer covers every earlier key. Before it both do, and with
    the gates' usual start (cmp small, slc and win summing to one) NSA is nearly dense."""
    return min(params.window, params.slc_count * params.slc_block)


def fully_sparse_from_position(params: NSAParams) -> int:
    """First query position at which *both* the window and the selection branch attend a strict
    subset of the earlier keys."""
    return max(params.window, params.slc_count * params.slc_block)


def default_eval_len(params: NSAParams, max_positions: int | None = None) -> int:
    """Evaluation length at which the sparsity matters: twice :func:`fully_sparse_from_position`, so
    the later half of the queries attend sparsely in every branch; capped by ``max_positions``."""
    n = 2 * fully_sparse_from_position(params)
    return min(n, max_positions) if max_positions else n


def keys_per_query(params: NSAParams, seq_len: int) -> dict:
    """Mean number of keys each branch attends per query over positions ``0..seq_len-1`` of one
    causal sequence, next to dense attention's. ``cmp`` counts compressed tokens (complete blocks),
    ``slc`` the selected blocks' keys up to the query, ``win`` the window's keys; ``nsa`` is their sum
    (the branches overlap, so it counts some keys twice, as the kernels compute them)."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: must be >= 1")
    cmp = slc = win = dense = 0
    lb = params.slc_block
    for t in range(seq_len):
        cmp += num_cmp_blocks(t + 1, params.cmp_block, params.cmp_stride)
        blocks = min(params.slc_count, t // lb + 1)  # the query's own block is always among them
        slc += blocks * lb - (lb - 1 - t % lb)
        win += min(t + 1, params.window)
        dense += t + 1
    out = {"cmp": cmp / seq_len, "slc": slc / seq_len, "win": win / seq_len, "dense": dense / seq_len}
    out["nsa"] = out["cmp"] + out["slc"] + out["win"]
    return out


# ---------------------------------------------------------------------------------------------
# Comparison


@torch.no_grad()
def compare_models(original, converted, sequences: Sequence[Sequence[int]], device, progress: bool = True) -> dict:
    """Next-token loss of both models and the gap between their logits over ``sequences``."""
    from tqdm.auto import tqdm

    loss = {"original": 0.0, "converted": 0.0}
    n_pred = n_logits = agree = 0
    max_gap = sum_gap = 0.0
    for seq in tqdm(sequences, desc="comparing original vs NSA", unit="seq", disable=not progress):
        ids = torch.tensor([list(seq)], device=device)
        logits = {}
        for name, model in (("original", original), ("converted", converted)):
            out = model(input_ids=ids, use_cache=False)
            logits[name] = out.logits[0].float()
            loss[name] += torch.nn.functional.cross_entropy(logits[name][:-1], ids[0, 1:], reduction="sum").item()
        gap = (logits["converted"] - logits["original"]).abs()
        max_gap = max(max_gap, gap.max().item())
        sum_gap += gap.sum().item()
        n_logits += gap.numel()
        agree += (logits["converted"].argmax(-1) == logits["original"].argmax(-1)).sum().item()
        n_pred += ids.shape[1] - 1
    return {
        "loss_original": loss["original"] / n_pred,
        "loss_converted": loss["converted"] / n_pred,
        "logit_max_abs_gap": max_gap,
        "logit_mean_abs_gap": sum_gap / n_logits,
        "top1_agreement": agree / sum(len(s) for s in sequences),
    }


__all__ = [
    "compare_models",
    "default_eval_len",
    "sample_sequences",
    "fully_sparse_from_position",
    "keys_per_query",
    "sparse_from_position",
    "stdlib_python_files",
]
