"""Conversion of a dense Llama checkpoint into NSA-Llama.

Every Llama weight is copied unchanged (and checked bit for bit); only the modules NSA adds to each
attention layer (``nsa_cmp_k``, ``nsa_cmp_v``, ``nsa_gate``) are new, initialised by the model so that
the converted model starts as close to the dense one as NSA allows. The conversion then measures how
far the untrained NSA model is from the original on sample text, at a length where the sparsity
matters, and saves the checkpoint with a model card holding that report.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import sysconfig
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nsa_kernels.params import NSAParams, num_cmp_blocks

NSA_SETTINGS = ("cmp_block", "cmp_stride", "slc_block", "slc_count", "init_blocks", "local_blocks", "window")
"""NSA sizes accepted by :func:`convert_llama_to_nsa`; each maps to the config field ``nsa_<name>``."""

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
"""Files copied verbatim from a local source directory when present."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SKIP_STDLIB_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo"}


@dataclass
class ConversionReport:
    """What :func:`convert_llama_to_nsa` did and measured. Losses are mean next-token cross-entropy
    (nats) on the sample text; logit gaps compare the converted (untrained NSA) model's logits with the
    original's at every position."""

    source: str
    nsa_settings: dict
    dtype: str
    weights_copied: int = 0
    parameters_copied: int = 0
    new_weights: list = field(default_factory=list)
    new_parameters: int = 0
    gate_init_bias: list | None = None
    eval_len: int | None = None
    eval_sequences: int = 0
    eval_tokens: int = 0
    text_source: str | None = None
    token_source: str | None = None
    sparse_from_position: int | None = None
    fully_sparse_from_position: int | None = None
    sparse_at_eval_len: bool | None = None
    keys_per_query: dict | None = None
    loss_original: float | None = None
    loss_converted: float | None = None
    logit_max_abs_gap: float | None = None
    logit_mean_abs_gap: float | None = None
    top1_agreement: float | None = None
    seconds: float = 0.0
    notes: list = field(default_factory=list)

    @property
    def loss_gap(self) -> float | None:
        """``loss_converted - loss_original`` (positive: the untrained NSA model is worse)."""
        if self.loss_original is None or self.loss_converted is None:
            return None
        return self.loss_converted - self.loss_original

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (``loss_gap`` included)."""
        d = asdict(self)
        d["loss_gap"] = self.loss_gap
        return d

    def format(self) -> str:
        """A human-readable multi-line summary (what ``nsa-hf convert`` prints)."""
        s = self.nsa_settings
        lines = [
            f"source: {self.source} ({self.dtype})",
            "NSA settings: " + ", ".join(f"{k}={s[k]}" for k in NSA_SETTINGS if k in s),
            f"weights copied exactly: {self.weights_copied} tensors ({self.parameters_copied:,} values)",
            f"new NSA weights: {len(self.new_weights)} tensors ({self.new_parameters:,} parameters)",
        ]
        if self.eval_len is None:
            lines.append("evaluation: skipped")
        else:
            lines.append(
                f"evaluation: {self.eval_sequences} sequence(s) x {self.eval_len} tokens from {self.text_source} "
                f"({self.token_source})"
            )
            if self.eval_len > self.fully_sparse_from_position:
                lines.append(
                    f"  queries attend sparsely from position {self.sparse_from_position} (window or selection) "
                    f"and in both branches from position {self.fully_sparse_from_position}"
                )
            elif self.sparse_at_eval_len:
                lines.append(
                    f"  queries attend sparsely from position {self.sparse_from_position}, in one branch only: both "
                    f"the window and the selection are sparse only from position {self.fully_sparse_from_position}"
                )
            else:
                lines.append(
                    f"  WARNING: at {self.eval_len} tokens NSA is still dense-equivalent (sparse from position "
                    f"{self.sparse_from_position}); the gap below does not measure the sparsity"
                )
            if self.keys_per_query:
                k = self.keys_per_query
                lines.append(
                    f"  keys per query (mean): cmp {k['cmp']:.1f} + slc {k['slc']:.1f} + win {k['win']:.1f} "
                    f"= {k['nsa']:.1f} vs dense {k['dense']:.1f}"
                )
            lines.append(
                f"  loss original {self.loss_original:.4f}, converted (untrained NSA) {self.loss_converted:.4f}, "
                f"gap {self.loss_gap:+.4f}"
            )
            lines.append(
                f"  logits |converted - original|: max {self.logit_max_abs_gap:.4f}, mean {self.logit_mean_abs_gap:.4f}; "
                f"top-1 agreement {100 * self.top1_agreement:.1f}%"
            )
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"time: {self.seconds:.1f} s")
        return "\n".join(lines)


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
# Loading


def _nsa_classes():
    from .configuration_nsa_llama import NSALlamaConfig
    from .modeling_nsa_llama import NSALlamaForCausalLM

    return NSALlamaConfig, NSALlamaForCausalLM


def _resolve_dtype(dtype):
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported: use one of {sorted(_DTYPES)} or 'auto' (the source's)")
    return _DTYPES[dtype]


def _nsa_config_kwargs(settings: dict, cmp_mlp_hidden, gate_init_bias) -> dict:
    kwargs = {f"nsa_{k}": v for k, v in settings.items() if v is not None}
    if cmp_mlp_hidden is not None:
        kwargs["nsa_cmp_mlp_hidden"] = cmp_mlp_hidden
    if gate_init_bias is not None:
        kwargs["nsa_gate_init_bias"] = list(gate_init_bias)
    return kwargs


def _check_llama(config, source: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type == "nsa_llama":
        raise ValueError(f"{source} is already an NSA-Llama checkpoint (model_type 'nsa_llama'): nothing to convert")
    if model_type != "llama":
        raise ValueError(
            f"{source} has model_type {model_type!r}; nsa-hf converts Llama checkpoints (model_type 'llama', "
            "LlamaForCausalLM) only"
        )


def build_nsa_config(llama_config, **nsa_kwargs):
    """An ``NSALlamaConfig`` with every field of ``llama_config`` plus the NSA fields
    (``nsa_cmp_block=...``, ...). The NSA config validates them (``ValueError`` when invalid)."""
    NSALlamaConfig, _ = _nsa_classes()
    d = llama_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path"):
        d.pop(key, None)
    d.update(nsa_kwargs)
    d["architectures"] = ["NSALlamaForCausalLM"]
    return NSALlamaConfig(**d)


@contextlib.contextmanager
def _quiet_transformers(progress: bool):
    """Silence the expected 'newly initialized weights' warning (the report lists those weights), and
    transformers' own progress bars when ``progress`` is off."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _load_tokenizer(src):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, TypeError, KeyError):
        return None


# ---------------------------------------------------------------------------------------------
# Weight check


def _layer_groups(keys: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Keys grouped as ('layer i', ...) in order, with the rest (embeddings, norm, head) around them."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        parts = key.split(".")
        if "layers" in parts and parts.index("layers") + 1 < len(parts):
            name = f"layer {parts[parts.index('layers') + 1]}"
        else:
            name = "embeddings/norm/head"
        groups.setdefault(name, []).append(key)
    return list(groups.items())


def verify_copied_weights(original, converted, progress: bool = True) -> tuple[int, int, list[str], int]:
    """Check that every tensor of ``original``'s state dict is in ``converted`` with the same name,
    shape, dtype and values, and that every other tensor of ``converted`` is an NSA module's.

    Returns ``(tensors copied, values copied, names of the new tensors, new parameter count)``;
    raises ``RuntimeError`` naming the first difference."""
    from tqdm.auto import tqdm

    from .training import is_nsa_parameter

    src = original.state_dict()
    dst = converted.state_dict()
    n_tensors = n_values = 0
    for _, keys in tqdm(_layer_groups(list(src)), desc="verifying copied weights", unit="layer", disable=not progress):
        for key in keys:
            a = src[key]
            if key not in dst:
                raise RuntimeError(f"weight {key!r} of the Llama model is missing from the NSA model")
            b = dst[key]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise RuntimeError(
                    f"weight {key!r}: Llama {tuple(a.shape)} {a.dtype} vs NSA {tuple(b.shape)} {b.dtype}"
                )
            if not torch.equal(a.cpu(), b.cpu()):
                raise RuntimeError(f"weight {key!r} was not copied exactly")
            n_tensors += 1
            n_values += a.numel()
    new = sorted(set(dst) - set(src))
    foreign = [k for k in new if not is_nsa_parameter(k)]
    if foreign:
        raise RuntimeError(f"the NSA model has weights that are neither Llama's nor NSA modules': {foreign[:5]}")
    return n_tensors, n_values, new, sum(dst[k].numel() for k in new)


# ---------------------------------------------------------------------------------------------
# Evaluation


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


def _eval_sequences(sample_text, tokenizer, vocab_size: int, eval_len: int, count: int):
    """Token sequences of ``eval_len`` tokens (fewer when the text is too short) and a description."""
    if sample_text is None:
        # Byte-level BPE on code gives about 3-4 characters per token; ask for generous files.
        docs, desc = _default_documents(min_chars=max(eval_len * 6, 16_000), count=count)
        seqs = [_encode(d, tokenizer, vocab_size)[:eval_len] for d in docs]
        return [s for s in seqs if len(s) >= 2], desc
    if isinstance(sample_text, os.PathLike):
        text, desc = _read(Path(sample_text)), os.fspath(sample_text)
    elif isinstance(sample_text, str):
        text, desc = sample_text, f"given text ({len(sample_text):,} characters)"
    else:
        text, desc = "\n\n".join(sample_text), f"{len(sample_text)} given document(s)"
    ids = _encode(text, tokenizer, vocab_size)
    if len(ids) < 2:
        raise ValueError(f"sample_text gives {len(ids)} token(s); it needs at least 2 to measure a loss")
    seqs = [ids[i : i + eval_len] for i in range(0, len(ids), eval_len)][:count]
    return [s for s in seqs if len(s) >= 2], desc


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


# ---------------------------------------------------------------------------------------------
# Saving


def _source_card_data(src) -> dict:
    """License and base model read from the source checkpoint's model card, when it is local."""
    if not isinstance(src, (str, os.PathLike)):
        return {}
    card = Path(src) / "README.md"
    if not card.is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        data = ModelCard.load(card).data
    except Exception:  # a malformed card must not stop the conversion
        return {}
    return {"license": getattr(data, "license", None)}


def _save(model, tokenizer, src, dst: Path, card, remote_code: bool) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    if remote_code:
        from .hub import bundle_remote_code

        bundle_remote_code(dst)
    copied = False
    if isinstance(src, (str, os.PathLike)) and Path(src).is_dir():
        for name in TOKENIZER_FILES:
            if (Path(src) / name).is_file():
                shutil.copyfile(Path(src) / name, dst / name)
                copied = True
    if not copied and tokenizer is not None:
        tokenizer.save_pretrained(dst)
    card.save(dst / "README.md")


# ---------------------------------------------------------------------------------------------
# Entry point


def convert_llama_to_nsa(
    src,
    dst: str | os.PathLike | None = None,
    *,
    cmp_block: int | None = None,
    cmp_stride: int | None = None,
    slc_block: int | None = None,
    slc_count: int | None = None,
    init_blocks: int | None = None,
    local_blocks: int | None = None,
    window: int | None = None,
    cmp_mlp_hidden: int | None = None,
    gate_init_bias: Sequence[float] | None = None,
    dtype=None,
    tokenizer=None,
    sample_text=None,
    eval_len: int | None = None,
    eval_sequences: int = 2,
    evaluate: bool = True,
    device=None,
    base_model: str | None = None,
    license: str | None = None,
    remote_code: bool = True,
    progress: bool = True,
):
    """Convert a dense Llama model into NSA-Llama.

    Args:
        src: a local checkpoint directory, a Hub model id, or a ``LlamaForCausalLM`` instance.
        dst: directory to save the converted checkpoint to (safetensors, config, generation config,
            tokenizer files, modeling code, ``conversion_report.json`` and a model card ``README.md``
            with the report); ``None`` saves nothing.
        cmp_block, cmp_stride, slc_block, slc_count, init_blocks, local_blocks, window: NSA sizes in
            tokens (see :class:`nsa_kernels.NSAParams`); ``None`` keeps ``NSALlamaConfig``'s default.
        cmp_mlp_hidden, gate_init_bias: passed to the config as ``nsa_cmp_mlp_hidden`` /
            ``nsa_gate_init_bias`` when given.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, a ``torch.dtype``, or ``None``/``"auto"``
            for the source's.
        tokenizer: tokenizer for the sample text (default: the source's, when it has one; else UTF-8
            bytes are used as token ids, which the report says).
        sample_text: ``None`` (long Python stdlib sources found on this machine), a string of text, a
            list of documents, or a ``pathlib.Path`` to a text file.
        eval_len: tokens per evaluation sequence; default :func:`default_eval_len` (twice the
            position from which the sparsity bites), capped by ``max_position_embeddings``.
        eval_sequences: how many sequences to evaluate.
        evaluate: ``False`` skips the comparison (the report then has no losses).
        device: where to evaluate (default: CUDA when available for a checkpoint loaded here, the
            instance's device for an instance).
        base_model: Hub id written to the card's ``base_model`` metadata (default: ``src`` when it is
            a Hub id).
        license: license for the card metadata (default: the source card's, when local).
        remote_code: also write self-contained modeling code (with the pure-PyTorch reference
            bundled, see :mod:`nsa_hf.hub`), so that ``dst`` loads with ``trust_remote_code=True`` where
            nsa-hf is not installed.
        progress: show tqdm progress bars.

    Returns:
        ``(model, report)``: the ``NSALlamaForCausalLM`` and a :class:`ConversionReport`.

    Raises:
        ValueError: invalid NSA settings (before any weight is loaded), a source that is not a Llama
            model, or a bad ``dtype``.
    """
    from transformers import LlamaForCausalLM, PreTrainedModel

    start = time.perf_counter()
    NSALlamaConfig, NSALlamaForCausalLM = _nsa_classes()
    settings = dict(cmp_block=cmp_block, cmp_stride=cmp_stride, slc_block=slc_block, slc_count=slc_count,
                    init_blocks=init_blocks, local_blocks=local_blocks, window=window)
    nsa_kwargs = _nsa_config_kwargs(settings, cmp_mlp_hidden, gate_init_bias)
    NSALlamaConfig(**nsa_kwargs)  # validates the NSA settings before anything heavy happens
    torch_dtype = _resolve_dtype(dtype)
    if eval_len is not None and eval_len < 2:
        raise ValueError(f"eval_len={eval_len}: must be >= 2 tokens")
    if eval_sequences < 1:
        raise ValueError(f"eval_sequences={eval_sequences}: must be >= 1")

    # Source config first: a non-Llama source fails before its weights are read.
    if isinstance(src, PreTrainedModel):
        source = getattr(src.config, "_name_or_path", "") or type(src).__name__
        _check_llama(src.config, source)
        if not isinstance(src, LlamaForCausalLM):
            raise ValueError(f"src is a {type(src).__name__}; pass a LlamaForCausalLM (a model with an LM head)")
        llama_config = src.config
    elif isinstance(src, (str, os.PathLike)):
        from transformers import AutoConfig

        source = os.fspath(src)
        llama_config = AutoConfig.from_pretrained(source)
        _check_llama(llama_config, source)
    else:
        raise TypeError(f"src must be a directory, a Hub id or a LlamaForCausalLM; got {type(src).__name__}")
    config = build_nsa_config(llama_config, **nsa_kwargs)
    params = config.nsa_params()

    with _quiet_transformers(progress):
        if isinstance(src, PreTrainedModel):
            original = src
            target_dtype = torch_dtype if torch_dtype not in (None, "auto") else src.dtype
            if original.dtype != target_dtype:  # a converted copy: the caller's model stays as it is
                original = copy.deepcopy(original).to(target_dtype)
            model = NSALlamaForCausalLM(config).to(device=next(src.parameters()).device, dtype=target_dtype)
            result = model.load_state_dict(original.state_dict(), strict=False)
            if result.unexpected_keys:
                raise RuntimeError(f"Llama weights the NSA model has no place for: {result.unexpected_keys[:5]}")
            if tokenizer is None and source and os.path.isdir(source):
                tokenizer = _load_tokenizer(source)
            device = torch.device(device) if device is not None else next(src.parameters()).device
        else:
            load_dtype = "auto" if torch_dtype is None else torch_dtype
            original = LlamaForCausalLM.from_pretrained(source, dtype=load_dtype)
            model = NSALlamaForCausalLM.from_pretrained(source, config=config, dtype=original.dtype)
            if tokenizer is None:
                tokenizer = _load_tokenizer(source)
            device = torch.device(device) if device is not None else torch.device(
                "cuda" if torch.cuda.is_available() else "cpu")
    original.eval()
    model.eval()
    if getattr(original, "generation_config", None) is not None:
        model.generation_config = type(original.generation_config).from_dict(original.generation_config.to_dict())

    report = ConversionReport(
        source=source,
        nsa_settings={k: getattr(params, k) for k in NSA_SETTINGS},
        dtype=str(model.dtype).replace("torch.", ""),
        gate_init_bias=list(getattr(config, "nsa_gate_init_bias", []) or []) or None,
    )
    report.nsa_settings["cmp_mlp_hidden"] = getattr(config, "nsa_cmp_mlp_hidden", None)
    (report.weights_copied, report.parameters_copied, report.new_weights,
     report.new_parameters) = verify_copied_weights(original, model, progress=progress)

    if evaluate:
        max_pos = getattr(config, "max_position_embeddings", None)
        n = eval_len or default_eval_len(params, max_pos)
        seqs, report.text_source = _eval_sequences(sample_text, tokenizer, config.vocab_size, n, eval_sequences)
        report.token_source = (
            f"tokenizer {type(tokenizer).__name__}" if tokenizer is not None
            else "UTF-8 bytes as token ids (no tokenizer found)"
        )
        report.eval_len = max(len(s) for s in seqs)
        report.eval_sequences = len(seqs)
        report.eval_tokens = sum(len(s) for s in seqs)
        report.sparse_from_position = sparse_from_position(params)
        report.fully_sparse_from_position = fully_sparse_from_position(params)
        report.sparse_at_eval_len = report.eval_len > report.sparse_from_position
        report.keys_per_query = keys_per_query(params, report.eval_len)
        if max_pos and eval_len is None and n < 2 * report.fully_sparse_from_position:
            report.notes.append(f"eval length capped by max_position_embeddings={max_pos}")
        if report.eval_len < n:
            report.notes.append(f"the sample text gave only {report.eval_len} of the {n} tokens asked for")
        original.to(device)
        model.to(device)
        for key, value in compare_models(original, model, seqs, device, progress=progress).items():
            setattr(report, key, value)
        if not all(math.isfinite(v) for v in (report.loss_original, report.loss_converted)):
            report.notes.append("a loss is not finite: check the dtype (float16 overflows easily)")

    report.seconds = time.perf_counter() - start
    if dst is not None:
        from .model_card import render_model_card

        hub_id = source if isinstance(src, (str, os.PathLike)) and not os.path.exists(source) else None
        meta = _source_card_data(src)
        card = render_model_card(
            config, report=report, base_model=base_model or hub_id,
            license=license or meta.get("license"),
        )
        with _quiet_transformers(progress):
            _save(model, tokenizer, src, Path(dst), card, remote_code)
        (Path(dst) / "conversion_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    return model, report
