"""Triton kernels for NSA decoding: a few query tokens per sequence, attending to a KV cache.

Computes exactly the function of :mod:`reference` (cmp attention, block selection from the cmp
probabilities summed over each GQA group, selected attention, window attention, gated sum), for the
last ``Tq`` positions of each row of a (possibly ragged, left-padded) cache laid out like HF's
``DynamicLayer``: ``(B, Hkv, S, D)``.

Decoding is memory bound, so the design is about reading each byte once and filling the GPU:

1. ``_decode_cmp_kernel``, grid ``(B*Hkv, splits, row blocks)``: flash-decoding over the compressed
   cache. Every program loads all ``G`` query heads (times ``Tq``) of one KV head, so each
   compressed key/value is read once per group. Besides the partial softmax state ``(m, l, acc)`` it
   accumulates, for the selection blocks its split owns, the un-normalised block scores
   ``sum_i exp(s_i - m) * overlap(i, j)`` per query row (a tiny ``(rows, blocks)`` tile). A split
   owns the selection blocks whose stride-chunks fall in its range of compressed tokens, so it also
   reads the ``l/d - 1`` compressed keys before its range (they count for the scores only).
2. ``_decode_sel_kernel``, grid ``(B*Hkv, Tq)``: merges the splits' softmax states into each row's
   log-sum-exp, turns the partial block scores into ``p_cmp @ overlap`` summed over the group, and
   takes the top ``n`` blocks in-kernel (forced initial/local blocks first, ties to the lower index).
3. ``_decode_slc_win_kernel``, grid ``(B*Hkv*Tq, units)``: each unit attends the group's query heads
   to a few selected blocks or to a slice of the sliding window (separate softmax states).
4. ``_decode_gate_kernel``, grid ``(B*Hkv*Tq, G)``: merges the partial states of the three branches and
   applies the gates.

Bytes read per (row, KV head): ``N_cmp*(D+Dv)`` for cmp (plus ``(l/d-1)*D`` per split), at most
``n*l'*(D+Dv)`` for slc and ``w*(D+Dv)`` for win, instead of ``S*(D+Dv)`` for dense attention.

Measured on one H100 (bf16, D=128, default NSAParams, CUDA-graph replay, benchmarks/bench_decode.py):
S=64k, 64/4 heads: 27 us at B=1 (dense SDPA 64 us), 126 us at B=16 (dense 699 us). Launched eagerly,
the four launches cost ~100-250 us of host time, more than the GPU work at small batch: use CUDA
graphs (static cache) for decoding.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .params import NSAParams
from .primitives import LOG2E, pow2


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _num_visible_cmp(t, clen, CMP_L: tl.constexpr, CMP_D: tl.constexpr):
    """Compressed tokens visible from position ``t``: complete blocks (``i*d + l - 1 <= t``) that
    exist in the cache (``i < clen``). Written without negative integer division."""
    n = tl.where(t >= CMP_L - 1, (tl.maximum(t - CMP_L + 1, 0)) // CMP_D + 1, 0)
    return tl.minimum(n, clen)


@triton.jit
def _decode_cmp_kernel(
    Q, CK, CV, KLEN, CSTART, CLEN,
    M_out, L_out, ACC_out, BINS_out,
    s_qb, s_qt, s_qh, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    Hkv, Tq, G, D, DV, NSPLIT, ROWS, JPS, qk_scale,
    CMP_L: tl.constexpr, CMP_D: tl.constexpr, R: tl.constexpr, CPB: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    JPS_P: tl.constexpr, PRE_P: tl.constexpr, PREC: tl.constexpr, BINS_PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    mblk = tl.program_id(2)
    b = bh // Hkv
    hk = bh % Hkv

    rows = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < ROWS
    tq = rows // G
    g = rows % G
    klen = tl.load(KLEN + b).to(tl.int32)
    clen = tl.load(CLEN + b).to(tl.int32)
    cst = tl.load(CSTART + b).to(tl.int64)
    t = klen - Tq + tq
    nvis = tl.where(row_ok, _num_visible_cmp(t, clen, CMP_L, CMP_D), 0)
    nvis_max = tl.max(nvis, axis=0)

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b.to(tl.int64) * s_qb + tq[:, None] * s_qt + (hk * G + g)[:, None] * s_qh + offs_d[None, :] * s_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)

    lo = split * CHUNK
    hi = lo + CHUNK
    start = lo - (R - 1)  # the previous R-1 tokens have stride-chunks inside this split's blocks
    end = tl.minimum(hi, nvis_max)

    jl = tl.arange(0, JPS_P)
    chunk_lo = (split * JPS + jl) * CPB  # first stride-chunk of each owned selection block
    chunk_hi = chunk_lo + CPB
    jl_ok = jl < JPS

    k_base = CK + b.to(tl.int64) * s_kb + hk.to(tl.int64) * s_kh + cst * s_kn
    v_base = CV + b.to(tl.int64) * s_vb + hk.to(tl.int64) * s_vh + cst * s_vn

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    bins = tl.zeros([BLOCK_M, JPS_P], tl.float32)
    if R > 1:
        # The R-1 compressed tokens before the split: scores (and max) only, no value.
        ip = lo - PRE_P + tl.arange(0, PRE_P)
        ip_ok = (ip >= start) & (ip >= 0) & (ip < end)
        kp = tl.load(k_base + ip[:, None] * s_kn + offs_d[None, :] * s_kd,
                     mask=ip_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        sp_ = tl.dot(q, tl.trans(kp), input_precision=PREC) * qk_scale
        sp_ = tl.where(ip_ok[None, :] & (ip[None, :] < nvis[:, None]), sp_, float("-inf"))
        m_i = tl.max(sp_, axis=1)
        pp = tl.exp2(sp_ - tl.where(m_i == float("-inf"), 0.0, m_i)[:, None])
        ovp = tl.minimum(ip[:, None] + R, chunk_hi[None, :]) - tl.maximum(ip[:, None], chunk_lo[None, :])
        ovp = tl.where(jl_ok[None, :], tl.maximum(ovp, 0), 0).to(tl.float32)
        bins = tl.dot(pp, ovp, input_precision=BINS_PREC)
    for n0 in range(lo, end, BLOCK_N):
        i = n0 + tl.arange(0, BLOCK_N)
        i_ok = i < end
        k = tl.load(k_base + i[:, None] * s_kn + offs_d[None, :] * s_kd,
                    mask=i_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where(i_ok[None, :] & (i[None, :] < nvis[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + i[:, None] * s_vn + offs_dv[None, :] * s_vd,
                    mask=i_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        # overlap(i, j): stride-chunks [i, i+R) of compressed token i inside selection block j
        ov = tl.minimum(i[:, None] + R, chunk_hi[None, :]) - tl.maximum(i[:, None], chunk_lo[None, :])
        ov = tl.where(jl_ok[None, :], tl.maximum(ov, 0), 0).to(tl.float32)
        bins = bins * alpha[:, None] + tl.dot(p, ov, input_precision=BINS_PREC)
        m_i = m_new

    base = (bh * NSPLIT + split).to(tl.int64) * ROWS + rows
    st_ok = row_ok & ((rows * 0 + start) < end)  # (a vector compare: the interpreter mishandles scalar masks)
    tl.store(M_out + base, m_i, mask=st_ok)
    tl.store(L_out + base, l_i, mask=st_ok)
    tl.store(ACC_out + base[:, None] * DV + offs_dv[None, :], acc, mask=st_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(BINS_out + base[:, None] * JPS + jl[None, :], bins, mask=st_ok[:, None] & jl_ok[None, :])


@triton.jit
def _active_splits(nvis, R: tl.constexpr, CHUNK: tl.constexpr):
    """Splits of the cmp pass that hold data for a row with ``nvis`` visible compressed tokens."""
    return tl.where(nvis > 0, (nvis + R - 1 + CHUNK - 1) // CHUNK, 0)


@triton.jit
def _decode_sel_kernel(
    M_in, L_in, BINS, KLEN, CLEN, IDX_out,
    Hkv, Tq, G, NSPLIT, ROWS, JPS,
    CMP_L: tl.constexpr, CMP_D: tl.constexpr, R: tl.constexpr, CHUNK: tl.constexpr,
    SLC_L: tl.constexpr, N_SEL: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr,
    SPLIT_P: tl.constexpr, JPS_P: tl.constexpr, GB: tl.constexpr,
):
    bh = tl.program_id(0)
    tq = tl.program_id(1)
    b = bh // Hkv
    klen = tl.load(KLEN + b).to(tl.int32)
    clen = tl.load(CLEN + b).to(tl.int32)
    t = klen - Tq + tq
    nvis = _num_visible_cmp(t, clen, CMP_L, CMP_D)
    n_act = _active_splits(nvis, R, CHUNK)

    sp = tl.arange(0, SPLIT_P)
    sp_ok = sp < n_act
    jl = tl.arange(0, JPS_P)
    jl_ok = jl < JPS
    score = tl.zeros([SPLIT_P, JPS_P], tl.float32)
    for h0 in range(0, G, GB):  # GB query heads at a time: their lse, then their weighted scores
        hh = h0 + tl.arange(0, GB)
        st = (bh * NSPLIT + sp).to(tl.int64)[:, None] * ROWS + (tq * G + hh)[None, :]
        mk = sp_ok[:, None] & (hh < G)[None, :]
        m_s = tl.load(M_in + st, mask=mk, other=float("-inf"))
        l_s = tl.load(L_in + st, mask=mk, other=0.0)
        m = tl.max(m_s, axis=0)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        l_tot = tl.sum(l_s * tl.exp2(m_s - m_use[None, :]), axis=0)
        lse = m_use + tl.log2(tl.where(l_tot > 0, l_tot, 1.0))
        w = tl.where((l_tot > 0)[None, :], tl.exp2(m_s - lse[None, :]), 0.0)  # (SPLIT_P, GB)
        part = tl.load(BINS + st[:, :, None] * JPS + jl[None, None, :],
                       mask=mk[:, :, None] & jl_ok[None, None, :], other=0.0)
        score += tl.sum(w[:, :, None] * part, axis=1)

    j = sp[:, None] * JPS + jl[None, :]
    own = t // SLC_L
    eligible = (j <= own) & jl_ok[None, :]
    forced = eligible & ((j < INIT) | (j > own - LOCAL))
    sc = tl.where(forced, float("inf"), score)  # scores are >= 0: their bits order like the floats
    # One sortable int64 key per block: (score bits, then the lower index first); -1 = not eligible.
    low = 2147483647 - j
    key = tl.where(eligible, sc.to(tl.int32, bitcast=True).to(tl.int64) * 4294967296 + low, -1)
    n_take = tl.minimum(own + 1, N_SEL)
    out = IDX_out + (bh * Tq + tq).to(tl.int64) * N_SEL
    for r in range(0, N_SEL):
        best = tl.max(tl.max(key, axis=1), axis=0)
        cand = (2147483647 - (best % 4294967296)).to(tl.int32)
        tl.store(out + r, tl.where(r < n_take, cand, -1))
        key = tl.where(key == best, -1, key)


@triton.jit
def _attend_tile(q, k_ptrs, v_ptrs, kmask, kmask2, vmask2, m_i, l_i, acc, qk_scale, PREC: tl.constexpr):
    """One online-softmax step of ``q`` over a tile of keys (``kmask``: (keys,) allowed keys;
    ``kmask2``/``vmask2``: the same for the 2-D key/value loads)."""
    k = tl.load(k_ptrs, mask=kmask2, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    s = tl.where(kmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_ptrs, mask=vmask2, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _decode_slc_win_kernel(
    Q, K, V, KSTART, KLEN, IDX,
    M_out, L_out, ACC_out,
    s_qb, s_qt, s_qh, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    Hkv, Tq, G, D, DV, NU, qk_scale,
    SLC_L: tl.constexpr, N_SEL: tl.constexpr, WIN: tl.constexpr,
    SPU: tl.constexpr, NS: tl.constexpr, WKEYS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_W: tl.constexpr,
    G_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
):
    bht = tl.program_id(0)
    u = tl.program_id(1)
    bh = bht // Tq
    tq = bht % Tq
    b = bh // Hkv
    hk = bh % Hkv
    gg = tl.arange(0, G_P)
    g_ok = gg < G
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b.to(tl.int64) * s_qb + tq * s_qt + (hk * G + gg)[:, None] * s_qh + offs_d[None, :] * s_qd,
                mask=g_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    klen = tl.load(KLEN + b).to(tl.int32)
    kst = tl.load(KSTART + b).to(tl.int64)
    t = klen - Tq + tq
    k_base = K + b.to(tl.int64) * s_kb + hk.to(tl.int64) * s_kh + kst * s_kn
    v_base = V + b.to(tl.int64) * s_vb + hk.to(tl.int64) * s_vh + kst * s_vn
    dmask = offs_d[None, :] < D
    dvmask = offs_dv[None, :] < DV

    m_i = tl.full([G_P], float("-inf"), tl.float32)
    l_i = tl.zeros([G_P], tl.float32)
    acc = tl.zeros([G_P, BLOCK_DV], tl.float32)
    if u < NS:
        offs_s = tl.arange(0, BLOCK_S)
        for r in range(u * SPU, tl.minimum(u * SPU + SPU, N_SEL)):
            blk = tl.load(IDX + bht.to(tl.int64) * N_SEL + r)
            for off in range(0, SLC_L, BLOCK_S):
                pos = blk * SLC_L + off + offs_s
                ok = (pos >= 0) & (off + offs_s < SLC_L) & (pos <= t)  # blk = -1: no key
                m_i, l_i, acc = _attend_tile(
                    q,
                    k_base + pos[:, None] * s_kn + offs_d[None, :] * s_kd,
                    v_base + pos[:, None] * s_vn + offs_dv[None, :] * s_vd,
                    ok, ok[:, None] & dmask, ok[:, None] & dvmask,
                    m_i, l_i, acc, qk_scale, PREC,
                )
    else:
        offs_w = tl.arange(0, BLOCK_W)
        w0 = tl.maximum(t - WIN + 1, 0) + (u - NS) * WKEYS
        w1 = tl.minimum(w0 + WKEYS, t + 1)
        for p0 in range(w0, w1, BLOCK_W):
            pos = p0 + offs_w
            ok = pos < w1
            m_i, l_i, acc = _attend_tile(
                q,
                k_base + pos[:, None] * s_kn + offs_d[None, :] * s_kd,
                v_base + pos[:, None] * s_vn + offs_dv[None, :] * s_vd,
                ok, ok[:, None] & dmask, ok[:, None] & dvmask,
                m_i, l_i, acc, qk_scale, PREC,
            )
    base = (bht * NU + u).to(tl.int64) * G_P + gg
    tl.store(M_out + base, m_i)
    tl.store(L_out + base, l_i)
    tl.store(ACC_out + base[:, None] * DV + offs_dv[None, :], acc, mask=dvmask)


@triton.jit
def _merge_splits(M, L, ACC, base, stride_s, n_s, offs_dv, DV, SB: tl.constexpr):
    """Normalised attention output (BLOCK_DV,) of one query head from ``n_s`` partial softmax states
    ``(m, l, acc)`` stored at ``base + s * stride_s`` (``acc`` rows of ``DV``); zeros if no key."""
    dv_ok = offs_dv < DV
    m = tl.full([SB], float("-inf"), tl.float32)
    for s0 in range(0, n_s, SB):
        sb = s0 + tl.arange(0, SB)
        m = tl.maximum(m, tl.load(M + base + sb.to(tl.int64) * stride_s, mask=sb < n_s, other=float("-inf")))
    m_max = tl.max(m, axis=0)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_tot = tl.zeros([SB], tl.float32)
    acc = tl.zeros([offs_dv.shape[0]], tl.float32)
    for s0 in range(0, n_s, SB):
        sb = s0 + tl.arange(0, SB)
        ok = sb < n_s
        ix = base + sb.to(tl.int64) * stride_s
        w = tl.exp2(tl.load(M + ix, mask=ok, other=float("-inf")) - m_use)
        l_tot += w * tl.load(L + ix, mask=ok, other=0.0)
        a = tl.load(ACC + ix[:, None] * DV + offs_dv[None, :], mask=ok[:, None] & dv_ok[None, :], other=0.0)
        acc += tl.sum(w[:, None] * a, axis=0)
    lt = tl.sum(l_tot, axis=0)
    return acc / tl.where(lt > 0, lt, 1.0)


@triton.jit
def _decode_gate_kernel(
    CM, CL, CACC, SM, SL, SACC, GATES, OUT, KLEN, CLEN,
    s_gb, s_gt, s_gh, s_gc,
    s_ob, s_ot, s_oh, s_od,
    Hkv, Tq, G, DV, NSPLIT, ROWS, NU,
    CMP_L: tl.constexpr, CMP_D: tl.constexpr, R: tl.constexpr, CHUNK: tl.constexpr, NS: tl.constexpr,
    G_P: tl.constexpr, BLOCK_DV: tl.constexpr, SB: tl.constexpr,
):
    """One program per (row, query token, query head): merges the partial states of the three
    branches and applies the gates."""
    bht = tl.program_id(0)
    h = tl.program_id(1)
    bh = bht // Tq
    tq = bht % Tq
    b = bh // Hkv
    hk = bh % Hkv
    offs_dv = tl.arange(0, BLOCK_DV)
    klen = tl.load(KLEN + b).to(tl.int32)
    clen = tl.load(CLEN + b).to(tl.int32)
    t = klen - Tq + tq
    n_act = _active_splits(_num_visible_cmp(t, clen, CMP_L, CMP_D), R, CHUNK)

    o_cmp = _merge_splits(CM, CL, CACC, (bh * NSPLIT).to(tl.int64) * ROWS + tq * G + h, ROWS, n_act,
                          offs_dv, DV, SB)
    ub = (bht * NU).to(tl.int64) * G_P + h
    o_slc = _merge_splits(SM, SL, SACC, ub, G_P, NS, offs_dv, DV, SB)
    o_win = _merge_splits(SM, SL, SACC, ub + NS * G_P, G_P, NU - NS, offs_dv, DV, SB)

    head = hk * G + h
    gp = GATES + b.to(tl.int64) * s_gb + tq * s_gt + head * s_gh
    g0 = tl.load(gp).to(tl.float32)
    g1 = tl.load(gp + s_gc).to(tl.float32)
    g2 = tl.load(gp + 2 * s_gc).to(tl.float32)
    o = g0 * o_cmp + g1 * o_slc + g2 * o_win
    optr = OUT + b.to(tl.int64) * s_ob + tq * s_ot + head * s_oh + offs_dv * s_od
    tl.store(optr, o.to(OUT.dtype.element_ty), mask=offs_dv < DV)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs, so that tests exercise several splits


def _check_inputs(q, k_cache, v_cache, cmp_k_cache, cmp_v_cache, gates, k_start, k_len, cmp_start, cmp_len):
    if q.dim() != 4:
        raise ValueError(f"q must be (B, Tq, Hq, D); got shape {tuple(q.shape)}")
    bsz, tq, hq, d = q.shape
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("cmp_k_cache", cmp_k_cache),
                    ("cmp_v_cache", cmp_v_cache)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be (B, Hkv, S, D); got shape {tuple(x.shape)}")
        if x.shape[0] != bsz:
            raise ValueError(f"{name} has batch size {x.shape[0]}; q has {bsz}")
        if x.dtype != q.dtype:
            raise ValueError(f"{name} dtype {x.dtype} differs from q's {q.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device}; q is on {q.device}")
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA")
    if tq < 1:
        raise ValueError(f"q must hold at least one query token per row; got Tq={tq}")
    if k_cache.shape[-1] != d or cmp_k_cache.shape[-1] != d:
        raise ValueError(f"key head dims {k_cache.shape[-1]} / {cmp_k_cache.shape[-1]} must equal q's head dim {d}")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} must match k_cache {tuple(k_cache.shape)} in (B, Hkv, S)")
    if cmp_v_cache.shape[:3] != cmp_k_cache.shape[:3] or cmp_k_cache.shape[1] != hkv:
        raise ValueError(
            f"cmp_k_cache {tuple(cmp_k_cache.shape)} / cmp_v_cache {tuple(cmp_v_cache.shape)} must match each other "
            f"in (B, Hkv, Sc) and have Hkv={hkv}"
        )
    if cmp_v_cache.shape[-1] != v_cache.shape[-1]:
        raise ValueError(f"cmp_v_cache head dim {cmp_v_cache.shape[-1]} must equal v_cache's {v_cache.shape[-1]}")
    if gates.shape != (bsz, tq, hq, 3):
        raise ValueError(f"gates must be (B, Tq, Hq, 3) = {(bsz, tq, hq, 3)}; got {tuple(gates.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q dtype {q.dtype} is not supported: use float16, bfloat16 or float32")
    for name, x in (("k_start", k_start), ("k_len", k_len), ("cmp_start", cmp_start), ("cmp_len", cmp_len)):
        if not isinstance(x, torch.Tensor) or x.shape != (bsz,) or x.dtype not in (torch.int32, torch.int64):
            got = (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be an int32/int64 tensor of shape ({bsz},); got {got}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device}; q is on {q.device}")
    return bsz, tq, hq, hkv, s, d


def _check_lengths(tq, s, sc, k_start, k_len, cmp_start, cmp_len):
    """Per-row bounds (needs the values on the host: one small copy)."""
    ks, kl, cs, cl = torch.stack([k_start.long(), k_len.long(), cmp_start.long(), cmp_len.long()]).cpu().tolist()
    for b in range(len(ks)):
        if not tq <= kl[b]:
            raise ValueError(f"k_len[{b}]={kl[b]} must be >= Tq={tq}: the queries are the last Tq valid positions")
        if not (0 <= ks[b] and ks[b] + kl[b] <= s):
            raise ValueError(f"k_start[{b}]={ks[b]}, k_len[{b}]={kl[b]}: need 0 <= k_start and k_start + k_len <= S={s}")
        if not (0 <= cs[b] and cl[b] >= 0 and cs[b] + cl[b] <= sc):
            raise ValueError(
                f"cmp_start[{b}]={cs[b]}, cmp_len[{b}]={cl[b]}: need 0 <= cmp_start, 0 <= cmp_len and "
                f"cmp_start + cmp_len <= Sc={sc}"
            )


@functools.lru_cache(maxsize=256)
def _plan(bsz, hkv, tq, g, s, sc, d, dv, params: NSAParams, device, cmp_chunk=None, slc_per_unit=None,
          win_per_unit=None):
    """Tile sizes and work split. Returns a dict of launch parameters."""
    sms = _num_sms(device)
    on_gpu = device.type == "cuda"
    r = params.cmp_block // params.cmp_stride
    cpb = params.slc_block // params.cmp_stride  # stride-chunks per selection block
    rows = tq * g
    block_m = min(pow2(rows), 64)
    m_blocks = triton.cdiv(rows, block_m)
    big_d = max(d, dv) > 128
    block_n = (32 if big_d else 64) if on_gpu else 16
    base = block_n * cpb // math.gcd(block_n, cpb)  # lcm: whole tiles and whole selection blocks
    if cmp_chunk is None:
        # Enough programs for ~2 waves, but splits of at least one tile and at most ~32 owned blocks
        # (the block-score tile costs (rows x tile) @ (tile x blocks) per tile).
        # Measured on an H200 at 64k (bench_decode.py --sweep): splits of >= 128 compressed tokens (two
        # 64-token tiles: 24 vs 27 us at B=1) and up to 64 owned blocks (256 tokens at d=16: 107 vs 116 us
        # at B=16, 64/4) beat the smaller, more numerous splits.
        want_splits = max(1, triton.cdiv(2 * sms, bsz * hkv * m_blocks))
        chunk = base
        while chunk < 128 and chunk // cpb < 64:
            chunk *= 2
        while chunk * want_splits < sc and chunk // cpb < 64 and chunk < 4096:
            chunk *= 2
        cmp_chunk = chunk
    else:
        cmp_chunk = triton.cdiv(cmp_chunk, base) * base  # (tests) at least the asked size
    jps = cmp_chunk // cpb
    # A split also owns the selection blocks fed by the R-1 compressed tokens before its range, so the
    # last one may start at sc (when sc is a multiple of the chunk): count it (see _active_splits).
    nsplit = max(1, triton.cdiv(sc + r - 1, cmp_chunk))
    n_slc_max = triton.cdiv(s, params.slc_block)
    split_p = triton.next_power_of_2(max(nsplit, triton.cdiv(n_slc_max, jps)))

    # selected + window units
    block_s = pow2(min(params.slc_block, 64))
    block_w = 64 if on_gpu else 16
    win_keys = min(params.window, s)
    if slc_per_unit is None or win_per_unit is None:
        total = params.slc_count * params.slc_block + win_keys
        want_units = max(2, triton.cdiv(4 * sms, bsz * hkv * tq))
        keys_per_unit = max(block_w, triton.cdiv(total, want_units))
        if slc_per_unit is None:
            slc_per_unit = max(1, min(params.slc_count, keys_per_unit // params.slc_block))
        if win_per_unit is None:
            win_per_unit = max(block_w, triton.cdiv(keys_per_unit, block_w) * block_w)
    win_per_unit = triton.cdiv(win_per_unit, block_w) * block_w  # (tests) at least the asked size
    ns = triton.cdiv(params.slc_count, slc_per_unit)
    nw = triton.cdiv(win_keys, win_per_unit)
    return dict(
        r=r, cpb=cpb, rows=rows, block_m=block_m, m_blocks=m_blocks, block_n=block_n, chunk=cmp_chunk, jps=jps,
        jps_p=pow2(jps), nsplit=nsplit, split_p=split_p, block_s=block_s, block_w=block_w, spu=slc_per_unit,
        wkeys=win_per_unit, ns=ns, nu=ns + nw, g_p=pow2(g), block_d=pow2(d), block_dv=pow2(dv),
    )


def nsa_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cmp_k_cache: torch.Tensor,
    cmp_v_cache: torch.Tensor,
    gates: torch.Tensor,
    k_start: torch.Tensor,
    k_len: torch.Tensor,
    cmp_start: torch.Tensor,
    cmp_len: torch.Tensor,
    params: NSAParams,
    scale: float | None = None,
    *,
    check_lengths: bool | None = None,
    return_block_indices: bool = False,
    _cmp_chunk: int | None = None,
    _slc_per_unit: int | None = None,
    _win_per_unit: int | None = None,
    _cmp_stages: int = 3,
    _cmp_warps: int = 4,
):
    """NSA for the last ``Tq`` positions of every row of a KV cache (see :mod:`reference`).

    Args:
        q: ``(B, Tq, Hq, D)`` queries; the ``Tq`` queries of row ``b`` are the last ``Tq`` of its
            ``k_len[b]`` valid positions.
        k_cache, v_cache: ``(B, Hkv, S, D)`` / ``(B, Hkv, S, Dv)`` (any strides); row ``b``'s keys
            are ``k_cache[b, :, k_start[b] : k_start[b] + k_len[b]]`` (position 0 at ``k_start[b]``).
        cmp_k_cache, cmp_v_cache: ``(B, Hkv, Sc, D)`` / ``(B, Hkv, Sc, Dv)``; row ``b``'s compressed
            token ``i`` (block ``[i*d, i*d + l)`` of the row) is at ``cmp_start[b] + i``, for
            ``i < cmp_len[b]``. Tokens of incomplete blocks are never read; ``cmp_len[b]`` should be
            ``num_cmp_blocks(k_len[b])`` (a smaller value hides the missing blocks).
        gates: ``(B, Tq, Hq, 3)`` gate values (cmp, slc, win).
        k_start, k_len, cmp_start, cmp_len: ``(B,)`` int32/int64 on q's device.
        params: the NSA sizes; scale: softmax scale, ``D ** -0.5`` by default.
        check_lengths: check the per-row lengths against the cache sizes (one small device-to-host
            copy). Default: on, except while a CUDA graph is being captured.
        return_block_indices: also return the chosen blocks ``(B, Hkv, Tq, n)`` int32 (unordered,
            ``-1`` padding).

    Returns:
        ``(B, Tq, Hq, Dv)`` in ``q.dtype``.
    """
    bsz, tq, hq, hkv, s, d = _check_inputs(
        q, k_cache, v_cache, cmp_k_cache, cmp_v_cache, gates, k_start, k_len, cmp_start, cmp_len
    )
    if not isinstance(params, NSAParams):
        raise ValueError(f"params must be an NSAParams; got {type(params).__name__}")
    dv = v_cache.shape[-1]
    sc = cmp_k_cache.shape[2]
    if check_lengths is None:
        check_lengths = not (q.is_cuda and torch.cuda.is_current_stream_capturing())
    if check_lengths:
        _check_lengths(tq, s, sc, k_start, k_len, cmp_start, cmp_len)
    scale = d ** -0.5 if scale is None else float(scale)
    g = hq // hkv
    dev = q.device
    pl = _plan(bsz, hkv, tq, g, s, sc, d, dv, params, dev, _cmp_chunk, _slc_per_unit, _win_per_unit)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    qk_scale = scale * LOG2E
    f32 = dict(dtype=torch.float32, device=dev)

    # 1. compressed pass
    rows, nsplit, nu, g_p = pl["rows"], pl["nsplit"], pl["nu"], pl["g_p"]
    # One scratch allocation for every partial result (fp32): cmp (m, l, acc, block scores), slc/win (m, l, acc).
    n_c = bsz * hkv * nsplit * rows
    n_s = bsz * hkv * tq * nu * g_p
    sizes = [n_c, n_c, n_c * dv, n_c * pl["jps"], n_s, n_s, n_s * dv]
    scratch = torch.empty(sum(sizes), **f32).split(sizes)
    cm, cl, cacc, bins, sm, sl, sacc = scratch
    _decode_cmp_kernel[(bsz * hkv, nsplit, pl["m_blocks"])](
        q, cmp_k_cache, cmp_v_cache, k_len, cmp_start, cmp_len,
        cm, cl, cacc, bins,
        *q.stride(), *cmp_k_cache.stride(), *cmp_v_cache.stride(),
        hkv, tq, g, d, dv, nsplit, rows, pl["jps"], qk_scale,
        CMP_L=params.cmp_block, CMP_D=params.cmp_stride, R=pl["r"], CPB=pl["cpb"], CHUNK=pl["chunk"],
        BLOCK_M=pl["block_m"], BLOCK_N=pl["block_n"], BLOCK_D=pl["block_d"], BLOCK_DV=pl["block_dv"],
        JPS_P=pl["jps_p"], PRE_P=pow2(pl["r"] - 1), PREC=prec, BINS_PREC="tf32x3" if q.is_cuda else "ieee",
        num_warps=_cmp_warps, num_stages=_cmp_stages,
    )
    # 2. block selection
    idx = torch.empty(bsz, hkv, tq, params.slc_count, dtype=torch.int32, device=dev)
    _decode_sel_kernel[(bsz * hkv, tq)](
        cm, cl, bins, k_len, cmp_len, idx,
        hkv, tq, g, nsplit, rows, pl["jps"],
        CMP_L=params.cmp_block, CMP_D=params.cmp_stride, R=pl["r"], CHUNK=pl["chunk"],
        SLC_L=params.slc_block, N_SEL=params.slc_count, INIT=params.init_blocks, LOCAL=params.local_blocks,
        SPLIT_P=pl["split_p"], JPS_P=pl["jps_p"],
        GB=max(1, min(triton.next_power_of_2(g), 16384 // (pl["split_p"] * pl["jps_p"]))), num_warps=8,
    )
    # 3. selected + window attention, split into units
    _decode_slc_win_kernel[(bsz * hkv * tq, nu)](
        q, k_cache, v_cache, k_start, k_len, idx,
        sm, sl, sacc,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        hkv, tq, g, d, dv, nu, qk_scale,
        SLC_L=params.slc_block, N_SEL=params.slc_count, WIN=params.window,
        SPU=pl["spu"], NS=pl["ns"], WKEYS=pl["wkeys"], BLOCK_S=pl["block_s"], BLOCK_W=pl["block_w"],
        G_P=g_p, BLOCK_D=pl["block_d"], BLOCK_DV=pl["block_dv"], PREC=prec, num_warps=4, num_stages=2,
    )
    # 4. merge and gate
    out = torch.empty(bsz, tq, hq, dv, dtype=q.dtype, device=dev)
    _decode_gate_kernel[(bsz * hkv * tq, g)](
        cm, cl, cacc, sm, sl, sacc, gates, out, k_len, cmp_len,
        *gates.stride(), *out.stride(),
        hkv, tq, g, dv, nsplit, rows, nu,
        CMP_L=params.cmp_block, CMP_D=params.cmp_stride, R=pl["r"], CHUNK=pl["chunk"], NS=pl["ns"],
        G_P=g_p, BLOCK_DV=pl["block_dv"], SB=max(16, min(64, 4096 // pl["block_dv"])), num_warps=4,
    )
    if return_block_indices:
        return out, idx
    return out
