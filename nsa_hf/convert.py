"""Conversion of a dense checkpoint (Llama, Mistral, Qwen2, Qwen3: :data:`nsa_hf.families.NSA_MODEL_TYPES`)
into its NSA counterpart.

Every dense weight is copied unchanged (and checked bit for bit); only the modules NSA adds to each
attention layer (``nsa_cmp_k``, ``nsa_cmp_v``, ``nsa_gate``) are new, initialised by the model so that
the converted model starts as close to the dense one as NSA allows. The conversion then measures how
far the untrained NSA model is from the original (:mod:`.evaluation`), and saves the checkpoint with
a model card holding that report (:class:`~.conversion_report.ConversionReport`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from nsa_kernels import NSAParams

from .configuration_nsa import NSA_FIELDS
from .conversion_report import ConversionReport
from .evaluation import (
    compare_models,
    default_eval_len,
    fully_sparse_from_position,
    keys_per_query,
    sample_sequences,
    sparse_from_position,
    stdlib_python_files,
)
from .families import NSA_MODEL_TYPES, supported_model_types

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
"""Files copied verbatim from a local source directory when present."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


# ---------------------------------------------------------------------------------------------
# Families and configs


def _auto_classes():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING


def nsa_classes(model_type: str) -> tuple[type, type]:
    """``(NSA config class, NSA causal-LM class)`` for a dense ``model_type`` nsa-hf converts (``ValueError``
    naming the supported types otherwise)."""
    if model_type not in NSA_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported: nsa-hf converts {supported_model_types()}")
    configs, lms = _auto_classes()
    config_class = configs[NSA_MODEL_TYPES[model_type]]
    return config_class, lms[config_class]


def _check_source_type(config, source: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type in NSA_MODEL_TYPES.values():
        raise ValueError(
            f"{source} is already an NSA checkpoint (model_type {model_type!r}): nothing to convert; pass the dense "
            "checkpoint it came from"
        )
    if model_type not in NSA_MODEL_TYPES:
        raise ValueError(
            f"{source} has model_type {model_type!r}; nsa-hf converts the model types {supported_model_types()} only"
        )


def build_nsa_config(dense_config, params: NSAParams | None = None, **nsa_kwargs):
    """The NSA config of ``dense_config``'s family with every field of ``dense_config``, the sizes of
    ``params`` (default: :class:`NSAParams`'s) and other ``nsa_*`` fields (``nsa_cmp_mlp_hidden=...``,
    ``nsa_gate_init_bias=...``). The NSA config validates them (``ValueError`` when invalid)."""
    config_class, lm_class = nsa_classes(getattr(dense_config, "model_type", None))
    d = dense_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path"):
        d.pop(key, None)
    if params is not None:
        d.update({f"nsa_{name}": getattr(params, name) for name in NSA_FIELDS})
    d.update(nsa_kwargs)
    d["architectures"] = [lm_class.__name__]
    return config_class(**d)


def _resolve_dtype(dtype):
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported: use one of {sorted(_DTYPES)} or 'auto' (the source's)")
    return _DTYPES[dtype]


def _resolve_device(device):
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device: use e.g. 'cpu', 'cuda' or 'cuda:1'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} but this PyTorch has no usable CUDA (torch.cuda.is_available() is False): "
            "use device='cpu' (--device cpu) or install a CUDA build of PyTorch"
        )
    return resolved


def _sliding_window_note(config, nsa_window: int) -> str | None:
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types and "sliding_attention" not in layer_types:
        return None
    return (
        f"the source attends through a sliding window of {window} tokens; the converted model keeps it for "
        f'attn_implementation="sdpa"/"eager", while "nsa" replaces it with NSA\'s own window ({nsa_window} '
        "tokens) plus the selected and compressed blocks"
    )


# ---------------------------------------------------------------------------------------------
# Sources


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def _source_config(source: str):
    """The source's config and whether it is to be read from the local Hub cache only. ``ValueError``
    with one line for a missing directory, a malformed id and an unreachable or offline Hub."""
    from huggingface_hub import constants
    from transformers import AutoConfig

    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"src={source!r} has no config.json: pass a transformers checkpoint directory")
        return AutoConfig.from_pretrained(path), False
    if source.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(source):
        raise ValueError(
            f"src={source!r} is neither an existing directory nor a Hub model id: check the path, or pass an id "
            "like 'owner/name'"
        )
    offline = constants.HF_HUB_OFFLINE or not _hub_reachable()
    try:
        return AutoConfig.from_pretrained(source, local_files_only=offline), offline
    except OSError as err:
        if offline:
            if constants.HF_HUB_OFFLINE:
                why, fix = "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE"
            else:
                why, fix = f"{constants.ENDPOINT} cannot be reached", "connect to the network"
            raise ValueError(
                f"src={source!r} is not a local directory, {why} and the model is not in the local Hub cache: "
                f"{fix}, or pass a local checkpoint directory"
            ) from None
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"src={source!r}: could not load its config from the Hub: {first_line}") from None


def _check_destination(dst: Path, src, overwrite: bool) -> None:
    if isinstance(src, (str, os.PathLike)) and Path(src).exists():
        s, d = Path(src).resolve(), dst.resolve()
        if d == s or s in d.parents or d in s.parents:
            raise ValueError(f"dst={os.fspath(dst)!r} overlaps the source {os.fspath(src)!r}: choose another directory")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"dst={os.fspath(dst)!r} is a file: choose a directory")
    if dst.is_dir() and any(dst.iterdir()) and overwrite:
        d, cwd = dst.resolve(), Path.cwd().resolve()
        if d == cwd or d in cwd.parents or d == Path.home().resolve():
            raise ValueError(
                f"dst={os.fspath(dst)!r} is the working directory, one above it or the home directory: refusing to "
                "clear it with overwrite; choose a directory of its own"
            )
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ValueError(
            f"dst={os.fspath(dst)!r} already exists and is not empty: pass overwrite=True (--overwrite) to replace "
            "its contents, or choose another directory"
        )


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


def _load_tokenizer(src, local_files_only: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src, local_files_only=local_files_only)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _stored_dtype(config) -> str | None:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).replace("torch.", "") if dtype is not None else None


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
                raise RuntimeError(f"weight {key!r} of the dense model is missing from the NSA model")
            b = dst[key]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise RuntimeError(
                    f"weight {key!r}: dense {tuple(a.shape)} {a.dtype} vs NSA {tuple(b.shape)} {b.dtype}"
                )
            if not torch.equal(a.cpu(), b.cpu()):
                raise RuntimeError(f"weight {key!r} was not copied exactly")
            n_tensors += 1
            n_values += a.numel()
    new = sorted(set(dst) - set(src))
    foreign = [k for k in new if not is_nsa_parameter(k)]
    if foreign:
        raise RuntimeError(f"the NSA model has weights that are neither the dense model's nor NSA modules': {foreign[:5]}")
    return n_tensors, n_values, new, sum(dst[k].numel() for k in new)


# ---------------------------------------------------------------------------------------------
# Saving


def _source_card_data(src) -> dict:
    """License read from the source checkpoint's model card, when it is local."""
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
    if dst.is_dir():
        shutil.rmtree(dst)  # _check_destination allowed it (empty, or overwrite=True)
    dst.mkdir(parents=True)
    model.save_pretrained(dst, remote_code=remote_code)  # bundles the reference, or writes no code / auto_map
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
# Entry points


def convert_to_nsa(
    src,
    dst: str | os.PathLike | None = None,
    params: NSAParams | None = None,
    *,
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
    overwrite: bool = False,
    progress: bool = True,
):
    """Convert a dense model (``model_type`` llama, mistral, qwen2 or qwen3) into its NSA counterpart.

    Args:
        src: a local checkpoint directory, a Hub model id, or a ``*ForCausalLM`` instance of a supported family.
        dst: directory to save the converted checkpoint to (safetensors, config, generation config,
            tokenizer files, modeling code, ``conversion_report.json`` and a model card ``README.md``
            with the report); ``None`` saves nothing. An existing non-empty directory is refused unless
            ``overwrite``.
        params: the NSA sizes (:class:`nsa_kernels.NSAParams`; default: the paper's).
        cmp_mlp_hidden, gate_init_bias: passed to the config as ``nsa_cmp_mlp_hidden`` /
            ``nsa_gate_init_bias`` when given.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, a ``torch.dtype``, or ``None``/``"auto"``
            for the source's.
        tokenizer: tokenizer for the sample text (default: the source's, when it has one; else UTF-8
            bytes are used as token ids, which the report says).
        sample_text: ``None`` (long Python stdlib sources found on this machine), a path to a text file
            (``pathlib.Path`` or a string naming a file), a string of text, or a list of documents.
        eval_len: tokens per evaluation sequence; default :func:`~.evaluation.default_eval_len` (twice
            the position from which the sparsity bites), capped by ``max_position_embeddings``.
        eval_sequences: how many sequences to evaluate.
        evaluate: ``False`` skips the comparison (the report then has no losses).
        device: where to evaluate (default: CUDA when available for a checkpoint loaded here, the
            instance's device for an instance).
        base_model: Hub id written to the card's ``base_model`` metadata (default: ``src`` when it is
            a Hub id).
        license: license for the card metadata (default: the source card's, when local).
        remote_code: also write self-contained modeling code (with the pure-PyTorch reference
            bundled, see :mod:`nsa_hf.hub`), so that ``dst`` loads with ``trust_remote_code=True`` where
            nsa-hf is not installed. ``False`` writes no modeling code and no ``auto_map``.
        overwrite: replace the contents of an existing non-empty ``dst``.
        progress: show tqdm progress bars.

    Returns:
        ``(model, report)``: the NSA causal LM and a :class:`~.conversion_report.ConversionReport`.

    Raises:
        ValueError: invalid NSA settings or options (before any weight is loaded), a source that is
            missing, unreachable or of an unsupported model type, a bad ``dtype`` or ``device``, an
            ``eval_len`` beyond the model's positions, or an occupied ``dst``.
    """
    from transformers import AutoModelForCausalLM, PreTrainedModel

    start = time.perf_counter()
    if params is not None and not isinstance(params, NSAParams):
        raise TypeError(f"params must be an nsa_kernels.NSAParams; got {type(params).__name__}")
    params = params or NSAParams()
    extra = {}
    if cmp_mlp_hidden is not None:
        extra["nsa_cmp_mlp_hidden"] = cmp_mlp_hidden
    if gate_init_bias is not None:
        extra["nsa_gate_init_bias"] = list(gate_init_bias)
    torch_dtype = _resolve_dtype(dtype)
    device = _resolve_device(device)
    if eval_len is not None and eval_len < 2:
        raise ValueError(f"eval_len={eval_len}: must be >= 2 tokens")
    if eval_sequences < 1:
        raise ValueError(f"eval_sequences={eval_sequences}: must be >= 1")
    if dst is not None:
        _check_destination(Path(dst), src, overwrite)

    # Source config first: an unsupported source fails before its weights are read.
    local_only = False
    if isinstance(src, PreTrainedModel):
        source = getattr(src.config, "_name_or_path", "") or type(src).__name__
        _check_source_type(src.config, source)
        _, lms = _auto_classes()
        lm_class = lms[type(src.config)]
        if not isinstance(src, lm_class):
            raise ValueError(f"src is a {type(src).__name__}; pass a {lm_class.__name__} (a model with an LM head)")
        dense_config = src.config
        source_dtype = str(src.dtype).replace("torch.", "")
    elif isinstance(src, (str, os.PathLike)):
        source = os.fspath(src)
        dense_config, local_only = _source_config(source)
        _check_source_type(dense_config, source)
        source_dtype = _stored_dtype(dense_config)
    else:
        raise TypeError(f"src must be a directory, a Hub id or a *ForCausalLM model; got {type(src).__name__}")
    config = build_nsa_config(dense_config, params, **extra)
    _, nsa_lm_class = nsa_classes(dense_config.model_type)
    max_pos = getattr(config, "max_position_embeddings", None)
    if evaluate and eval_len is not None and max_pos and eval_len > max_pos:
        raise ValueError(
            f"eval_len={eval_len} is above the model's max_position_embeddings={max_pos}: pass eval_len <= {max_pos}"
        )

    with _quiet_transformers(progress):
        if isinstance(src, PreTrainedModel):
            original = src
            target_dtype = torch_dtype if torch_dtype not in (None, "auto") else src.dtype
            if original.dtype != target_dtype:  # a converted copy: the caller's model stays as it is
                original = copy.deepcopy(original).to(target_dtype)
            model = nsa_lm_class(config).to(device=next(src.parameters()).device, dtype=target_dtype)
            result = model.load_state_dict(original.state_dict(), strict=False)
            if result.unexpected_keys:
                raise RuntimeError(f"dense weights the NSA model has no place for: {result.unexpected_keys[:5]}")
            if tokenizer is None and source and os.path.isdir(source):
                tokenizer = _load_tokenizer(source)
            device = device if device is not None else next(src.parameters()).device
        else:
            load_dtype = "auto" if torch_dtype is None else torch_dtype
            original = AutoModelForCausalLM.from_pretrained(source, dtype=load_dtype, local_files_only=local_only)
            model = nsa_lm_class.from_pretrained(source, config=config, dtype=original.dtype,
                                                 local_files_only=local_only)
            if source_dtype is None:
                source_dtype = str(original.dtype).replace("torch.", "")
            if tokenizer is None:
                tokenizer = _load_tokenizer(source, local_files_only=local_only)
            device = device if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    original.eval()
    model.eval()
    if getattr(original, "generation_config", None) is not None:
        model.generation_config = type(original.generation_config).from_dict(original.generation_config.to_dict())

    report = ConversionReport(
        source=source,
        nsa_settings=dataclasses.asdict(params),
        dtype=str(model.dtype).replace("torch.", ""),
        model_type=dense_config.model_type,
        nsa_model_type=config.model_type,
        source_dtype=source_dtype,
        gate_init_bias=list(getattr(config, "nsa_gate_init_bias", []) or []) or None,
    )
    report.nsa_settings["cmp_mlp_hidden"] = getattr(config, "nsa_cmp_mlp_hidden", None)
    note = _sliding_window_note(config, params.window)
    if note:
        report.notes.append(note)
    (report.weights_copied, report.parameters_copied, report.new_weights,
     report.new_parameters) = verify_copied_weights(original, model, progress=progress)

    if evaluate:
        n = eval_len or default_eval_len(params, max_pos)
        seqs, report.text_source = sample_sequences(sample_text, tokenizer, config.vocab_size, n, eval_sequences)
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
            license=license or meta.get("license"), remote_code=remote_code,
        )
        with _quiet_transformers(progress):
            _save(model, tokenizer, src, Path(dst), card, remote_code)
        (Path(dst) / "conversion_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    return model, report


def convert_llama_to_nsa(src, dst: str | os.PathLike | None = None, params: NSAParams | None = None, **kwargs):
    """:func:`convert_to_nsa` under its earlier name (it converts every supported family, not only
    Llama). The NSA sizes may also be given one by one as keywords (``window=256, slc_count=8``; the
    fields of :class:`nsa_kernels.NSAParams`, unset ones keep its defaults) instead of ``params``."""
    sizes = {name: kwargs.pop(name) for name in NSA_FIELDS if name in kwargs}
    sizes = {name: value for name, value in sizes.items() if value is not None}
    if sizes:
        if params is not None:
            raise ValueError(f"pass the NSA sizes as params=NSAParams(...) or as keywords, not both (got {sorted(sizes)})")
        params = NSAParams(**sizes)
    return convert_to_nsa(src, dst, params, **kwargs)


__all__ = [
    "ConversionReport",
    "TOKENIZER_FILES",
    "build_nsa_config",
    "convert_llama_to_nsa",
    "convert_to_nsa",
    "default_eval_len",
    "fully_sparse_from_position",
    "keys_per_query",
    "nsa_classes",
    "sparse_from_position",
    "stdlib_python_files",
    "verify_copied_weights",
]
