"""KV-block-outer ("block-centric") forward of NSA's selected-block attention (slc branch).

An alternative to the query-centric forward of :mod:`selected_attention` (``_fwd``), same inputs and
same outputs ``(o, lse)``, forward only. The query-centric kernel gives each program a set of query
rows and walks their selected blocks, so a block chosen by many tokens is read once per program that
chose it. Here the loop order is inverted (as Flash-Sparse-Attention does): each program owns one
selection block of one KV head and a chunk of the query tokens that chose it (the inverted index of
:func:`selected_attention._build_inverted_index`, also used by the dk/dv backward kernel), loads the
block's keys/values once and streams the tokens' query rows past them. It pays off when few query
heads share a KV head (GQA group 1, 2, 4), where the query-centric tiles have few rows per block.

Two kernels:

* **A, partials** (``_slc_kv_outer_partial_kernel``): for each (token, query head) row that chose the
  block, the block-local softmax statistics in the log2 domain: ``m`` (row max of the scaled
  scores), ``l = sum exp2(s - m)`` and the unnormalised ``o = sum exp2(s - m) v``, with the causal
  mask (key position <= the query's own key position). They are written to a partial buffer at
  ``(token, kv head, slot, group member)``, ``slot`` being the position of the block in the token's
  ascending list of usable blocks (``sel`` of :func:`selected_attention._packed_selection`), found in
  the kernel as the number of the token's blocks that start before this one.
* **B, merge** (``_slc_kv_outer_merge_kernel``): per token and KV head, the log-sum-exp merge of its
  ``scnt`` partials (exactly the slots A wrote, so the buffer needs no initialisation), written as
  ``o`` in q's dtype and the natural-log ``lse`` (``-inf`` where nothing is attended).

Memory: the partials take ``Nq * Hq * n * (Dv + 2) * 4`` bytes (fp32), e.g. ~17 GB at 64k tokens,
32 query heads, n = 16 blocks, Dv = 128. ``max_partial_bytes`` bounds it by processing the query
tokens in slices, each with its own inverted index over its tokens.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .selected_attention import (
    _BIG,
    _LOG2E,
    _build_inverted_index,
    _check_selected_inputs,
    _contiguous_heads,
    _dot_precision,
    _packed_selection,
    _pow2,
    _query_key_positions,
)

__all__ = ["selected_attention_fwd_kv_outer", "partial_bytes_per_token"]


@triton.jit
def _slc_kv_outer_partial_kernel(
    Q, K, V,
    PO, PM, PL,  # partials: fp32 (Nq, HKV, NSEL, G, DV), (Nq, HKV, NSEL, G), (Nq, HKV, NSEL, G)
    QKPOS,  # (Nq,) packed key index of each query's own position
    SEL,  # (Nq, HKV, NSEL) packed first key of each usable block, ascending, then _BIG padding
    TOKS, WORK_KEY, WORK_START, WORK_END, BLK_START, BLK_LEN,  # the inverted index
    NB, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, NSEL: tl.constexpr,
    TQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_SEL: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr, BIG: tl.constexpr,
):
    """Block-local softmax partials of one selection block (whole block as one key tile) for one
    chunk of the tokens that chose it, in row tiles of ``TQ`` tokens x ``G`` heads."""
    pid = tl.program_id(0)
    key = tl.load(WORK_KEY + pid)
    if key >= 0:
        h = key // NB
        blk = key % NB
        bstart = tl.load(BLK_START + blk)
        blen = tl.load(BLK_LEN + blk)
        w0 = tl.load(WORK_START + pid)
        w1 = tl.load(WORK_END + pid)
        cols = tl.arange(0, BLOCK_K)
        col_ok = cols < blen
        kpos = bstart + cols
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_sel = tl.arange(0, BLOCK_SEL)
        k = tl.load(
            K + kpos[:, None].to(tl.int64) * stride_kt + h * stride_kh + offs_d[None, :],
            mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0,
        )
        v = tl.load(
            V + kpos[:, None].to(tl.int64) * stride_vt + h * stride_vh + offs_dv[None, :],
            mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0,
        )
        rows = tl.arange(0, BLOCK_M)
        g = rows % G
        head = h * G + g
        for i in range(w0, w1, TQ):
            ent = i + rows // G
            row_ok = (rows < TQ * G) & (ent < w1)
            tok = tl.load(TOKS + ent, mask=row_ok, other=0).to(tl.int64)
            q = tl.load(
                Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0,
            )
            q_kpos = tl.load(QKPOS + tok, mask=row_ok, other=-1)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # (BLOCK_M, BLOCK_K)
            allowed = row_ok[:, None] & col_ok[None, :] & (kpos[None, :] <= q_kpos[:, None])
            s = tl.where(allowed, s, float("-inf"))
            # Finite floor: a row with no allowed key gets p = 0, l = 0 (and never NaN).
            m = tl.maximum(tl.max(s, axis=1), -1.0e30)
            p = tl.exp2(s - m[:, None])
            l_row = tl.sum(p, axis=1)
            o = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            # Slot of this block in the token's ascending selection: how many of its blocks start before.
            srow = (tok[:, None] * HKV + h) * NSEL + offs_sel[None, :]
            sel = tl.load(SEL + srow, mask=row_ok[:, None] & (offs_sel[None, :] < NSEL), other=BIG)
            slot = tl.sum((sel < bstart).to(tl.int32), axis=1)
            base = ((tok * HKV + h) * NSEL + slot) * G + g
            tl.store(PM + base, m, mask=row_ok)
            tl.store(PL + base, l_row, mask=row_ok)
            tl.store(PO + base[:, None] * DV + offs_dv[None, :], o, mask=row_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _slc_kv_outer_merge_kernel(
    PO, PM, PL, SCNT, O, LSE,
    Nq, stride_ot, stride_oh,
    HKV: tl.constexpr, G: tl.constexpr, DV: tl.constexpr, NSEL: tl.constexpr,
    TB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Log-sum-exp merge of the partials of ``TB`` tokens x the ``G`` heads of one KV head."""
    tile = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    rows = tl.arange(0, BLOCK_R)
    tok = tile * TB + rows // G
    g = rows % G
    row_ok = (rows < TB * G) & (tok < Nq)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    cnt = tl.load(SCNT + tok * HKV + h, mask=row_ok, other=0)
    m_i = tl.full([BLOCK_R], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    for s in range(tl.max(cnt, axis=0)):
        ok = row_ok & (s < cnt)
        base = ((tok * HKV + h) * NSEL + s) * G + g
        m_s = tl.load(PM + base, mask=ok, other=-1.0e30)
        l_s = tl.load(PL + base, mask=ok, other=0.0)
        o_s = tl.load(PO + base[:, None] * DV + offs_dv[None, :], mask=ok[:, None] & dv_ok[None, :], other=0.0)
        m_new = tl.maximum(m_i, m_s)
        alpha = tl.exp2(m_i - m_new)
        beta = tl.exp2(m_s - m_new)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + o_s * beta[:, None]
        m_i = m_new
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    head = h * G + g
    tl.store(
        O + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_dv[None, :],
        out.to(O.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :],
    )
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(LSE + tok * (HKV * G) + head, lse, mask=row_ok)


def partial_bytes_per_token(hq: int, nsel: int, dv: int) -> int:
    """Bytes of fp32 partials (o, m, l) one query token needs: ``Hq * n * (Dv + 2) * 4``."""
    return hq * nsel * (dv + 2) * 4


def selected_attention_fwd_kv_outer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    slc_block: int,
    scale: float | None = None,
    *,
    max_partial_bytes: int | None = None,
    chunk_tokens: int = 256,
    block_rows: int = 64,
    merge_rows: int = 32,
    num_warps: int = 4,
    num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NSA selected-block attention forward with a KV-block-outer loop (Triton, no autograd).

    Same arguments and semantics as :func:`selected_attention.selected_attention`:

    Args:
        q: ``(Nq, Hq, D)`` queries; k: ``(Nk, Hkv, D)``; v: ``(Nk, Hkv, Dv)``; one dtype among
            bfloat16, float16, float32. ``Hq`` is any multiple of ``Hkv``.
        block_indices: int32 ``(Nq, Hkv, n)``: for each query and KV head, the selected block
            indices (block ``j`` = key positions ``[j*slc_block, (j+1)*slc_block)`` of the sequence),
            distinct, ``-1`` for unused slots. Blocks starting after the query are ignored.
        cu_seqlens_q, cu_seqlens_k: int32 ``(B+1,)`` offsets; sequence ``b``'s queries are the last
            ``Tq`` of its ``Tk`` key positions.
        slc_block: tokens per selection block (>= 1); the whole block is one key tile of
            ``next_power_of_2(slc_block)`` (>= 16) keys, so keep it moderate (<= 128).
        scale: softmax scale, ``D ** -0.5`` by default.
        max_partial_bytes: bound on the fp32 partial buffer (``Nq * Hq * n * (Dv + 2) * 4`` bytes
            without it, see :func:`partial_bytes_per_token`): the query tokens are then processed in
            slices of at most ``max_partial_bytes // partial_bytes_per_token(...)`` tokens (at least
            one), each with its own inverted index. ``None``: one slice.
        chunk_tokens: query tokens of one block per program of the partial kernel.
        block_rows: query rows (tokens x the ``G`` heads of the KV head) per step of that kernel.
        merge_rows: rows (tokens x ``G`` heads) per program of the merge kernel.
        num_warps, num_stages: Triton launch options of the partial kernel.

    Returns:
        ``(o, lse)``, as ``selected_attention._fwd``: ``o (Nq, Hq, Dv)`` in q's dtype (zeros for a
        query with no usable key) and the natural-log ``lse (Nq, Hq)`` in fp32 (``-inf`` there).
        The index preparation (torch sorts) never copies to the host.
    """
    scale = _check_selected_inputs(q, k, v, block_indices, cu_seqlens_q, cu_seqlens_k, slc_block, scale)
    q, k, v = (_contiguous_heads(x) for x in (q, k, v))
    block_indices = block_indices.contiguous()
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    nq, hq, d = q.shape
    nk, hkv, dv = v.shape
    group = hq // hkv
    nsel = block_indices.shape[-1]
    o = torch.empty(nq, hq, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(nq, hq, device=q.device, dtype=torch.float32)
    if nq == 0:
        return o, lse
    _, q_kpos, k_start = _query_key_positions(cu_seqlens_q, cu_seqlens_k, nq)
    sel, scnt = _packed_selection(block_indices, q_kpos, k_start, slc_block)
    per_tok = partial_bytes_per_token(hq, nsel, dv)
    n_slice = nq if max_partial_bytes is None else max(1, min(nq, int(max_partial_bytes) // per_tok))
    po = torch.empty(n_slice, hkv, nsel, group, dv, device=q.device, dtype=torch.float32)
    pm = torch.empty(n_slice, hkv, nsel, group, device=q.device, dtype=torch.float32)
    pl = torch.empty_like(pm)
    tq = max(1, block_rows // group)
    tb = max(1, merge_rows // group)
    for t0 in range(0, nq, n_slice):
        t1 = min(nq, t0 + n_slice)
        sel_s = sel[t0:t1]
        toks, wkey, wstart, wend, blk_start, blk_len, nb = _build_inverted_index(
            sel_s, cu_seqlens_k, nk, slc_block, chunk_tokens
        )
        q_s = q[t0:t1]
        _slc_kv_outer_partial_kernel[(wkey.shape[0],)](
            q_s, k, v, po, pm, pl, q_kpos[t0:t1], sel_s, toks, wkey, wstart, wend, blk_start, blk_len,
            nb, scale * _LOG2E,
            q_s.stride(0), q_s.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            HKV=hkv, G=group, D=d, DV=dv, NSEL=nsel, TQ=tq, BLOCK_M=_pow2(tq * group),
            BLOCK_K=_pow2(slc_block), BLOCK_SEL=_pow2(nsel, 2), BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv),
            DOT_PREC=_dot_precision(q.dtype), BIG=_BIG, num_warps=num_warps, num_stages=num_stages,
        )
        o_s = o[t0:t1]
        _slc_kv_outer_merge_kernel[(triton.cdiv(t1 - t0, tb), hkv)](
            po, pm, pl, scnt[t0:t1], o_s, lse[t0:t1],
            t1 - t0, o_s.stride(0), o_s.stride(1),
            HKV=hkv, G=group, DV=dv, NSEL=nsel, TB=tb, BLOCK_R=_pow2(tb * group, 2), BLOCK_DV=_pow2(dv, 2),
            num_warps=4,
        )
    return o, lse
