"""Decoding steps through the Triton decode kernels, reading HF's cache in place (no packing).

:func:`nsa_kernels.decode.nsa_decode` reads HF's ``(B, Hkv, S, D)`` dense cache and the cache layer's
``(B, Hkv, capacity, D)`` compressed keys/values. A step takes this path (:func:`try_decode`) when

* the decode kernels are enabled (:func:`.backends.decode_enabled`: ``"auto"`` on CUDA, or ``"triton"``);
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
the first layer and kept on the mask tensor, which every layer of the forward receives).

On an :class:`~.cache.NSAStaticCacheLayer`, :func:`try_static_decode` runs the step with no host work at
all and no data-dependent Python branch: the cache state it relies on is Python attributes (guards for
``torch.compile``) and fixed-size tensors updated in place. The attention itself is one
``nsa_kernels::decode`` custom op: the Triton decode kernels on CUDA, the batched PyTorch reference elsewhere
(:func:`.backends.static_decode_impl`; ``"auto"`` also on a CPU, unlike the dynamic path). So the step can be
captured in a CUDA graph, compiled with ``torch.compile(fullgraph=True)`` (``generate()``'s automatic
compilation of decoding steps on a static cache) and exported with ``torch.export``.

On a plain transformers ``StaticLayer`` (no compressed state: transformers' export recipes build one) with no
padding mask, :func:`try_plain_static_decode` compresses every complete block of the dense keys at each
step and calls the same op: graph-safe too, at ``O(max_cache_len)`` compression work per step.
"""
from __future__ import annotations

import dataclasses

import torch

from nsa_kernels import NSAParams, num_cmp_blocks
from nsa_kernels.reference import nsa_decode_reference

from .backends import decode_enabled, decode_module, decode_ops, static_decode_impl
from .cache import NSAStaticCacheLayer

__all__ = ["MAX_DECODE_QUERIES", "try_decode", "try_plain_static_decode", "try_static_decode"]

MAX_DECODE_QUERIES = 16
"""Largest query length (new tokens per row) handled by the decode kernels; longer steps (prefill,
long chunks) take the varlen training kernels."""


@dataclasses.dataclass
class _DecodePlan:
    """What a decoding step needs, shared by all layers of one forward (they see the same mask object)."""

    shape: tuple  # (B, S, Q, cmp_block, cmp_stride, device)
    ok: bool  # left-aligned rows with at least Q real tokens each
    valid: torch.Tensor | None = None  # (B, S) bool, without a mask (with one: the mask, not kept here)
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
    """The plan of this step: one host sync with a padding mask (eligibility and the per-row lengths),
    built at the first layer and kept on the mask tensor for the others; none without a mask."""
    shape = (batch, kv_len, q_len, params.cmp_block, params.cmp_stride, device)
    plan = getattr(attention_mask, "_nsa_decode_plan", None)
    if plan is not None and plan.shape == shape:
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
    plan = _DecodePlan(shape, ok)
    if attention_mask is not None:
        attention_mask._nsa_decode_plan = plan
    if not ok:
        return plan
    n_new, slots, gather = _candidate_blocks(kv_len - k_len, k_len, q_len, kv_len, params)
    j = slots.shape[1]
    cmp_counts = [num_cmp_blocks(n, l, d) for n in k_lens]
    # The plan is kept on the mask: it must not refer back to it (a cycle through the tensor's attributes).
    plan.valid = valid if attention_mask is None else None
    plan.k_lens, plan.cmp_counts = k_lens, cmp_counts
    plan.k_len = k_len.to(torch.int32)
    plan.k_start = (kv_len - k_len).to(torch.int32)
    plan.cmp_len = n_new.to(torch.int32)
    plan.cmp_start = torch.zeros(batch, dtype=torch.int32, device=device)
    plan.new_blocks = any(c != num_cmp_blocks(n - q_len, l, d) for c, n in zip(cmp_counts, k_lens))
    plan.slots, plan.gather = slots, gather
    plan.capacity = num_cmp_blocks(kv_len, l, d) + j
    return plan


def _candidates(key, value, slots, gather, compressors, params):
    """A function computing the ``J`` candidate blocks of every row (those that may end among the new
    positions), ``(B, Hkv, J, D)`` keys and values, for the cache layer to store at their slots."""

    def compress():
        cmp_k_fn, cmp_v_fn = compressors
        batch, hkv, _, _ = key.shape
        l = params.cmp_block
        j = slots.shape[1]
        idx = gather[:, None, :, None]

        def blocks(x):
            g = x.gather(2, idx.expand(batch, hkv, j * l, x.shape[-1]))  # (B, Hkv, J*l, D)
            return g.view(batch, hkv, j, l, x.shape[-1]).transpose(1, 2).reshape(batch * j, hkv, l, x.shape[-1])

        ck = cmp_k_fn(blocks(key)).view(batch, j, hkv, -1).transpose(1, 2)
        cv = cmp_v_fn(blocks(value)).view(batch, j, hkv, -1).transpose(1, 2)
        return ck.to(key.dtype), cv.to(value.dtype)

    return compress


def try_decode(query, key, value, attention_mask, gates, compressors, params, cache_layer, scaling, config, kwargs):
    """The decode path on a dynamic cache (see the module docstring): ``(B, Q, Hq, D)``, or ``None`` when
    this step is not one. ``gates`` ``(B, Q, Hq, 3)`` (already filled in for models without gates)."""
    batch, hq, q_len, _ = query.shape
    kv_len = key.shape[2]
    if (
        cache_layer is None
        or not 1 <= q_len <= MAX_DECODE_QUERIES
        or kv_len <= q_len  # no cached past: a prefill
        or kwargs.get("cu_seq_lens_q") is not None
        or kwargs.get("cu_seq_lens_k") is not None
        or (attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape != (batch, kv_len)))
        or not decode_enabled(config, query.device)
    ):
        return None
    plan = _decode_plan(attention_mask, batch, kv_len, q_len, params, query.device)
    if not plan.ok:
        return None
    compress = _candidates(key, value, plan.slots, plan.gather, compressors, params) if plan.new_blocks else None
    valid = plan.valid if attention_mask is None else attention_mask.to(torch.bool)
    stored = cache_layer.decode_compressed(
        valid, q_len, plan.k_lens, plan.cmp_len, plan.cmp_counts, plan.slots, plan.capacity, compress,
        params.cmp_block, params.cmp_stride,
    )
    if stored is None:
        return None  # no (or a stale) compressed state: the varlen path rebuilds it
    sc = max(1, num_cmp_blocks(kv_len, params.cmp_block, params.cmp_stride))
    return _nsa_decode(
        query.transpose(1, 2), key, value, stored[0][:, :, :sc], stored[1][:, :, :sc], gates,
        plan.k_start, plan.k_len, plan.cmp_start, plan.cmp_len, params, scaling,
    )


def try_static_decode(query, key, value, gates, compressors, params, cache_layer, scaling, config, kwargs):
    """A decoding step on an :class:`~.cache.NSAStaticCacheLayer` with no host synchronisation (so it can
    be captured in a CUDA graph), or ``None`` when the step is not one (then the varlen path runs).

    Row ``b`` is ``[left_pad[b], cumulative_length)`` of the cache, as recorded by the last varlen step
    (``static_ready``: rows were left-aligned); the attention mask is not read. Every step compresses the
    ``ceil(Q / d)`` candidate blocks that may end among the new positions and writes them at their slots;
    ``cmp_len`` is recomputed from the length, so the state also survives ``crop``."""
    batch, hq, q_len, _ = query.shape
    impl = static_decode_impl(config, query.device)
    if (
        impl is None
        or not isinstance(cache_layer, NSAStaticCacheLayer)
        or not cache_layer.static_ready
        or not 1 <= q_len <= min(MAX_DECODE_QUERIES, cache_layer.max_decode_queries)
        or kwargs.get("cu_seq_lens_q") is not None
        or kwargs.get("cu_seq_lens_k") is not None
        or (cache_layer.cmp_block, cache_layer.cmp_stride) != (params.cmp_block, params.cmp_stride)
        or cache_layer.left_pad is None
        or cache_layer.left_pad.shape[0] != batch
        or cache_layer.cmp_k is None
    ):
        return None
    k_start = cache_layer.left_pad
    k_len = (cache_layer.cumulative_length.to(query.device) - k_start).to(torch.int32)
    n_new, slots, gather = _candidate_blocks(k_start, k_len, q_len, key.shape[2], params)
    cmp_k, cmp_v, cmp_len = cache_layer.static_decode_compressed(
        slots, n_new, _candidates(key, value, slots, gather, compressors, params))
    return _graph_safe_decode(impl, query.transpose(1, 2), key, value, cmp_k, cmp_v, gates, k_start, k_len,
                              torch.zeros_like(k_start), cmp_len, params, scaling)


def try_plain_static_decode(query, key, value, attention_mask, gates, compressors, params, layer, scaling, config,
                            kwargs):
    """A decoding step on a plain transformers :class:`~transformers.StaticLayer` (no compressed state, e.g.
    the ``StaticCache`` of transformers' ``TorchExportableModuleWithStaticCache``) with no padding mask: every
    row is positions ``[0, cumulative_length)``, and every complete compression block of the dense keys is
    compressed at each step (``O(max_cache_len)`` work, no state). Graph-safe like :func:`try_static_decode`;
    ``None`` when the step is not one (a padding mask, more than ``MAX_DECODE_QUERIES`` tokens, packed
    sequences, the decode backend off)."""
    batch, hq, q_len, _ = query.shape
    impl = static_decode_impl(config, query.device)
    if (
        impl is None
        or attention_mask is not None
        or not 1 <= q_len <= MAX_DECODE_QUERIES
        or kwargs.get("cu_seq_lens_q") is not None
        or kwargs.get("cu_seq_lens_k") is not None
    ):
        return None
    slots = key.shape[2]
    l, d = params.cmp_block, params.cmp_stride
    n_blocks = max(1, num_cmp_blocks(slots, l, d))
    gather = (torch.arange(n_blocks, device=key.device)[:, None] * d + torch.arange(l, device=key.device))
    gather = gather.clamp_(max=slots - 1).reshape(1, n_blocks * l).expand(batch, -1)
    slot_ids = torch.zeros(batch, n_blocks, dtype=torch.long, device=key.device)  # only the count matters here
    cmp_k, cmp_v = _candidates(key, value, slot_ids, gather, compressors, params)()
    k_len = layer.cumulative_length.to(query.device).reshape(1).expand(batch).to(torch.int32)
    zeros = torch.zeros_like(k_len)
    return _graph_safe_decode(impl, query.transpose(1, 2), key, value, cmp_k, cmp_v, gates, zeros, k_len, zeros,
                              _device_cmp_blocks(k_len, l, d), params, scaling)


def _graph_safe_decode(impl, *args):
    """The static steps' attention: the ``nsa_kernels::decode`` op (the Triton kernels when ``impl`` is
    ``"triton"``, else the batched reference), or, without triton (Hub remote code without nsa-hf), the
    reference traced op by op. ``args`` as for :func:`nsa_kernels.decode.nsa_decode`."""
    ops = decode_ops()
    if ops is None:
        return nsa_decode_reference(*args)
    return ops.nsa_decode_op(*args, use_triton=impl == "triton")


def _nsa_decode(q, k, v, cmp_k, cmp_v, gates, k_start, k_len, cmp_start, cmp_len, params, scale):
    """The decode kernels, called directly on the dynamic path (lengths consistent by construction: no
    host-side check)."""
    return decode_module().nsa_decode(q, k, v, cmp_k, cmp_v, gates, k_start, k_len, cmp_start, cmp_len, params,
                                      scale, check_lengths=False)
