"""Fused gate combination of NSA's three branches (Triton), forward and backward in one pass each.

``out = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`` with ``o_*`` ``(N, H, Dv)`` and per-head gates
``g`` ``(N, H, 3)`` ordered (cmp, slc, win). Products and the sum are accumulated in fp32 and ``out``
is written in the dtype of ``o_*``. The backward reads ``dout``, the three branch outputs and the gates
once and writes ``d o_* = g_* * dout`` (in the dtype of ``o_*``) and
``d g_* = sum over Dv of dout * o_*`` (fp32 sums, stored in the gates' dtype).

Unfused, the same formula in PyTorch is five elementwise passes over ``(N, H, Dv)`` forward (three
products, two sums, plus the casts) and six backward; fused, each direction reads its inputs once.

:func:`gate_combine` is the differentiable public function (it calls the ``nsa_kernels::gate_combine``
custom op, see :mod:`ops`); :func:`gate_combine_reference` is the PyTorch formula, used by the tests.
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


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------


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


def gate_combine(o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Gated sum of the three NSA branch outputs (Triton, differentiable w.r.t. all four inputs).

    Args:
        o_cmp, o_slc, o_win: ``(N, H, Dv)`` branch outputs, one dtype (float32, float16 or bfloat16).
        gates: ``(N, H, 3)`` gate values ordered (cmp, slc, win), float32/float16/bfloat16.

    Returns:
        ``(N, H, Dv)`` in the dtype of the branch outputs: ``sum_i gates[..., i:i+1] * o_i`` computed
        in fp32. Traceable by ``torch.compile`` (the kernels run inside the ``nsa_kernels::gate_combine``
        custom op).
    """
    check_gate_inputs(o_cmp, o_slc, o_win, gates)
    from .ops import gate_combine_op

    return gate_combine_op(o_cmp, o_slc, o_win, gates)


def gate_combine_reference(o_cmp, o_slc, o_win, gates):
    """The PyTorch formula (fp32 accumulation, fp64 for fp64 inputs; output in the dtype of ``o_cmp``)."""
    acc = torch.promote_types(torch.promote_types(torch.float32, o_cmp.dtype), gates.dtype)
    g = gates.to(acc)
    out = g[..., 0:1] * o_cmp.to(acc) + g[..., 1:2] * o_slc.to(acc) + g[..., 2:3] * o_win.to(acc)
    return out.to(o_cmp.dtype)
