"""Packed documents stay apart in every Triton branch: a NaN or inf in one document's keys/values
reaches neither the outputs nor the gradients of the other documents.

Each test runs a branch twice on the same packed batch, once clean and once with one document's
values (and keys) poisoned, and requires every other document's outputs and gradients to be finite and
equal to the clean run's (the poisoned document itself may be NaN). Finite values were always isolated
(masked scores); ``0 * NaN`` in a tile that spans a document boundary was not.
CPU: the Triton interpreter on tiny shapes.
"""
import pytest
import torch

from nsa_kernels import NSAParams, nsa_attention_varlen
from nsa_kernels.parallel import parallel_cmp
from nsa_kernels.params import num_cmp_blocks
from nsa_kernels.parallel import parallel_slc
from nsa_kernels.parallel import parallel_win

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Lengths not multiples of the block sizes: a document's last selection block ends inside the next one.
LENS = (40, 50, 30)
POISONED = 1
PARAMS = NSAParams(cmp_block=8, cmp_stride=4, slc_block=16, slc_count=3, init_blocks=1, local_blocks=1, window=12)


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def _all_blocks(lens, hkv, slc_block):
    """Every token selects every block of its document up to its own (many shared blocks, so the
    selected kernel's token tiles walk their union, across the document boundaries)."""
    rows, width = [], -(-max(lens) // slc_block)
    for n in lens:
        pos = torch.arange(n)
        idx = torch.arange(width).expand(n, width).clone()
        idx[idx > (pos // slc_block)[:, None]] = -1
        rows.append(idx)
    return torch.cat(rows)[:, None, :].expand(-1, hkv, -1).to(torch.int32).contiguous().to(DEVICE)


def _poison(x, cu, doc):
    x = x.detach().clone()
    s, e = int(cu[doc]), int(cu[doc + 1])
    x[s:e] = float("nan")
    x[s] = float("inf")
    return x


def _outside(cu, doc, n):
    keep = torch.ones(n, dtype=torch.bool, device=DEVICE)
    keep[int(cu[doc]) : int(cu[doc + 1])] = False
    return keep


def _run(fn, inputs):
    xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*xs)
    do = torch.randn(out.shape, generator=torch.Generator(DEVICE).manual_seed(0), device=DEVICE).to(out.dtype)
    grads = torch.autograd.grad(out, [x for x in xs if x.requires_grad], do)
    return out, grads


def _check(fn, inputs, poison, keep_q, keeps):
    """``poison``: indices into ``inputs`` (with their offsets) to poison; ``keep_q``: rows of the
    output outside the poisoned document; ``keeps``: per differentiable input, its rows to compare."""
    clean_out, clean_grads = _run(fn, inputs)
    bad = list(inputs)
    for i, cu in poison:
        bad[i] = _poison(bad[i], cu, POISONED)
    out, grads = _run(fn, bad)
    assert torch.isfinite(clean_out).all()
    assert torch.isfinite(out[keep_q]).all(), "NaN/inf reached another document's output"
    torch.testing.assert_close(out[keep_q], clean_out[keep_q], rtol=0, atol=1e-5)
    for n, (g, g0, keep) in enumerate(zip(grads, clean_grads, keeps)):
        assert torch.isfinite(g[keep]).all(), f"NaN/inf reached another document's gradient (input {n})"
        torch.testing.assert_close(g[keep], g0[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hq,hkv", [(1, 1), (4, 2)])
def test_selected_attention_isolates_documents(hq, hkv):
    cu = _cu(LENS)
    n, d = sum(LENS), 16
    q, k, v = (torch.randn(n, h, d, device=DEVICE) for h in (hq, hkv, hkv))
    blocks = _all_blocks(LENS, hkv, PARAMS.slc_block)
    keep = _outside(cu, POISONED, n)
    fn = lambda q, k, v: parallel_slc(q, k, v, blocks, cu, cu, PARAMS.slc_block)  # noqa: E731
    _check(fn, (q, k, v), [(2, cu)], keep, (keep, keep, keep))
    _check(fn, (q, k, v), [(1, cu)], keep, (keep, keep, keep))


@pytest.mark.parametrize("hq,hkv", [(1, 1), (4, 2)])
def test_window_attention_isolates_documents(hq, hkv):
    cu = _cu(LENS)
    n, d = sum(LENS), 16
    q, k, v = (torch.randn(n, h, d, device=DEVICE) for h in (hq, hkv, hkv))
    keep = _outside(cu, POISONED, n)
    fn = lambda q, k, v: parallel_win(q, k, v, cu, cu, PARAMS.window)  # noqa: E731
    _check(fn, (q, k, v), [(1, cu), (2, cu)], keep, (keep, keep, keep))


def test_compressed_attention_isolates_documents():
    cu = _cu(LENS)
    cu_c = _cu([num_cmp_blocks(n, PARAMS.cmp_block, PARAMS.cmp_stride) for n in LENS])
    n, nc, d = sum(LENS), int(cu_c[-1]), 16
    q = torch.randn(n, 4, d, device=DEVICE)
    ck, cv = torch.randn(nc, 2, d, device=DEVICE), torch.randn(nc, 2, d, device=DEVICE)
    keep_q, keep_c = _outside(cu, POISONED, n), _outside(cu_c, POISONED, nc)

    def fn(q, ck, cv):
        return parallel_cmp(q, ck, cv, cu, cu, cu_c, PARAMS.cmp_block, PARAMS.cmp_stride)[0]

    _check(fn, (q, ck, cv), [(1, cu_c), (2, cu_c)], keep_q, (keep_q, keep_c, keep_c))


def test_nsa_attention_isolates_documents():
    """The whole layer (selection included, from the poisoned document's own compressed keys)."""
    cu = _cu(LENS)
    cu_c = _cu([num_cmp_blocks(n, PARAMS.cmp_block, PARAMS.cmp_stride) for n in LENS])
    n, nc, d, hq, hkv = sum(LENS), int(cu_c[-1]), 16, 2, 1
    q, k, v = (torch.randn(n, h, d, device=DEVICE) for h in (hq, hkv, hkv))
    ck, cv = torch.randn(nc, hkv, d, device=DEVICE), torch.randn(nc, hkv, d, device=DEVICE)
    gates = torch.rand(n, hq, 3, device=DEVICE)
    keep_q, keep_c = _outside(cu, POISONED, n), _outside(cu_c, POISONED, nc)

    def fn(q, k, v, ck, cv, g):
        return nsa_attention_varlen(q, k, v, ck, cv, g, cu, cu, cu_c, PARAMS, backend="triton")

    inputs = (q, k, v, ck, cv, gates)
    keeps = (keep_q, keep_q, keep_q, keep_c, keep_c, keep_q)
    _check(fn, inputs, [(2, cu), (4, cu_c)], keep_q, keeps)
