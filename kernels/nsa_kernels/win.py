"""Triton kernels for NSA's sliding-window attention ("win" branch), forward and backward.

Layout and semantics are those of :mod:`reference`: packed varlen tensors, tokens first, GQA; the
query at position ``t`` of its sequence attends to the keys ``t - window < s <= t``.

Design: flash-attention with a band mask, GQA-aware. A program owns ``TOK`` consecutive query tokens
of one sequence and one KV head, i.e. ``TOK * G`` query rows (all query heads of the group), so every
key/value tile is loaded once for the whole group; it only visits the ``window + TOK - 1`` keys the
band can reach. The backward is FA2-style: dq (query-centric, also computing
``delta = rowsum(o * do)``), then dk/dv per key tile over the queries that can see it (no atomics).

Each program finds its sequence and tile in the offsets itself (:func:`primitives.tile_of`; the grid
is an upper bound of the tile count), so launching needs no torch pre-pass and never waits for the GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .primitives import LOG2E, dot_precision, load_rows, pow2, softmax_step, store_o_lse, tile_of, tile_programs

# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _win_fwd_kernel(
    Q, K, V, O, LSE, CUQ, CUK, n_seq,
    window, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, TOK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_B: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    seq, q0 = tile_of(pid, CUQ, n_seq, TOK, BLOCK_B)
    if seq >= 0:
        q_end = tl.load(CUQ + seq + 1)
        k_beg = tl.load(CUK + seq)
        shift = tl.load(CUK + seq + 1) - q_end  # packed key index of a query = its token + shift
        rows = tl.arange(0, BLOCK_M)
        tok = q0 + rows // G
        head = h * G + rows % G
        row_ok = (rows < TOK * G) & (tok < q_end)
        q_kpos = tok + shift
        tok64 = tok.to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q = load_rows(Q, tok64, head, row_ok, stride_qt, stride_qh, D, BLOCK_D)
        k_hi = tl.minimum(q0 + TOK, q_end) + shift  # exclusive
        k_lo = tl.maximum(k_beg, q0 + shift - window + 1)
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        cols = tl.arange(0, BLOCK_N)
        for kb in range(k_lo, k_hi, BLOCK_N):
            kpos = kb + cols
            col_ok = kpos < k_hi
            kpos64 = kpos.to(tl.int64)
            k = tl.load(
                K + kpos64[:, None] * stride_kt + h * stride_kh + offs_d[None, :],
                mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0,
            )
            v = tl.load(
                V + kpos64[:, None] * stride_vt + h * stride_vh + offs_dv[None, :],
                mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0,
            )
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
            allowed = (
                row_ok[:, None] & col_ok[None, :]
                & (kpos[None, :] <= q_kpos[:, None]) & (kpos[None, :] > q_kpos[:, None] - window)
            )
            s = tl.where(allowed, s, float("-inf"))
            m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, DOT_PREC)
        store_o_lse(O, LSE, tok64, head, row_ok, stride_ot, stride_oh, HKV * G, acc, m_i, l_i, DV, BLOCK_DV, False)


@triton.jit
def _win_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, CUQ, CUK, n_seq,
    window, scale, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_dot, stride_doh, stride_dqt, stride_dqh,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, TOK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_B: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dq of one query tile; also writes ``delta = rowsum(o * do)`` for the dk/dv kernel."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    seq, q0 = tile_of(pid, CUQ, n_seq, TOK, BLOCK_B)
    if seq >= 0:
        q_end = tl.load(CUQ + seq + 1)
        k_beg = tl.load(CUK + seq)
        shift = tl.load(CUK + seq + 1) - q_end
        rows = tl.arange(0, BLOCK_M)
        tok = q0 + rows // G
        head = h * G + rows % G
        row_ok = (rows < TOK * G) & (tok < q_end)
        q_kpos = tok + shift
        tok64 = tok.to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        dmask = row_ok[:, None] & (offs_d[None, :] < D)
        dvmask = row_ok[:, None] & (offs_dv[None, :] < DV)
        q = tl.load(Q + tok64[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=dmask, other=0.0)
        do = tl.load(
            DO + tok64[:, None] * stride_dot + head[:, None] * stride_doh + offs_dv[None, :], mask=dvmask, other=0.0
        )
        o = tl.load(O + tok64[:, None] * stride_ot + head[:, None] * stride_oh + offs_dv[None, :], mask=dvmask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(DELTA + tok64 * (HKV * G) + head, delta, mask=row_ok)
        lse2 = tl.load(LSE + tok64 * (HKV * G) + head, mask=row_ok, other=0.0) * 1.4426950408889634
        k_hi = tl.minimum(q0 + TOK, q_end) + shift
        k_lo = tl.maximum(k_beg, q0 + shift - window + 1)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        cols = tl.arange(0, BLOCK_N)
        for kb in range(k_lo, k_hi, BLOCK_N):
            kpos = kb + cols
            col_ok = kpos < k_hi
            kpos64 = kpos.to(tl.int64)
            k = tl.load(
                K + kpos64[:, None] * stride_kt + h * stride_kh + offs_d[None, :],
                mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0,
            )
            v = tl.load(
                V + kpos64[:, None] * stride_vt + h * stride_vh + offs_dv[None, :],
                mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0,
            )
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
            allowed = (
                row_ok[:, None] & col_ok[None, :]
                & (kpos[None, :] <= q_kpos[:, None]) & (kpos[None, :] > q_kpos[:, None] - window)
            )
            p = tl.where(allowed, tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        tl.store(
            DQ + tok64[:, None] * stride_dqt + head[:, None] * stride_dqh + offs_d[None, :],
            (dq * scale).to(DQ.dtype.element_ty), mask=dmask,
        )


@triton.jit
def _win_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DVAL, CUQ, CUK, n_seq,
    window, scale, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, TOK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_B: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dk/dv of one key tile (``BLOCK_N`` keys of one sequence, one KV head) over the queries whose
    window reaches it, ``TOK`` tokens (all ``G`` heads) at a time."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    seq, k0 = tile_of(pid, CUK, n_seq, BLOCK_N, BLOCK_B)
    if seq >= 0:
        q_beg = tl.load(CUQ + seq)
        q_end = tl.load(CUQ + seq + 1)
        k_end = tl.load(CUK + seq + 1)
        shift = k_end - q_end
        cols = tl.arange(0, BLOCK_N)
        kpos = k0 + cols
        col_ok = kpos < k_end
        kpos64 = kpos.to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        kmask = col_ok[:, None] & (offs_d[None, :] < D)
        vmask = col_ok[:, None] & (offs_dv[None, :] < DV)
        k = tl.load(K + kpos64[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(V + kpos64[:, None] * stride_vt + h * stride_vh + offs_dv[None, :], mask=vmask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        t_lo = tl.maximum(q_beg, k0 - shift)
        t_hi = tl.minimum(q_end, k0 + BLOCK_N - 1 + window - shift)  # exclusive
        rows = tl.arange(0, BLOCK_M)
        for t in range(t_lo, t_hi, TOK):
            tok = t + rows // G
            head = h * G + rows % G
            row_ok = (rows < TOK * G) & (tok < t_hi)
            q_kpos = tok + shift
            tok64 = tok.to(tl.int64)
            q = load_rows(Q, tok64, head, row_ok, stride_qt, stride_qh, D, BLOCK_D)
            do = tl.load(
                DO + tok64[:, None] * stride_dot + head[:, None] * stride_doh + offs_dv[None, :],
                mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0,
            )
            lse2 = tl.load(LSE + tok64 * (HKV * G) + head, mask=row_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + tok64 * (HKV * G) + head, mask=row_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale_log2  # (BLOCK_N, BLOCK_M)
            allowed = (
                col_ok[:, None] & row_ok[None, :]
                & (kpos[:, None] <= q_kpos[None, :]) & (kpos[:, None] > q_kpos[None, :] - window)
            )
            p_t = tl.where(allowed, tl.exp2(s_t - lse2[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
        tl.store(
            DK + kpos64[:, None] * stride_dkt + h * stride_dkh + offs_d[None, :],
            (dk * scale).to(DK.dtype.element_ty), mask=kmask,
        )
        tl.store(
            DVAL + kpos64[:, None] * stride_dvt + h * stride_dvh + offs_dv[None, :],
            dv.to(DVAL.dtype.element_ty), mask=vmask,
        )


# ------------------------------------------------------------------------------------------------
# Launchers (no global state)
# ------------------------------------------------------------------------------------------------


def _rows_config(group: int, block_m: int):
    """Tokens per program and the padded row count for ``block_m`` target rows."""
    tok = max(1, block_m // group)
    return tok, pow2(tok * group)


def _fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, window: int, scale: float,
         block_m: int = 64, block_n: int = 64, num_warps: int = 4, num_stages: int = 2):
    """Forward launcher: ``(o, lse)``, ``o (Nq, Hq, Dv)`` in q's dtype, natural-log ``lse (Nq, Hq)`` fp32."""
    nq, hq, d = q.shape
    nk, hkv, dv = v.shape
    group = hq // hkv
    tok, bm = _rows_config(group, block_m)
    o = torch.empty(nq, hq, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(nq, hq, device=q.device, dtype=torch.float32)
    n_seq = cu_seqlens_q.shape[0] - 1
    n_prog, block_b = tile_programs(nq, n_seq, tok)
    if nq > 0:
        _win_fwd_kernel[(n_prog, hkv)](
            q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, n_seq,
            window, scale * LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
            HKV=hkv, G=group, D=d, DV=dv, TOK=tok, BLOCK_M=bm, BLOCK_N=block_n,
            BLOCK_D=pow2(d), BLOCK_DV=pow2(dv), BLOCK_B=block_b, DOT_PREC=dot_precision(q.dtype),
            num_warps=num_warps, num_stages=num_stages,
        )
    return o, lse


def _bwd(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, window: int, scale: float,
         block_m: int = 64, block_n: int = 64, num_warps: int = 4, num_stages: int = 2,
         dkdv_block_m: int | None = None, dkdv_block_n: int | None = None, dkdv_num_warps: int | None = None):
    """Backward launcher: ``(dq, dk, dv)`` in the dtypes of ``q, k, v``. The ``dkdv_*`` settings
    (query rows per step, keys per program, warps) default to the dq kernel's."""
    nq, hq, d = q.shape
    nk, hkv, dv_dim = v.shape
    group = hq // hkv
    do = do.contiguous()
    tok, bm = _rows_config(group, block_m)
    dq = torch.empty_like(q)
    dk = torch.zeros(nk, hkv, d, device=q.device, dtype=k.dtype)
    dv = torch.zeros(nk, hkv, dv_dim, device=q.device, dtype=v.dtype)
    delta = torch.empty(nq, hq, device=q.device, dtype=torch.float32)
    prec = dot_precision(q.dtype)
    if nq > 0:
        n_seq = cu_seqlens_q.shape[0] - 1
        n_prog, block_b = tile_programs(nq, n_seq, tok)
        _win_bwd_dq_kernel[(n_prog, hkv)](
            q, k, v, o, do, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, n_seq,
            window, scale, scale * LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            o.stride(0), o.stride(1), do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
            HKV=hkv, G=group, D=d, DV=dv_dim, TOK=tok, BLOCK_M=bm, BLOCK_N=block_n,
            BLOCK_D=pow2(d), BLOCK_DV=pow2(dv_dim), BLOCK_B=block_b, DOT_PREC=prec,
            num_warps=num_warps, num_stages=num_stages,
        )
        kv_n = dkdv_block_n or block_n
        kv_tok, kv_bm = _rows_config(group, dkdv_block_m or block_m)
        n_kprog, _ = tile_programs(nk, n_seq, kv_n)
        _win_bwd_dkdv_kernel[(n_kprog, hkv)](
            q, k, v, do, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, n_seq,
            window, scale, scale * LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            HKV=hkv, G=group, D=d, DV=dv_dim, TOK=kv_tok, BLOCK_M=kv_bm, BLOCK_N=kv_n,
            BLOCK_D=pow2(d), BLOCK_DV=pow2(dv_dim), BLOCK_B=block_b, DOT_PREC=prec,
            num_warps=dkdv_num_warps or num_warps, num_stages=num_stages,
        )
    return dq, dk, dv
