"""The MLP compressor's parameter gradients: float32 accumulation, one rounding to the parameter dtype.

On the GPU, ``tests/kernels/test_triton_long.py`` checks the bf16 gradients against float32 at 256k tokens;
here (CPU) the same code path is checked against float64 autograd of the textbook formula."""
import torch
import torch.nn.functional as F

from nsa_kernels import MLPCompressor


def _textbook(comp, blocks):
    """The compressor's formula with plain torch ops (float64)."""
    p = {n: t.detach().double().requires_grad_() for n, t in comp.named_parameters()}
    x = blocks.double()
    mlp_in = (x + p["pos_embed"]).flatten(-2)
    h = F.silu(F.linear(mlp_in, p["up.weight"], p["up.bias"]))
    return x.mean(-2) + F.linear(h, p["down.weight"], p["down.bias"]), p


def test_bf16_parameter_grads_are_one_rounding_of_the_exact_sums():
    comp = MLPCompressor(head_dim=16, cmp_block=8, hidden_size=24)
    with torch.no_grad():
        for t in comp.parameters():
            t.normal_(0, 0.3)
    comp16 = comp.bfloat16()
    blocks = torch.randn(3000, 2, 8, 16).bfloat16()  # 6000 rows summed into each parameter gradient
    do = torch.randn(3000, 2, 16).bfloat16()
    want_out, want = _textbook(comp16, blocks)  # the same rounded parameters and inputs, in float64
    grads64 = dict(zip(want, torch.autograd.grad(want_out, list(want.values()), do.double())))
    out = comp16(blocks)
    assert out.dtype == torch.bfloat16
    assert ((out.double() - want_out).norm() / want_out.norm()).item() < 1e-2
    out.backward(do)
    for name, t in comp16.named_parameters():
        g, w = t.grad, grads64[name]
        assert g.dtype == torch.bfloat16, name
        # The forward's bf16 intermediates differ from float64's: a few roundings, relative to the norm.
        err = ((g.double() - w).norm() / w.norm()).item()
        assert err < 1e-2, (name, err)
