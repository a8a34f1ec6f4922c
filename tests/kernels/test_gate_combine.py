"""The fused gate kernel (nsa_kernels/gate.py) against the PyTorch formula, forward and backward.

On CPU the kernels run in the Triton interpreter (tiny shapes)."""
import pytest
import torch

from nsa_kernels.parallel import parallel_gate
from nsa_kernels.reference import gate_combine

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(n, h, dv, dtype, gate_dtype):
    os_ = [torch.randn(n, h, dv, device=DEVICE).to(dtype).requires_grad_() for _ in range(3)]
    g = torch.rand(n, h, 3, device=DEVICE).to(gate_dtype).requires_grad_()
    return os_, g


@pytest.mark.parametrize(
    "n,h,dv,dtype,gate_dtype,tol",
    [
        (7, 3, 16, torch.float32, torch.float32, 1e-6),
        (5, 2, 24, torch.float32, torch.float32, 1e-6),  # Dv not a power of two, rows not a tile multiple
        (9, 4, 16, torch.bfloat16, torch.bfloat16, 1e-2),
        (6, 2, 32, torch.bfloat16, torch.float32, 1e-2),  # fp32 gates with bf16 branch outputs
    ],
)
def test_gate_combine_matches_formula(n, h, dv, dtype, gate_dtype, tol):
    (oc, os_, ow), g = _inputs(n, h, dv, dtype, gate_dtype)
    out = parallel_gate(oc, os_, ow, g)
    # The formula in float64 on the same (rounded) inputs: fp32 accumulation, so only the output rounding differs.
    leaves = [x.detach().double().requires_grad_() for x in (oc, os_, ow, g)]
    want = gate_combine(*leaves)
    assert out.dtype == dtype and out.shape == (n, h, dv) and out.is_contiguous()
    assert torch.allclose(out.double(), want, rtol=tol, atol=tol)
    # Same fp32 formula in torch: equal up to one rounding of the output (summation order may differ).
    same = gate_combine(oc, os_, ow, g)
    assert torch.allclose(out.float(), same.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
    dout = torch.randn(n, h, dv, device=DEVICE).to(dtype)
    got = torch.autograd.grad(out, (oc, os_, ow, g), dout)
    exp = torch.autograd.grad(want, leaves, dout.double())
    for name, a, b, x in zip(("d_cmp", "d_slc", "d_win", "d_gates"), got, exp, (oc, os_, ow, g)):
        assert a.dtype == x.dtype and a.shape == x.shape, name
        # d gates is a sum over Dv of products: scale the tolerance by its size.
        scale = b.abs().max().item() if name == "d_gates" else 1.0
        assert torch.allclose(a.double(), b, rtol=tol, atol=tol * max(scale, 1.0)), (name, (a.double() - b).abs().max())


def test_gate_combine_gradcheck_like_fp32():
    """Directional derivative check of all inputs at once (finite differences in float64 through the
    formula vs the kernel's backward)."""
    (oc, os_, ow), g = _inputs(4, 2, 16, torch.float32, torch.float32)
    inputs = (oc, os_, ow, g)
    dirs = [torch.randn_like(x) for x in inputs]
    dout = torch.randn(4, 2, 16, device=DEVICE)
    grads = torch.autograd.grad(parallel_gate(*inputs), inputs, dout)
    analytic = sum((gr.double() * d.double()).sum() for gr, d in zip(grads, dirs))
    eps = 1e-4
    plus = gate_combine(*(x.detach().double() + eps * d.double() for x, d in zip(inputs, dirs)))
    minus = gate_combine(*(x.detach().double() - eps * d.double() for x, d in zip(inputs, dirs)))
    numeric = ((plus - minus) * dout.double()).sum() / (2 * eps)
    assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-5), (analytic, numeric)


def test_gate_combine_non_contiguous_inputs():
    oc, os_, ow = (torch.randn(6, 16, 3, device=DEVICE).transpose(1, 2) for _ in range(3))  # (6, 3, 16) strided
    g = torch.rand(6, 3, 5, device=DEVICE)[..., 1:4]
    assert torch.allclose(parallel_gate(oc, os_, ow, g), gate_combine(oc, os_, ow, g), rtol=1e-6, atol=1e-6)


def test_gate_combine_errors_name_the_value():
    o = torch.zeros(4, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"gates must be \(N, H, 3\)"):
        parallel_gate(o, o, o, torch.zeros(4, 2, 2, device=DEVICE))
    with pytest.raises(ValueError, match="one shape"):
        parallel_gate(o, o[:3], o, torch.zeros(4, 2, 3, device=DEVICE))
    with pytest.raises(ValueError, match="float64"):
        parallel_gate(o.double(), o.double(), o.double(), torch.zeros(4, 2, 3, device=DEVICE))


def test_gate_combine_opcheck():
    from nsa_kernels import ops

    (oc, os_, ow), g = _inputs(5, 2, 16, torch.float32, torch.float32)
    torch.library.opcheck(ops.gate_fwd, (oc, os_, ow, g))
    dout = torch.randn(5, 2, 16, device=DEVICE)
    torch.library.opcheck(ops.gate_bwd, tuple(x.detach() for x in (dout, oc, os_, ow, g)))


@pytest.mark.gpu
def test_gate_combine_gpu_bf16_large():
    (oc, os_, ow), g = _inputs(4099, 16, 128, torch.bfloat16, torch.bfloat16)
    out = parallel_gate(oc, os_, ow, g)
    assert torch.allclose(out.float(), gate_combine(oc, os_, ow, g).float(), rtol=2**-7, atol=1e-6)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (oc, os_, ow, g), dout)
    leaves = [x.detach().float().requires_grad_() for x in (oc, os_, ow, g)]
    exp = torch.autograd.grad(gate_combine(*leaves), leaves, dout.float())
    for a, b in zip(got, exp):
        assert ((a.float() - b).norm() / b.norm()) < 1e-2
