"""flash_nsa (github.com/mdy666/Scalable-Flash-Native-Sparse-Attention, MIT) as an optional benchmark column.

Its source is not a dependency: export its ``flash_nsa/`` package into a folder on ``PYTHONPATH`` (e.g. an
ignored ``.flashnsa/``) and the benchmarks pick it up. Two adaptations, both stated in every table:

* its window branch calls ``flash_attn``; where that is missing, our window kernel stands in for it (with
  ``window + 1`` keys, as its flash_attn call keeps ``t - w .. t``);
* it imports ``pkg_resources`` (a version check) and ``pandas`` (a printout): stand-ins are installed
  when they are missing.

Compression is its default mean pooling (parameter-free); its other settings are the paper's, as ours.
"""
from __future__ import annotations

import sys
import types


def _stub_missing_modules():
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        from packaging.version import parse

        sys.modules["pkg_resources"] = types.SimpleNamespace(parse_version=parse)
    try:
        import pandas  # noqa: F401
    except ImportError:
        sys.modules["pandas"] = types.ModuleType("pandas")


def load(params):
    """``make(q, k, v, gates, cu_seqlens) -> callable`` running flash_nsa's layer on packed inputs, or
    ``None`` (with the reason printed) when flash_nsa is not importable."""
    _stub_missing_modules()
    try:
        import flash_nsa
        from flash_nsa.modules import megatron_level_nsa as core_mod
    except Exception as exc:  # noqa: BLE001 - the column is optional
        print(f"flash_nsa not importable ({type(exc).__name__}: {exc}); skipping it", file=sys.stderr)
        return None
    from nsa_kernels.win import _bwd as win_bwd, _fwd as win_fwd

    try:
        import flash_attn  # noqa: F401
        substituted = False
    except ImportError:
        substituted = True
        window = params.window + 1

        def swa_fwd(q, k, v, sm_scale=None, out=None, helper=None):
            cu = helper.x_cu_seqlens if helper is not None else flash_nsa.NSAHelper.x_cu_seqlens
            return win_fwd(q, k, v, cu, cu, window, sm_scale)

        def swa_bwd(q, k, v, out, lse, dout, sm_scale=None, helper=None):
            cu = helper.x_cu_seqlens if helper is not None else flash_nsa.NSAHelper.x_cu_seqlens
            return win_bwd(dout, q, k, v, out, lse, cu, cu, window, sm_scale)

        core_mod.swa_fwd, core_mod.swa_bwd = swa_fwd, swa_bwd

    def make(q, k, v, gates, cu_seqlens):
        cfg = flash_nsa.NSAConfig(
            head_dim=q.shape[-1], num_heads=q.shape[1], num_kv_heads=k.shape[1],
            kernel_size=params.cmp_block, stride=params.cmp_stride, block_size=params.slc_block,
            top_n=params.slc_count, num_init_blocks=params.init_blocks, num_local_blocks=params.local_blocks,
            window_size=params.window,
        )
        layer = flash_nsa.NSACore(cfg, process_group=None, pp_size=1)
        return lambda: layer(q, k, v, gates, cu_seqlens)

    make.substituted_window = substituted
    return make
