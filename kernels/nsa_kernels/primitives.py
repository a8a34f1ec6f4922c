"""Shared primitives of the Triton kernels: constants, launch-size helpers, layout and input checks,
the varlen offsets' validation (one device-to-host copy), and the ``@triton.jit`` building blocks of
the attention kernels (row-tile load, online-softmax step, output/logsumexp epilogue).

Layering (each module imports only from the ones above it): ``params`` -> ``primitives`` -> the branch
kernels (``cmp``, ``sel``, ``slc``, ``win``, ``gate``, ``decode``: kernels and launchers only) -> ``ops``
(the ``torch.library`` custom ops) -> ``parallel`` (the public Triton functions) -> ``nsa`` (the entry
point: Triton on CUDA, the reference elsewhere).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .params import num_cmp_blocks

LOG2E = 1.4426950408889634
BIG = 2**31 - 1  # int32 padding that sorts after every real key position

# ------------------------------------------------------------------------------------------------
# Launch sizes and layouts
# ------------------------------------------------------------------------------------------------


def pow2(n: int, floor: int = 16) -> int:
    """The smallest power of two >= ``n`` and >= ``floor`` (Triton tile sizes)."""
    return max(floor, triton.next_power_of_2(int(n)))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs keep exact fp32 products (the spec's precision); 16-bit inputs use the tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def rows_contiguous(*xs: Tensor) -> tuple[Tensor, ...]:
    """The kernels need the last axis contiguous (token/head strides are free): a no-op normally."""
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in xs)


def dense(*xs: Tensor) -> tuple[Tensor, ...]:
    """Offsets, logsumexps and index tensors are addressed as dense arrays."""
    return tuple(x.contiguous() for x in xs)


# ------------------------------------------------------------------------------------------------
# Input checks (ValueError naming the bad value) and varlen sizes
# ------------------------------------------------------------------------------------------------


def check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k):
    """Shape/dtype checks shared by the selected and window kernels (ValueError naming the value)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be (tokens, heads, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"q dtype {q.dtype} is not supported: use bfloat16, float16 or float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == cu_seqlens_q.device == cu_seqlens_k.device):
        raise ValueError("q, k, v and cu_seqlens must be on one device")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a positive multiple of key/value heads ({hkv}) for GQA")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same tokens and heads")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q head_dim ({q.shape[-1]}) must equal k head_dim ({k.shape[-1]})")
    for name, cu, n in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if cu.dim() != 1 or cu.numel() < 2 or cu.dtype != torch.int32:
            raise ValueError(f"{name} must be int32 of shape (B+1,) with B >= 1; got {cu.dtype} {tuple(cu.shape)}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q ({cu_seqlens_q.numel()}) and cu_seqlens_k ({cu_seqlens_k.numel()}) must have the same length"
        )


def check_cu_seqlens_meta(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, cu_seqlens_cmp: Tensor, device) -> None:
    """Checks of the offsets that need no copy to the host: 1-D int32 ``(B+1,)``, same B, on ``device``."""
    cus = (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k), ("cu_seqlens_cmp", cu_seqlens_cmp))
    for name, cu in cus:
        if cu.dim() != 1 or cu.dtype != torch.int32 or cu.shape[0] < 2:
            raise ValueError(f"{name} must be a 1-D int32 tensor of B+1 >= 2 offsets; got {cu.dtype} {tuple(cu.shape)}")
        if cu.shape[0] != cu_seqlens_q.shape[0]:
            raise ValueError(f"{name} has {cu.shape[0]} entries, cu_seqlens_q has {cu_seqlens_q.shape[0]}")
        if cu.device != device:
            raise ValueError(f"{name} is on {cu.device}, q on {device}")


def varlen_plan(
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, cu_seqlens_cmp: Tensor,
    nq: int, nk: int, nc: int, cmp_block: int, cmp_stride: int,
) -> tuple[int, int, int]:
    """Validate the offsets against the token counts (``nk < 0``: key total unchecked) and return
    ``(max_seqlen_q, max_seqlen_k, max_seqlen_cmp)``. One device-to-host copy of all three offsets;
    ``ValueError`` naming the bad values otherwise."""
    b1 = cu_seqlens_q.shape[0]
    flat = torch.cat([cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp]).tolist()  # the one transfer
    bq, bk, bc = flat[:b1], flat[b1 : 2 * b1], flat[2 * b1 :]
    lq = [e - s for s, e in zip(bq[:-1], bq[1:])]
    lk = [e - s for s, e in zip(bk[:-1], bk[1:])]
    lc = [e - s for s, e in zip(bc[:-1], bc[1:])]
    if bq[0] != 0 or bq[-1] != nq or min(lq) < 0:
        raise ValueError(f"cu_seqlens_q={bq} must rise from 0 to the {nq} query tokens")
    if bk[0] != 0 or (nk >= 0 and bk[-1] != nk) or min(lk) < 0:
        to = f" to the {nk} key tokens" if nk >= 0 else ""
        raise ValueError(f"cu_seqlens_k={bk} must rise from 0{to}")
    if bc[0] != 0 or bc[-1] != nc or min(lc) < 0:
        raise ValueError(f"cu_seqlens_cmp={bc} must rise from 0 to the {nc} compressed tokens")
    if any(a > b for a, b in zip(lq, lk)):
        raise ValueError(
            f"every sequence needs at least as many keys as queries (queries are the last Tq of Tk); "
            f"got query lengths {lq} and key lengths {lk}"
        )
    expect = [num_cmp_blocks(n, cmp_block, cmp_stride) for n in lk]
    if lc != expect:
        raise ValueError(
            f"cu_seqlens_cmp gives {lc} compressed tokens per sequence; key lengths {lk} have {expect} "
            f"complete blocks (cmp_block={cmp_block}, cmp_stride={cmp_stride})"
        )
    return max(lq), max(lk), max(lc)


def max_lengths(
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, cu_seqlens_cmp: Tensor, nq: int, nk: int, nc: int,
    cmp_block: int, cmp_stride: int, max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
) -> tuple[int, int]:
    """``(max_seqlen_q, max_seqlen_cmp)`` for the launch grids, with at most one device-to-host copy.

    * ``max_seqlen_k`` given: no copy, the offsets are trusted (``max_seqlen_q`` defaults to it: queries
      never outnumber keys; the maxima may be upper bounds, never underestimates);
    * otherwise, eagerly: :func:`varlen_plan` (one copy of the three offsets, validated against the
      token counts ``nq``/``nk``/``nc``; ``nk < 0``: key total unchecked);
    * otherwise, while ``torch.compile`` traces: ``(-1, -1)``, and the cmp custom op does that copy
      and those checks when it runs (its backward once more, as it cannot see the forward's sizes).
    """
    if max_seqlen_k is not None:
        max_q = max_seqlen_k if max_seqlen_q is None else max_seqlen_q
        return max_q, num_cmp_blocks(max_seqlen_k, cmp_block, cmp_stride)
    if torch.compiler.is_compiling():
        return -1, -1
    max_q, _, max_c = varlen_plan(cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, nq, nk, nc, cmp_block, cmp_stride)
    return max_q, max_c


def check_qkv_shapes(q: Tensor, k: Tensor, v: Tensor, names: tuple[str, str, str] = ("q", "k", "v")) -> None:
    """Rank, GQA grouping and agreement of queries ``(Tq, Hq, D)``, keys ``(Tk, Hkv, D)`` and values
    ``(Tk, Hkv, Dv)``, ``Hq`` a multiple of ``Hkv``; ``ValueError`` calling the tensors by ``names``."""
    nq, nk, nv = names
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"{nq}, {nk}, {nv} must be (tokens, heads, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    hq, hkv = q.shape[1], k.shape[1]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA")
    if k.shape[:2] != v.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{nk} {tuple(k.shape)} / {nv} {tuple(v.shape)} / {nq} {tuple(q.shape)} shapes disagree")


def check_cmp_inputs(q, cmp_k, cmp_v, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, cmp_block, cmp_stride,
                     max_seqlen_q=None, max_seqlen_k=None):
    """Validate the inputs of compressed attention / block selection; raise ``ValueError`` naming the
    bad value. Returns ``(max_seqlen_q, max_seqlen_cmp)``.

    The offsets are copied to the host once (one transfer for all three) to be checked and to give
    the maxima, unless ``max_seqlen_k`` is given (then nothing is copied and the offsets' values are
    trusted; ``max_seqlen_q`` defaults to ``max_seqlen_k``), or while ``torch.compile`` traces (then
    ``(-1, -1)`` is returned and the custom op does the copy and the checks when it runs)."""
    for name, value in (("cmp_block", cmp_block), ("cmp_stride", cmp_stride)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if cmp_block % cmp_stride != 0:
        raise ValueError(f"cmp_block={cmp_block} must be a multiple of cmp_stride={cmp_stride}")
    check_qkv_shapes(q, cmp_k, cmp_v, names=("q", "cmp_k", "cmp_v"))
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q.dtype={q.dtype} must be float32, float16 or bfloat16")
    if cmp_k.dtype != q.dtype or cmp_v.dtype != q.dtype:
        raise ValueError(f"dtypes differ: q {q.dtype}, cmp_k {cmp_k.dtype}, cmp_v {cmp_v.dtype}")
    if q.device != cmp_k.device or q.device != cmp_v.device:
        raise ValueError(f"devices differ: q {q.device}, cmp_k {cmp_k.device}, cmp_v {cmp_v.device}")
    check_cu_seqlens_meta(cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, q.device)
    return max_lengths(cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, q.shape[0], -1, cmp_k.shape[0], cmp_block,
                       cmp_stride, max_seqlen_q, max_seqlen_k)


# ------------------------------------------------------------------------------------------------
# @triton.jit building blocks
# ------------------------------------------------------------------------------------------------


@triton.jit
def n_visible(pos, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr):
    """Number of complete compression blocks seen by a query at position ``pos``."""
    return tl.where(pos >= CMP_BLOCK - 1, (pos - (CMP_BLOCK - 1)) // CMP_STRIDE + 1, 0)


@triton.jit
def bitonic_sort(x, pos, LOG_N: tl.constexpr, DESC: tl.constexpr, FIRST_STAGE: tl.constexpr):
    """Bitonic sort of ``x`` ``(T, 2**LOG_N)`` along its last axis (``FIRST_STAGE=1``), or only the
    final merge of a bitonic sequence (``FIRST_STAGE=LOG_N``). ``pos`` ``(T, N)`` holds each element's
    position along the axis. Each compare-and-swap step views pairs ``2**dist`` apart as an axis of
    size 2 and takes its min/max (native reductions: fast compiled and in the interpreter alike)."""
    T: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    first = tl.arange(0, 2)[None, :, None] == 0
    for stage in tl.static_range(FIRST_STAGE, LOG_N + 1):
        for step in tl.static_range(stage):
            y = tl.reshape(x, (T * N // (2 << (stage - 1 - step)), 2, 1 << (stage - 1 - step)))
            lo = tl.min(y, axis=1, keep_dims=True)
            hi = tl.max(y, axis=1, keep_dims=True)
            p = tl.reshape(pos, (T * N // (2 << (stage - 1 - step)), 2, 1 << (stage - 1 - step)))
            desc = (((p >> stage) & 1) != 0) ^ DESC  # runs of 2**stage alternate direction
            x = tl.reshape(tl.where(first ^ desc, lo, hi), (T, N))
    return x


@triton.jit
def tile_of(pid, CU, n_seq, TILE: tl.constexpr, BLOCK_B: tl.constexpr):
    """Work list without a torch pre-pass: every sequence of the offsets ``CU`` (``n_seq + 1``
    entries) is cut into tiles of ``TILE`` tokens, numbered sequence after sequence; returns the
    sequence and first packed token of tile ``pid``, or sequence ``-1`` past the last tile (launch
    ``n_tokens // TILE + n_seq`` programs: an upper bound). Reads the offsets ``BLOCK_B`` at a time."""
    seq = tl.zeros([], dtype=tl.int32) - 1
    start = tl.zeros([], dtype=tl.int32)
    done = tl.zeros([], dtype=tl.int32)  # tiles of the sequences before the chunk
    for c0 in range(0, n_seq, BLOCK_B):
        idx = c0 + tl.arange(0, BLOCK_B)
        ok = idx < n_seq
        s = tl.load(CU + idx, mask=ok, other=0)
        e = tl.load(CU + idx + 1, mask=ok, other=0)
        cnt = tl.where(ok, (e - s + TILE - 1) // TILE, 0)
        end = tl.cumsum(cnt, axis=0) + done
        hit = ok & (end > pid) & (end - cnt <= pid)
        seq = tl.maximum(seq, tl.max(tl.where(hit, idx, -1), axis=0))
        start += tl.sum(tl.where(hit, s + (pid - (end - cnt)) * TILE, 0), axis=0)
        done += tl.sum(cnt, axis=0)
    return seq, start


def tile_programs(n_tokens: int, n_seq: int, tile: int) -> tuple[int, int]:
    """``(programs, BLOCK_B)`` for :func:`tile_of`: an upper bound of the tile count (no host sync)
    and the chunk of offsets read at a time."""
    return n_tokens // tile + n_seq, min(256, pow2(n_seq))


@triton.jit
def load_rows(X, tok, head, row_ok, stride_t, stride_h, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """The row tile of a ``(tokens, heads, D)`` tensor: row ``r`` = token ``tok[r]``, head ``head[r]``
    (``tok`` int64 for packed offsets past 2**31 elements); rows outside ``row_ok`` read 0."""
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(
        X + tok[:, None] * stride_t + head[:, None] * stride_h + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0,
    )


@triton.jit
def softmax_step(s, v, m_i, l_i, acc, DOT_PREC: tl.constexpr):
    """One online-softmax step: scores ``s`` (base-2, masked entries ``-inf``) against values ``v``;
    returns the new running max, sum and (unnormalised) output."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def store_o_lse(O, LSE, tok, head, row_ok, stride_ot, stride_oh, lse_stride_t, acc, m_i, l_i,
                DV: tl.constexpr, BLOCK_DV: tl.constexpr, EMPTY_LSE_POS: tl.constexpr):
    """The epilogue: ``o = acc / l`` (0 for a row that saw no key) and the natural-log ``lse`` at
    ``LSE + tok * lse_stride_t + head``, ``+inf`` (``EMPTY_LSE_POS``) or ``-inf`` for an empty row."""
    offs_dv = tl.arange(0, BLOCK_DV)
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    tl.store(
        O + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_dv[None, :],
        out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV),
    )
    lse = (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634
    if EMPTY_LSE_POS:
        lse = tl.where(has, lse, float("inf"))
    else:
        lse = tl.where(has, lse, float("-inf"))
    tl.store(LSE + tok * lse_stride_t + head, lse, mask=row_ok)
