"""NSA attention entry point: the Triton kernels on CUDA, the pure-PyTorch reference elsewhere.

Both compute the function specified in :mod:`reference` on the same packed ("varlen") inputs.
"""
from __future__ import annotations

import warnings

import torch

from . import reference
from .params import NSAParams

_BACKENDS = ("auto", "triton", "reference")
_warned_no_triton = False


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(device: torch.device, backend: str = "auto") -> str:
    """Pick the implementation for tensors on ``device``: ``"triton"`` on CUDA, ``"reference"`` on
    CPU. Asking for ``"triton"`` on CPU is honoured only under ``TRITON_INTERPRET=1`` (tests)."""
    global _warned_no_triton
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {_BACKENDS}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        if triton_available():
            return "triton"
        if not _warned_no_triton:
            warnings.warn("NSA: triton is not importable; CUDA tensors use the slow PyTorch reference", stacklevel=3)
            _warned_no_triton = True
    return "reference"


def _check_shapes(q, k, v, cmp_k, cmp_v, gates, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params):
    """Checks of the Triton path that need no copy to the host (shapes, dtypes, devices, sizes)."""
    from .ops import check_cu_seqlens_meta

    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or cmp_k.dim() != 3 or cmp_v.dim() != 3:
        raise ValueError(
            f"q, k, v, cmp_k, cmp_v must be (tokens, heads, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}, {tuple(cmp_k.shape)}, {tuple(cmp_v.shape)}"
        )
    hq, hkv = q.shape[1], k.shape[1]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA")
    if k.shape[:2] != v.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} / q {tuple(q.shape)} shapes disagree")
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


def nsa_attention_triton(q, k, v, cmp_k, cmp_v, gates, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params, scale,
                         max_seqlen_q: int = -1, max_seqlen_cmp: int = -1):
    """The three branches with the Triton kernels, combined by the fused gate kernel: five
    ``nsa_kernels`` custom ops (cmp + selection, slc, win, gates). Inputs must be validated by the
    caller (see :func:`nsa_attention_varlen`); ``-1`` maxima are computed inside the cmp op."""
    from . import ops

    q, k, v, cmp_k, cmp_v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, cmp_k, cmp_v))
    cu_q, cu_k, cu_c = (c.contiguous() for c in (cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp))
    o_cmp, _, blocks = ops.cmp_fwd(
        q, cmp_k, cmp_v, cu_q, cu_k, cu_c, max_seqlen_q, max_seqlen_cmp, params.cmp_block, params.cmp_stride,
        scale, params.slc_block, params.slc_count, params.init_blocks, params.local_blocks,
    )
    o_slc = ops.slc_fwd(q, k, v, blocks, cu_q, cu_k, params.slc_block, scale)[0]
    o_win = ops.win_fwd(q, k, v, cu_q, cu_k, params.window, scale)[0]
    if gates.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        gates = gates.to(q.dtype)
    return ops.gate_combine_op(o_cmp, o_slc, o_win, gates)


def nsa_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cmp_k: torch.Tensor,
    cmp_v: torch.Tensor,
    gates: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    cu_seqlens_cmp: torch.Tensor,
    params: NSAParams,
    scale: float | None = None,
    backend: str = "auto",
    *,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> torch.Tensor:
    """Native Sparse Attention over packed sequences; arguments as in
    :func:`reference.nsa_attention_varlen` (the specification). ``backend`` is ``"auto"`` (Triton on
    CUDA, reference otherwise), ``"triton"`` or ``"reference"``.

    Triton backend: the kernels run as ``nsa_kernels`` custom ops (:mod:`ops`), so ``torch.compile``
    traces the call without graph breaks and autograd runs the Triton backward kernels.
    ``max_seqlen_q`` / ``max_seqlen_k`` (optional, as in flash-attn's varlen API: the longest query /
    key sequence, or upper bounds of them) spare the one device-to-host copy of the offsets that the
    call otherwise makes to validate them and size the launch grids; when given, the offsets are
    trusted (not validated). ``max_seqlen_q`` defaults to ``max_seqlen_k``. The reference backend
    ignores both.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if resolve_backend(q.device, backend) == "reference":
        return reference.nsa_attention_varlen(
            q, k, v, cmp_k, cmp_v, gates, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params, scale
        )
    _check_shapes(q, k, v, cmp_k, cmp_v, gates, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params)
    from .ops import max_lengths

    max_q, max_c = max_lengths(
        cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, q.shape[0], k.shape[0], cmp_k.shape[0],
        params.cmp_block, params.cmp_stride, max_seqlen_q, max_seqlen_k,
    )
    return nsa_attention_triton(
        q, k, v, cmp_k, cmp_v, gates, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params, float(scale), max_q, max_c
    ).to(q.dtype)
