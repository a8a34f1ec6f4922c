"""Triton kernel for NSA's block selection: which selection blocks each query attends to ("slc" input).

Computes exactly :func:`reference.select_blocks` fed with the reference's block scores (see
:func:`reference.chunk_overlap_matrix` and the module docstring of :mod:`reference`):

* ``p_cmp[h, t, i] = exp(scale * q[t, h] . cmp_k[i, h // G] - lse[t, h])`` for the compressed tokens
  ``i`` the query sees (``lse`` from the cmp kernel, :mod:`cmp`);
* selection block ``j`` scores ``sum_h sum_i p_cmp[h, t, i] * M[i, j]`` (heads of one KV group summed),
  ``M[i, j]`` the number of stride-chunks of compression block ``i`` inside block ``j``;
* eligible blocks ``j <= t // slc_block``; the first ``init_blocks`` and the ``local_blocks`` most
  recent are forced; the rest of ``slc_count`` go by score, ties to the lower block index;
* output int32 ``(Nq, Hkv, slc_count)``, ascending, ``-1`` padding.

Design: one program owns ``TOK`` query tokens of one sequence and one KV head (``TOK * G`` query rows,
the group padded to a power of two ``GP``). It streams over the compressed keys in tiles that map to
``NB`` whole selection blocks, recomputes the probabilities with the saved ``lse`` (never writing a
score matrix to memory), sums them over the group, spreads them onto the blocks (each compressed
token feeds its own block and, through its last chunks, the next one: a carry crosses tiles), and
merges the tile's ``NB`` block scores into a running top-``NB`` kept in registers: every candidate is
a 64-bit key ``(float bits of the score) << 32 | (2**31 - 1 - j)``, so one integer order ranks by
score and breaks ties towards the lower index; a sorted running list and the ascending-sorted new
keys merge by an elementwise max (one bitonic half-cleaner step) and one more sort.

Limit: ``cmp_block <= slc_block`` (a compression block then touches at most two selection blocks);
other settings raise ``ValueError`` (the reference handles them).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .primitives import LOG2E, bitonic_sort, dot_precision, n_visible, pow2


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _sel_fwd_kernel(
    Q, K, LSE, OUT,
    CU_Q, CU_K, CU_C,
    scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SLC_BLOCK: tl.constexpr,
    NSEL: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr,
    TOK: tl.constexpr, NB: tl.constexpr, LOG_NB: tl.constexpr, DOT_PREC: tl.constexpr,
    WORK: tl.constexpr,  # 3 = everything; 1, 2 = partial work, only to time the stages (benchmarks)
    SKIP: tl.constexpr,  # 1: skip the top-n merge of tiles without a candidate above the cut-off
):
    R: tl.constexpr = SLC_BLOCK // CMP_STRIDE  # stride-chunks per selection block
    C: tl.constexpr = CMP_BLOCK // CMP_STRIDE  # stride-chunks per compression block
    BN: tl.constexpr = NB * R  # compressed tokens per tile
    M: tl.constexpr = TOK * GP
    tile = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    tq = tl.load(CU_Q + b + 1) - q_start
    tk = tl.load(CU_K + b + 1) - tl.load(CU_K + b)
    c_start = tl.load(CU_C + b)
    nc = tl.load(CU_C + b + 1) - c_start
    if tile * TOK >= tq:
        return
    # Query rows: token r // GP, head r % GP of the group (heads >= G are padding).
    rows = tl.arange(0, M)
    g = rows % GP
    tok = tile * TOK + rows // GP
    row_ok = (g < G) & (tok < tq)
    pos = tok + (tk - tq)
    n_vis = n_visible(pos, CMP_BLOCK, CMP_STRIDE)
    gtok = (q_start + tok).to(tl.int64)
    head = h * G + g
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(
        Q + gtok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0,
    )
    lse2 = tl.load(LSE + gtok * HQ + head, mask=row_ok, other=float("inf")) * 1.4426950408889634
    # Per-token quantities.
    toks = tile * TOK + tl.arange(0, TOK)
    own = (toks + (tk - tq)) // SLC_BLOCK  # the query's own selection block
    last_pos = tl.minimum(tile * TOK + TOK - 1, tq - 1) + (tk - tq)
    n_blocks = last_pos // SLC_BLOCK + 1
    # Compressed token i (tile-local, tiles start on a block boundary) has C chunks: those that stay
    # in its own block, and the rest that spill into the next one (C <= R).
    icol = tl.arange(0, BN)
    w_own = tl.minimum(C, R - icol % R).to(tl.float32)
    w_spill = C - w_own
    jcol = tl.arange(0, NB)
    shift = ((jcol[:, None] + 1) == jcol[None, :]).to(tl.float32)  # (NB, NB): block j -> j + 1
    pos_nb = tl.broadcast_to(jcol[None, :], (TOK, NB))
    best = tl.full([TOK, NB], -1, dtype=tl.int64)
    carry = tl.zeros([TOK], dtype=tl.float32)
    k_base = K + c_start.to(tl.int64) * stride_kt + h * stride_kh
    for j0 in range(0, n_blocks, NB):
        kidx = j0 * R + icol
        k = tl.load(
            k_base + kidx[:, None] * stride_kt + offs_d[None, :],
            mask=(kidx[:, None] < nc) & (offs_d[None, :] < D), other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        p = tl.where(kidx[None, :] < n_vis[:, None], tl.exp2(s - lse2[:, None]), 0.0)
        p_tok = tl.sum(tl.reshape(p, (TOK, GP, BN)), axis=1)  # summed over the group's heads
        if WORK == 1:  # timing knob: scores only (kept alive through the output)
            best = tl.maximum(best, tl.sum(p_tok, axis=1).to(tl.int32, bitcast=True).to(tl.int64)[:, None])
        else:
            own_sum = tl.sum(tl.reshape(p_tok * w_own[None, :], (TOK, NB, R)), axis=2)
            spill = tl.sum(tl.reshape(p_tok * w_spill[None, :], (TOK, NB, R)), axis=2)
            spilled_in = tl.sum(spill[:, :, None] * shift[None, :, :], axis=1)
            score = own_sum + spilled_in + tl.where(jcol[None, :] == 0, carry[:, None], 0.0)
            carry = tl.sum(tl.where(jcol[None, :] == NB - 1, spill, 0.0), axis=1)
            j = j0 + jcol
            eligible = j[None, :] <= own[:, None]
            forced = eligible & ((j[None, :] < INIT) | (j[None, :] > own[:, None] - LOCAL))
            bits = tl.where(forced, 2139095040, score.to(tl.int32, bitcast=True)).to(tl.int64)  # +inf if forced
            key = tl.where(eligible, (bits << 32) | (2147483647 - j)[None, :].to(tl.int64), -1)
            if WORK == 2:  # timing knob: block scores, no top-n
                best = tl.maximum(best, key)
            else:
                # Skip the merge when no row has a candidate above its cut-off, the NSEL-th best key so
                # far (``best`` is sorted descending): the top NSEL of (best, new) is then best's own.
                # Keys are distinct (each carries its block index), so nothing ties with the cut-off.
                cutoff = tl.sum(tl.where(jcol[None, :] == NSEL - 1, best, 0), axis=1)
                beats = tl.max(key, axis=1) > cutoff
                if (tl.sum(beats.to(tl.int32), axis=0) > 0) | (SKIP == 0):
                    # Top-NB of (best, new): best sorted descending, new ascending, elementwise max, re-sort.
                    new = bitonic_sort(key, pos_nb, LOG_NB, False, 1)
                    best = bitonic_sort(tl.maximum(best, new), pos_nb, LOG_NB, True, LOG_NB)
    taken = (jcol[None, :] < NSEL) & (best >= 0)
    idx = tl.where(taken, 2147483647 - (best & 2147483647).to(tl.int32), 2147483647)
    idx = bitonic_sort(idx, pos_nb, LOG_NB, False, 1)
    idx = tl.where(idx == 2147483647, -1, idx)
    out_tok = (q_start + toks).to(tl.int64)
    tl.store(
        OUT + (out_tok[:, None] * HKV + h) * NSEL + jcol[None, :], idx,
        mask=(toks[:, None] < tq) & (jcol[None, :] < NSEL),
    )


# ------------------------------------------------------------------------------------------------
# Launcher (plain function, no global state)
# ------------------------------------------------------------------------------------------------


def _select_config(q: torch.Tensor, group: int) -> dict:
    gp = triton.next_power_of_2(group)
    if not q.is_cuda:
        return dict(TOK=max(1, 64 // gp), )
    # H100, D=128, T=64k (bench_cmp_sel --sweep): 256 rows / 8 warps at G=16 (16.5 ms; 128 rows: 19-22
    # ms), 128 rows / 4 warps at G=4 (9.5 ms; 64 rows / 4 warps 11.4, 128 rows / 8 warps 15.5).
    # Summing the group's heads with tensor-core matmuls (p split in 3 bf16 parts) was 3x slower.
    rows, warps = (256, 8) if gp >= 16 else (128, 4)
    return dict(TOK=max(1, rows // gp), num_warps=warps, num_stages=2, )


def _fwd(q, cmp_k, lse, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, max_seqlen_q: int,
         cmp_block: int, cmp_stride: int, slc_block: int, slc_count: int, init_blocks: int,
         local_blocks: int, scale: float, _work: int = 3, _skip: bool = True):
    """Launch the selection kernel; returns int32 ``(Nq, Hkv, slc_count)`` block indices.
    (``_work`` < 3 skips stages, for timing only: the result is then wrong. ``_skip=False`` merges
    every tile into the running top-n, the same result without the cut-off test: tests, timing.)"""
    nq, hq, d = q.shape
    hkv = cmp_k.shape[1]
    group = hq // hkv
    batch = cu_seqlens_q.shape[0] - 1
    out = torch.empty(nq, hkv, slc_count, device=q.device, dtype=torch.int32)
    if nq == 0 or max_seqlen_q == 0:
        return out
    cfg = _select_config(q, group)
    nb = pow2(slc_count)
    grid = (triton.cdiv(max_seqlen_q, cfg["TOK"]), batch, hkv)
    _sel_fwd_kernel[grid](
        q, cmp_k, lse, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp,
        scale * LOG2E,
        q.stride(0), q.stride(1), cmp_k.stride(0), cmp_k.stride(1),
        HQ=hq, HKV=hkv, G=group, GP=triton.next_power_of_2(group), D=d, BLOCK_D=pow2(d),
        CMP_BLOCK=cmp_block, CMP_STRIDE=cmp_stride, SLC_BLOCK=slc_block,
        NSEL=slc_count, INIT=init_blocks, LOCAL=local_blocks, NB=nb, LOG_NB=nb.bit_length() - 1,
        DOT_PREC=dot_precision(q.dtype), WORK=_work, SKIP=int(_skip), **cfg,
    )
    return out
