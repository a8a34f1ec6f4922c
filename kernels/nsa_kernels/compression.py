"""Compression of keys/values into one token per (overlapping) block: the NSA "cmp" input.

Block ``i`` of a sequence covers key positions ``[i*d, i*d + l)``; it is *complete* (and so exists)
once position ``i*d + l - 1`` is reached. Packed sequences are compressed one document at a time, so
no block ever spans two documents.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .params import num_cmp_blocks


def gather_cmp_blocks(x: torch.Tensor, cmp_block: int, cmp_stride: int) -> torch.Tensor:
    """Complete blocks of one sequence: ``x`` ``(T, H, D)`` -> ``(N_cmp, H, cmp_block, D)`` (a view)."""
    n = num_cmp_blocks(x.shape[0], cmp_block, cmp_stride)
    if n == 0:
        return x.new_empty(0, x.shape[1], cmp_block, x.shape[2])
    # unfold over the token axis gives (N, H, D, l); move l before D.
    return x[: (n - 1) * cmp_stride + cmp_block].unfold(0, cmp_block, cmp_stride).transpose(-1, -2)


def cmp_cu_seqlens(cu_seqlens: torch.Tensor, cmp_block: int, cmp_stride: int) -> torch.Tensor:
    """Offsets of each sequence's compressed tokens, given the offsets ``cu_seqlens`` of its keys
    (int32, on their device; computed there, so nothing waits for the GPU)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    counts = torch.where(lens >= cmp_block, torch.div(lens - cmp_block, cmp_stride, rounding_mode="floor") + 1, 0)
    out = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=cu_seqlens.device)
    out[1:] = counts.cumsum(0)
    return out


class MeanPoolCompressor(nn.Module):
    """Parameter-free compression: the mean of each block's tokens."""

    def __init__(self, cmp_block: int):
        super().__init__()
        self.cmp_block = cmp_block

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:  # (..., l, D) -> (..., D)
        return blocks.mean(dim=-2)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in float32 (inputs of any float dtype)."""
    if a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)  # one GEMM, fp32 accumulator and output
        except (TypeError, RuntimeError, NotImplementedError):  # torch without mm(out_dtype=)
            pass
    return a.float() @ b.float()


class _Linear(torch.autograd.Function):
    """``F.linear`` whose weight and bias gradients are accumulated in float32 and rounded once.

    Their reduction runs over every compressed token of the batch (tens of thousands of rows at long
    context); a half-precision GEMM may reduce partial sums in half precision there (cuBLAS split-K),
    and the relative error then grows with length. The input gradient keeps the plain GEMM."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dy @ weight.to(dy.dtype)).to(x.dtype)
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.needs_input_grad[1]:
            dw = _mm_fp32(dy2.t(), x.reshape(-1, x.shape[-1]).to(dy.dtype)).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            db = dy2.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, dw, db


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return _Linear.apply(x, layer.weight, layer.bias)


class MLPCompressor(nn.Module):
    """The learnable compressor phi of the paper: an MLP over the flattened block, with a learnable
    intra-block position encoding added to each token first.

    ``phi(block) = mean(block) + W2 act(W1 flatten(block + pos))``. The mean-pool residual plus a
    zero-initialised ``W2`` make a freshly initialised compressor exactly mean pooling, a sensible
    starting point for converting a dense checkpoint; training moves it away from there.
    """

    def __init__(self, head_dim: int, cmp_block: int, hidden_size: int | None = None):
        super().__init__()
        self.cmp_block = cmp_block
        self.head_dim = head_dim
        hidden_size = hidden_size or head_dim
        self.pos_embed = nn.Parameter(torch.zeros(cmp_block, head_dim))
        self.up = nn.Linear(cmp_block * head_dim, hidden_size)
        self.act = nn.SiLU()
        self.down = nn.Linear(hidden_size, head_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.pos_embed)
        nn.init.normal_(self.up.weight, std=(self.cmp_block * self.head_dim) ** -0.5)
        nn.init.zeros_(self.up.bias)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:  # (..., l, D) -> (..., D)
        # The parameters' gradients are sums over every block of the batch, accumulated in float32: the
        # linear layers' in :class:`_Linear`, ``pos_embed``'s in the broadcast's reduction (a torch sum,
        # whose accumulator is float32 for half inputs).
        mlp_in = (blocks + self.pos_embed.to(blocks.dtype)).flatten(-2)
        return blocks.mean(dim=-2) + _linear(self.act(_linear(mlp_in, self.up)), self.down)


def compress_varlen(
    x: torch.Tensor, cu_seqlens: torch.Tensor, compressor: nn.Module, cmp_block: int, cmp_stride: int,
    *, bounds: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress packed sequences ``x`` ``(N, H, D)`` -> ``(N_cmp, H, D')`` and their offsets.

    ``bounds``: ``cu_seqlens`` as a Python list when the caller has it on the host; otherwise it is
    copied from the device once (a synchronisation)."""
    bounds = cu_seqlens.tolist() if bounds is None else list(bounds)
    blocks = [gather_cmp_blocks(x[s:e], cmp_block, cmp_stride) for s, e in zip(bounds[:-1], bounds[1:])]
    cu_cmp = cmp_cu_seqlens(cu_seqlens, cmp_block, cmp_stride)
    all_blocks = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=0)
    return compressor(all_blocks), cu_cmp
