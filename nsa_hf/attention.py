"""The ``"nsa"`` attention backend for transformers.

Importing this module registers ``nsa_attention_forward`` under the name ``"nsa"`` with
:class:`transformers.AttentionInterface`, and :func:`nsa_padding_mask` with
:class:`transformers.AttentionMaskInterface` (so the backend receives the 2D padding mask), for the
whole process. Any Llama-style model then runs NSA with ``attn_implementation="nsa"``.

HF passes ``query (B, Hq, Q, D)`` and ``key/value (B, Hkv, KV, D)`` (cached past included). The backend
turns them into NSA's packed ("varlen") layout, one sequence per

* batch row, made of the row's real tokens: padding (left, right or anywhere) is dropped, so a row
  starts at its first real token and its compression and selection blocks are aligned to that start;
  outputs at padded query positions are zeros;
* document of a packed row: ``cu_seq_lens_q/k`` kwargs (batch of one, e.g. from
  ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``), or, without a padding mask and with no
  cached past, ``position_ids`` that restart (any batch size);

and makes a single call of :func:`_nsa_varlen` (the Triton training kernels on CUDA, the reference on CPU;
:data:`VARLEN_BACKEND`, environment variable ``NSA_BACKEND``, forces either, e.g. the reference on CUDA to
check a training run against the specification).

**Decoding steps** take a faster path instead: the Triton decode kernels
(:func:`nsa_kernels.decode.nsa_decode`) read HF's ``(B, Hkv, S, D)`` cache and the cache layer's
``(B, Hkv, capacity, D)`` compressed keys/values in place, with no packing. A step is a decoding step when

* the decode backend is on: :data:`DECODE_BACKEND` (environment variable ``NSA_DECODE_BACKEND``) is
  ``"auto"`` and the tensors are on CUDA (where :func:`nsa_kernels.resolve_backend` picks ``"triton"``)
  and ``nsa_kernels.decode`` imports, or it is ``"triton"``
  (forced; on CPU only under ``TRITON_INTERPRET=1``); ``"off"`` disables the path;
* an :class:`~.cache.NSACacheLayer` is present whose compressed state covers exactly the cached past
  (otherwise the varlen path rebuilds it first), and the step has a past (``KV > Q``);
* ``1 <= Q <= MAX_DECODE_QUERIES`` (16) new tokens per row, one sequence per row (a 2D padding mask or
  none, no ``cu_seq_lens``);
* every row is padding followed by at least ``Q`` real tokens (left padding, what ``generate()``
  makes); anything else falls back to the varlen path.

The step then compresses only the blocks completed by the new tokens (written at their slots of the
cache layer), and calls the kernels with ``k_start = KV - valid.sum(1)``, ``k_len = valid.sum(1)``,
``cmp_start = 0``, ``cmp_len = num_cmp_blocks(k_len)`` and ``check_lengths=False``. Host syncs: none
without a padding mask, one per forward with one (its row sums and the left-padding check, computed at
the first layer and shared by the others, which see the same mask object).

NSA-Llama attention modules pass ``nsa_gates`` ``(B, Q, Hq, 3)``, ``nsa_compressors`` (keys, values),
``nsa_params`` and ``nsa_cache_layer`` (an :class:`~.cache.NSACacheLayer` that keeps the compressed
keys/values between decoding steps). A module without them (a stock Llama) gets the parameter-free
fallback: mean-pool compression and fixed gates (cmp 0, slc 0.5, win 0.5), with the compressed keys
recomputed from the dense cache at every step; see ``docs/fallback.md``.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import warnings

import torch
from transformers import AttentionInterface, AttentionMaskInterface

from nsa_kernels import MLPCompressor, MeanPoolCompressor, NSAParams, num_cmp_blocks, validate_nsa_params
from nsa_kernels import nsa_attention_varlen

from .cache import NSACompressedState, NSAStaticCacheLayer
from .families import NSA_MODEL_TYPES, supported_model_types

__all__ = [
    "MLPCompressor",
    "NSAParams",
    "FALLBACK_GATES",
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


# -- layout -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Layout:
    """How HF's padded batch maps onto NSA's packed sequences."""

    q_keep: torch.Tensor | None  # (B*Q,) bool: query positions that are real tokens; None = all
    k_keep: torch.Tensor | None  # (B*KV,) bool: key positions that are real tokens; None = all
    lens_q: list[int]  # queries per sequence, in packed order
    lens_k: list[int]  # keys per sequence
    per_row: bool  # one sequence per batch row (the cache's compressed state applies)
    valid: torch.Tensor | None  # (B, KV) real-token mask when per_row
    left_aligned: bool = False  # per_row and every row is padding then real tokens


def _restart_lengths(position_ids: torch.Tensor, batch: int, length: int) -> list[int] | None:
    """Document lengths, in row-major order, of rows whose ``position_ids`` restart (a position that
    is not the previous one plus one starts a document); ``None`` if no row restarts."""
    pos = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
    if pos.shape[-1] != length:
        return None
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if int(starts.sum()) == batch:
        return None
    first = torch.nonzero(starts.reshape(-1)).flatten().tolist() + [batch * length]
    return [b - a for a, b in zip(first[:-1], first[1:])]


_last_offsets: list[tuple | None] = [None]


def _host_offsets(cu_q: torch.Tensor, cu_k: torch.Tensor) -> tuple[list[int], list[int]]:
    """``cu_seq_lens_q/k`` as host lists: one device-to-host copy per forward, not per layer (every
    layer of a forward gets the same tensor objects; identity is the key, the tensors are kept alive)."""
    last = _last_offsets[0]
    if last is not None and last[0] is cu_q and last[1] is cu_k:
        return last[2], last[3]
    both = torch.cat([cu_q.reshape(-1), cu_k.reshape(-1)]).tolist()
    bq, bk = both[: cu_q.numel()], both[cu_q.numel():]
    _last_offsets[0] = (cu_q, cu_k, bq, bk)
    return bq, bk


def _layout(query: torch.Tensor, key: torch.Tensor, attention_mask, kwargs) -> _Layout:
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if batch != 1 or attention_mask is not None:
            raise ValueError(
                f"cu_seq_lens_q/k describe packed sequences in a batch of one with no padding mask; got "
                f"batch size {batch} and a mask of shape "
                f"{None if attention_mask is None else tuple(attention_mask.shape)}"
            )
        cu_q = cu_k if cu_q is None else cu_q
        cu_k = cu_q if cu_k is None else cu_k
        bq, bk = _host_offsets(cu_q, cu_k)
        if bq[-1] != q_len or bk[-1] != kv_len or bq[0] != 0 or bk[0] != 0:
            raise ValueError(
                f"cu_seq_lens_q={bq} / cu_seq_lens_k={bk} must run from 0 to the query length {q_len} / "
                f"key length {kv_len}"
            )
        lens_q = [b - a for a, b in zip(bq[:-1], bq[1:])]
        lens_k = [b - a for a, b in zip(bk[:-1], bk[1:])]
        return _Layout(None, None, lens_q, lens_k, per_row=False, valid=None)
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape != (batch, kv_len):
            raise ValueError(
                f"the nsa backend takes a 2D padding mask of shape (batch, keys) = {(batch, kv_len)}; got "
                f"{tuple(attention_mask.shape)} (4D/custom masks are not supported)"
            )
        valid = attention_mask.to(torch.bool)
        q_valid = valid[:, kv_len - q_len:]
        mono = (valid[:, 1:] >= valid[:, :-1]).all().reshape(1)
        sums = torch.cat([q_valid.sum(1), valid.sum(1), mono.long()]).tolist()  # one host sync
        return _Layout(
            q_valid.reshape(-1), valid.reshape(-1), sums[:batch], sums[batch:2 * batch],
            per_row=True, valid=valid, left_aligned=bool(sums[-1]),
        )
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and q_len == kv_len:
        lens = _restart_lengths(position_ids, batch, q_len)
        if lens is not None:
            return _Layout(None, None, lens, lens, per_row=False, valid=None)
    valid = torch.ones(batch, kv_len, dtype=torch.bool, device=key.device)
    return _Layout(None, None, [q_len] * batch, [kv_len] * batch, per_row=True, valid=valid, left_aligned=True)


def _pack(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``(B, H, T, D)`` -> ``(N, H, D)`` tokens in row-major order, only those in ``keep``."""
    x = x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])
    return x if keep is None else x[keep]


def _cu(lengths: list[int], device) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return out.to(device)


# -- compression --------------------------------------------------------------------------------------


def _needs_grad(modules) -> bool:
    return torch.is_grad_enabled() and any(
        p.requires_grad for m in modules if isinstance(m, torch.nn.Module) for p in m.parameters()
    )


def _compress_blocks(k, v, lens_k, first, compressors, params):
    """Compress blocks ``first[s]`` .. last complete of each packed sequence ``s``.

    Returns the compressed keys and values of each sequence (lists of ``(n_s, Hkv, D)``)."""
    cmp_k_fn, cmp_v_fn = compressors
    d, l = params.cmp_stride, params.cmp_block
    offset, starts, counts = 0, [], []
    for n, f in zip(lens_k, first):
        last = num_cmp_blocks(n, l, d)
        counts.append(max(last - f, 0))
        if last > f:
            starts.append(torch.arange(f, last, device=k.device) * d + offset)
        offset += n
    if not starts and not _needs_grad(compressors):
        return [k.new_empty(0, k.shape[1], k.shape[2])] * len(lens_k), [k.new_empty(0, v.shape[1], v.shape[2])] * len(lens_k)
    # When training, the compressors run even on zero blocks: their parameters then stay in the autograd
    # graph (zero gradients), which FSDP and DDP need on every rank; a rank whose batch is too short to
    # compress must not skip the gradient reduction of these parameters (it hangs).
    first_tokens = torch.cat(starts) if starts else torch.zeros(0, dtype=torch.long, device=k.device)
    idx = first_tokens[:, None] + torch.arange(l, device=k.device)  # (n_blocks, l)
    ck = cmp_k_fn(k[idx].transpose(1, 2))  # (n_blocks, Hkv, l, D) -> (n_blocks, Hkv, D)
    cv = cmp_v_fn(v[idx].transpose(1, 2))
    return list(ck.split(counts)), list(cv.split(counts))


def _compressed(k, v, layout, compressors, params, cache_layer):
    """Compressed keys/values of every sequence, packed, and their offsets."""
    if cache_layer is not None and layout.per_row:
        first = cache_layer.compressed_counts(layout.valid, params.cmp_block, params.cmp_stride)
        new_k, new_v = _compress_blocks(k, v, layout.lens_k, first, compressors, params)
        rows_k, rows_v = cache_layer.append_compressed(layout.valid, new_k, new_v, real_lens=layout.lens_k,
                                                       left_aligned=layout.left_aligned)
    else:
        if cache_layer is not None:
            cache_layer.clear_compressed()  # packed rows: no per-row state to keep
        rows_k, rows_v = _compress_blocks(k, v, layout.lens_k, [0] * len(layout.lens_k), compressors, params)
    counts = [x.shape[0] for x in rows_k]
    return torch.cat(rows_k, dim=0), torch.cat(rows_v, dim=0), counts


# -- decode path --------------------------------------------------------------------------------------

DECODE_BACKEND = os.environ.get("NSA_DECODE_BACKEND", "auto")
"""When decoding steps use the Triton decode kernels (:func:`nsa_kernels.decode.nsa_decode`):
``"auto"`` (default) when :func:`nsa_kernels.resolve_backend` picks ``"triton"`` (CUDA), ``"triton"``
always (on CPU only under ``TRITON_INTERPRET=1``: tests), ``"off"`` never (every step takes the varlen
path). Read at each call; set it here or with the environment variable ``NSA_DECODE_BACKEND`` (read at
import)."""

MAX_DECODE_QUERIES = 16
"""Largest query length (new tokens per row) handled by the decode kernels; longer steps (prefill,
long chunks) take the varlen training kernels."""

_DECODE_CHOICES = ("auto", "triton", "off")


_decode_module_cache: list = []


def _decode_module():
    """``nsa_kernels.decode`` (needs triton), or ``None`` when it cannot be imported (e.g. Hub remote code
    without nsa-hf: imported by name so that the exporter does not try to bundle it)."""
    if not _decode_module_cache:
        try:
            _decode_module_cache.append(importlib.import_module("nsa_kernels.decode"))
        except ImportError:
            _decode_module_cache.append(None)
    return _decode_module_cache[0]


def _decode_enabled(device: torch.device) -> bool:
    mode = DECODE_BACKEND
    if mode not in _DECODE_CHOICES:
        raise ValueError(f"NSA_DECODE_BACKEND / nsa_hf.attention.DECODE_BACKEND={mode!r} is not one of {_DECODE_CHOICES}")
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return False
    return _decode_module() is not None  # "triton", or "auto" on CUDA (what resolve_backend picks there)


@dataclasses.dataclass
class _DecodePlan:
    """What a decoding step needs, shared by all layers of one forward (they see the same mask object)."""

    mask: torch.Tensor | None  # the attention mask it was built from (kept alive: identity is the key)
    shape: tuple  # (B, S, Q, cmp_block, cmp_stride, device)
    ok: bool  # left-aligned rows with at least Q real tokens each
    valid: torch.Tensor | None = None  # (B, S) bool
    k_len: torch.Tensor | None = None  # (B,) int32 real tokens per row
    k_start: torch.Tensor | None = None  # (B,) int32 S - k_len
    cmp_len: torch.Tensor | None = None  # (B,) int32 num_cmp_blocks(k_len)
    cmp_start: torch.Tensor | None = None  # (B,) int32 zeros
    k_lens: list[int] | None = None  # host copy of k_len
    cmp_counts: list[int] | None = None  # host copy of cmp_len
    new_blocks: bool = False  # some row completes a compression block in this step
    slots: torch.Tensor | None = None  # (B, J) int64 slots of the candidate new blocks
    gather: torch.Tensor | None = None  # (B, J*l) int64 key positions of their tokens (clamped)
    capacity: int = 0  # compressed slots the candidates need


_last_plan: list[_DecodePlan | None] = [None]


def _device_cmp_blocks(n: torch.Tensor, cmp_block: int, cmp_stride: int) -> torch.Tensor:
    """:func:`num_cmp_blocks` of a tensor of lengths, on its device."""
    return torch.where(n >= cmp_block, (n - cmp_block).clamp_min(0) // cmp_stride + 1, torch.zeros_like(n))


def _candidate_blocks(k_start: torch.Tensor, k_len: torch.Tensor, q_len: int, kv_len: int, params: NSAParams):
    """The compression blocks that may end among the last ``q_len`` of each row's ``k_len`` keys (row ``b``
    starting at cache position ``k_start[b]``), all on the device: ``num_cmp_blocks(k_len)`` ``(B,)``, their
    slots ``(B, J)`` (``J = ceil(Q / d)``, from the count before the step) and the cache positions of
    their tokens ``(B, J*l)`` (clamped into ``[0, kv_len)``; a candidate that does not complete reads
    clamped positions and is written to a scratch slot)."""
    l, d = params.cmp_block, params.cmp_stride
    device = k_len.device
    n_new = _device_cmp_blocks(k_len, l, d)
    n_old = _device_cmp_blocks(k_len - q_len, l, d)
    j = -(-q_len // d)  # blocks ending among Q consecutive positions
    slots = n_old[:, None].long() + torch.arange(j, device=device)
    first = k_start[:, None].long() + slots * d  # first key of each candidate block
    gather = (first[:, :, None] + torch.arange(l, device=device)).clamp_(0, kv_len - 1).reshape(k_len.shape[0], j * l)
    return n_new, slots, gather


def _decode_plan(attention_mask, batch: int, kv_len: int, q_len: int, params: NSAParams, device) -> _DecodePlan:
    """The plan of this step, built once per forward: one host sync with a padding mask (eligibility and
    the per-row lengths), none without one."""
    shape = (batch, kv_len, q_len, params.cmp_block, params.cmp_stride, device)
    plan = _last_plan[0]
    if plan is not None and plan.mask is attention_mask and plan.shape == shape:
        return plan
    l, d = params.cmp_block, params.cmp_stride
    if attention_mask is None:
        valid = torch.ones(batch, kv_len, dtype=torch.bool, device=device)
        k_len = torch.full((batch,), kv_len, dtype=torch.int64, device=device)
        k_lens, ok = [kv_len] * batch, True
    else:
        valid = attention_mask.to(torch.bool)
        k_len = valid.sum(1)
        mono = (valid[:, 1:] >= valid[:, :-1]).all().reshape(1)  # padding, then real tokens
        host = torch.cat([k_len, mono.long()]).tolist()  # the one host sync of the step
        k_lens, ok = host[:batch], bool(host[-1]) and min(host[:batch]) >= q_len
    plan = _DecodePlan(attention_mask, shape, ok)
    _last_plan[0] = plan
    if not ok:
        return plan
    n_new, slots, gather = _candidate_blocks(kv_len - k_len, k_len, q_len, kv_len, params)
    j = slots.shape[1]
    cmp_counts = [num_cmp_blocks(n, l, d) for n in k_lens]
    plan.valid, plan.k_lens, plan.cmp_counts = valid, k_lens, cmp_counts
    plan.k_len = k_len.to(torch.int32)
    plan.k_start = (kv_len - k_len).to(torch.int32)
    plan.cmp_len = n_new.to(torch.int32)
    plan.cmp_start = torch.zeros(batch, dtype=torch.int32, device=device)
    plan.new_blocks = any(c != num_cmp_blocks(n - q_len, l, d) for c, n in zip(cmp_counts, k_lens))
    plan.slots, plan.gather = slots, gather
    plan.capacity = num_cmp_blocks(kv_len, l, d) + j
    return plan


def _try_decode(query, key, value, attention_mask, gates, compressors, params, cache_layer, scaling, kwargs):
    """The decode path (see :func:`nsa_attention_forward`), or ``None`` when this step is not one."""
    batch, hq, q_len, _ = query.shape
    kv_len = key.shape[2]
    if (
        cache_layer is None
        or not 1 <= q_len <= MAX_DECODE_QUERIES
        or kv_len <= q_len  # no cached past: a prefill
        or kwargs.get("cu_seq_lens_q") is not None
        or kwargs.get("cu_seq_lens_k") is not None
        or (attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape != (batch, kv_len)))
        or not _decode_enabled(query.device)
    ):
        return None
    plan = _decode_plan(attention_mask, batch, kv_len, q_len, params, query.device)
    if not plan.ok:
        return None
    past_real = [n - q_len for n in plan.k_lens]
    if not cache_layer.decode_ready(batch, kv_len - q_len, past_real, params.cmp_block, params.cmp_stride,
                                    plan.valid):
        return None  # no (or a stale) compressed state: the varlen path rebuilds it
    if plan.new_blocks:
        _compress_candidates(key, value, plan.slots, plan.gather, plan.capacity, compressors, params, cache_layer)
    cache_layer.set_decode_state(plan.valid, plan.cmp_len, plan.cmp_counts, plan.k_lens)
    if gates is None:
        gates = query.new_tensor(FALLBACK_GATES).expand(batch, q_len, hq, 3)
    sc = max(1, num_cmp_blocks(kv_len, params.cmp_block, params.cmp_stride))
    out = _nsa_decode(
        query.transpose(1, 2), key, value, cache_layer.cmp_k[:, :, :sc], cache_layer.cmp_v[:, :, :sc], gates,
        plan.k_start, plan.k_len, plan.cmp_start, plan.cmp_len, params, scaling,
    )
    return out


def _compress_candidates(key, value, slots, gather, capacity, compressors, params, cache_layer) -> None:
    """Compress the ``J`` candidate blocks of every row (those that may end among the new positions) and
    write them at their slots: the completed ones become visible through the new counts, the others
    land in scratch slots."""
    cmp_k_fn, cmp_v_fn = compressors
    batch, hkv, _, dim = key.shape
    l = params.cmp_block
    j = slots.shape[1]
    idx = gather[:, None, :, None]

    def blocks(x):
        g = x.gather(2, idx.expand(batch, hkv, j * l, x.shape[-1]))  # (B, Hkv, J*l, D)
        return g.view(batch, hkv, j, l, x.shape[-1]).transpose(1, 2).reshape(batch * j, hkv, l, x.shape[-1])

    ck = cmp_k_fn(blocks(key)).view(batch, j, hkv, -1).transpose(1, 2)
    cv = cmp_v_fn(blocks(value)).view(batch, j, hkv, -1).transpose(1, 2)
    cache_layer.write_compressed(slots, ck.to(key.dtype), cv.to(value.dtype), capacity)


# -- static caches -------------------------------------------------------------------------------------


def _try_static_decode(query, key, value, gates, compressors, params, cache_layer, scaling, kwargs):
    """A decoding step on an :class:`~.cache.NSAStaticCacheLayer` with no host synchronisation (so it can
    be captured in a CUDA graph), or ``None`` when the step is not one (then the varlen path runs).

    Row ``b`` is ``[left_pad[b], cumulative_length)`` of the cache, as recorded by the last varlen step
    (``static_ready``: rows were left-aligned); the attention mask is not read. Every step compresses the
    ``ceil(Q / d)`` candidate blocks that may end among the new positions and writes them at their slots;
    ``cmp_len`` is recomputed from the length, so the state also survives ``crop``."""
    batch, hq, q_len, _ = query.shape
    if (
        not cache_layer.static_ready
        or not 1 <= q_len <= min(MAX_DECODE_QUERIES, cache_layer.max_decode_queries)
        or kwargs.get("cu_seq_lens_q") is not None
        or kwargs.get("cu_seq_lens_k") is not None
        or (cache_layer.cmp_block, cache_layer.cmp_stride) != (params.cmp_block, params.cmp_stride)
        or cache_layer.left_pad is None
        or cache_layer.left_pad.shape[0] != batch
        or cache_layer.cmp_k is None
        or not _decode_enabled(query.device)
    ):
        return None
    k_start = cache_layer.left_pad
    k_len = (cache_layer.cumulative_length.to(query.device) - k_start).to(torch.int32)
    n_new, slots, gather = _candidate_blocks(k_start, k_len, q_len, key.shape[2], params)
    _compress_candidates(key, value, slots, gather, cache_layer.static_capacity(), compressors, params, cache_layer)
    cache_layer.cmp_len.copy_(n_new)
    if gates is None:
        gates = query.new_tensor(FALLBACK_GATES).expand(batch, q_len, hq, 3)
    return _nsa_decode(
        query.transpose(1, 2), key, value, cache_layer.cmp_k, cache_layer.cmp_v, gates,
        k_start, k_len, torch.zeros_like(k_start), cache_layer.cmp_len, params, scaling,
    )


def _static_prefix(key, value, attention_mask, cache_layer):
    """The written part ``[0, cumulative_length)`` of a static cache's keys, values and mask, for the varlen
    path (one host synchronisation: the length)."""
    end = int(cache_layer.cumulative_length)
    key, value = key[:, :, :end], value[:, :, :end]
    if attention_mask is not None:
        attention_mask = attention_mask[:, :end]
    return key, value, attention_mask


def _nsa_decode(q, k, v, cmp_k, cmp_v, gates, k_start, k_len, cmp_start, cmp_len, params, scale):
    """The decode kernels (lengths consistent by construction: no host-side check)."""
    return _decode_module().nsa_decode(q, k, v, cmp_k, cmp_v, gates, k_start, k_len, cmp_start, cmp_len, params, scale,
                      check_lengths=False)


# -- the backend --------------------------------------------------------------------------------------


VARLEN_BACKEND = os.environ.get("NSA_BACKEND", "auto")
"""Implementation of every non-decoding NSA call (training, prefill): ``"auto"`` (default: the Triton
kernels on CUDA, the PyTorch reference on CPU), ``"triton"`` (on CPU only under ``TRITON_INTERPRET=1``) or
``"reference"`` (the specification, also on CUDA: slow, O(T^2) memory per sequence, for checking a run).
Read at each call; set it here or with the environment variable ``NSA_BACKEND`` (read at import)."""

_VARLEN_CHOICES = ("auto", "triton", "reference")


def _nsa_varlen(q, k, v, cmp_k, cmp_v, gates, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params, scale,
                max_seqlen_q, max_seqlen_k):
    """The one place where NSA attention itself is computed (packed layout, see
    :func:`nsa_kernels.nsa_attention_varlen`). The offsets are built here from host-side lengths, so
    the maximum lengths are passed along and the Triton path needs no device-to-host copy."""
    if VARLEN_BACKEND not in _VARLEN_CHOICES:
        raise ValueError(f"NSA_BACKEND / nsa_hf.attention.VARLEN_BACKEND={VARLEN_BACKEND!r}: allowed values are "
                         f"{_VARLEN_CHOICES}")
    return nsa_attention_varlen(
        q, k, v, cmp_k, cmp_v, gates, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params, scale,
        backend=VARLEN_BACKEND, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )


_mean_pool: dict[int, MeanPoolCompressor] = {}


def _fallback_compressors(params: NSAParams):
    pool = _mean_pool.setdefault(params.cmp_block, MeanPoolCompressor(params.cmp_block))
    return pool, pool


def nsa_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Native Sparse Attention as a transformers attention function.

    Args:
        module: the attention module (its ``config`` gives the NSA sizes when ``nsa_params`` is not passed).
        query: ``(B, Hq, Q, D)``; key, value: ``(B, Hkv, KV, D)``, the cached past included.
        attention_mask: ``(B, KV)`` bool padding mask from :func:`nsa_padding_mask`, or ``None``.
        scaling: softmax scale (``D ** -0.5`` if ``None``).
        dropout: must be 0 (attention dropout is not supported by NSA).
        nsa_gates: ``(B, Q, Hq, 3)`` gate values (cmp, slc, win) in [0, 1].
        nsa_compressors: ``(compress_keys, compress_values)`` modules ``(..., l, D) -> (..., D)``.
        nsa_params: :class:`NSAParams`.
        nsa_cache_layer: :class:`~.cache.NSACacheLayer` holding the compressed state, or ``None``.
        cu_seq_lens_q, cu_seq_lens_k, position_ids: packed-sequence information (see module docstring).

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
        compressors = _fallback_compressors(params)
    if cache_layer is not None and not isinstance(cache_layer, NSACompressedState):
        cache_layer = None
    static = isinstance(cache_layer, NSAStaticCacheLayer)

    if static:
        decoded = _try_static_decode(query, key, value, gates, compressors, params, cache_layer, scaling, kwargs)
        if decoded is not None:
            return decoded, None
        key, value, attention_mask = _static_prefix(key, value, attention_mask, cache_layer)
    else:
        decoded = _try_decode(query, key, value, attention_mask, gates, compressors, params, cache_layer, scaling,
                              kwargs)
        if decoded is not None:
            return decoded, None

    batch, hq, q_len, head_dim = query.shape
    layout = _layout(query, key, attention_mask, kwargs)
    q = _pack(query, layout.q_keep)
    k = _pack(key, layout.k_keep)
    v = _pack(value, layout.k_keep)
    if gates is None:
        g = q.new_tensor(FALLBACK_GATES).expand(q.shape[0], hq, 3)
    else:
        g = gates.reshape(batch * q_len, hq, 3)
        g = g if layout.q_keep is None else g[layout.q_keep]

    cmp_k, cmp_v, cmp_counts = _compressed(k, v, layout, compressors, params, cache_layer)
    if static:
        ready = layout.per_row and layout.left_aligned
        left_pad = (key.shape[2] - layout.valid.sum(1)).to(torch.int32) if ready else None
        cache_layer.set_static_rows(left_pad, ready)
    device = q.device
    out = _nsa_varlen(
        q, k, v, cmp_k, cmp_v, g,
        _cu(layout.lens_q, device), _cu(layout.lens_k, device), _cu(cmp_counts, device),
        params, scaling, max(layout.lens_q, default=0), max(layout.lens_k, default=0),
    )
    if layout.q_keep is not None:
        full = out.new_zeros(batch * q_len, hq, out.shape[-1])
        full[layout.q_keep] = out
        out = full
    return out.view(batch, q_len, hq, -1), None


AttentionInterface.register("nsa", nsa_attention_forward)
AttentionMaskInterface.register("nsa", nsa_padding_mask)
