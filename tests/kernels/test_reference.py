"""The pure-PyTorch reference against the brute-force oracle (float64), plus its invariants."""
import pytest
import torch

from nsa_kernels import (
    MLPCompressor,
    MeanPoolCompressor,
    NSAParams,
    cmp_cu_seqlens,
    compress_varlen,
    gather_cmp_blocks,
    nsa_attention_varlen,
    nsa_sequence,
    num_cmp_blocks,
)
from tests.kernels.oracle import oracle_sequence

SMALL = dict(cmp_block=8, cmp_stride=4, slc_block=12, slc_count=4, init_blocks=1, local_blocks=2, window=24)


def _inputs(tq, tk, hq, hkv, d=8, dv=8, dtype=torch.float64, params=None):
    params = params or NSAParams(**SMALL)
    q = torch.randn(tq, hq, d, dtype=dtype)
    k = torch.randn(tk, hkv, d, dtype=dtype)
    v = torch.randn(tk, hkv, dv, dtype=dtype)
    n_cmp = num_cmp_blocks(tk, params.cmp_block, params.cmp_stride)
    # Random compressed tokens (not derived from k) so that selection varies a lot between queries.
    ck = torch.randn(n_cmp, hkv, d, dtype=dtype) * 2
    cv = torch.randn(n_cmp, hkv, dv, dtype=dtype)
    gates = torch.rand(tq, hq, 3, dtype=dtype)
    return q, k, v, ck, cv, gates, params


@pytest.mark.parametrize(
    "tq,tk,hq,hkv",
    [(77, 77, 2, 2), (61, 61, 4, 2), (53, 53, 3, 1), (45, 45, 8, 1), (37, 37, 16, 1), (6, 91, 6, 2), (1, 70, 4, 1)],
)
def test_reference_matches_oracle_forward(tq, tk, hq, hkv):
    q, k, v, ck, cv, gates, params = _inputs(tq, tk, hq, hkv, dv=6)
    scale = 0.4
    out, blocks = nsa_sequence(q, k, v, ck, cv, gates, params, scale, return_block_indices=True)
    want, chosen = oracle_sequence(q, k, v, ck, cv, gates, params, scale)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    for (qi, kh), picked in chosen.items():
        got = [j for j in blocks[qi, kh].tolist() if j >= 0]
        assert got == picked, (qi, kh)


def test_reference_selection_is_sparse_at_this_length():
    """Guard against a vacuous oracle test: at these sizes most queries must skip some blocks."""
    q, k, v, ck, cv, gates, params = _inputs(77, 77, 4, 2)
    _, blocks = nsa_sequence(q, k, v, ck, cv, gates, params, 0.4, return_block_indices=True)
    eligible = torch.arange(77) // params.slc_block + 1
    taken = (blocks >= 0).sum(-1)[:, 0]
    assert (taken < eligible).float().mean() > 0.25


@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 1)])
def test_reference_gradients_match_oracle(hq, hkv):
    tq = tk = 41
    q, k, v, ck, cv, gates, params = _inputs(tq, tk, hq, hkv)
    leaves = [x.requires_grad_() for x in (q, k, v, ck, cv, gates)]
    grad_out = torch.randn(tq, hq, v.shape[-1], dtype=torch.float64)
    out = nsa_sequence(*leaves, params, 0.5)
    got = torch.autograd.grad((out * grad_out).sum(), leaves)
    want_out, _ = oracle_sequence(*leaves, params, 0.5)
    want = torch.autograd.grad((want_out * grad_out).sum(), leaves)
    for name, g, w in zip(("q", "k", "v", "cmp_k", "cmp_v", "gates"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=lambda m: f"d{name}: {m}")


def test_reference_float32_and_bfloat16_close_to_float64():
    q, k, v, ck, cv, gates, params = _inputs(70, 70, 4, 2)
    want = nsa_sequence(q, k, v, ck, cv, gates, params, 0.3)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        args = [x.to(dtype) for x in (q, k, v, ck, cv, gates)]
        got = nsa_sequence(*args, params, 0.3).double()
        # bf16 may legitimately flip a near-tied block choice: compare the typical error.
        err = (got - want).norm() / want.norm()
        assert err < tol, (dtype, err)


def test_varlen_equals_separate_sequences_and_documents_are_isolated():
    params = NSAParams(**SMALL)
    lens_k = [37, 70, 1, 53]
    lens_q = [37, 5, 1, 53]
    hq, hkv, d = 4, 2, 8
    k = torch.randn(sum(lens_k), hkv, d, dtype=torch.float64)
    v = torch.randn(sum(lens_k), hkv, d, dtype=torch.float64)
    q = torch.randn(sum(lens_q), hq, d, dtype=torch.float64)
    gates = torch.rand(sum(lens_q), hq, 3, dtype=torch.float64)
    cu_k = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    cu_q = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    comp = MeanPoolCompressor(params.cmp_block)
    ck, cu_c = compress_varlen(k, cu_k, comp, params.cmp_block, params.cmp_stride)
    cv, _ = compress_varlen(v, cu_k, comp, params.cmp_block, params.cmp_stride)
    out = nsa_attention_varlen(q, k, v, ck, cv, gates, cu_q, cu_k, cu_c, params)
    for b in range(len(lens_k)):
        sk, sq, sc = slice(cu_k[b], cu_k[b + 1]), slice(cu_q[b], cu_q[b + 1]), slice(cu_c[b], cu_c[b + 1])
        alone = nsa_sequence(q[sq], k[sk], v[sk], ck[sc], cv[sc], gates[sq], params, d**-0.5)
        torch.testing.assert_close(out[sq], alone, rtol=0, atol=0)
    # Changing document 0 must not move any output of the other documents.
    k2 = k.clone()
    k2[: lens_k[0]] += torch.randn_like(k2[: lens_k[0]])
    ck2, _ = compress_varlen(k2, cu_k, comp, params.cmp_block, params.cmp_stride)
    out2 = nsa_attention_varlen(q, k2, v, ck2, cv, gates, cu_q, cu_k, cu_c, params)
    assert not torch.allclose(out2[: lens_q[0]], out[: lens_q[0]])
    torch.testing.assert_close(out2[lens_q[0] :], out[lens_q[0] :], rtol=0, atol=0)


def test_short_sequences_equal_dense_attention():
    """When every block fits in the selection budget and the window, slc and win are dense causal."""
    params = NSAParams(**SMALL)
    t, hq, hkv = params.window, 4, 2  # slc_count * slc_block = 48 >= window = 24
    q = torch.randn(t, hq, 8, dtype=torch.float64)
    k = torch.randn(t, hkv, 8, dtype=torch.float64)
    v = torch.randn(t, hkv, 8, dtype=torch.float64)
    ck = torch.randn(num_cmp_blocks(t, 8, 4), hkv, 8, dtype=torch.float64)
    gates = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64).expand(t, hq, 3)
    out = nsa_sequence(q, k, v, ck, ck, gates, params, 8**-0.5)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(2, 0), v.transpose(0, 1).repeat_interleave(2, 0),
        is_causal=True,
    ).transpose(0, 1)
    torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)


def test_compression_blocks_and_offsets():
    params = NSAParams(**SMALL)
    x = torch.randn(45, 2, 8)
    blocks = gather_cmp_blocks(x, params.cmp_block, params.cmp_stride)
    assert blocks.shape == (num_cmp_blocks(45, 8, 4), 2, 8, 8) == (10, 2, 8, 8)
    for i in range(blocks.shape[0]):
        torch.testing.assert_close(blocks[i], x[i * 4 : i * 4 + 8].transpose(0, 1))
    cu = torch.tensor([0, 7, 8, 53], dtype=torch.int32)
    assert cmp_cu_seqlens(cu, 8, 4).tolist() == [0, 0, 0, num_cmp_blocks(45, 8, 4)]


def test_mlp_compressor_starts_as_mean_pooling_and_learns():
    comp = MLPCompressor(head_dim=8, cmp_block=4, hidden_size=16)
    blocks = torch.randn(5, 3, 4, 8)
    torch.testing.assert_close(comp(blocks), blocks.mean(-2))
    comp(blocks).square().sum().backward()
    assert comp.down.weight.grad.abs().sum() > 0 and comp.up.weight.grad is not None


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("cmp_block", 30, "multiple of cmp_stride"),
        ("cmp_stride", 64, "<= cmp_block"),
        ("slc_block", 40, "multiple of cmp_stride"),
        ("slc_count", 2, ">= init_blocks + local_blocks"),
        ("window", 0, ">= 1"),
        ("cmp_stride", -16, ">= 1"),
        ("local_blocks", 0, "own selection block"),
        ("init_blocks", -1, ">= 0"),
        ("slc_count", 3.5, "integer"),
    ],
)
def test_invalid_params_name_field_value_and_range(field, value, needle):
    with pytest.raises(ValueError) as err:
        NSAParams(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value) and needle in str(err.value)
