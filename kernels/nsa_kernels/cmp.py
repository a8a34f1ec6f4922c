"""Triton kernels for NSA's compressed attention ("cmp" branch), forward and backward.

Layout and semantics are those of :mod:`reference` (packed varlen tensors, tokens first, GQA). The
query at position ``t`` of its sequence attends to the compressed tokens ``i`` of that sequence with
``i * cmp_stride + cmp_block - 1 <= t`` (the complete compression blocks it has seen). A query that sees
none gets output 0 and ``lse = +inf`` (so that ``exp(score - lse) = 0``).

Design (flash-attention style, GQA-aware):

* **forward / dq**: one program owns ``TOK`` consecutive query tokens of one sequence and one KV head,
  i.e. ``TOK * G`` query rows (row ``r`` = token ``r // G``, head ``r % G`` of the group; any ``G``,
  the tile is padded to a power of two). Every compressed key/value tile is loaded once for all
  ``G`` heads. Tiles every row sees run without masks; the ragged causal edge is masked; tiles no
  row sees are skipped.
* **dk / dv**: one program owns a tile of compressed keys of one sequence and KV head and walks the
  query rows that see it (again ``TOK * G`` rows per step, all heads of the group), accumulating
  dk/dv in registers: no atomics.
* ``delta = rowsum(o * do)`` comes from a small pre-pass kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .primitives import LOG2E, dot_precision, load_rows, n_visible, pow2, softmax_step, store_o_lse


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _cmp_fwd_kernel(
    Q, K, V, O, LSE,
    CU_Q, CU_K, CU_C,
    scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, TOK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    tq = tl.load(CU_Q + b + 1) - q_start
    tk = tl.load(CU_K + b + 1) - tl.load(CU_K + b)
    c_start = tl.load(CU_C + b)
    if tile * TOK >= tq:
        return
    rows = tl.arange(0, BLOCK_M)
    tok = tile * TOK + rows // G
    head = h * G + rows % G
    row_ok = (rows < TOK * G) & (tok < tq)
    pos = tok + (tk - tq)
    n_vis = n_visible(pos, CMP_BLOCK, CMP_STRIDE)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    gtok = (q_start + tok).to(tl.int64)
    q = load_rows(Q, gtok, head, row_ok, stride_qt, stride_qh, D, BLOCK_D)
    first_pos = tile * TOK + (tk - tq)
    last_pos = tl.minimum(tile * TOK + TOK - 1, tq - 1) + (tk - tq)
    n_full = n_visible(first_pos, CMP_BLOCK, CMP_STRIDE)  # every row sees these
    n_max = n_visible(last_pos, CMP_BLOCK, CMP_STRIDE)  # no row sees beyond
    n_full_tiles = (n_full // BLOCK_N) * BLOCK_N
    cols = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    k_base = K + c_start.to(tl.int64) * stride_kt + h * stride_kh
    v_base = V + c_start.to(tl.int64) * stride_vt + h * stride_vh
    # Tiles seen by every row of the tile: no causal mask.
    for n0 in range(0, n_full_tiles, BLOCK_N):
        kidx = n0 + cols
        k = tl.load(k_base + kidx[:, None] * stride_kt + offs_d[None, :], mask=offs_d[None, :] < D, other=0.0)
        v = tl.load(v_base + kidx[:, None] * stride_vt + offs_dv[None, :], mask=offs_dv[None, :] < DV, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, DOT_PREC)
    # The ragged causal edge.
    for n0 in range(n_full_tiles, n_max, BLOCK_N):
        kidx = n0 + cols
        col_ok = kidx < n_max
        k = tl.load(
            k_base + kidx[:, None] * stride_kt + offs_d[None, :],
            mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0,
        )
        v = tl.load(
            v_base + kidx[:, None] * stride_vt + offs_dv[None, :],
            mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        s = tl.where(kidx[None, :] < n_vis[:, None], s, float("-inf"))
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, DOT_PREC)
    store_o_lse(O, LSE, gtok, head, row_ok, stride_ot, stride_oh, HQ, acc, m_i, l_i, DV, BLOCK_DV, True)


@triton.jit
def _cmp_bwd_delta_kernel(
    O, DO, DELTA, n_rows,
    DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """``delta[r] = sum(o[r] * do[r])`` over contiguous ``(n_rows, DV)`` views of o and do."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs = tl.arange(0, BLOCK_DV)
    mask = (rows[:, None] < n_rows) & (offs[None, :] < DV)
    o = tl.load(O + rows[:, None] * DV + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + rows[:, None] * DV + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, axis=1), mask=rows < n_rows)


@triton.jit
def _cmp_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    CU_Q, CU_K, CU_C,
    scale, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dqt, stride_dqh,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, TOK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dq for the rows of one (token tile, KV head) of one sequence."""
    tile = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    tq = tl.load(CU_Q + b + 1) - q_start
    tk = tl.load(CU_K + b + 1) - tl.load(CU_K + b)
    c_start = tl.load(CU_C + b)
    if tile * TOK >= tq:
        return
    rows = tl.arange(0, BLOCK_M)
    tok = tile * TOK + rows // G
    head = h * G + rows % G
    row_ok = (rows < TOK * G) & (tok < tq)
    pos = tok + (tk - tq)
    n_vis = n_visible(pos, CMP_BLOCK, CMP_STRIDE)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    gtok = (q_start + tok).to(tl.int64)
    dmask = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + gtok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=dmask, other=0.0)
    do = tl.load(
        DO + gtok[:, None] * stride_dot + head[:, None] * stride_doh + offs_dv[None, :],
        mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0,
    )
    lse2 = tl.load(LSE + gtok * HQ + head, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + gtok * HQ + head, mask=row_ok, other=0.0)
    last_pos = tl.minimum(tile * TOK + TOK - 1, tq - 1) + (tk - tq)
    n_max = n_visible(last_pos, CMP_BLOCK, CMP_STRIDE)
    cols = tl.arange(0, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + c_start.to(tl.int64) * stride_kt + h * stride_kh
    v_base = V + c_start.to(tl.int64) * stride_vt + h * stride_vh
    for n0 in range(0, n_max, BLOCK_N):
        kidx = n0 + cols
        col_ok = kidx < n_max
        k = tl.load(
            k_base + kidx[:, None] * stride_kt + offs_d[None, :],
            mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0,
        )
        v = tl.load(
            v_base + kidx[:, None] * stride_vt + offs_dv[None, :],
            mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        p = tl.where(kidx[None, :] < n_vis[:, None], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    tl.store(
        DQ + gtok[:, None] * stride_dqt + head[:, None] * stride_dqh + offs_d[None, :],
        (dq * scale).to(DQ.dtype.element_ty), mask=dmask,
    )


@triton.jit
def _cmp_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DVAL,
    CU_Q, CU_K, CU_C,
    scale, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    stride_dks, stride_dvs, q_chunk,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, TOK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dk/dv of one tile of compressed keys of one sequence and KV head from the query rows (all
    ``G`` heads of the group) of one chunk of ``q_chunk`` queries: split ``s`` writes its partial
    sums to ``DK + s * stride_dks`` (summed afterwards, deterministically)."""
    ktile = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2) // HKV
    h = tl.program_id(2) % HKV
    q_start = tl.load(CU_Q + b)
    tq = tl.load(CU_Q + b + 1) - q_start
    tk = tl.load(CU_K + b + 1) - tl.load(CU_K + b)
    c_start = tl.load(CU_C + b)
    nc = tl.load(CU_C + b + 1) - c_start
    n0 = ktile * BLOCK_N
    if n0 >= nc:
        return
    cols = tl.arange(0, BLOCK_N)
    kidx = n0 + cols
    col_ok = kidx < nc
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    gk = (c_start + kidx).to(tl.int64)
    kmask = col_ok[:, None] & (offs_d[None, :] < D)
    vmask = col_ok[:, None] & (offs_dv[None, :] < DV)
    k = tl.load(K + gk[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=kmask, other=0.0)
    v = tl.load(V + gk[:, None] * stride_vt + h * stride_vh + offs_dv[None, :], mask=vmask, other=0.0)
    # Key i is seen from position i*d + l - 1 on: the first query (local index) that sees the tile.
    first_tok = tl.maximum(n0 * CMP_STRIDE + CMP_BLOCK - 1 - (tk - tq), split * q_chunk)
    end_tok = tl.minimum(tq, (split + 1) * q_chunk)
    key_end = kidx * CMP_STRIDE + CMP_BLOCK - 1  # position from which each key is seen
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    rows = tl.arange(0, BLOCK_M)
    row_tok = rows // G
    head = h * G + rows % G
    row_in = rows < TOK * G
    for t0 in range(first_tok, end_tok, TOK):
        tok = t0 + row_tok
        row_ok = row_in & (tok < end_tok)
        pos = tok + (tk - tq)
        gtok = (q_start + tok).to(tl.int64)
        q = load_rows(Q, gtok, head, row_ok, stride_qt, stride_qh, D, BLOCK_D)
        do = tl.load(
            DO + gtok[:, None] * stride_dot + head[:, None] * stride_doh + offs_dv[None, :],
            mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0,
        )
        lse2 = tl.load(LSE + gtok * HQ + head, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + gtok * HQ + head, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        seen = row_ok[:, None] & col_ok[None, :] & (key_end[None, :] <= pos[:, None])
        p = tl.where(seen, tl.exp2(s - lse2[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    dk_ptr = DK + split.to(tl.int64) * stride_dks + gk[:, None] * stride_dkt + h * stride_dkh + offs_d[None, :]
    dv_ptr = DVAL + split.to(tl.int64) * stride_dvs + gk[:, None] * stride_dvt + h * stride_dvh + offs_dv[None, :]
    tl.store(dk_ptr, (dk * scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(dv_ptr, dv.to(DVAL.dtype.element_ty), mask=vmask)


# ------------------------------------------------------------------------------------------------
# Launchers (plain functions, no global state)
# ------------------------------------------------------------------------------------------------


def _row_tiling(group: int, block_m: int) -> tuple[int, int]:
    """``(BLOCK_M, TOK)``: rows per program (a power of two) and the query tokens they hold."""
    block_m = max(block_m, pow2(group))
    return block_m, max(1, block_m // group)


def _fwd_config(q: torch.Tensor, group: int) -> dict:
    if q.is_cuda:
        big = q.shape[-1] > 64
        block_m, tok = _row_tiling(group, 128)
        return dict(BLOCK_M=block_m, TOK=tok, BLOCK_N=64, num_warps=8 if big else 4, num_stages=3 if big else 2)
    block_m, tok = _row_tiling(group, 16)
    return dict(BLOCK_M=block_m, TOK=tok, BLOCK_N=16)


def _fwd(q, cmp_k, cmp_v, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, max_seqlen_q: int,
         cmp_block: int, cmp_stride: int, scale: float):
    """Launch the forward kernel; returns ``o (Nq, Hq, Dv)`` in q's dtype and ``lse (Nq, Hq)`` fp32."""
    nq, hq, d = q.shape
    hkv, dv = cmp_k.shape[1], cmp_v.shape[-1]
    group = hq // hkv
    batch = cu_seqlens_q.shape[0] - 1
    o = torch.empty(nq, hq, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(nq, hq, device=q.device, dtype=torch.float32)
    cfg = _fwd_config(q, group)
    if nq == 0 or max_seqlen_q == 0:
        return o, lse
    grid = (triton.cdiv(max_seqlen_q, cfg["TOK"]), batch, hkv)
    _cmp_fwd_kernel[grid](
        q, cmp_k, cmp_v, o, lse, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp,
        scale * LOG2E,
        q.stride(0), q.stride(1), cmp_k.stride(0), cmp_k.stride(1), cmp_v.stride(0), cmp_v.stride(1),
        o.stride(0), o.stride(1),
        HQ=hq, G=group, D=d, DV=dv, CMP_BLOCK=cmp_block, CMP_STRIDE=cmp_stride,
        BLOCK_D=pow2(d), BLOCK_DV=pow2(dv), DOT_PREC=dot_precision(q.dtype), **cfg,
    )
    return o, lse


def _bwd_configs(q: torch.Tensor, group: int) -> tuple[dict, dict]:
    if q.is_cuda:
        big = q.shape[-1] > 64
        # H100, bf16, D=128, T=64k (bench_cmp_sel --sweep), whole backward: 64 rows / 4 warps for both
        # kernels 34.2 / 19.5 ms at G=16 / 4; 128 rows / 8 warps 37.6 / 19.4; dk/dv with 32 keys 46 / 26;
        # 3 stages or 256 rows at D=128 run out of shared memory.
        block_m, tok = _row_tiling(group, 64)
        dq_cfg = dict(BLOCK_M=block_m, TOK=tok, BLOCK_N=64, num_warps=4, num_stages=2 if big else 3)
        kv_cfg = dict(BLOCK_M=block_m, TOK=tok, BLOCK_N=64, num_warps=4, num_stages=2 if big else 3)
        return dq_cfg, kv_cfg
    block_m, tok = _row_tiling(group, 16)
    cfg = dict(BLOCK_M=block_m, TOK=tok, BLOCK_N=16)
    return cfg, cfg


def _query_splits(max_seqlen_q: int, programs: int, tok: int, on_gpu: bool) -> tuple[int, int]:
    """Split each key tile's queries into chunks so that the dk/dv grid fills the GPU (about 2048
    programs, half of them empty under the causal mask); chunks of at least 256 queries."""
    if not on_gpu:  # the interpreter: small chunks, so that CPU tests cover the split path
        q_chunk = triton.cdiv(64, tok) * tok
        return triton.cdiv(max_seqlen_q, q_chunk), q_chunk
    splits = max(1, min(triton.cdiv(2048, max(programs, 1)), triton.cdiv(max_seqlen_q, 256)))
    q_chunk = triton.cdiv(triton.cdiv(max_seqlen_q, splits), tok) * tok
    return triton.cdiv(max_seqlen_q, q_chunk), q_chunk


def _bwd(q, cmp_k, cmp_v, o, lse, do, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp,
         max_seqlen_q: int, max_seqlen_cmp: int, cmp_block: int, cmp_stride: int, scale: float):
    """Launch the backward kernels; returns ``dq, dcmp_k, dcmp_v`` in the dtypes of their inputs."""
    nq, hq, d = q.shape
    hkv, dv = cmp_k.shape[1], cmp_v.shape[-1]
    group = hq // hkv
    batch = cu_seqlens_q.shape[0] - 1
    do = do.contiguous()
    o = o.contiguous()
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(cmp_k)
    dvv = torch.zeros_like(cmp_v)
    if nq == 0 or max_seqlen_q == 0:
        return dq, dk, dvv
    delta = torch.empty(nq, hq, device=q.device, dtype=torch.float32)
    block_r = 64 if q.is_cuda else 16
    _cmp_bwd_delta_kernel[(triton.cdiv(nq * hq, block_r),)](
        o, do, delta, nq * hq, DV=dv, BLOCK_R=block_r, BLOCK_DV=pow2(dv)
    )
    dq_cfg, kv_cfg = _bwd_configs(q, group)
    common = dict(
        HQ=hq, G=group, D=d, DV=dv, CMP_BLOCK=cmp_block, CMP_STRIDE=cmp_stride,
        BLOCK_D=pow2(d), BLOCK_DV=pow2(dv), DOT_PREC=dot_precision(q.dtype),
    )
    _cmp_bwd_dq_kernel[(triton.cdiv(max_seqlen_q, dq_cfg["TOK"]), batch, hkv)](
        q, cmp_k, cmp_v, do, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp,
        scale, scale * LOG2E,
        q.stride(0), q.stride(1), cmp_k.stride(0), cmp_k.stride(1), cmp_v.stride(0), cmp_v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        **common, **dq_cfg,
    )
    if max_seqlen_cmp > 0:
        n_ktiles = triton.cdiv(max_seqlen_cmp, kv_cfg["BLOCK_N"])
        splits, q_chunk = _query_splits(max_seqlen_q, n_ktiles * batch * hkv, kv_cfg["TOK"], q.is_cuda)
        if splits == 1:
            dk_part, dv_part = dk[None], dvv[None]
        else:  # every split writes every key row of its tiles (zeros if it has no query): no memset
            dk_part = torch.empty((splits,) + tuple(cmp_k.shape), device=q.device, dtype=torch.float32)
            dv_part = torch.empty((splits,) + tuple(cmp_v.shape), device=q.device, dtype=torch.float32)
        _cmp_bwd_dkdv_kernel[(n_ktiles, splits, batch * hkv)](
            q, cmp_k, cmp_v, do, lse, delta, dk_part, dv_part, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp,
            scale, scale * LOG2E,
            q.stride(0), q.stride(1), cmp_k.stride(0), cmp_k.stride(1), cmp_v.stride(0), cmp_v.stride(1),
            do.stride(0), do.stride(1), dk_part.stride(1), dk_part.stride(2), dv_part.stride(1), dv_part.stride(2),
            dk_part.stride(0), dv_part.stride(0), q_chunk, HKV=hkv,
            **common, **kv_cfg,
        )
        if splits > 1:
            dk = dk_part.sum(0).to(cmp_k.dtype)
            dvv = dv_part.sum(0).to(cmp_v.dtype)
    return dq, dk, dvv
