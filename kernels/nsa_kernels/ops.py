"""The Triton NSA kernels registered as ``torch.library`` custom ops (namespace ``nsa_kernels``).

Registered ops make the kernels traceable by ``torch.compile`` (each op is one opaque node with a
fake implementation giving its output shapes and dtypes) and give them autograd formulas whose
backward is itself a custom op, so compiled forward and backward graphs both contain the kernels.
Nothing here keeps state between calls (no caches, no module-level tensors), so the ops are safe under
FSDP, activation checkpointing and torch.compile alike.

Granularity: one op per branch and direction, plus the gate combination, rather than one op for the
whole NSA layer. Each branch's backward needs only what its own forward saved (exactly what the
former ``torch.autograd.Function`` of the branch saved), the public per-branch functions use the same
ops, and the compiler sees five forward and four backward nodes.

* ``cmp_fwd`` / ``cmp_bwd``: compressed attention. ``cmp_fwd`` also runs the block selection when
  ``slc_count > 0`` (selection needs ``lse`` and the same varlen sizes, and is not differentiated), so
  that the forward pass needs the host-side sizes in one place only.
* ``sel_fwd``: the block selection alone (no gradient).
* ``slc_fwd`` / ``slc_bwd``: selected-block attention; ``slc_fwd`` returns the index tensors that the
  backward reuses (``q_kpos, sel, scnt, uni, ucnt``), so nothing is recomputed.
* ``win_fwd`` / ``win_bwd``: sliding-window attention.
* ``gate_fwd`` / ``gate_bwd``: the fused gated sum (:mod:`gate`).
* ``decode``: a decoding step from a KV cache (inference only, no autograd): the Triton decode kernels
  (:func:`decode.nsa_decode`, lengths unchecked: no host synchronisation, so it can be captured in a CUDA
  graph) when ``use_triton``, else the batched reference :func:`reference.nsa_decode_reference`.
  :func:`nsa_decode_op` calls it with an :class:`~params.NSAParams`.

Host synchronisation: the cmp and selection launch grids need ``max_seqlen_q`` and ``max_seqlen_cmp``
as Python ints. The ops take them as ints; ``-1`` means "not known": the op then copies the cu_seqlens
to the host once (one transfer for all three), validates them and derives the sizes
(:func:`primitives.varlen_plan`). The slc and win launchers never synchronise (their grids use upper bounds).
"""
import torch
from torch import Tensor

from . import cmp as _cmp
from . import decode as _decode
from . import gate as _gate
from . import sel as _sel
from . import slc as _slc
from . import win as _win
from .params import NSAParams
from .primitives import dense as _dense
from .primitives import rows_contiguous as _rows
from .primitives import varlen_plan
from .reference import nsa_decode_reference

# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _sizes(q, cmp_k, cu_q, cu_k, cu_c, max_q, max_c, cmp_block, cmp_stride):
    if max_q >= 0 and max_c >= 0:
        return max_q, max_c
    mq, _, mc = varlen_plan(cu_q, cu_k, cu_c, q.shape[0], -1, cmp_k.shape[0], cmp_block, cmp_stride)
    return mq, mc


def _new(x: Tensor) -> Tensor:
    """A contiguous tensor like ``x`` (fake outputs; the real ones are contiguous, see :func:`_fresh`)."""
    return x.new_empty(x.shape)


def _fresh(outputs, inputs=()):
    """Custom ops may not return tensors that alias their inputs or each other: clone those that do.
    Everything returned is contiguous (the layout the fake implementations promise)."""
    seen = {x.untyped_storage().data_ptr() for x in inputs if isinstance(x, Tensor) and x.numel()}
    out = []
    for x in outputs:
        x = x.contiguous()
        if x.numel():
            ptr = x.untyped_storage().data_ptr()
            if ptr in seen:
                x = x.clone()
                ptr = x.untyped_storage().data_ptr()
            seen.add(ptr)
        out.append(x)
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# Compressed attention (+ block selection)
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("nsa_kernels::cmp_fwd", mutates_args=())
def cmp_fwd(
    q: Tensor, cmp_k: Tensor, cmp_v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, cu_seqlens_cmp: Tensor,
    max_seqlen_q: int, max_seqlen_cmp: int, cmp_block: int, cmp_stride: int, scale: float,
    slc_block: int, slc_count: int, init_blocks: int, local_blocks: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(o (Nq, Hq, Dv), lse (Nq, Hq) fp32, blocks (Nq, Hkv, slc_count) int32)``; the selection runs
    only when ``slc_count > 0`` (else ``blocks`` is empty)."""
    q, cmp_k, cmp_v = _rows(q, cmp_k, cmp_v)
    cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp = _dense(cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp)
    max_q, max_c = _sizes(q, cmp_k, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, max_seqlen_q, max_seqlen_cmp,
                          cmp_block, cmp_stride)
    o, lse = _cmp._fwd(q, cmp_k, cmp_v, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, max_q, cmp_block, cmp_stride, scale)
    if slc_count > 0:
        blocks = _sel._fwd(q, cmp_k, lse, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, max_q, cmp_block, cmp_stride,
                           slc_block, slc_count, init_blocks, local_blocks, scale)
    else:
        blocks = torch.empty(q.shape[0], cmp_k.shape[1], 0, device=q.device, dtype=torch.int32)
    return o, lse, blocks


@cmp_fwd.register_fake
def _(q, cmp_k, cmp_v, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, max_seqlen_q, max_seqlen_cmp, cmp_block,
      cmp_stride, scale, slc_block, slc_count, init_blocks, local_blocks):
    nq, hq = q.shape[0], q.shape[1]
    return (
        q.new_empty(nq, hq, cmp_v.shape[-1]),
        q.new_empty(nq, hq, dtype=torch.float32),
        q.new_empty(nq, cmp_k.shape[1], max(slc_count, 0), dtype=torch.int32),
    )


@torch.library.custom_op("nsa_kernels::cmp_bwd", mutates_args=())
def cmp_bwd(
    do: Tensor, q: Tensor, cmp_k: Tensor, cmp_v: Tensor, o: Tensor, lse: Tensor,
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, cu_seqlens_cmp: Tensor,
    max_seqlen_q: int, max_seqlen_cmp: int, cmp_block: int, cmp_stride: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dcmp_k, dcmp_v)`` of compressed attention."""
    q, cmp_k, cmp_v = _rows(q, cmp_k, cmp_v)
    cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, lse = _dense(cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, lse)
    max_q, max_c = _sizes(q, cmp_k, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, max_seqlen_q, max_seqlen_cmp,
                          cmp_block, cmp_stride)
    grads = _cmp._bwd(q, cmp_k, cmp_v, o, lse, do, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, max_q, max_c,
                      cmp_block, cmp_stride, scale)
    return _fresh(grads, (do, q, cmp_k, cmp_v, o, lse))


@cmp_bwd.register_fake
def _(do, q, cmp_k, cmp_v, o, lse, *args):
    return _new(q), _new(cmp_k), _new(cmp_v)


def _cmp_setup(ctx, inputs, output):
    q, cmp_k, cmp_v, cu_q, cu_k, cu_c, max_q, max_c, cmp_block, cmp_stride, scale = inputs[:11]
    o, lse, blocks = output
    ctx.save_for_backward(q, cmp_k, cmp_v, o, lse, cu_q, cu_k, cu_c)
    ctx.sizes = (max_q, max_c, cmp_block, cmp_stride, scale)
    ctx.mark_non_differentiable(lse, blocks)
    ctx.set_materialize_grads(False)  # no zero tensors for the gradients of lse and blocks


def _cmp_backward(ctx, do, dlse, dblocks):
    if do is None:
        return (None,) * 15
    q, cmp_k, cmp_v, o, lse, cu_q, cu_k, cu_c = ctx.saved_tensors
    dq, dk, dv = cmp_bwd(do, q, cmp_k, cmp_v, o, lse, cu_q, cu_k, cu_c, *ctx.sizes)
    return (dq, dk, dv) + (None,) * 12


cmp_fwd.register_autograd(_cmp_backward, setup_context=_cmp_setup)


@torch.library.custom_op("nsa_kernels::sel_fwd", mutates_args=())
def sel_fwd(
    q: Tensor, cmp_k: Tensor, lse: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, cu_seqlens_cmp: Tensor,
    max_seqlen_q: int, cmp_block: int, cmp_stride: int, slc_block: int, slc_count: int,
    init_blocks: int, local_blocks: int, scale: float,
) -> Tensor:
    """int32 ``(Nq, Hkv, slc_count)`` selected blocks (no gradient)."""
    q, cmp_k = _rows(q, cmp_k)
    cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, lse = _dense(cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, lse)
    max_q, _ = _sizes(q, cmp_k, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, max_seqlen_q, max_seqlen_q,
                      cmp_block, cmp_stride)
    return _sel._fwd(q, cmp_k, lse, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, max_q, cmp_block, cmp_stride,
                     slc_block, slc_count, init_blocks, local_blocks, scale)


@sel_fwd.register_fake
def _(q, cmp_k, lse, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, max_seqlen_q, cmp_block, cmp_stride, slc_block,
      slc_count, init_blocks, local_blocks, scale):
    return q.new_empty(q.shape[0], cmp_k.shape[1], slc_count, dtype=torch.int32)


# ------------------------------------------------------------------------------------------------
# Selected-block attention
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("nsa_kernels::slc_fwd", mutates_args=())
def slc_fwd(
    q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    slc_block: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(o, lse, q_kpos, sel, scnt, uni, ucnt)``: the output, its logsumexp and the index tensors
    of :func:`slc._prepare` (saved for the backward)."""
    q, k, v = _rows(q, k, v)
    block_indices, cu_seqlens_q, cu_seqlens_k = _dense(block_indices, cu_seqlens_q, cu_seqlens_k)
    tok = _slc.default_tokens_per_program(q.shape[1] // k.shape[1])
    prep = _slc._prepare(block_indices, cu_seqlens_q, cu_seqlens_k, q.shape[0], slc_block, tok)
    o, lse = _slc._fwd(q, k, v, block_indices, cu_seqlens_q, cu_seqlens_k, slc_block, scale, prep=prep)
    return _fresh((o, lse) + tuple(prep), (q, k, v, block_indices, cu_seqlens_q, cu_seqlens_k))


@slc_fwd.register_fake
def _(q, k, v, block_indices, cu_seqlens_q, cu_seqlens_k, slc_block, scale):
    nq, hq = q.shape[0], q.shape[1]
    hkv, nsel = k.shape[1], block_indices.shape[-1]
    tok = _slc.default_tokens_per_program(hq // hkv)
    n_tiles = (nq + tok - 1) // tok
    i32 = dict(dtype=torch.int32)
    return (
        q.new_empty(nq, hq, v.shape[-1]),
        q.new_empty(nq, hq, dtype=torch.float32),
        q.new_empty(nq, **i32),
        q.new_empty(nq, hkv, nsel, **i32),
        q.new_empty(nq, hkv, **i32),
        q.new_empty(n_tiles, hkv, tok * nsel, **i32),
        q.new_empty(n_tiles, hkv, **i32),
    )


@torch.library.custom_op("nsa_kernels::slc_bwd", mutates_args=())
def slc_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, block_indices: Tensor,
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    q_kpos: Tensor, sel: Tensor, scnt: Tensor, uni: Tensor, ucnt: Tensor, slc_block: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of selected-block attention."""
    q, k, v, o = _rows(q, k, v, o)
    lse, block_indices, cu_seqlens_q, cu_seqlens_k = _dense(lse, block_indices, cu_seqlens_q, cu_seqlens_k)
    q_kpos, sel, scnt, uni, ucnt = _dense(q_kpos, sel, scnt, uni, ucnt)
    grads = _slc._bwd(do, q, k, v, o, lse, block_indices, cu_seqlens_q, cu_seqlens_k, slc_block, scale,
                      prep=(q_kpos, sel, scnt, uni, ucnt))
    return _fresh(grads, (do, q, k, v, o, lse))


@slc_bwd.register_fake
def _(do, q, k, v, *args):
    return _new(q), _new(k), _new(v)


def _slc_setup(ctx, inputs, output):
    q, k, v, block_indices, cu_q, cu_k, slc_block, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], block_indices, cu_q, cu_k, *output[2:])
    ctx.sizes = (slc_block, scale)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero tensors for the gradients of lse and the index tensors


def _slc_backward(ctx, do, *unused):
    if do is None:
        return (None,) * 8
    q, k, v, o, lse, block_indices, cu_q, cu_k, *prep = ctx.saved_tensors
    dq, dk, dv = slc_bwd(do, q, k, v, o, lse, block_indices, cu_q, cu_k, *prep, *ctx.sizes)
    return dq, dk, dv, None, None, None, None, None


slc_fwd.register_autograd(_slc_backward, setup_context=_slc_setup)

# ------------------------------------------------------------------------------------------------
# Sliding-window attention
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("nsa_kernels::win_fwd", mutates_args=())
def win_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, window: int, scale: float,
) -> tuple[Tensor, Tensor]:
    """``(o (Nq, Hq, Dv), lse (Nq, Hq) fp32)`` of sliding-window attention."""
    q, k, v = _rows(q, k, v)
    cu_seqlens_q, cu_seqlens_k = _dense(cu_seqlens_q, cu_seqlens_k)
    return _win._fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, window, scale)


@win_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, window, scale):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1]), q.new_empty(q.shape[0], q.shape[1], dtype=torch.float32)


@torch.library.custom_op("nsa_kernels::win_bwd", mutates_args=())
def win_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    window: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of sliding-window attention."""
    q, k, v, o = _rows(q, k, v, o)
    lse, cu_seqlens_q, cu_seqlens_k = _dense(lse, cu_seqlens_q, cu_seqlens_k)
    return _fresh(_win._bwd(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, window, scale), (do, q, k, v, o, lse))


@win_bwd.register_fake
def _(do, q, k, v, *args):
    return _new(q), _new(k), _new(v)


def _win_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, window, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k)
    ctx.sizes = (window, scale)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero tensor for the gradient of lse


def _win_backward(ctx, do, dlse):
    if do is None:
        return (None,) * 7
    q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = win_bwd(do, q, k, v, o, lse, cu_q, cu_k, *ctx.sizes)
    return dq, dk, dv, None, None, None, None


win_fwd.register_autograd(_win_backward, setup_context=_win_setup)

# ------------------------------------------------------------------------------------------------
# Gate combination
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("nsa_kernels::gate_fwd", mutates_args=())
def gate_fwd(o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, gates: Tensor) -> Tensor:
    """``g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`` (fp32 accumulation, in the dtype of ``o_cmp``)."""
    return _gate._fwd(o_cmp, o_slc, o_win, gates)  # always a new contiguous tensor


@gate_fwd.register_fake
def _(o_cmp, o_slc, o_win, gates):
    return _new(o_cmp)


@torch.library.custom_op("nsa_kernels::gate_bwd", mutates_args=())
def gate_bwd(
    dout: Tensor, o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, gates: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(d o_cmp, d o_slc, d o_win, d gates)``."""
    return _gate._bwd(dout, o_cmp, o_slc, o_win, gates)


@gate_bwd.register_fake
def _(dout, o_cmp, o_slc, o_win, gates):
    return tuple(_new(x) for x in (o_cmp, o_slc, o_win, gates))


def _gate_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gate_backward(ctx, dout):
    return gate_bwd(dout, *ctx.saved_tensors)


gate_fwd.register_autograd(_gate_backward, setup_context=_gate_setup)


# ------------------------------------------------------------------------------------------------
# Decoding from a KV cache
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("nsa_kernels::decode", mutates_args=())
def decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cmp_k_cache: Tensor, cmp_v_cache: Tensor, gates: Tensor,
    k_start: Tensor, k_len: Tensor, cmp_start: Tensor, cmp_len: Tensor,
    cmp_block: int, cmp_stride: int, slc_block: int, slc_count: int, init_blocks: int, local_blocks: int,
    window: int, scale: float, use_triton: bool,
) -> Tensor:
    """``(B, Tq, Hq, Dv)``: NSA for the last ``Tq`` positions of every row of a KV cache (arguments as for
    :func:`decode.nsa_decode`; the NSA sizes spelled out). ``use_triton``: the decode kernels (lengths not
    checked), else the PyTorch reference."""
    params = NSAParams(cmp_block, cmp_stride, slc_block, slc_count, init_blocks, local_blocks, window)
    args = (q, k_cache, v_cache, cmp_k_cache, cmp_v_cache, gates, k_start, k_len, cmp_start, cmp_len, params, scale)
    if use_triton:
        return _decode.nsa_decode(*args, check_lengths=False)
    return nsa_decode_reference(*args).contiguous()


@decode.register_fake
def _(q, k_cache, v_cache, cmp_k_cache, cmp_v_cache, gates, *args):
    return q.new_empty(*q.shape[:3], v_cache.shape[-1])


def nsa_decode_op(q, k_cache, v_cache, cmp_k_cache, cmp_v_cache, gates, k_start, k_len, cmp_start, cmp_len,
                  params: NSAParams, scale: float | None = None, use_triton: bool = True) -> Tensor:
    """The ``nsa_kernels::decode`` op with an :class:`NSAParams` (see :func:`decode.nsa_decode` for the
    arguments; ``scale`` defaults to ``D ** -0.5``). One opaque node for ``torch.compile`` / ``torch.export``,
    no host synchronisation on either implementation."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return decode(q, k_cache, v_cache, cmp_k_cache, cmp_v_cache, gates, k_start, k_len, cmp_start, cmp_len,
                  params.cmp_block, params.cmp_stride, params.slc_block, params.slc_count, params.init_blocks,
                  params.local_blocks, params.window, scale, use_triton)
