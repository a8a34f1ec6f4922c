"""Triton kernels for NSA's selected-block attention ("slc" branch), forward and backward.

Layout and semantics are those of :mod:`reference` (packed varlen tensors, tokens first, GQA): query
``i`` at position ``t`` of its sequence, query head ``h``, attends to the keys ``s <= t`` of the
selection blocks listed in ``block_indices[i, h // G]`` (block ``j`` = key positions
``[j*slc_block, (j+1)*slc_block)``, ``-1`` = unused slot).

Design (NSA paper, Section 3.3, plus sharing between neighbouring tokens):

* **forward / dq** are query-centric and group-centric: one program owns ``TOK`` consecutive query
  tokens and one KV head, i.e. ``TOK * G`` query rows (the M side of every dot, padded to a power of
  two >= 16). It walks the *union* of the blocks selected by its tokens (built by a small index kernel, ``_prepare``),
  loading each block's keys/values once for all its rows; rows whose token did not select the block
  are masked. ``TOK = 1`` is the paper's kernel; ``TOK > 1`` fills the tile when ``G`` is small.
* **dk / dv** are KV-block-centric: an inverted index (a stable counting sort of the selections by
  block, two small kernels and a cumsum, ``_build_inverted_index``) lists the query tokens that chose
  each block; one program owns one key tile of one block and a chunk of those tokens, accumulates
  dk/dv in registers and adds them (fp32 atomics) to the output once.
* ``delta = rowsum(o * do)`` is computed inside the dq kernel (it loads ``do`` anyway), which runs
  before the dk/dv kernel.

Every kernel works in global ("packed") key coordinates: a selected block is represented by the
packed index of its first key, so tiles may mix tokens of different sequences.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .primitives import BIG, LOG2E, bitonic_sort, dot_precision, load_rows, pow2, softmax_step, store_o_lse


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _slc_fwd_rows(
    Q, K, V, O, LSE, QKPOS, SEL, LIST, count, tok, head, row_ok, h, Nk, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    SLC_BLOCK: tl.constexpr, NSEL: tl.constexpr, MEMBER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, NSUB: tl.constexpr, BLOCK_SEL: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Attention of one set of query rows (``tok``/``head``, ``BLOCK_M`` long) over the ``count``
    blocks listed at ``LIST`` (packed first keys). With ``MEMBER`` the rows belong to several tokens
    and each row only keeps the blocks of its own token (looked up in ``SEL``)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_rows(Q, tok, head, row_ok, stride_qt, stride_qh, D, BLOCK_D)
    q_kpos = tl.load(QKPOS + tok, mask=row_ok, other=-1)
    # No key after the rows' last position is loaded: the rows belong to one document, so keys of the
    # next one (which a block at the document's end would reach) never enter a dot, where 0 * NaN = NaN.
    k_last = tl.max(q_kpos, axis=0)
    if MEMBER:
        offs_sel = tl.arange(0, BLOCK_SEL)
        sel = tl.load(
            SEL + (tok[:, None] * HKV + h) * NSEL + offs_sel[None, :],
            mask=row_ok[:, None] & (offs_sel[None, :] < NSEL), other=-2,
        )
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_K)
    for it in range(count * NSUB):
        slot = it // NSUB
        sub = it % NSUB
        start = tl.load(LIST + slot)
        in_blk = sub * BLOCK_K + cols
        kpos = start + in_blk
        col_ok = (in_blk < SLC_BLOCK) & (kpos <= k_last)
        k = tl.load(
            K + kpos[:, None].to(tl.int64) * stride_kt + h * stride_kh + offs_d[None, :],
            mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0,
        )
        v = tl.load(
            V + kpos[:, None].to(tl.int64) * stride_vt + h * stride_vh + offs_dv[None, :],
            mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        allowed = row_ok[:, None] & col_ok[None, :] & (kpos[None, :] <= q_kpos[:, None])
        if MEMBER:
            member = tl.sum((sel == start).to(tl.int32), axis=1) > 0
            allowed = allowed & member[:, None]
        s = tl.where(allowed, s, float("-inf"))
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, DOT_PREC)
    store_o_lse(O, LSE, tok, head, row_ok, stride_ot, stride_oh, HQ, acc, m_i, l_i, DV, BLOCK_DV, False)


@triton.jit
def _slc_fwd_kernel(
    Q, K, V, O, LSE,
    QKPOS,  # (Nq,) packed key index of each query's own position
    SEL, SCNT,  # (Nq, HKV, NSEL) packed first key of each usable block, ascending then padding; counts
    UNI, UCNT,  # (n_tiles, HKV, USZ) sorted union of a tile's blocks, (n_tiles, HKV) its length
    Nq, Nk, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    SLC_BLOCK: tl.constexpr, NSEL: tl.constexpr, USZ: tl.constexpr, TOK: tl.constexpr,
    UNION_PCT: tl.constexpr, PER_TOKEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_K: tl.constexpr, NSUB: tl.constexpr,
    BLOCK_SEL: tl.constexpr, BLOCK_TOK: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Work split: tiles of ``TOK`` consecutive query tokens x one KV head. A tile whose union of
    blocks is small (<= UNION_PCT % of its tokens' selections) is done by one ``PER_TOKEN=False``
    program whose ``TOK * G`` rows walk the union together (each block loaded once for all); the
    other tiles are done by ``PER_TOKEN=True`` programs (grid over tokens), each token's ``G`` rows
    walking its own blocks. Both launches evaluate the same test, so every token is done once."""
    h = tl.program_id(1)
    if PER_TOKEN:
        t = tl.program_id(0).to(tl.int64)
        tile = t // TOK
    else:
        tile = tl.program_id(0).to(tl.int64)
    ubase = (tile * HKV + h).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_TOK)
    ttok = (tile * TOK + offs_t).to(tl.int64)
    total = tl.sum(tl.load(SCNT + ttok * HKV + h, mask=(offs_t < TOK) & (ttok < Nq), other=0), axis=0)
    ucount = tl.load(UCNT + ubase)
    use_union = (ucount * 100 <= total * UNION_PCT) & (total > 0) & (TOK > 1)
    if PER_TOKEN:
        if use_union == 0:
            rows1 = tl.arange(0, BLOCK_M1)
            cnt = tl.load(SCNT + t * HKV + h)
            _slc_fwd_rows(
                Q, K, V, O, LSE, QKPOS, SEL, SEL + (t * HKV + h) * NSEL, cnt, t + rows1 * 0, h * G + rows1,
                rows1 < G, h, Nk, scale_log2,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                HKV * G, HKV, D, DV, SLC_BLOCK, NSEL, False, BLOCK_M1, BLOCK_K, NSUB, BLOCK_SEL, BLOCK_D,
                BLOCK_DV, DOT_PREC,
            )
    elif use_union:
        rows = tl.arange(0, BLOCK_M)
        tok = tile * TOK + rows // G
        row_ok = (rows < TOK * G) & (tok < Nq)
        _slc_fwd_rows(
            Q, K, V, O, LSE, QKPOS, SEL, UNI + ubase * USZ, ucount, tok, h * G + rows % G, row_ok, h, Nk, scale_log2,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
            HKV * G, HKV, D, DV, SLC_BLOCK, NSEL, True, BLOCK_M, BLOCK_K, NSUB, BLOCK_SEL, BLOCK_D, BLOCK_DV, DOT_PREC,
        )


@triton.jit
def _slc_dq_rows(
    Q, K, V, O, DO, LSE, DELTA, DQ, QKPOS, SEL, LIST, count, tok, head, row_ok, h, Nk, scale, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_dot, stride_doh, stride_dqt, stride_dqh,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    SLC_BLOCK: tl.constexpr, NSEL: tl.constexpr, MEMBER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, NSUB: tl.constexpr, BLOCK_SEL: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dq (and ``delta = rowsum(o * do)``) of one set of query rows over the blocks at ``LIST``."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    dmask = row_ok[:, None] & (offs_d[None, :] < D)
    dvmask = row_ok[:, None] & (offs_dv[None, :] < DV)
    q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=dmask, other=0.0)
    do = tl.load(DO + tok[:, None] * stride_dot + head[:, None] * stride_doh + offs_dv[None, :], mask=dvmask, other=0.0)
    o = tl.load(O + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_dv[None, :], mask=dvmask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + tok * HQ + head, delta, mask=row_ok)
    lse2 = tl.load(LSE + tok * HQ + head, mask=row_ok, other=0.0) * 1.4426950408889634
    q_kpos = tl.load(QKPOS + tok, mask=row_ok, other=-1)
    # No key after the rows' last position is loaded: the rows belong to one document, so keys of the
    # next one (which a block at the document's end would reach) never enter a dot, where 0 * NaN = NaN.
    k_last = tl.max(q_kpos, axis=0)
    if MEMBER:
        offs_sel = tl.arange(0, BLOCK_SEL)
        sel = tl.load(
            SEL + (tok[:, None] * HKV + h) * NSEL + offs_sel[None, :],
            mask=row_ok[:, None] & (offs_sel[None, :] < NSEL), other=-2,
        )
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_K)
    for it in range(count * NSUB):
        slot = it // NSUB
        sub = it % NSUB
        start = tl.load(LIST + slot)
        in_blk = sub * BLOCK_K + cols
        kpos = start + in_blk
        col_ok = (in_blk < SLC_BLOCK) & (kpos <= k_last)
        k = tl.load(
            K + kpos[:, None].to(tl.int64) * stride_kt + h * stride_kh + offs_d[None, :],
            mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0,
        )
        v = tl.load(
            V + kpos[:, None].to(tl.int64) * stride_vt + h * stride_vh + offs_dv[None, :],
            mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        allowed = row_ok[:, None] & col_ok[None, :] & (kpos[None, :] <= q_kpos[:, None])
        if MEMBER:
            member = tl.sum((sel == start).to(tl.int32), axis=1) > 0
            allowed = allowed & member[:, None]
        p = tl.where(allowed, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    tl.store(
        DQ + tok[:, None] * stride_dqt + head[:, None] * stride_dqh + offs_d[None, :],
        (dq * scale).to(DQ.dtype.element_ty), mask=dmask,
    )


@triton.jit
def _slc_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ,
    QKPOS, SEL, SCNT, UNI, UCNT,
    Nq, Nk, scale, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_dot, stride_doh, stride_dqt, stride_dqh,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    SLC_BLOCK: tl.constexpr, NSEL: tl.constexpr, USZ: tl.constexpr, TOK: tl.constexpr,
    UNION_PCT: tl.constexpr, PER_TOKEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_K: tl.constexpr, NSUB: tl.constexpr,
    BLOCK_SEL: tl.constexpr, BLOCK_TOK: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dq (and ``delta``) with the forward's work split (two launches, see ``_slc_fwd_kernel``)."""
    h = tl.program_id(1)
    if PER_TOKEN:
        t = tl.program_id(0).to(tl.int64)
        tile = t // TOK
    else:
        tile = tl.program_id(0).to(tl.int64)
    ubase = (tile * HKV + h).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_TOK)
    ttok = (tile * TOK + offs_t).to(tl.int64)
    total = tl.sum(tl.load(SCNT + ttok * HKV + h, mask=(offs_t < TOK) & (ttok < Nq), other=0), axis=0)
    ucount = tl.load(UCNT + ubase)
    use_union = (ucount * 100 <= total * UNION_PCT) & (total > 0) & (TOK > 1)
    if PER_TOKEN:
        if use_union == 0:
            rows1 = tl.arange(0, BLOCK_M1)
            cnt = tl.load(SCNT + t * HKV + h)
            _slc_dq_rows(
                Q, K, V, O, DO, LSE, DELTA, DQ, QKPOS, SEL, SEL + (t * HKV + h) * NSEL, cnt, t + rows1 * 0,
                h * G + rows1, rows1 < G, h, Nk, scale, scale_log2,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                stride_ot, stride_oh, stride_dot, stride_doh, stride_dqt, stride_dqh,
                HKV * G, HKV, D, DV, SLC_BLOCK, NSEL, False, BLOCK_M1, BLOCK_K, NSUB, BLOCK_SEL, BLOCK_D,
                BLOCK_DV, DOT_PREC,
            )
    elif use_union:
        rows = tl.arange(0, BLOCK_M)
        tok = tile * TOK + rows // G
        row_ok = (rows < TOK * G) & (tok < Nq)
        _slc_dq_rows(
            Q, K, V, O, DO, LSE, DELTA, DQ, QKPOS, SEL, UNI + ubase * USZ, ucount, tok, h * G + rows % G, row_ok,
            h, Nk, scale, scale_log2,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
            stride_ot, stride_oh, stride_dot, stride_doh, stride_dqt, stride_dqh,
            HKV * G, HKV, D, DV, SLC_BLOCK, NSEL, True, BLOCK_M, BLOCK_K, NSUB, BLOCK_SEL, BLOCK_D, BLOCK_DV, DOT_PREC,
        )


@triton.jit
def _slc_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DVAL,  # DK, DVAL: fp32 (Nk, HKV, D/DV), zero-initialised
    QKPOS,
    TOKS,  # (n_entries,) query tokens sorted by (kv head, block): the inverted index
    WORK_KEY, WORK_START, WORK_END,  # per program: block key (h * NB + block), -1 = idle, and its token range
    BLK_START, BLK_LEN,  # (NB,) packed first key and length of every block
    NB, scale, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    TQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dk/dv of one key tile of one selection block from one chunk of the tokens that chose it."""
    pid = tl.program_id(0)
    sub = tl.program_id(1)
    key = tl.load(WORK_KEY + pid)
    if key >= 0:
        h = key // NB
        blk = key % NB
        bstart = tl.load(BLK_START + blk)
        blen = tl.load(BLK_LEN + blk)
        w0 = tl.load(WORK_START + pid)
        w1 = tl.load(WORK_END + pid)
        cols = sub * BLOCK_K + tl.arange(0, BLOCK_K)
        col_ok = cols < blen
        kpos = bstart + cols
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        kmask = col_ok[:, None] & (offs_d[None, :] < D)
        vmask = col_ok[:, None] & (offs_dv[None, :] < DV)
        k = tl.load(K + kpos[:, None].to(tl.int64) * stride_kt + h * stride_kh + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(V + kpos[:, None].to(tl.int64) * stride_vt + h * stride_vh + offs_dv[None, :], mask=vmask, other=0.0)
        dk = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_K, BLOCK_DV], dtype=tl.float32)
        rows = tl.arange(0, BLOCK_M)
        for i in range(w0, w1, TQ):
            ent = i + rows // G
            row_ok = (rows < TQ * G) & (ent < w1)
            tok = tl.load(TOKS + ent, mask=row_ok, other=0).to(tl.int64)
            head = h * G + rows % G
            q = load_rows(Q, tok, head, row_ok, stride_qt, stride_qh, D, BLOCK_D)
            do = tl.load(
                DO + tok[:, None] * stride_dot + head[:, None] * stride_doh + offs_dv[None, :],
                mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0,
            )
            lse2 = tl.load(LSE + tok * (HKV * G) + head, mask=row_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + tok * (HKV * G) + head, mask=row_ok, other=0.0)
            q_kpos = tl.load(QKPOS + tok, mask=row_ok, other=-1)
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale_log2  # (BLOCK_K, BLOCK_M)
            allowed = col_ok[:, None] & row_ok[None, :] & (kpos[:, None] <= q_kpos[None, :])
            p_t = tl.where(allowed, tl.exp2(s_t - lse2[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
        tl.atomic_add(
            DK + kpos[:, None].to(tl.int64) * (HKV * D) + h * D + offs_d[None, :], dk * scale, mask=kmask, sem="relaxed"
        )
        tl.atomic_add(
            DVAL + kpos[:, None].to(tl.int64) * (HKV * DV) + h * DV + offs_dv[None, :], dv, mask=vmask, sem="relaxed"
        )


# ------------------------------------------------------------------------------------------------
# Index preparation (one Triton kernel, no host synchronisation)
# ------------------------------------------------------------------------------------------------


@triton.jit
def _sequence_of(t, CU_Q, n_seq, n_search):
    """Each query token's sequence: how many of the offsets ``cu_q[1:]`` are ``<= t`` (a binary search of
    ``n_search`` steps, ``n_seq.bit_length()``)."""
    lo = tl.zeros_like(t)
    hi = tl.zeros_like(t) + n_seq
    for _ in range(n_search):
        active = lo < hi
        mid = (lo + hi) // 2
        right = active & (tl.load(CU_Q + 1 + mid, mask=active, other=0) <= t)
        hi = tl.where(active & (right == 0), mid, hi)
        lo = tl.where(right, mid + 1, lo)
    return lo


@triton.jit
def _slc_prep_kernel(
    BI,  # (Nq, HKV, NSEL) int32 selected block indices, -1 = unused
    CU_Q, CU_K,
    QKPOS, SEL, SCNT, UNI, UCNT,  # outputs, see _prepare
    nq, n_seq, n_search,
    HKV: tl.constexpr, NSEL: tl.constexpr, NSELP: tl.constexpr, LOG_NSELP: tl.constexpr,
    TOK: tl.constexpr, TOKP: tl.constexpr, LOG_U: tl.constexpr, SLC_BLOCK: tl.constexpr,
):
    """The index tensors of one tile of ``TOK`` query tokens and one KV head (see :func:`_prepare`)."""
    BIG_: tl.constexpr = 2147483647
    U: tl.constexpr = TOKP * NSELP
    tile = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.arange(0, TOKP)
    t = tile * TOK + r
    ok = (r < TOK) & (t < nq)
    seq = tl.where(ok, _sequence_of(t, CU_Q, n_seq, n_search), 0)
    # Packed index of the query's own key position and of its sequence's first key.
    q_kpos = tl.load(CU_K + seq + 1, mask=ok, other=0) - tl.load(CU_Q + seq + 1, mask=ok, other=0) + t
    k_start = tl.load(CU_K + seq, mask=ok, other=0)
    if h == 0:
        tl.store(QKPOS + t, q_kpos, mask=ok)
    # Usable blocks' packed first keys, ascending, BIG padding.
    c = tl.arange(0, NSELP)
    cm = ok[:, None] & (c[None, :] < NSEL)
    row = (t.to(tl.int64) * HKV + h) * NSEL
    bi = tl.load(BI + row[:, None] + c[None, :], mask=cm, other=-1)
    start = k_start[:, None] + bi * SLC_BLOCK
    usable = cm & (bi >= 0) & (start <= q_kpos[:, None])
    vals = bitonic_sort(tl.where(usable, start, BIG_), tl.broadcast_to(c[None, :], (TOKP, NSELP)), LOG_NSELP,
                        False, 1)
    tl.store(SEL + row[:, None] + c[None, :], vals, mask=cm)
    tl.store(SCNT + t.to(tl.int64) * HKV + h, tl.sum(usable.to(tl.int32), axis=1), mask=ok)
    # The tile's union: all its tokens' blocks sorted, duplicates dropped (to BIG, sorted once more).
    ubase = tile.to(tl.int64) * HKV + h
    i = tl.arange(0, U)
    upos = tl.reshape(i, (1, U))
    if TOK > 1:
        u = tl.reshape(bitonic_sort(tl.reshape(vals, (1, U)), upos, LOG_U, False, 1), (U,))
        prev = tl.gather(u, tl.maximum(i - 1, 0), 0)
        u = tl.where((i > 0) & (prev == u), BIG_, u)
        u = tl.reshape(bitonic_sort(tl.reshape(u, (1, U)), upos, LOG_U, False, 1), (U,))
        count = tl.sum((u != BIG_).to(tl.int32), axis=0)
        # A tile whose tokens span two documents never walks its union: its rows would share dots with
        # the other document's keys and values (masked scores, but 0 * NaN = NaN). Its tokens run per
        # token instead (a union count above every total fails the kernels' union test).
        first_seq = tl.sum(tl.where(r == 0, seq, 0), axis=0)
        last_seq = tl.max(tl.where(ok, seq, -1), axis=0)
        count = tl.where(last_seq != first_seq, TOK * NSEL + 1, count)
    else:
        u = tl.reshape(vals, (U,))
        count = tl.sum((u != BIG_).to(tl.int32), axis=0)
    tl.store(UNI + ubase * (TOK * NSEL) + i, u, mask=i < TOK * NSEL)
    tl.store(UCNT + ubase, count)


def _prepare(block_indices, cu_seqlens_q, cu_seqlens_k, nq: int, slc_block: int, tok: int):
    """Index tensors shared by the forward and backward launchers (compute once, pass to both), all
    int32 and contiguous, made by one kernel launch:

    * ``q_kpos (Nq,)``: the packed index of each query's own key position (queries are the last Tq of
      their sequence's Tk positions);
    * ``sel (Nq, Hkv, n)``: per query and KV head the packed first key of every usable selected block,
      ascending, then ``BIG`` padding; ``scnt (Nq, Hkv)`` their number. A block is usable when its index
      is >= 0 and it starts at or before the query (later ones are masked);
    * ``uni (n_tiles, Hkv, tok * n)``: the sorted, de-duplicated union of the blocks of each tile of
      ``tok`` consecutive tokens (``BIG`` padding) and ``ucnt (n_tiles, Hkv)`` its length, or
      ``tok * n + 1`` for a tile whose tokens span two documents (never walked as a union)."""
    nq_, hkv, nsel = block_indices.shape
    device = block_indices.device
    n_tiles = -(-nq // tok)
    i32 = dict(device=device, dtype=torch.int32)
    q_kpos = torch.empty(nq, **i32)
    sel = torch.empty(nq, hkv, nsel, **i32)
    scnt = torch.empty(nq, hkv, **i32)
    uni = torch.empty(n_tiles, hkv, tok * nsel, **i32)
    ucnt = torch.empty(n_tiles, hkv, **i32)
    if nq > 0:
        n_seq = cu_seqlens_q.shape[0] - 1
        nselp, tokp = pow2(nsel, 1), pow2(tok, 1)
        _slc_prep_kernel[(n_tiles, hkv)](
            block_indices, cu_seqlens_q, cu_seqlens_k, q_kpos, sel, scnt, uni, ucnt,
            nq, n_seq, n_seq.bit_length(),
            HKV=hkv, NSEL=nsel, NSELP=nselp, LOG_NSELP=nselp.bit_length() - 1, TOK=tok, TOKP=tokp,
            LOG_U=(nselp * tokp).bit_length() - 1, SLC_BLOCK=slc_block,
        )
    return q_kpos, sel, scnt, uni, ucnt


# ------------------------------------------------------------------------------------------------
# Inverted index of the dk/dv kernel (two Triton kernels and a cumsum, no host synchronisation)
# ------------------------------------------------------------------------------------------------


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _seq_blocks(CU_K, idx, ok, SLC_BLOCK: tl.constexpr):
    """Selection blocks of the sequences ``idx``: ``ceil(len_k / l')``, 0 where not ``ok``."""
    len_k = tl.load(CU_K + idx + 1, mask=ok, other=0) - tl.load(CU_K + idx, mask=ok, other=0)
    return tl.where(ok, (len_k + SLC_BLOCK - 1) // SLC_BLOCK, 0)


@triton.jit
def _blocks_before(seq, CU_K, n_seq, SLC_BLOCK: tl.constexpr, BLOCK_B: tl.constexpr):
    """Blocks of the sequences before ``seq`` (a vector): sum over ``s < seq`` of ``ceil(len_k(s) / l')``."""
    acc = tl.zeros(seq.shape, dtype=tl.int32)
    for c0 in range(0, n_seq, BLOCK_B):
        idx = c0 + tl.arange(0, BLOCK_B)
        ok = idx < n_seq
        nblk = _seq_blocks(CU_K, idx, ok, SLC_BLOCK)
        acc += tl.sum(tl.where(idx[None, :] < seq[:, None], nblk[None, :], 0), axis=1)
    return acc


@triton.jit
def _inv_chunk_sorted(
    SEL, CU_Q, CU_K, c, nq, n_seq, n_search, nb,
    HKV: tl.constexpr, NSEL: tl.constexpr, TC: tl.constexpr, HKVP: tl.constexpr,
    NSELP: tl.constexpr, LOG_E: tl.constexpr, SLC_BLOCK: tl.constexpr, BLOCK_B: tl.constexpr,
    WIDE: tl.constexpr,
):
    """The entries ``(token, kv head, slot)`` of the ``TC`` tokens of chunk ``c`` sorted by
    ``(key, flat index)``, key ``h * nb + block`` (``HKV * nb`` for an unused slot, ``HKV * nb + 1``
    for padding lanes). Returns the sorted keys, the entries' lanes (``(r * HKVP + h) * NSELP + s``),
    each one's rank in its run of equal keys and the sorted positions ``0 .. E - 1``."""
    E: tl.constexpr = TC * HKVP * NSELP
    BIG_: tl.constexpr = 2147483647
    r = tl.arange(0, TC)
    t = c * TC + r
    ok = t < nq
    # Each token's sequence, its blocks before.
    seq = tl.where(ok, _sequence_of(t, CU_Q, n_seq, n_search), 0)
    boff = _blocks_before(seq, CU_K, n_seq, SLC_BLOCK, BLOCK_B)
    kst = tl.load(CU_K + seq, mask=ok, other=0)
    hh = tl.arange(0, HKVP)
    ss = tl.arange(0, NSELP)
    lane_ok = ok[:, None, None] & (hh[None, :, None] < HKV) & (ss[None, None, :] < NSEL)
    val = tl.load(
        SEL + (t[:, None, None].to(tl.int64) * HKV + hh[None, :, None]) * NSEL + ss[None, None, :],
        mask=lane_ok, other=BIG_,
    )
    blk = boff[:, None, None] + (val - kst[:, None, None]) // SLC_BLOCK
    nkeys = HKV * nb
    key = tl.where(val != BIG_, hh[None, :, None] * nb + blk, nkeys)
    key = tl.where(lane_ok, key, nkeys + 1)
    lane = (r[:, None, None] * HKVP + hh[None, :, None]) * NSELP + ss[None, None, :]
    if WIDE:
        comp = (key.to(tl.int64) << LOG_E) | lane
    else:
        comp = (key << LOG_E) | lane
    i = tl.arange(0, E)
    u = tl.reshape(bitonic_sort(tl.reshape(comp, (1, E)), tl.reshape(i, (1, E)), LOG_E, False, 1), (E,))
    skey = (u >> LOG_E).to(tl.int32)
    slane = (u & (E - 1)).to(tl.int32)
    prev = tl.gather(skey, tl.maximum(i - 1, 0), 0)
    # The first position of each entry's run: a running maximum of the runs' first positions.
    first = tl.associative_scan(tl.where((i == 0) | (prev != skey), i, 0), 0, _max_combine)
    return skey, slane, i - first, i


@triton.jit
def _slc_inv_count_kernel(
    SEL, CU_Q, CU_K,
    HIST,  # (HKV * nb + 1, n_c) zero-initialised: entries per (key, token chunk)
    BLK_START, BLK_LEN,  # (nb,) outputs
    nq, n_seq, n_search, nb, n_c,
    HKV: tl.constexpr, NSEL: tl.constexpr, TC: tl.constexpr, HKVP: tl.constexpr,
    NSELP: tl.constexpr, LOG_E: tl.constexpr, SLC_BLOCK: tl.constexpr, BLOCK_B: tl.constexpr,
    WIDE: tl.constexpr, BLOCK_NB: tl.constexpr,
):
    """Programs ``< n_c``: the entry counts of one token chunk per key; the others: ``BLOCK_NB``
    blocks' packed first key and length."""
    pid = tl.program_id(0)
    if pid < n_c:
        skey, slane, rank, i = _inv_chunk_sorted(
            SEL, CU_Q, CU_K, pid, nq, n_seq, n_search, nb, HKV, NSEL, TC, HKVP, NSELP, LOG_E, SLC_BLOCK,
            BLOCK_B, WIDE,
        )
        E: tl.constexpr = TC * HKVP * NSELP
        nxt = tl.gather(skey, tl.minimum(i + 1, E - 1), 0)
        last = ((i == E - 1) | (nxt != skey)) & (skey <= HKV * nb)
        tl.store(HIST + skey.to(tl.int64) * n_c + pid, rank + 1, mask=last)
    else:
        b = (pid - n_c) * BLOCK_NB + tl.arange(0, BLOCK_NB)
        # The block's sequence: how many sequences end (in blocks) at or before it, at most n_seq - 1.
        cnt = tl.zeros([BLOCK_NB], dtype=tl.int32)
        done = tl.zeros([], dtype=tl.int32)
        for c0 in range(0, n_seq, BLOCK_B):
            idx = c0 + tl.arange(0, BLOCK_B)
            ok = idx < n_seq
            nblk = _seq_blocks(CU_K, idx, ok, SLC_BLOCK)
            incl = tl.cumsum(nblk, axis=0) + done
            cnt += tl.sum((ok[None, :] & (incl[None, :] <= b[:, None])).to(tl.int32), axis=1)
            done += tl.sum(nblk, axis=0)
        seq = tl.minimum(cnt, n_seq - 1)
        local = b - _blocks_before(seq, CU_K, n_seq, SLC_BLOCK, BLOCK_B)
        bstart = tl.load(CU_K + seq) + local * SLC_BLOCK
        blen = tl.minimum(tl.maximum(tl.load(CU_K + seq + 1) - bstart, 0), SLC_BLOCK)
        blen = tl.where(b < done, blen, 0)
        tl.store(BLK_START + b, bstart, mask=b < nb)
        tl.store(BLK_LEN + b, blen, mask=b < nb)


@triton.jit
def _slc_inv_fill_kernel(
    SEL, CU_Q, CU_K, HIST, INCL,  # INCL: inclusive cumsum of HIST (flat, key-major)
    TOKS, WORK_KEY, WORK_START, WORK_END,  # outputs
    nq, n_seq, n_search, nb, n_c, n_prog, key_search,
    HKV: tl.constexpr, NSEL: tl.constexpr, TC: tl.constexpr, HKVP: tl.constexpr,
    NSELP: tl.constexpr, LOG_E: tl.constexpr, SLC_BLOCK: tl.constexpr, BLOCK_B: tl.constexpr,
    WIDE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Programs ``< n_c``: place the entries of one token chunk in ``TOKS`` (stable: a key's entries
    of earlier chunks come first); the others: ``BLOCK_P`` slots of the work list. Key ``k`` owns
    the slots from ``S_k = offs[k] // CHUNK + k`` (``offs[k]``: entries of the smaller keys) to
    ``S_{k+1}``; its ``ceil(count / CHUNK)`` work items fill the first ones, the rest are idle (-1)."""
    pid = tl.program_id(0)
    if pid < n_c:
        skey, slane, rank, i = _inv_chunk_sorted(
            SEL, CU_Q, CU_K, pid, nq, n_seq, n_search, nb, HKV, NSEL, TC, HKVP, NSELP, LOG_E, SLC_BLOCK,
            BLOCK_B, WIDE,
        )
        live = skey <= HKV * nb
        at = skey.to(tl.int64) * n_c + pid
        base = tl.load(INCL + at, mask=live, other=0) - tl.load(HIST + at, mask=live, other=0)
        tok = pid * TC + slane // (HKVP * NSELP)
        tl.store(TOKS + base + rank, tok, mask=live)
    else:
        p = (pid - n_c) * BLOCK_P + tl.arange(0, BLOCK_P)
        nkeys = HKV * nb
        # The key owning slot p: the last k < nkeys with S_k <= p (S_0 = 0, S strictly increasing).
        lo = tl.zeros([BLOCK_P], dtype=tl.int32)
        hi = tl.zeros([BLOCK_P], dtype=tl.int32) + nkeys
        for _ in range(key_search):
            active = lo < hi
            mid = (lo + hi) // 2
            off_mid = tl.load(INCL + mid.to(tl.int64) * n_c - 1, mask=active & (mid > 0), other=0)
            right = active & (off_mid // CHUNK + mid <= p)
            hi = tl.where(active & (right == 0), mid, hi)
            lo = tl.where(right, mid + 1, lo)
        k = lo - 1
        off0 = tl.load(INCL + k.to(tl.int64) * n_c - 1, mask=k > 0, other=0)
        off1 = tl.load(INCL + (k + 1).to(tl.int64) * n_c - 1)
        j = p - (off0 // CHUNK + k)
        live = j * CHUNK < off1 - off0
        w0 = off0 + j * CHUNK
        pm = p < n_prog
        tl.store(WORK_KEY + p, tl.where(live, k, -1), mask=pm)
        tl.store(WORK_START + p, tl.where(live, w0, 0), mask=pm)
        tl.store(WORK_END + p, tl.where(live, tl.minimum(w0 + CHUNK, off1), 0), mask=pm)


def _inverted_index_by_sort(sel, cu_seqlens_k, nk, slc_block, chunk):
    """:func:`_build_inverted_index`'s result from torch ops (about 30, one stable sort of all entries by key):
    where the kernels' count table would be too large (long sequences)."""
    device = sel.device
    nq, hkv, nsel = sel.shape
    bsz = cu_seqlens_k.numel() - 1
    lens_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    nblk = (lens_k + slc_block - 1) // slc_block  # blocks of each sequence
    blk_off = torch.zeros(bsz + 1, dtype=torch.long, device=device)
    blk_off[1:] = torch.cumsum(nblk, 0)
    nb = nk // slc_block + bsz  # upper bound on the total number of blocks (no host sync)
    blk_ids = torch.arange(nb, device=device)
    blk_seq = torch.searchsorted(blk_off[1:], blk_ids, right=True).clamp_max(bsz - 1)
    local = blk_ids - blk_off[blk_seq]
    blk_start = cu_seqlens_k[blk_seq].long() + local * slc_block
    seq_end = cu_seqlens_k[blk_seq + 1].long()
    blk_len = (seq_end - blk_start).clamp(min=0, max=slc_block)
    blk_len = torch.where(blk_ids < blk_off[-1], blk_len, 0)
    # Map each packed block start back to its block id: start = cu_k[seq] + j * l'.
    flat = sel.reshape(-1).long()
    valid = flat != BIG
    tok_of = torch.arange(flat.numel(), device=device) // (hkv * nsel)
    h_of = (torch.arange(flat.numel(), device=device) // nsel) % hkv
    flat = torch.where(valid, flat, 0)
    seq_q = torch.searchsorted(cu_seqlens_k[1:].long(), flat, right=True).clamp_max(bsz - 1)
    blk = blk_off[seq_q] + (flat - cu_seqlens_k[seq_q].long()) // slc_block
    nkeys = hkv * nb
    key = torch.where(valid, h_of * nb + blk, nkeys)
    sorted_key, order = torch.sort(key, stable=True)
    toks = tok_of[order].to(torch.int32).contiguous()
    # Entries per key from the sorted keys (torch.bincount would copy its maximum to the host on CUDA).
    bounds = torch.searchsorted(sorted_key, torch.arange(nkeys + 1, device=device))
    counts = bounds[1:] - bounds[:-1]
    offs = bounds[:-1]
    chunks = (counts + chunk - 1) // chunk
    cum = torch.cumsum(chunks, 0)
    n_prog = flat.numel() // chunk + nkeys
    pids = torch.arange(n_prog, device=device)
    wkey = torch.searchsorted(cum, pids, right=True)
    live = wkey < nkeys
    wkey_c = wkey.clamp_max(nkeys - 1)
    c = pids - (cum[wkey_c] - chunks[wkey_c])
    wstart = offs[wkey_c] + c * chunk
    wend = torch.minimum(wstart + chunk, offs[wkey_c] + counts[wkey_c])
    return (
        toks,
        torch.where(live, wkey_c, -1).to(torch.int32).contiguous(),
        wstart.to(torch.int32).contiguous(),
        wend.to(torch.int32).contiguous(),
        blk_start.to(torch.int32).contiguous(),
        blk_len.to(torch.int32).contiguous(),
        nb,
    )


def _build_inverted_index(sel, cu_seqlens_q, cu_seqlens_k, nk, slc_block, chunk, lanes=2048, wide=None,
                          sort_above=6.0):
    """Which query tokens chose each (kv head, block), cut into work items of <= ``chunk`` tokens.

    ``sel`` is :func:`_prepare`'s (each query's usable blocks, packed first keys); ``nk`` is the
    packed key count (a Python int). Blocks are numbered over the packed sequences. Returns
    ``(toks, work_key, work_start, work_end, blk_start, blk_len, nb)``: ``toks`` lists the query
    tokens sorted by key ``h * nb + block``, a key's tokens in increasing order (a stable counting
    sort), then the unused slots' tokens; program ``p`` handles ``toks[work_start[p]:work_end[p]]``
    for key ``work_key[p]`` (-1 = idle program; a key's items are consecutive and in order, idle
    programs may sit between keys). ``nb`` is an upper bound of the block count, so nothing here
    waits for the GPU.

    Two kernel launches and a cumsum: per chunk of ``TC`` query tokens, its entries are sorted by key
    in registers; the first kernel stores how many fall on each key (``hist (nkeys + 1, n_c)``), the
    cumsum over (key, chunk) gives each chunk's first place in each key, and the second kernel
    stores the tokens there (and builds the work list from the keys' offsets). The in-register sort
    key is ``key << log2(lanes) | lane``, in int64 when it could pass 2**31 (``wide``: force either).
    ``hist`` and its cumsum hold ``(Hkv * nb + 1) * ceil(Nq / TC)`` int32 each (at 64k tokens, 4 KV heads,
    16 blocks of 64: about 8M, i.e. 34 MB). That grows with the square of the tokens: where it would
    hold more than ``sort_above`` times the entries (``Nq * Hkv * n``; 6: about what the torch sort's
    int64 buffers take per entry; e.g. 128k tokens with 8 KV heads), :func:`_inverted_index_by_sort`
    builds the same index from torch ops in less memory (host work does not matter at those lengths).
    ``sort_above=None`` always takes the kernels."""
    device = sel.device
    nq, hkv, nsel = sel.shape
    n_seq = cu_seqlens_k.numel() - 1
    nb = nk // slc_block + n_seq  # upper bound on the total number of blocks (no host sync)
    nkeys = hkv * nb
    n_prog = nq * hkv * nsel // chunk + nkeys  # upper bound of the work items
    hkvp, nselp = pow2(hkv, 1), pow2(nsel, 1)
    tc = max(1, lanes // (hkvp * nselp))  # tokens per chunk (a power of two): ``lanes`` entries sorted together
    log_e = (tc * hkvp * nselp).bit_length() - 1
    n_c = -(-nq // tc)
    if sort_above is not None and (nkeys + 1) * n_c > sort_above * max(1, nq * hkv * nsel):
        return _inverted_index_by_sort(sel, cu_seqlens_k, nk, slc_block, chunk)
    i32 = dict(device=device, dtype=torch.int32)
    hist = torch.zeros((nkeys + 1) * n_c, **i32)
    toks = torch.empty(nq * hkv * nsel, **i32)
    wkey = torch.empty(n_prog, **i32)
    wstart = torch.empty(n_prog, **i32)
    wend = torch.empty(n_prog, **i32)
    blk_start = torch.empty(nb, **i32)
    blk_len = torch.empty(nb, **i32)
    common = dict(
        HKV=hkv, NSEL=nsel, TC=tc, HKVP=hkvp, NSELP=nselp, LOG_E=log_e, SLC_BLOCK=slc_block,
        BLOCK_B=min(64, pow2(n_seq, 1), max(1, 8192 // tc)), WIDE=((nkeys + 2) << log_e >= 2**31) if wide is None else wide,
    )
    block_nb = 128
    _slc_inv_count_kernel[(n_c + triton.cdiv(nb, block_nb),)](
        sel, cu_seqlens_q, cu_seqlens_k, hist, blk_start, blk_len,
        nq, n_seq, n_seq.bit_length(), nb, n_c, BLOCK_NB=block_nb, **common,
    )
    incl = torch.cumsum(hist, 0, dtype=torch.int32)
    block_p = 1024
    _slc_inv_fill_kernel[(n_c + triton.cdiv(n_prog, block_p),)](
        sel, cu_seqlens_q, cu_seqlens_k, hist, incl, toks, wkey, wstart, wend,
        nq, n_seq, n_seq.bit_length(), nb, n_c, n_prog, nkeys.bit_length(),
        CHUNK=chunk, BLOCK_P=block_p, **common,
    )
    return toks, wkey, wstart, wend, blk_start, blk_len, nb


# ------------------------------------------------------------------------------------------------
# Launchers (no global state: safe to wrap as torch.library ops)
# ------------------------------------------------------------------------------------------------


def default_tokens_per_program(group: int) -> int:
    """Query tokens sharing one program: up to 64 rows when they walk their union of blocks."""
    return max(1, 64 // group)


UNION_PCT = 67  # walk the tile's union when it is <= 67% of its tokens' selections (measured, H100)


def _key_tile(slc_block: int) -> int:
    return max(16, min(64, triton.next_power_of_2(slc_block)))


def _fwd(q, k, v, block_indices, cu_seqlens_q, cu_seqlens_k, slc_block: int, scale: float,
         tokens_per_program: int | None = None, union_pct: int = UNION_PCT, num_warps: int = 4, num_stages: int = 2,
         prep=None):
    """Forward launcher: returns ``(o, lse)`` with ``o (Nq, Hq, Dv)`` in q's dtype and the natural-log
    ``lse (Nq, Hq)`` in fp32 (``-inf`` for a query that attends to nothing). ``prep``: the output of
    :func:`_prepare` for the same ``tokens_per_program``, to share it with the backward."""
    nq, hq, d = q.shape
    nk, hkv, dv = v.shape
    group = hq // hkv
    nsel = block_indices.shape[-1]
    tok = tokens_per_program or default_tokens_per_program(group)
    if prep is None:
        prep = _prepare(block_indices, cu_seqlens_q, cu_seqlens_k, nq, slc_block, tok)
    q_kpos, sel, scnt, uni, ucnt = prep
    o = torch.empty(nq, hq, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(nq, hq, device=q.device, dtype=torch.float32)
    block_k = _key_tile(slc_block)
    if nq > 0:
        # Per-token programs first (tiles that do not walk their union), then the union tiles.
        for per_token, n_prog in ((True, nq), (False, uni.shape[0] if tok > 1 else 0)):
            if n_prog == 0:
                continue
            _slc_fwd_kernel[(n_prog, hkv)](
                q, k, v, o, lse, q_kpos, sel, scnt, uni, ucnt,
                nq, nk, scale * LOG2E,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
                HKV=hkv, G=group, D=d, DV=dv, SLC_BLOCK=slc_block, NSEL=nsel, USZ=uni.shape[-1], TOK=tok,
                UNION_PCT=union_pct, PER_TOKEN=per_token, BLOCK_M=pow2(tok * group), BLOCK_M1=pow2(group),
                BLOCK_K=block_k, NSUB=triton.cdiv(slc_block, block_k), BLOCK_SEL=pow2(nsel, 2),
                BLOCK_TOK=pow2(tok, 2), BLOCK_D=pow2(d), BLOCK_DV=pow2(dv), DOT_PREC=dot_precision(q.dtype),
                num_warps=num_warps, num_stages=num_stages,
            )
    return o, lse


def _bwd(do, q, k, v, o, lse, block_indices, cu_seqlens_q, cu_seqlens_k, slc_block: int, scale: float,
         tokens_per_program: int | None = None, union_pct: int = UNION_PCT, chunk_tokens: int = 256,
         num_warps: int = 4, num_stages: int = 2, dkdv_rows: int = 32, dkdv_num_warps: int = 4, prep=None):
    """Backward launcher: returns ``(dq, dk, dv)`` in the dtypes of ``q, k, v``. ``dkdv_rows``: query
    rows per step of the dk/dv kernel; ``prep`` as in :func:`_fwd`."""
    nq, hq, d = q.shape
    nk, hkv, dv_dim = v.shape
    group = hq // hkv
    nsel = block_indices.shape[-1]
    do = do.contiguous()
    tok = tokens_per_program or default_tokens_per_program(group)
    if prep is None:
        prep = _prepare(block_indices, cu_seqlens_q, cu_seqlens_k, nq, slc_block, tok)
    q_kpos, sel, scnt, uni, ucnt = prep
    dq = torch.empty_like(q)
    delta = torch.empty(nq, hq, device=q.device, dtype=torch.float32)
    dk32 = torch.zeros(nk, hkv, d, device=q.device, dtype=torch.float32)
    dv32 = torch.zeros(nk, hkv, dv_dim, device=q.device, dtype=torch.float32)
    block_k = _key_tile(slc_block)
    nsub = triton.cdiv(slc_block, block_k)
    prec = dot_precision(q.dtype)
    if nq > 0:
        for per_token, n_prog in ((True, nq), (False, uni.shape[0] if tok > 1 else 0)):
            if n_prog == 0:
                continue
            _slc_bwd_dq_kernel[(n_prog, hkv)](
                q, k, v, o, do, lse, delta, dq, q_kpos, sel, scnt, uni, ucnt,
                nq, nk, scale, scale * LOG2E,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                o.stride(0), o.stride(1), do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
                HKV=hkv, G=group, D=d, DV=dv_dim, SLC_BLOCK=slc_block, NSEL=nsel, USZ=uni.shape[-1], TOK=tok,
                UNION_PCT=union_pct, PER_TOKEN=per_token, BLOCK_M=pow2(tok * group), BLOCK_M1=pow2(group),
                BLOCK_K=block_k, NSUB=nsub, BLOCK_SEL=pow2(nsel, 2), BLOCK_TOK=pow2(tok, 2),
                BLOCK_D=pow2(d), BLOCK_DV=pow2(dv_dim), DOT_PREC=prec,
                num_warps=num_warps, num_stages=num_stages,
            )
        tq = max(1, dkdv_rows // group)
        toks, wkey, wstart, wend, blk_start, blk_len, nb = _build_inverted_index(
            sel, cu_seqlens_q, cu_seqlens_k, nk, slc_block, chunk_tokens
        )
        _slc_bwd_dkdv_kernel[(wkey.shape[0], nsub)](
            q, k, v, do, lse, delta, dk32, dv32, q_kpos, toks, wkey, wstart, wend, blk_start, blk_len,
            nb, scale, scale * LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            HKV=hkv, G=group, D=d, DV=dv_dim, TQ=tq, BLOCK_M=pow2(tq * group), BLOCK_K=block_k,
            BLOCK_D=pow2(d), BLOCK_DV=pow2(dv_dim), DOT_PREC=prec,
            num_warps=dkdv_num_warps, num_stages=num_stages,
        )
    return dq, dk32.to(k.dtype), dv32.to(v.dtype)
