"""The whole NSA layer on the Triton kernels (all branches + gates) against the reference."""
import copy

import pytest
import torch

from nsa_kernels import MLPCompressor, NSAParams, compress_varlen, nsa_attention_varlen, resolve_backend


def _case(lens, hq, hkv, d, dv, params, device, dtype):
    cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
    n = sum(lens)
    q = torch.randn(n, hq, d, device=device, dtype=dtype)
    k = torch.randn(n, hkv, d, device=device, dtype=dtype)
    v = torch.randn(n, hkv, dv, device=device, dtype=dtype)
    gates = torch.rand(n, hq, 3, device=device, dtype=dtype)
    ck_mod = MLPCompressor(d, params.cmp_block).to(device, dtype)
    cv_mod = MLPCompressor(dv, params.cmp_block).to(device, dtype)
    return q, k, v, gates, cu, ck_mod, cv_mod


def _run(backend, q, k, v, gates, cu, ck_mod, cv_mod, params):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, gates)]
    ck, cu_c = compress_varlen(leaves[1], cu, ck_mod, params.cmp_block, params.cmp_stride)
    cv, _ = compress_varlen(leaves[2], cu, cv_mod, params.cmp_block, params.cmp_stride)
    out = nsa_attention_varlen(leaves[0], leaves[1], leaves[2], ck, cv, leaves[3], cu, cu, cu_c, params, backend=backend)
    return out, leaves


def _compare(params, lens, hq, hkv, d, dv, device, dtype, tol):
    q, k, v, gates, cu, ck_mod, cv_mod = _case(lens, hq, hkv, d, dv, params, device, dtype)
    out, leaves = _run("triton", q, k, v, gates, cu, ck_mod, cv_mod, params)
    ref, ref_leaves = _run("reference", q.double(), k.double(), v.double(), gates.double(), cu,
                           ck_mod.double(), cv_mod.double(), params)
    assert out.dtype == dtype and torch.isfinite(out).all()
    err = (out.double() - ref).norm() / ref.norm()
    assert err < tol, f"forward rel err {err:.2e}"
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    for name, a, b in zip("q k v gates".split(), leaves, ref_leaves):
        gerr = (a.grad.double() - b.grad).norm() / b.grad.norm()
        assert gerr < tol * 3, f"d{name} rel err {gerr:.2e}"


def test_auto_backend_is_reference_on_cpu():
    assert resolve_backend(torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="backend='cuda'"):
        resolve_backend(torch.device("cpu"), "cuda")


@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 1)])
def test_triton_layer_matches_reference_interpreter(hq, hkv):
    if torch.cuda.is_available():
        pytest.skip("covered at realistic shapes by the gpu test")
    params = NSAParams(cmp_block=8, cmp_stride=4, slc_block=16, slc_count=4, init_blocks=1, local_blocks=2, window=24)
    _compare(params, [67, 30], hq, hkv, 16, 16, "cpu", torch.float32, 2e-4)


@pytest.mark.parametrize("dtype", [
    torch.float16,
    # The Triton interpreter cannot do bf16 dots (numpy has no bf16; outputs come back as garbage), so
    # bf16 is checked on the GPU (test_triton_layer_matches_reference_gpu); strict: tells when it can.
    pytest.param(torch.bfloat16, marks=pytest.mark.xfail(strict=True, reason="no bf16 dots in the Triton interpreter")),
])
def test_triton_layer_half_precision_inputs_interpreter(dtype):
    """fp16 and bf16 in, fp32 accumulation inside: forward and gradients against the float64 reference."""
    if torch.cuda.is_available():
        pytest.skip("covered at realistic shapes by the gpu test")
    params = NSAParams(cmp_block=8, cmp_stride=4, slc_block=16, slc_count=4, init_blocks=1, local_blocks=2, window=24)
    _compare(params, [67, 30], 4, 2, 16, 16, "cpu", dtype, 2e-2 if dtype == torch.float16 else 5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(64, 4), (32, 8), (12, 2)])
def test_triton_layer_matches_reference_gpu(hq, hkv):
    params = NSAParams()
    # bf16 may flip near-tied block choices; the relative error over the whole layer stays small.
    _compare(params, [1537, 2500], hq, hkv, 128, 128, "cuda", torch.bfloat16, 3e-2)


def test_public_triton_functions_are_exported_with_docstrings():
    import nsa_kernels
    from nsa_kernels import decode, parallel

    names = ("parallel_cmp", "parallel_sel", "parallel_slc", "parallel_win", "parallel_gate", "parallel_nsa")
    for name in names:
        assert getattr(nsa_kernels, name) is getattr(parallel, name), name
    assert nsa_kernels.nsa_decode is decode.nsa_decode
    assert nsa_kernels.select_blocks is nsa_kernels.reference.select_blocks  # the specification's
    for name in names + ("nsa_decode",):
        doc = getattr(nsa_kernels, name).__doc__
        assert doc and "(" in doc, name
    for name in names[:-1] + ("nsa_decode",):
        assert "Returns" in getattr(nsa_kernels, name).__doc__, name  # states shapes and what comes back


@pytest.mark.gpu
def test_triton_layer_max_seqlen_gpu():
    """Passing max_seqlen_q/max_seqlen_k (no host copy) gives the same layer as letting it copy the offsets."""
    params = NSAParams()
    q, k, v, gates, cu, ck_mod, cv_mod = _case([1537, 2500, 77], 32, 8, 128, 128, params, "cuda", torch.bfloat16)
    results = []
    for kw in ({}, dict(max_seqlen_q=2500, max_seqlen_k=2500), dict(max_seqlen_k=4096)):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, gates)]
        ck, cu_c = compress_varlen(leaves[1], cu, ck_mod, params.cmp_block, params.cmp_stride)
        cv, _ = compress_varlen(leaves[2], cu, cv_mod, params.cmp_block, params.cmp_stride)
        out = nsa_attention_varlen(leaves[0], leaves[1], leaves[2], ck, cv, leaves[3], cu, cu, cu_c, params,
                                   backend="triton", **kw)
        out.float().square().sum().backward()
        results.append((out.detach(), [x.grad for x in leaves]))
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0])
        for a, b in zip(grads, results[0][1]):  # the slc dk/dv use fp32 atomics: equal up to rounding
            assert ((a.float() - b.float()).norm() / b.float().norm()) < 1e-2


def test_triton_layer_gradients_with_sharp_logits_and_a_sparse_loss_interpreter():
    """The regime of a retrieval fine-tune: a trained model's sharper attention (q, k x 3) and a loss on a
    few answer positions only (upstream gradient zero elsewhere), at the quality experiment's block sizes
    (compression 32/16, selection blocks of 64) with one block chosen by score, 8 query / 2 KV heads of 64;
    the compressors' parameter gradients are compared as well."""
    if torch.cuda.is_available():
        pytest.skip("interpreter test; the gpu tests cover CUDA")
    params = NSAParams(cmp_block=32, cmp_stride=16, slc_block=64, slc_count=4, init_blocks=1, local_blocks=2,
                       window=64)
    lens = [300, 203]
    q, k, v, gates, cu, ck_mod, cv_mod = _case(lens, 8, 2, 64, 64, params, "cpu", torch.float32)
    q, k = q * 3, k * 3
    with torch.no_grad():  # compressors that are not at their (mean-pooling) initialisation
        for p in [*ck_mod.parameters(), *cv_mod.parameters()]:
            p.add_(torch.randn_like(p) * 0.05)
    ref_mods = [copy.deepcopy(m).double() for m in (ck_mod, cv_mod)]
    out, leaves = _run("triton", q, k, v, gates, cu, ck_mod, cv_mod, params)
    ref, ref_leaves = _run("reference", q.double(), k.double(), v.double(), gates.double(), cu, *ref_mods, params)
    grad = torch.zeros_like(ref)
    ends = cu[1:].tolist()
    for end in ends:  # the last 12 positions of each sequence
        grad[end - 12:end] = torch.randn(12, *ref.shape[1:], dtype=ref.dtype)
    out.backward(grad.float())
    ref.backward(grad)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    for name, a, b in zip("q k v gates".split(), leaves, ref_leaves):
        assert b.grad.norm() > 0
        assert (a.grad.double() - b.grad).norm() / b.grad.norm() < 1e-5, name
    for which, mod, ref_mod in (("keys", ck_mod, ref_mods[0]), ("values", cv_mod, ref_mods[1])):
        # one vector per compressor: the key compressor's output bias has an exactly-zero gradient in exact
        # arithmetic (softmax is shift-invariant), so only rounding noise to compare element by element
        got = torch.cat([p.grad.double().flatten() for p in mod.parameters()])
        want = torch.cat([p.grad.flatten() for p in ref_mod.parameters()])
        assert want.norm() > 0 and (got - want).norm() / want.norm() < 1e-5, which
