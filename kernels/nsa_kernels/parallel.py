"""The public Triton functions: one per branch (``parallel_cmp``, ``parallel_sel``, ``parallel_slc``,
``parallel_win``, ``parallel_gate``) and the whole layer (``parallel_nsa``). Each checks its inputs and calls
the ``nsa_kernels`` custom op of :mod:`ops` (differentiable, traceable by ``torch.compile``).

Naming: ``parallel_*`` are the Triton kernels (as in flash-linear-attention); the pure-PyTorch
specification lives in :mod:`reference`. The branches are spelled ``cmp`` (compressed attention),
``sel`` (block selection), ``slc`` (selected-block attention), ``win`` (sliding window) and ``gate``
(gated sum) in module, op and function names alike.
"""
from __future__ import annotations

import math

import torch

from .ops import cmp_fwd, gate_fwd, sel_fwd, slc_fwd, win_fwd
from .params import NSAParams
from .primitives import check_cmp_inputs, check_cu_seqlens_meta, check_qkv_shapes, check_varlen_inputs, rows_contiguous


def parallel_cmp(
    q: torch.Tensor,
    cmp_k: torch.Tensor,
    cmp_v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    cu_seqlens_cmp: torch.Tensor,
    cmp_block: int,
    cmp_stride: int,
    scale: float | None = None,
    *,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NSA's compressed-attention branch over packed sequences (Triton, differentiable).

    Args:
        q: ``(Nq, Hq, D)`` queries; sequence ``b``'s are the last ``Tq`` of its ``Tk`` positions.
        cmp_k, cmp_v: ``(Nc, Hkv, D)`` / ``(Nc, Hkv, Dv)`` compressed keys/values (every complete
            compression block of each sequence, in order). ``Hq`` must be a multiple of ``Hkv``.
            One dtype among float32, float16, bfloat16; the last axis contiguous (made so otherwise).
        cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp: int32 ``(B + 1,)`` offsets of each sequence.
        cmp_block, cmp_stride: ``l`` and ``d``: block ``i`` covers keys ``[i*d, i*d + l)``.
        scale: softmax scale, ``D ** -0.5`` by default.
        max_seqlen_q, max_seqlen_k: optional upper bounds of the query / key lengths (as in
            flash-attn's varlen API). With ``max_seqlen_k`` given nothing is copied to the host (the
            offsets are then not validated); otherwise the offsets are copied once and checked.

    Returns:
        ``o (Nq, Hq, Dv)`` in q's dtype and ``lse (Nq, Hq)`` float32, the natural-log logsumexp of the
        scaled scores (``+inf`` for queries that see no compressed token; their output is 0).
        Gradients flow to ``q``, ``cmp_k`` and ``cmp_v``; ``lse`` is not differentiable.
        Runs as the ``nsa_kernels::cmp_fwd`` custom op (traceable by ``torch.compile``).
    """
    max_q, max_c = check_cmp_inputs(q, cmp_k, cmp_v, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, cmp_block, cmp_stride,
                                    max_seqlen_q, max_seqlen_k)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, cmp_k, cmp_v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, cmp_k, cmp_v))

    o, lse, _ = cmp_fwd(
        q, cmp_k, cmp_v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), cu_seqlens_cmp.contiguous(),
        max_q, max_c, cmp_block, cmp_stride, scale, 0, 0, 0, 0,
    )
    return o, lse


def parallel_sel(
    q: torch.Tensor,
    cmp_k: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    cu_seqlens_cmp: torch.Tensor,
    params: NSAParams,
    scale: float | None = None,
    *,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> torch.Tensor:
    """Selection blocks of every query and KV head (Triton, no gradient).

    Args:
        q: ``(Nq, Hq, D)`` queries; cmp_k: ``(Nc, Hkv, D)`` compressed keys (one dtype among float32,
            float16, bfloat16).
        lse: ``(Nq, Hq)`` float32 logsumexp returned by
            :func:`parallel_cmp` with the same inputs and scale.
        cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp: int32 ``(B + 1,)`` offsets of each sequence.
        params: NSA sizes (``cmp_block <= slc_block`` is required here).
        scale: softmax scale, ``D ** -0.5`` by default.
        max_seqlen_q, max_seqlen_k: optional upper bounds of the sequence lengths; with
            ``max_seqlen_k`` given nothing is copied to the host (see :func:`parallel_cmp`).

    Returns:
        int32 ``(Nq, Hkv, params.slc_count)``: chosen block indices in ascending order, ``-1`` padding
        where fewer blocks are eligible; equal to the reference's choice (ties to the lower index).
        Runs as the ``nsa_kernels::sel_fwd`` custom op.
    """
    if not isinstance(params, NSAParams):
        raise ValueError(f"params must be an NSAParams; got {type(params).__name__}")
    if params.cmp_block > params.slc_block:
        raise ValueError(
            f"cmp_block={params.cmp_block} must be <= slc_block={params.slc_block} for the Triton block "
            "selection (use the reference implementation otherwise)"
        )
    max_q, _ = check_cmp_inputs(
        q, cmp_k, cmp_k, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params.cmp_block, params.cmp_stride,
        max_seqlen_q, max_seqlen_k,
    )
    if lse.shape != q.shape[:2] or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 {tuple(q.shape[:2])}; got {lse.dtype} {tuple(lse.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, cmp_k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, cmp_k))

    return sel_fwd(
        q.detach(), cmp_k.detach(), lse.detach().contiguous(), cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
        cu_seqlens_cmp.contiguous(), max_q, params.cmp_block, params.cmp_stride, params.slc_block,
        params.slc_count, params.init_blocks, params.local_blocks, scale,
    )


def check_slc_inputs(q, k, v, block_indices, cu_seqlens_q, cu_seqlens_k, slc_block, scale) -> float:
    """The argument checks of the selected-block attention entry points; returns the scale as a float."""
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    if isinstance(slc_block, bool) or not isinstance(slc_block, int) or slc_block < 1:
        raise ValueError(f"slc_block={slc_block!r} is invalid: must be an integer >= 1")
    if (
        block_indices.dim() != 3
        or block_indices.shape[:2] != (q.shape[0], k.shape[1])
        or block_indices.shape[2] < 1
        or block_indices.dtype != torch.int32
    ):
        raise ValueError(
            f"block_indices must be int32 of shape (Nq, Hkv, n) = ({q.shape[0]}, {k.shape[1]}, n>=1); "
            f"got {block_indices.dtype} {tuple(block_indices.shape)}"
        )
    if block_indices.device != q.device:
        raise ValueError(f"block_indices is on {block_indices.device}, q on {q.device}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale={scale!r} must be a finite number")
    return scale


def parallel_slc(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    slc_block: int,
    scale: float | None = None,
) -> torch.Tensor:
    """NSA selected-block attention over packed sequences (Triton, differentiable w.r.t. q, k, v).

    Args:
        q: ``(Nq, Hq, D)`` queries; k: ``(Nk, Hkv, D)``; v: ``(Nk, Hkv, Dv)``; one dtype among
            bfloat16, float16, float32. ``Hq`` is any multiple of ``Hkv``.
        block_indices: int32 ``(Nq, Hkv, n)``: for each query and KV head, the selected block
            indices (block ``j`` = key positions ``[j*slc_block, (j+1)*slc_block)`` of the sequence),
            distinct, ``-1`` for unused slots. Blocks starting after the query are ignored.
        cu_seqlens_q, cu_seqlens_k: int32 ``(B+1,)`` offsets; sequence ``b``'s queries are the last
            ``Tq`` of its ``Tk`` key positions.
        slc_block: tokens per selection block (>= 1).
        scale: softmax scale, ``D ** -0.5`` by default.

    Returns:
        ``(Nq, Hq, Dv)`` in q's dtype: for each query, causal softmax attention over the keys of its
        selected blocks (fp32 accumulation). A query with no usable key gets zeros. Runs as the
        ``nsa_kernels::slc_fwd`` custom op (traceable by ``torch.compile``; never copies to the host).
    """
    scale = check_slc_inputs(q, k, v, block_indices, cu_seqlens_q, cu_seqlens_k, slc_block, scale)
    q, k, v = rows_contiguous(q, k, v)

    return slc_fwd(
        q, k, v, block_indices.contiguous(), cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), slc_block, scale
    )[0]


def parallel_win(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    window: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal sliding-window attention over packed sequences (Triton, differentiable w.r.t. q, k, v).

    Args:
        q: ``(Nq, Hq, D)``; k: ``(Nk, Hkv, D)``; v: ``(Nk, Hkv, Dv)``; one dtype among bfloat16,
            float16, float32; ``Hq`` any multiple of ``Hkv`` (query head ``h`` reads KV head ``h // G``).
        cu_seqlens_q, cu_seqlens_k: int32 ``(B+1,)`` offsets; sequence ``b``'s queries are the last
            ``Tq`` of its ``Tk`` key positions.
        window: ``w >= 1``: the query at position ``t`` attends to keys ``t - w < s <= t``.
        scale: softmax scale, ``D ** -0.5`` by default.

    Returns:
        ``(Nq, Hq, Dv)`` in q's dtype (fp32 accumulation). Runs as the ``nsa_kernels::win_fwd`` custom
        op (traceable by ``torch.compile``; never copies to the host).
    """
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} is invalid: must be an integer >= 1")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale={scale!r} must be a finite number")
    q, k, v = rows_contiguous(q, k, v)

    return win_fwd(q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), window, scale)[0]


def check_gate_inputs(o_cmp, o_slc, o_win, gates) -> None:
    """Raise ``ValueError`` naming the bad value for inconsistent shapes, dtypes or devices."""
    if o_cmp.dim() != 3 or o_slc.shape != o_cmp.shape or o_win.shape != o_cmp.shape:
        raise ValueError(
            f"o_cmp, o_slc, o_win must be (N, H, Dv) of one shape; got {tuple(o_cmp.shape)}, "
            f"{tuple(o_slc.shape)}, {tuple(o_win.shape)}"
        )
    if gates.shape != (o_cmp.shape[0], o_cmp.shape[1], 3):
        raise ValueError(f"gates must be (N, H, 3) = {(o_cmp.shape[0], o_cmp.shape[1], 3)}; got {tuple(gates.shape)}")
    if o_slc.dtype != o_cmp.dtype or o_win.dtype != o_cmp.dtype:
        raise ValueError(f"branch outputs must share one dtype; got {o_cmp.dtype}, {o_slc.dtype}, {o_win.dtype}")
    for name, x in (("o_cmp", o_cmp), ("gates", gates)):
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name}.dtype={x.dtype} must be float32, float16 or bfloat16")
    if not (o_cmp.device == o_slc.device == o_win.device == gates.device):
        raise ValueError("o_cmp, o_slc, o_win and gates must be on one device")


def parallel_gate(o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Gated sum of the three NSA branch outputs (Triton, differentiable w.r.t. all four inputs).

    Args:
        o_cmp, o_slc, o_win: ``(N, H, Dv)`` branch outputs, one dtype (float32, float16 or bfloat16).
        gates: ``(N, H, 3)`` gate values ordered (cmp, slc, win), float32/float16/bfloat16.

    Returns:
        ``(N, H, Dv)`` in the dtype of the branch outputs: ``sum_i gates[..., i:i+1] * o_i`` computed
        in fp32. Traceable by ``torch.compile`` (the kernels run inside the ``nsa_kernels::gate_fwd``
        custom op).
    """
    check_gate_inputs(o_cmp, o_slc, o_win, gates)

    return gate_fwd(o_cmp, o_slc, o_win, gates)


def check_nsa_shapes(q, k, v, cmp_k, cmp_v, gates, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params):
    """Checks of the Triton path that need no copy to the host (shapes, dtypes, devices, sizes)."""
    check_qkv_shapes(q, k, v)
    hq = q.shape[1]
    if cmp_k.shape[1:] != k.shape[1:] or cmp_v.shape[1:] != v.shape[1:] or cmp_k.shape[0] != cmp_v.shape[0]:
        raise ValueError(
            f"cmp_k {tuple(cmp_k.shape)} / cmp_v {tuple(cmp_v.shape)} must be (N_cmp, Hkv, D) / (N_cmp, Hkv, Dv) "
            f"like k {tuple(k.shape)} / v {tuple(v.shape)}"
        )
    if gates.shape != (q.shape[0], hq, 3):
        raise ValueError(f"gates must be (tokens, Hq, 3) = {(q.shape[0], hq, 3)}; got {tuple(gates.shape)}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q.dtype={q.dtype} is not supported by the Triton kernels: use bfloat16, float16 or float32")
    if any(x.dtype != q.dtype for x in (k, v, cmp_k, cmp_v)):
        raise ValueError(
            f"q, k, v, cmp_k, cmp_v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}, {cmp_k.dtype}, "
            f"{cmp_v.dtype}"
        )
    if any(x.device != q.device for x in (k, v, cmp_k, cmp_v, gates)):
        raise ValueError("q, k, v, cmp_k, cmp_v and gates must be on one device")
    check_cu_seqlens_meta(cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, q.device)
    if params.cmp_block > params.slc_block:
        raise ValueError(
            f"NSA setting cmp_block={params.cmp_block} must be <= slc_block={params.slc_block} for the Triton "
            "block selection (use backend='reference' otherwise)"
        )


def parallel_nsa(q, k, v, cmp_k, cmp_v, gates, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params, scale,
                 max_seqlen_q: int = -1, max_seqlen_cmp: int = -1):
    """The three branches with the Triton kernels, combined by the fused gate kernel: five
    ``nsa_kernels`` custom ops (cmp + selection, slc, win, gates). Inputs must be validated by the
    caller (see :func:`check_nsa_shapes` and :func:`nsa.nsa_attention_varlen`); ``-1`` maxima are
    computed inside the cmp op."""
    q, k, v, cmp_k, cmp_v = rows_contiguous(q, k, v, cmp_k, cmp_v)
    cu_q, cu_k, cu_c = (c.contiguous() for c in (cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp))
    o_cmp, _, blocks = cmp_fwd(
        q, cmp_k, cmp_v, cu_q, cu_k, cu_c, max_seqlen_q, max_seqlen_cmp, params.cmp_block, params.cmp_stride,
        scale, params.slc_block, params.slc_count, params.init_blocks, params.local_blocks,
    )
    o_slc = slc_fwd(q, k, v, blocks, cu_q, cu_k, params.slc_block, scale)[0]
    o_win = win_fwd(q, k, v, cu_q, cu_k, params.window, scale)[0]
    if gates.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        gates = gates.to(q.dtype)
    return gate_fwd(o_cmp, o_slc, o_win, gates)
