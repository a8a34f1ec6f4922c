"""From HF's padded batch to NSA's packed ("varlen") layout and back, and the compression of packed keys.

HF passes ``query (B, Hq, Q, D)`` and ``key/value (B, Hkv, KV, D)`` (cached past included). NSA runs on
packed sequences, tokens first, one sequence per

* batch row, made of the row's real tokens: padding (left, right or anywhere) is dropped, so a row
  starts at its first real token and its compression and selection blocks are aligned to that start;
  outputs at padded query positions are zeros;
* document of a packed row: ``cu_seq_lens_q/k`` kwargs (batch of one, e.g. from
  ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``), or, without a padding mask and with no
  cached past, ``position_ids`` that restart (any batch size).

:func:`unpad_input` builds the :class:`Layout` and packs; :func:`pad_output` puts the packed output back.
Both need the sequence lengths on the host (one device-to-host copy per forward with a padding mask or
``cu_seq_lens``, shared by the layers through the tensors they all receive).

While ``torch.compile`` traces, :func:`static_unpad_input` / :func:`static_pad_output` replace them: rows
whose real tokens are one contiguous run (no padding, left or right padding) are rolled so that each
starts at position 0, and NSA runs on equal-length rows (every shape static, no host copy).
"""
from __future__ import annotations

import dataclasses
import weakref

import torch

from nsa_kernels import NSAParams, num_cmp_blocks

__all__ = ["Layout", "compress_packed", "cu_seqlens", "pad_output", "restart_lengths", "static_pad_output",
           "static_unpad_input", "unpad_input"]


@dataclasses.dataclass
class Layout:
    """How HF's padded batch maps onto NSA's packed sequences."""

    q_keep: torch.Tensor | None  # (B*Q,) bool: query positions that are real tokens; None = all
    k_keep: torch.Tensor | None  # (B*KV,) bool: key positions that are real tokens; None = all
    lens_q: list[int]  # queries per sequence, in packed order
    lens_k: list[int]  # keys per sequence
    per_row: bool  # one sequence per batch row (the cache's compressed state applies)
    valid: torch.Tensor | None  # (B, KV) real-token mask when per_row
    left_aligned: bool = False  # per_row and every row is padding then real tokens


def restart_lengths(position_ids: torch.Tensor, batch: int, length: int) -> list[int] | None:
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


def _host_offsets(cu_q: torch.Tensor, cu_k: torch.Tensor) -> tuple[list[int], list[int]]:
    """``cu_seq_lens_q/k`` as host lists: one device-to-host copy per forward, not per layer (every
    layer of a forward gets the same tensor objects: the lists are kept on ``cu_q``, with a weak reference
    to ``cu_k``, never a strong one: no cycle through the tensors' attributes)."""
    memo = getattr(cu_q, "_nsa_host_offsets", None)
    if memo is not None and memo[0]() is cu_k:
        return memo[1], memo[2]
    both = torch.cat([cu_q.reshape(-1), cu_k.reshape(-1)]).tolist()
    bq, bk = both[: cu_q.numel()], both[cu_q.numel():]
    cu_q._nsa_host_offsets = (weakref.ref(cu_k), bq, bk)
    return bq, bk


def _layout(batch: int, q_len: int, kv_len: int, device, attention_mask, kwargs) -> Layout:
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
        return Layout(None, None, lens_q, lens_k, per_row=False, valid=None)
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
        return Layout(
            q_valid.reshape(-1), valid.reshape(-1), sums[:batch], sums[batch:2 * batch],
            per_row=True, valid=valid, left_aligned=bool(sums[-1]),
        )
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and q_len == kv_len:
        lens = restart_lengths(position_ids, batch, q_len)
        if lens is not None:
            return Layout(None, None, lens, lens, per_row=False, valid=None)
    valid = torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    return Layout(None, None, [q_len] * batch, [kv_len] * batch, per_row=True, valid=valid, left_aligned=True)


def _pack(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``(B, H, T, D)`` -> ``(N, H, D)`` tokens in row-major order, only those in ``keep``."""
    x = x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])
    return x if keep is None else x[keep]


def unpad_input(query, key, value, gates, attention_mask, kwargs):
    """Pack a padded batch (see the module docstring).

    Args:
        query: ``(B, Hq, Q, D)``; key, value: ``(B, Hkv, KV, D)``; gates: ``(B, Q, Hq, 3)`` or ``None``.
        attention_mask: ``(B, KV)`` bool padding mask or ``None``.
        kwargs: the backend's keyword arguments (``cu_seq_lens_q/k``, ``position_ids``).

    Returns:
        ``(q, k, v, gates, layout)``: ``(Nq, Hq, D)``, ``(Nk, Hkv, D)`` twice, ``(Nq, Hq, 3)`` or ``None``,
        and the :class:`Layout`.
    """
    batch, hq, q_len, _ = query.shape
    layout = _layout(batch, q_len, key.shape[2], key.device, attention_mask, kwargs)
    q = _pack(query, layout.q_keep)
    k = _pack(key, layout.k_keep)
    v = _pack(value, layout.k_keep)
    if gates is not None:
        gates = gates.reshape(batch * q_len, hq, 3)
        gates = gates if layout.q_keep is None else gates[layout.q_keep]
    return q, k, v, gates, layout


def pad_output(out: torch.Tensor, layout: Layout, batch: int, q_len: int) -> torch.Tensor:
    """``(Nq, Hq, Dv)`` packed output -> ``(B, Q, Hq, Dv)``, zeros at padded query positions."""
    if layout.q_keep is not None:
        full = out.new_zeros(batch * q_len, out.shape[1], out.shape[-1])
        full[layout.q_keep] = out
        out = full
    return out.view(batch, q_len, out.shape[1], -1)


def cu_seqlens(lengths: list[int], device) -> torch.Tensor:
    """``(len(lengths) + 1,)`` int32 offsets of sequences of host-side ``lengths``."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return out.to(device)


def _needs_grad(modules) -> bool:
    return torch.is_grad_enabled() and any(
        p.requires_grad for m in modules if isinstance(m, torch.nn.Module) for p in m.parameters()
    )


def compress_packed(k, v, lens_k: list[int], first: list[int], compressors, params: NSAParams):
    """Compress blocks ``first[s]`` .. last complete of each packed sequence ``s`` (lengths ``lens_k``).

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
        return ([k.new_empty(0, k.shape[1], k.shape[2])] * len(lens_k),
                [v.new_empty(0, v.shape[1], v.shape[2])] * len(lens_k))
    # When training, the compressors run even on zero blocks: their parameters then stay in the autograd
    # graph (zero gradients), which FSDP and DDP need on every rank; a rank whose batch is too short to
    # compress must not skip the gradient reduction of these parameters (it hangs).
    first_tokens = torch.cat(starts) if starts else torch.zeros(0, dtype=torch.long, device=k.device)
    idx = first_tokens[:, None] + torch.arange(l, device=k.device)  # (n_blocks, l)
    ck = cmp_k_fn(k[idx].transpose(1, 2))  # (n_blocks, Hkv, l, D) -> (n_blocks, Hkv, D)
    cv = cmp_v_fn(v[idx].transpose(1, 2))
    return list(ck.split(counts)), list(cv.split(counts))


# -- static shapes (torch.compile) ----------------------------------------------------------------------


def _roll(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, T, ...)`` with row ``b`` read at positions ``index[b]`` ``(B, T)``."""
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(x.shape))


def static_unpad_input(query, key, value, gates, attention_mask, kwargs):
    """The static-shape counterpart of :func:`unpad_input`, for ``torch.compile``: no host synchronisation,
    every shape a function of the input shapes.

    It covers a call with no cached past (``Q == KV``) whose rows each hold one contiguous run of real
    tokens (no padding, left or right padding). Each row is rolled so that its run starts at position 0,
    which leaves the padding at the end: under causal attention, trailing padding changes no output at
    a real position (its blocks complete only after the last real token), so every row is a sequence of
    ``T`` tokens. Anything else raises ``ValueError`` while tracing (packed ``cu_seq_lens``, a cached
    past) or fails a runtime check (a padding mask with holes, restarting ``position_ids``).

    Returns:
        ``(q, k, v, gates, shift)``: ``(B, T, Hq, D)``, ``(B, T, Hkv, D)`` twice, ``(B, T, Hq, 3)``, and
        ``(shift, valid)`` for :func:`static_pad_output` (``None`` without a mask).
    """
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        raise ValueError("packed documents given by cu_seq_lens_q/k need host-side lengths and do not compile "
                         "with fullgraph=True; run the model eagerly, or compile without fullgraph")
    if q_len != kv_len:
        raise ValueError(f"under torch.compile the nsa backend runs calls with no cached past only (got {q_len} "
                         f"queries over {kv_len} keys); decode eagerly, or pass use_cache=False")
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    if attention_mask is None:
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and position_ids.shape[-1] == q_len and q_len > 1:
            pos = position_ids.expand(batch, -1)
            torch._assert_async((pos[:, 1:] == pos[:, :-1] + 1).all(),
                                "nsa: position_ids that restart (packed documents) do not compile; run eagerly")
        return q, k, v, gates, None
    if attention_mask.dim() != 2 or attention_mask.shape != (batch, kv_len):
        raise ValueError(
            f"the nsa backend takes a 2D padding mask of shape (batch, keys) = {(batch, kv_len)}; got "
            f"{tuple(attention_mask.shape)} (4D/custom masks are not supported)"
        )
    valid = attention_mask.to(torch.bool)
    first = valid.int().argmax(1)  # first real token (0 for an empty row)
    last = kv_len - 1 - valid.flip(1).int().argmax(1)
    runs = (valid.sum(1) == (last - first + 1)) | ~valid.any(1)
    torch._assert_async(runs.all(), "nsa: under torch.compile every row's real tokens must be one contiguous run "
                                    "(no padding, left or right padding); run eagerly")
    index = (torch.arange(kv_len, device=valid.device) + first[:, None]) % kv_len
    q, k, v, gates = (_roll(x, index) for x in (q, k, v, gates))
    return q, k, v, gates, (first, valid)


def static_pad_output(out: torch.Tensor, shift) -> torch.Tensor:
    """``(B, T, Hq, Dv)`` output of rolled rows -> HF's positions, zeros at padded positions."""
    if shift is None:
        return out
    first, valid = shift
    length = out.shape[1]
    index = (torch.arange(length, device=out.device) - first[:, None]) % length
    return torch.where(valid[:, :, None, None], _roll(out, index), 0.0)
