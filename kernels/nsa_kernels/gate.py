"""Fused gate combination of NSA's three branches (Triton), forward and backward in one pass each.

``out = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`` with ``o_*`` ``(N, H, Dv)`` and per-head gates
``g`` ``(N, H, 3)`` ordered (cmp, slc, win). Products and the sum are accumulated in fp32 and ``out``
is written in the dtype of ``o_*``. The backward reads ``dout``, the three branch outputs and the gates
once and writes ``d o_* = g_* * dout`` (in the dtype of ``o_*``) and
``d g_* = sum over Dv of dout * o_*`` (fp32 sums, stored in the gates' dtype).

Unfused, the same formula in PyTorch is five elementwise passes over ``(N, H, Dv)`` forward (three
products, two sums, plus the casts) and six backward; fused, each direction reads its inputs once.

:func:`parallel.parallel_gate` is the differentiable public function (it calls the ``nsa_kernels::gate_fwd``
custom op, see :mod:`ops`); :func:`reference.gate_combine` is the PyTorch formula, used by the tests.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gate_fwd_kernel(
    OC, OS, OW, G, OUT, n_rows,
    DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program: ``BLOCK_R`` rows (a row = one token and head) of contiguous ``(rows, DV)`` views."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_DV)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < DV)
    offs = rows[:, None] * DV + cols[None, :]
    g_c = tl.load(G + rows * 3 + 0, mask=row_ok, other=0.0).to(tl.float32)
    g_s = tl.load(G + rows * 3 + 1, mask=row_ok, other=0.0).to(tl.float32)
    g_w = tl.load(G + rows * 3 + 2, mask=row_ok, other=0.0).to(tl.float32)
    acc = g_c[:, None] * tl.load(OC + offs, mask=mask, other=0.0).to(tl.float32)
    acc += g_s[:, None] * tl.load(OS + offs, mask=mask, other=0.0).to(tl.float32)
    acc += g_w[:, None] * tl.load(OW + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd_kernel(
    DOUT, OC, OS, OW, G, DOC, DOS, DOW, DG, n_rows,
    DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_DV)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < DV)
    offs = rows[:, None] * DV + cols[None, :]
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    g_c = tl.load(G + rows * 3 + 0, mask=row_ok, other=0.0).to(tl.float32)
    g_s = tl.load(G + rows * 3 + 1, mask=row_ok, other=0.0).to(tl.float32)
    g_w = tl.load(G + rows * 3 + 2, mask=row_ok, other=0.0).to(tl.float32)
    o_c = tl.load(OC + offs, mask=mask, other=0.0).to(tl.float32)
    o_s = tl.load(OS + offs, mask=mask, other=0.0).to(tl.float32)
    o_w = tl.load(OW + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DOC + offs, (g_c[:, None] * dout).to(DOC.dtype.element_ty), mask=mask)
    tl.store(DOS + offs, (g_s[:, None] * dout).to(DOS.dtype.element_ty), mask=mask)
    tl.store(DOW + offs, (g_w[:, None] * dout).to(DOW.dtype.element_ty), mask=mask)
    tl.store(DG + rows * 3 + 0, tl.sum(dout * o_c, axis=1).to(DG.dtype.element_ty), mask=row_ok)
    tl.store(DG + rows * 3 + 1, tl.sum(dout * o_s, axis=1).to(DG.dtype.element_ty), mask=row_ok)
    tl.store(DG + rows * 3 + 2, tl.sum(dout * o_w, axis=1).to(DG.dtype.element_ty), mask=row_ok)


# ------------------------------------------------------------------------------------------------
# Launchers (plain functions, no global state)
# ------------------------------------------------------------------------------------------------


def _config(x: torch.Tensor, dv: int) -> dict:
    block_dv = max(16, triton.next_power_of_2(dv))
    if not x.is_cuda:
        return dict(BLOCK_R=16, BLOCK_DV=block_dv)
    # ~4K elements per program per tensor: 32 rows at Dv=128.
    return dict(BLOCK_R=max(1, 4096 // block_dv), BLOCK_DV=block_dv, num_warps=4)


def _fwd(o_cmp, o_slc, o_win, gates):
    """``out (N, H, Dv)`` in the dtype of ``o_cmp``. Inputs are made contiguous here."""
    o_cmp, o_slc, o_win, gates = (x.contiguous() for x in (o_cmp, o_slc, o_win, gates))
    out = torch.empty_like(o_cmp)
    dv = o_cmp.shape[-1]
    n_rows = o_cmp.numel() // max(dv, 1)
    if n_rows == 0 or dv == 0:
        return out
    cfg = _config(o_cmp, dv)
    _gate_fwd_kernel[(triton.cdiv(n_rows, cfg["BLOCK_R"]),)](o_cmp, o_slc, o_win, gates, out, n_rows, DV=dv, **cfg)
    return out


def _bwd(dout, o_cmp, o_slc, o_win, gates):
    """``(d o_cmp, d o_slc, d o_win, d gates)`` in the dtypes of their inputs."""
    dout, o_cmp, o_slc, o_win, gates = (x.contiguous() for x in (dout, o_cmp, o_slc, o_win, gates))
    d_cmp, d_slc, d_win = (torch.empty_like(x) for x in (o_cmp, o_slc, o_win))
    dg = torch.empty_like(gates)
    dv = o_cmp.shape[-1]
    n_rows = o_cmp.numel() // max(dv, 1)
    if n_rows == 0:
        return d_cmp, d_slc, d_win, dg
    if dv == 0:
        return d_cmp, d_slc, d_win, dg.zero_()
    cfg = _config(o_cmp, dv)
    _gate_bwd_kernel[(triton.cdiv(n_rows, cfg["BLOCK_R"]),)](
        dout, o_cmp, o_slc, o_win, gates, d_cmp, d_slc, d_win, dg, n_rows, DV=dv, **cfg
    )
    return d_cmp, d_slc, d_win, dg
