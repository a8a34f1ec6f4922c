"""KV-block-outer selected-attention forward against the query-centric ``_fwd`` (o and lse) and the
PyTorch reference (o), on the batches of ``test_triton_slc_win`` (reference block selections).

On CPU the kernels run in the Triton interpreter (tiny shapes, float32/float16); the ``gpu`` tests run
realistic shapes in bfloat16 (bf16 dots fail in the interpreter).
"""
import pytest
import torch

from nsa_kernels import selected_attention as slc_mod
from nsa_kernels.params import NSAParams
from nsa_kernels.selected_attention_kv_outer import partial_bytes_per_token, selected_attention_fwd_kv_outer
from test_triton_slc_win import PAPER, TINY, _assert_sparse, _make_batch, _rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _args(batch, slc_block):
    return (
        batch["q"].detach(), batch["k"].detach(), batch["v"].detach(), batch["blocks"], batch["cu_q"], batch["cu_k"],
        slc_block, batch["scale"],
    )


def _check(batch, slc_block, o_tol, lse_tol, ref_tol, o_rtol=0.0, **kw):
    """kv-outer forward vs the query-centric forward (o, lse) and the reference (o); returns (o, lse).
    ``o_rtol``: for half-precision outputs, whose rounding steps grow with |o|."""
    args = _args(batch, slc_block)
    o, lse = selected_attention_fwd_kv_outer(*args, **kw)
    o_ref, lse_ref = slc_mod._fwd(*args)
    assert o.shape == o_ref.shape and o.dtype == o_ref.dtype
    assert lse.shape == lse_ref.shape and lse.dtype == torch.float32
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o.float(), o_ref.float(), atol=o_tol, rtol=o_rtol)
    torch.testing.assert_close(lse, lse_ref, atol=lse_tol, rtol=0)  # equal infinities count as equal
    assert _rel_err(o, batch["ref"]) < ref_tol, _rel_err(o, batch["ref"])
    return o, lse


CASES = [
    # lens_k, lens_q, hq, hkv, d, dv
    ([97, 61], [97, 61], 4, 4, 16, 16),  # G=1, two sequences
    ([113], [113], 4, 2, 32, 16),  # G=2, D != Dv
    ([83, 70], [83, 70], 3, 1, 16, 16),  # G=3 (not a power of two)
    ([130, 45, 9], [57, 45, 3], 8, 2, 16, 32),  # G=4, Tq < Tk, three sequences, Dv > D
    ([101], [101], 16, 1, 16, 16),  # G=16
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lens_k,lens_q,hq,hkv,d,dv", CASES)
def test_kv_outer_matches_query_centric(lens_k, lens_q, hq, hkv, d, dv, dtype):
    params = NSAParams(**TINY)
    batch = _make_batch(lens_k, lens_q, hq, hkv, d, dv, params, dtype)
    _assert_sparse(batch["blocks"], lens_q, lens_k, params.slc_block)
    if dtype == torch.float32:
        _check(batch, params.slc_block, 2e-6, 2e-6, 1e-5)
    else:  # fp16: p is rounded against a block-local max here, a running max there
        _check(batch, params.slc_block, 4e-3, 1e-3, 3e-3, o_rtol=2e-3)


def test_kv_outer_token_slices_and_small_tiles():
    """``max_partial_bytes`` small (slices of 7 tokens, each with its own inverted index), chunks of 5
    tokens, row tiles of 2 tokens x G, a block size (24) that is not a power of two, Tq < Tk: the same
    result as one slice with the default tiles."""
    params = NSAParams(cmp_block=8, cmp_stride=4, slc_block=24, slc_count=3, init_blocks=1, local_blocks=1, window=8)
    lens_k, lens_q = [100, 53], [41, 53]
    batch = _make_batch(lens_k, lens_q, 4, 2, 16, 16, params, torch.float32)
    o, lse = _check(batch, params.slc_block, 2e-6, 2e-6, 1e-5)
    per_tok = partial_bytes_per_token(4, batch["blocks"].shape[-1], 16)
    o2, lse2 = selected_attention_fwd_kv_outer(
        *_args(batch, params.slc_block), max_partial_bytes=7 * per_tok + 5, chunk_tokens=5, block_rows=4, merge_rows=6,
    )
    torch.testing.assert_close(o2, o, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse2, lse, atol=1e-6, rtol=0)


def test_kv_outer_unused_slots_and_empty():
    """Extra ``-1`` slots and blocks after the query are ignored, in any slot order; a query with no
    usable block gets zeros and ``lse = -inf``."""
    params = NSAParams(**TINY)
    lens = [90]
    batch = _make_batch(lens, lens, 4, 2, 16, 16, params, torch.float16)
    own = (torch.arange(90, device=DEVICE) // params.slc_block)[:, None, None].expand(90, 2, 1)
    later = own + 1 + torch.randint(0, 3, (90, 2, 1), device=DEVICE)  # starts after the query
    blocks = torch.cat([batch["blocks"], torch.full_like(batch["blocks"][..., :1], -1), later.int()], dim=-1)
    batch["blocks"] = blocks[..., torch.randperm(blocks.shape[-1])].contiguous()
    _check(batch, params.slc_block, 4e-3, 1e-3, 3e-3, o_rtol=2e-3)
    empty = torch.full_like(blocks, -1)
    empty[:45, 1, 0] = 0  # half the tokens see block 0 through KV head 1 only
    args = list(_args(batch, params.slc_block))
    args[3] = empty
    o, lse = selected_attention_fwd_kv_outer(*args)
    o_ref, lse_ref = slc_mod._fwd(*args)
    assert torch.equal(o[:, :2], torch.zeros_like(o[:, :2])) and torch.equal(o[45:], torch.zeros_like(o[45:]))
    assert torch.isneginf(lse[:, :2]).all() and torch.isneginf(lse[45:]).all()
    torch.testing.assert_close(o.float(), o_ref.float(), atol=4e-3, rtol=2e-3)
    torch.testing.assert_close(lse, lse_ref, atol=1e-3, rtol=0)


def test_kv_outer_bad_inputs_raise():
    q, k, v = torch.randn(10, 4, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16)
    cu = torch.tensor([0, 10], dtype=torch.int32)
    blocks = torch.zeros(10, 2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        selected_attention_fwd_kv_outer(q, torch.randn(10, 3, 16), torch.randn(10, 3, 16), blocks, cu, cu, 4)
    with pytest.raises(ValueError, match="block_indices"):
        selected_attention_fwd_kv_outer(q, k, v, blocks.long(), cu, cu, 4)
    with pytest.raises(ValueError, match="slc_block=0"):
        selected_attention_fwd_kv_outer(q, k, v, blocks, cu, cu, 0)


# ---------------------------------------------------------------- realistic shapes on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(8, 8), (16, 4), (16, 1)])
def test_gpu_bf16_realistic(hq, hkv):
    """bf16, D=128, paper sizes (blocks of 64, n=16), two documents (4097 tokens in all), G = 1, 4, 16."""
    lens = [3001, 1096]
    batch = _make_batch(lens, lens, hq, hkv, 128, 128, PAPER, torch.bfloat16, device="cuda")
    _assert_sparse(batch["blocks"], lens, lens, PAPER.slc_block)
    _check(batch, PAPER.slc_block, 2e-2, 2e-3, 1e-2, o_rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(32, 8), (6, 3)])
def test_gpu_bf16_decode_like_and_slices(hq, hkv):
    """8k keys, the last 1500 queries only (Tq < Tk) plus a 700-token document; token slices."""
    lens_k, lens_q = [8192, 700], [1500, 700]
    batch = _make_batch(lens_k, lens_q, hq, hkv, 128, 128, PAPER, torch.bfloat16, device="cuda")
    o, lse = _check(batch, PAPER.slc_block, 2e-2, 2e-3, 1e-2, o_rtol=1e-2)
    per_tok = partial_bytes_per_token(hq, batch["blocks"].shape[-1], 128)
    o2, lse2 = selected_attention_fwd_kv_outer(*_args(batch, PAPER.slc_block), max_partial_bytes=333 * per_tok)
    torch.testing.assert_close(o2.float(), o.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse2, lse, atol=1e-4, rtol=0)


@pytest.mark.gpu
def test_gpu_fp32_exact_dots():
    lens = [777, 1290]
    batch = _make_batch(lens, lens, 8, 2, 64, 64, PAPER, torch.float32, device="cuda")
    _check(batch, PAPER.slc_block, 1e-5, 1e-5, 1e-5)
