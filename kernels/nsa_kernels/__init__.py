"""Native Sparse Attention: pure-PyTorch reference and Triton kernels (depends on torch and triton only).

``nsa_attention_varlen`` runs the Triton kernels on CUDA and the reference elsewhere. The Triton
functions (differentiable, ``torch.compile``-traceable custom ops, see :mod:`ops`) are those of
:mod:`parallel`, exported here and imported lazily on first use (they need triton): ``parallel_cmp``
(compressed attention), ``parallel_sel`` (block selection), ``parallel_slc`` (selected-block
attention), ``parallel_win`` (sliding window), ``parallel_gate`` (gated sum), ``parallel_nsa`` (the
layer), and ``nsa_decode`` (:mod:`decode`, decoding from a KV cache). :mod:`reference` is the
specification (``nsa_sequence``, ``select_blocks``, ...).

Modules, bottom to top: ``params``, ``compression``, ``reference`` (torch only); ``primitives``
(shared Triton helpers); ``cmp``, ``sel``, ``slc``, ``win``, ``gate``, ``decode`` (kernels and launchers);
``ops`` (custom ops); ``parallel`` (public Triton functions); ``nsa`` (entry point).

Installed under the import name ``nsa_kernels`` (the name ``kernels`` belongs to HF's kernel hub).
"""
from .compression import MLPCompressor, MeanPoolCompressor, compress_varlen, gather_cmp_blocks, cmp_cu_seqlens
from .params import NSAParams, num_cmp_blocks, validate_nsa_params
from .nsa import nsa_attention_varlen, resolve_backend
from .reference import nsa_sequence, select_blocks

# Triton functions, imported on first access (PEP 562): ``import nsa_kernels`` does not import triton.
_LAZY = {
    "parallel_cmp": "parallel",
    "parallel_sel": "parallel",
    "parallel_slc": "parallel",
    "parallel_win": "parallel",
    "parallel_gate": "parallel",
    "parallel_nsa": "parallel",
    "nsa_decode": "decode",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MLPCompressor",
    "MeanPoolCompressor",
    "NSAParams",
    "cmp_cu_seqlens",
    "compress_varlen",
    "gather_cmp_blocks",
    "nsa_attention_varlen",
    "nsa_decode",
    "nsa_sequence",
    "num_cmp_blocks",
    "parallel_cmp",
    "parallel_gate",
    "parallel_nsa",
    "parallel_sel",
    "parallel_slc",
    "parallel_win",
    "resolve_backend",
    "select_blocks",
    "validate_nsa_params",
]
