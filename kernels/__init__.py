"""Native Sparse Attention: pure-PyTorch reference and Triton kernels (depends on torch and triton only).

Installed under the import name ``nsa_kernels`` (the name ``kernels`` belongs to HF's kernel hub).
"""
from .compression import MLPCompressor, MeanPoolCompressor, compress_varlen, gather_cmp_blocks, cmp_cu_seqlens
from .params import NSAParams, num_cmp_blocks, validate_nsa_params
from .reference import nsa_attention_varlen, nsa_sequence, select_blocks

__all__ = [
    "MLPCompressor",
    "MeanPoolCompressor",
    "NSAParams",
    "cmp_cu_seqlens",
    "compress_varlen",
    "gather_cmp_blocks",
    "nsa_attention_varlen",
    "nsa_sequence",
    "num_cmp_blocks",
    "select_blocks",
    "validate_nsa_params",
]
