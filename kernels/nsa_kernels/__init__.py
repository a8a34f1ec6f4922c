"""Native Sparse Attention: pure-PyTorch reference and Triton kernels (depends on torch and triton only).

``nsa_attention_varlen`` runs the Triton kernels on CUDA and the reference elsewhere. The per-branch
Triton functions (differentiable, ``torch.compile``-traceable custom ops, see :mod:`ops`) are exported
here under names that do not hide their submodules, imported lazily on first use (they need triton):

* ``compressed_attention_triton`` = :func:`compressed_attention.compressed_attention`
* ``select_blocks_triton`` = :func:`block_selection.select_blocks` (``select_blocks`` is the reference's)
* ``selected_attention_triton`` = :func:`selected_attention.selected_attention`
* ``window_attention_triton`` = :func:`window_attention.window_attention`
* ``gate_combine_triton`` = :func:`gate_combine.gate_combine`
* ``nsa_decode`` = :func:`decode.nsa_decode` (decoding from a KV cache)

(``nsa_kernels.compressed_attention`` etc. are the submodules; ``from nsa_kernels.compressed_attention
import compressed_attention`` gives the same function.)

Installed under the import name ``nsa_kernels`` (the name ``kernels`` belongs to HF's kernel hub).
"""
from .compression import MLPCompressor, MeanPoolCompressor, compress_varlen, gather_cmp_blocks, cmp_cu_seqlens
from .params import NSAParams, num_cmp_blocks, validate_nsa_params
from .nsa import nsa_attention_varlen, resolve_backend
from .reference import nsa_sequence, select_blocks

# Triton functions, imported on first access (PEP 562): ``import nsa_kernels`` does not import triton.
_LAZY = {
    "compressed_attention_triton": ("compressed_attention", "compressed_attention"),
    "select_blocks_triton": ("block_selection", "select_blocks"),
    "selected_attention_triton": ("selected_attention", "selected_attention"),
    "window_attention_triton": ("window_attention", "window_attention"),
    "gate_combine_triton": ("gate_combine", "gate_combine"),
    "nsa_decode": ("decode", "nsa_decode"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MLPCompressor",
    "MeanPoolCompressor",
    "NSAParams",
    "cmp_cu_seqlens",
    "compress_varlen",
    "compressed_attention_triton",
    "gate_combine_triton",
    "gather_cmp_blocks",
    "nsa_attention_varlen",
    "nsa_decode",
    "nsa_sequence",
    "resolve_backend",
    "num_cmp_blocks",
    "select_blocks",
    "select_blocks_triton",
    "selected_attention_triton",
    "validate_nsa_params",
    "window_attention_triton",
]
