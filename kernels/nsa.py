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


def nsa_attention_triton(q, k, v, cmp_k, cmp_v, gates, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params, scale):
    """The three branches with the Triton kernels, combined by the gates."""
    from .block_selection import select_blocks
    from .compressed_attention import compressed_attention
    from .selected_attention import selected_attention
    from .window_attention import window_attention

    o_cmp, lse = compressed_attention(
        q, cmp_k, cmp_v, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params.cmp_block, params.cmp_stride, scale
    )
    with torch.no_grad():
        blocks = select_blocks(q, cmp_k, lse, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params, scale)
    o_slc = selected_attention(q, k, v, blocks, cu_seqlens_q, cu_seqlens_k, params.slc_block, scale)
    o_win = window_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, params.window, scale)
    g = gates.to(o_cmp.dtype).unsqueeze(-1)
    return g[:, :, 0] * o_cmp + g[:, :, 1] * o_slc + g[:, :, 2] * o_win


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
) -> torch.Tensor:
    """Native Sparse Attention over packed sequences; arguments as in
    :func:`reference.nsa_attention_varlen` (the specification). ``backend`` is ``"auto"`` (Triton on
    CUDA, reference otherwise), ``"triton"`` or ``"reference"``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if resolve_backend(q.device, backend) == "reference":
        return reference.nsa_attention_varlen(
            q, k, v, cmp_k, cmp_v, gates, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params, scale
        )
    reference.check_nsa_inputs(q, k, v, cmp_k, cmp_v, gates, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params)
    return nsa_attention_triton(
        q, k, v, cmp_k, cmp_v, gates, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params, scale
    ).to(q.dtype)
