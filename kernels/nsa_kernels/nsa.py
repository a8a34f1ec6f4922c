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

    Triton backend: :func:`parallel.parallel_nsa`, whose kernels run as ``nsa_kernels`` custom ops
    (:mod:`ops`), so ``torch.compile``
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
    from . import parallel
    from .primitives import max_lengths

    parallel.check_nsa_shapes(q, k, v, cmp_k, cmp_v, gates, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params)
    max_q, max_c = max_lengths(
        cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, q.shape[0], k.shape[0], cmp_k.shape[0],
        params.cmp_block, params.cmp_stride, max_seqlen_q, max_seqlen_k,
    )
    return parallel.parallel_nsa(
        q, k, v, cmp_k, cmp_v, gates, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params, float(scale), max_q, max_c
    ).to(q.dtype)
