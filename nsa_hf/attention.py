"""The ``"nsa"`` attention backend for transformers: entry point, mask and fallback.

Importing this module registers :func:`nsa_attention_forward` under the name ``"nsa"`` with
:class:`transformers.AttentionInterface`, and :func:`nsa_padding_mask` with
:class:`transformers.AttentionMaskInterface` (so the backend receives the 2D padding mask), for the
whole process. Any Llama-style model then runs NSA with ``attn_implementation="nsa"``.

A call takes one of three paths:

* a decoding step through the decode kernels (:mod:`.decoding`: a few new tokens on an NSA cache,
  left-padded rows; on a static cache with no host synchronisation, traceable by ``torch.compile`` and
  ``torch.export``);
* otherwise the varlen path: the batch is packed (:mod:`.packing`: padding dropped, packed documents
  split), the cache layer gives the compressed keys/values, compressing only new blocks
  (:meth:`.cache.NSACompressedState.update_compressed`), and :func:`_nsa_varlen` computes NSA (the Triton
  training kernels on CUDA, the reference on CPU);
* while ``torch.compile`` traces, the static varlen path (:func:`.packing.static_layout`): no host
  synchronisation, rows of one contiguous run of real tokens; see ``docs/fallback.md``.

Which implementations run is chosen per model or per ``with`` block (:mod:`.backends`).

NSA-Llama attention modules pass ``nsa_gates`` ``(B, Q, Hq, 3)``, ``nsa_compressors`` (keys, values),
``nsa_params`` and ``nsa_cache_layer`` (an :class:`~.cache.NSACacheLayer` that keeps the compressed
keys/values between decoding steps). A module without them (a stock Llama) gets the parameter-free
fallback: mean-pool compression and fixed gates (cmp 0, slc 0.5, win 0.5), with the compressed keys
recomputed from the dense cache at every step; see ``docs/fallback.md``.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import StaticLayer

from nsa_kernels import MLPCompressor, MeanPoolCompressor, NSAParams, num_cmp_blocks, validate_nsa_params
from nsa_kernels import nsa_attention_varlen, nsa_sequence

from .backends import varlen_backend
from .cache import NSACompressedState, NSAStaticCacheLayer
from .decoding import MAX_DECODE_QUERIES, try_decode, try_plain_static_decode, try_static_decode
from .packing import compress_packed, cu_seqlens, pad_output, static_pad_output, static_unpad_input, unpad_input
from .families import NSA_MODEL_TYPES, supported_model_types

__all__ = [
    "MLPCompressor",
    "NSAParams",
    "FALLBACK_GATES",
    "MAX_DECODE_QUERIES",
    "nsa_attention_forward",
    "nsa_padding_mask",
    "nsa_params_from_config",
    "validate_nsa_params",
]

FALLBACK_GATES = (0.0, 0.5, 0.5)
"""Gate values (cmp, slc, win) used on models without NSA weights."""

_fallback_warned = False


def _warn_fallback_once(model_type: str | None) -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        if model_type in NSA_MODEL_TYPES:
            advice = "Convert the checkpoint with `nsa-hf convert` to get trainable NSA modules and an NSA cache."
        else:
            advice = (
                f"nsa-hf convert does not support model_type {model_type!r} (it converts {supported_model_types()}), "
                "so this model can only use the fallback."
            )
        warnings.warn(
            'attn_implementation="nsa" on a model without NSA weights (no compressors or gates): using '
            f"parameter-free mean-pool compression and fixed gates (cmp 0, slc 0.5, win 0.5). {advice}",
            UserWarning,
            stacklevel=3,
        )


def nsa_params_from_config(config) -> NSAParams:
    """NSA sizes of a model config: ``config.nsa_params()`` for NSA-Llama; for other configs the
    ``nsa_<field>`` attributes that are set (e.g. ``config.nsa_window = 128``), the paper's defaults
    for the rest."""
    if callable(getattr(config, "nsa_params", None)):
        return config.nsa_params()
    values = {}
    for field in dataclasses.fields(NSAParams):
        value = getattr(config, f"nsa_{field.name}", None)
        if value is not None:
            values[field.name] = value
    return NSAParams(**values)


# -- mask ---------------------------------------------------------------------------------------------


def nsa_padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                     attention_mask=None, **kwargs):
    """Mask function of the ``"nsa"`` backend: the 2D ``(B, KV)`` bool padding mask (True = real
    token) sliced to the keys, or ``None`` when no mask was given. NSA applies causality itself. With a
    static cache (``KV`` = its fixed length) the mask covers the positions written so far and is padded
    with ``False``."""
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)
    if mask.shape[-1] < kv_length:
        # A static cache: keys are its max_cache_len slots, the mask covers the positions written so far.
        mask = torch.nn.functional.pad(mask, (0, kv_length - mask.shape[-1]), value=False)
    return mask[:, -kv_length:]


# -- the backend --------------------------------------------------------------------------------------


def _nsa_varlen(q, k, v, cmp_k, cmp_v, gates, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params, scale,
                max_seqlen_q, max_seqlen_k, backend="auto"):
    """The one place where NSA attention itself is computed (packed layout, see
    :func:`nsa_kernels.nsa_attention_varlen`). The offsets are built from host-side lengths, so the
    maximum lengths are passed along and the Triton path needs no device-to-host copy."""
    return nsa_attention_varlen(
        q, k, v, cmp_k, cmp_v, gates, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params, scale,
        backend=backend, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )


@functools.cache
def _mean_pool(cmp_block: int) -> MeanPoolCompressor:
    return MeanPoolCompressor(cmp_block)


def _static_prefix(key, value, attention_mask, cache_layer):
    """The written part ``[0, cumulative_length)`` of a static cache's keys, values and mask, for the varlen
    path (one host synchronisation: the length)."""
    end = int(cache_layer.cumulative_length)
    key, value = key[:, :, :end], value[:, :, :end]
    if attention_mask is not None:
        attention_mask = attention_mask[:, :end]
    return key, value, attention_mask


def _static_varlen(query, key, value, attention_mask, gates, compressors, params, cache_layer, scaling, backend,
                   kwargs):
    """The varlen path with static shapes, while ``torch.compile`` traces (see
    :func:`.packing.static_unpad_input` for what it covers). The cache layer's compressed state is
    dropped (a later eager step rebuilds it from the dense keys)."""
    q, k, v, g, shift = static_unpad_input(query, key, value, gates, attention_mask, kwargs)
    batch, length, hq, _ = q.shape
    if cache_layer is not None:
        cache_layer.clear_compressed()
    q, k, v, g = (x.reshape(batch * length, *x.shape[2:]) for x in (q, k, v, g))
    rows_k, rows_v = compress_packed(k, v, [length] * batch, [0] * batch, compressors, params)
    n_cmp = num_cmp_blocks(length, params.cmp_block, params.cmp_stride)
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    if backend == "reference" or (backend == "auto" and q.device.type != "cuda"):
        # Row by row with static slices (the varlen reference copies its offsets to the host).
        out = torch.stack([
            nsa_sequence(q[b * length:(b + 1) * length], k[b * length:(b + 1) * length],
                         v[b * length:(b + 1) * length], rows_k[b], rows_v[b], g[b * length:(b + 1) * length],
                         params, scale).to(q.dtype)
            for b in range(batch)
        ])
    else:
        steps = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
        out = _nsa_varlen(
            q, k, v, torch.cat(rows_k, dim=0), torch.cat(rows_v, dim=0), g, steps * length, steps * length,
            steps * n_cmp, params, scale, length, length, backend,
        ).view(batch, length, hq, -1)
    return static_pad_output(out, shift)


def _varlen(query, key, value, attention_mask, gates, compressors, params, cache_layer, scaling, backend, kwargs):
    """The varlen path: pack, get the compressed keys/values (from the cache layer when there is one),
    compute, unpack."""
    batch, _, q_len, _ = query.shape
    q, k, v, g, layout = unpad_input(query, key, value, gates, attention_mask, kwargs)

    def compress(first):
        return compress_packed(k, v, layout.lens_k, first, compressors, params)

    if cache_layer is not None:
        rows_k, rows_v = cache_layer.update_compressed(
            compress, layout.lens_k, params.cmp_block, params.cmp_stride,
            valid=layout.valid if layout.per_row else None, left_aligned=layout.left_aligned,
        )
    else:
        rows_k, rows_v = compress([0] * len(layout.lens_k))
    cmp_counts = [x.shape[0] for x in rows_k]
    device = q.device
    out = _nsa_varlen(
        q, k, v, torch.cat(rows_k, dim=0), torch.cat(rows_v, dim=0), g,
        cu_seqlens(layout.lens_q, device), cu_seqlens(layout.lens_k, device), cu_seqlens(cmp_counts, device),
        params, scaling, max(layout.lens_q, default=0), max(layout.lens_k, default=0), backend,
    )
    return pad_output(out, layout, batch, q_len)


def nsa_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Native Sparse Attention as a transformers attention function.

    Args:
        module: the attention module (its ``config`` gives the NSA sizes when ``nsa_params`` is not passed,
            and the choice of implementations, see :mod:`.backends`).
        query: ``(B, Hq, Q, D)``; key, value: ``(B, Hkv, KV, D)``, the cached past included.
        attention_mask: ``(B, KV)`` bool padding mask from :func:`nsa_padding_mask`, or ``None``.
        scaling: softmax scale (``D ** -0.5`` if ``None``).
        dropout: must be 0 (attention dropout is not supported by NSA).
        nsa_gates: ``(B, Q, Hq, 3)`` gate values (cmp, slc, win) in [0, 1].
        nsa_compressors: ``(compress_keys, compress_values)`` modules ``(..., l, D) -> (..., D)``.
        nsa_params: :class:`NSAParams`.
        nsa_cache_layer: :class:`~.cache.NSACacheLayer` holding the compressed state, or ``None``.
        cu_seq_lens_q, cu_seq_lens_k, position_ids: packed-sequence information (see :mod:`.packing`).

    Returns:
        ``(output (B, Q, Hq, D), None)``.
    """
    if dropout and dropout > 0:
        raise ValueError(
            f"attention dropout={dropout} is not supported by the nsa backend (allowed: 0.0); set "
            "config.attention_dropout=0.0"
        )
    params = kwargs.get("nsa_params") or nsa_params_from_config(module.config)
    compressors = kwargs.get("nsa_compressors")
    gates = kwargs.get("nsa_gates")
    cache_layer = kwargs.get("nsa_cache_layer")
    if compressors is None or gates is None:
        _warn_fallback_once(getattr(getattr(module, "config", None), "model_type", None))
    if compressors is None:
        compressors = (_mean_pool(params.cmp_block),) * 2
    batch, hq, q_len, _ = query.shape
    if gates is None:
        gates = query.new_tensor(FALLBACK_GATES).expand(batch, q_len, hq, 3)
    if type(cache_layer) is StaticLayer:
        # A plain StaticCache (transformers' export recipes): graph-safe steps recompressing the dense keys.
        decoded = try_plain_static_decode(query, key, value, attention_mask, gates, compressors, params,
                                          cache_layer, scaling, getattr(module, "config", None), kwargs)
        if decoded is not None:
            return decoded, None
        if not torch.compiler.is_compiling():  # other steps: the varlen path on the written positions
            key, value, attention_mask = _static_prefix(key, value, attention_mask, cache_layer)
    if cache_layer is not None and not isinstance(cache_layer, NSACompressedState):
        cache_layer = None
    config = getattr(module, "config", None)

    if isinstance(cache_layer, NSAStaticCacheLayer):
        # Graph-safe (no host work): also the path of decoding steps traced by torch.compile / torch.export.
        decoded = try_static_decode(query, key, value, gates, compressors, params, cache_layer, scaling, config,
                                    kwargs)
        if decoded is not None:
            return decoded, None
        if torch.compiler.is_compiling():
            raise ValueError(
                "under torch.compile / torch.export a step on an NSAStaticCache must be a decoding step of at most "
                f"{min(MAX_DECODE_QUERIES, cache_layer.max_decode_queries)} tokens after an eager prefill of "
                "left-padded rows, with the decode backend not 'off'; run the prefill (and other steps) eagerly"
            )
    if torch.compiler.is_compiling():
        return _static_varlen(query, key, value, attention_mask, gates, compressors, params, cache_layer, scaling,
                              varlen_backend(config), kwargs), None
    if isinstance(cache_layer, NSAStaticCacheLayer):
        key, value, attention_mask = _static_prefix(key, value, attention_mask, cache_layer)
    else:
        decoded = try_decode(query, key, value, attention_mask, gates, compressors, params, cache_layer, scaling,
                             config, kwargs)
        if decoded is not None:
            return decoded, None
    return _varlen(query, key, value, attention_mask, gates, compressors, params, cache_layer, scaling,
                   varlen_backend(config), kwargs), None


AttentionInterface.register("nsa", nsa_attention_forward)
AttentionMaskInterface.register("nsa", nsa_padding_mask)
