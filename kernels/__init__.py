"""Native Sparse Attention: pure-PyTorch reference and Triton kernels (depends on torch and triton only).

``nsa_attention_varlen`` runs the Triton kernels on CUDA and the reference elsewhere. The per-branch
Triton functions live in ``compressed_attention``, ``block_selection``, ``selected_attention``,
``window_attention`` and ``decode`` (imported lazily: they need triton).

Installed under the import name ``nsa_kernels`` (the name ``kernels`` belongs to HF's kernel hub).
"""
from .compression import MLPCompressor, MeanPoolCompressor, compress_varlen, gather_cmp_blocks, cmp_cu_seqlens
from .params import NSAParams, num_cmp_blocks, validate_nsa_params
from .nsa import nsa_attention_varlen, resolve_backend
from .reference import nsa_sequence, select_blocks

__all__ = [
    "MLPCompressor",
    "MeanPoolCompressor",
    "NSAParams",
    "cmp_cu_seqlens",
    "compress_varlen",
    "gather_cmp_blocks",
    "nsa_attention_varlen",
    "nsa_sequence",
    "resolve_backend",
    "num_cmp_blocks",
    "select_blocks",
    "validate_nsa_params",
]
