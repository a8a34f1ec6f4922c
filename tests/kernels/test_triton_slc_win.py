"""Triton selected-block and sliding-window attention against the PyTorch reference (the spec).

On CPU the kernels run in the Triton interpreter (tiny shapes, float32/float16); the ``gpu`` tests run
realistic shapes in bfloat16. Block indices come from the reference's own selection
(``nsa_sequence(..., return_block_indices=True)``) so the kernels see the sets NSA really produces.
"""
import pytest
import torch

from nsa_kernels.params import NSAParams, num_cmp_blocks
from nsa_kernels.reference import nsa_sequence
from nsa_kernels import slc as slc_mod
from nsa_kernels import win as win_mod
from nsa_kernels.parallel import parallel_slc
from nsa_kernels.parallel import parallel_win

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = dict(cmp_block=8, cmp_stride=4, slc_block=16, slc_count=4, init_blocks=1, local_blocks=2, window=24)
SLC, WIN = 1, 2  # gate positions (cmp, slc, win)


def _make_batch(lens_k, lens_q, hq, hkv, d, dv, params, dtype, device=DEVICE, branch=SLC):
    """Random packed inputs plus, per sequence, the reference output of one branch (gates one-hot)
    computed in float32 on the same (rounded) inputs, and the reference's block indices."""
    qs, ks, vs, refs, blocks = [], [], [], [], []
    for tk, tq in zip(lens_k, lens_q):
        qs.append(torch.randn(tq, hq, d, device=device).to(dtype))
        ks.append(torch.randn(tk, hkv, d, device=device).to(dtype))
        vs.append(torch.randn(tk, hkv, dv, device=device).to(dtype))
    q, k, v = (torch.cat(x).requires_grad_() for x in (qs, ks, vs))
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=device)
    scale = d**-0.5
    for b, (tk, tq) in enumerate(zip(lens_k, lens_q)):
        n_cmp = num_cmp_blocks(tk, params.cmp_block, params.cmp_stride)
        # Random compressed tokens (not pooled from k) so that the selection varies between queries.
        cmp_k = torch.randn(n_cmp, hkv, d, device=device) * 2
        cmp_v = torch.randn(n_cmp, hkv, dv, device=device)
        gates = torch.zeros(tq, hq, 3, device=device)
        gates[..., branch] = 1
        sq, sk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        o, idx = nsa_sequence(
            q32[sq], k32[sk], v32[sk], cmp_k, cmp_v, gates, params, scale, return_block_indices=True
        )
        refs.append(o)
        blocks.append(idx)
    return dict(
        q=q, k=k, v=v, q32=q32, k32=k32, v32=v32, cu_q=cu_q, cu_k=cu_k, scale=scale,
        ref=torch.cat(refs), blocks=torch.cat(blocks).contiguous(),
    )


def _rel_err(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def _check_fwd_bwd(out, batch, fwd_tol, grad_tol):
    """Forward and dq/dk/dv against autograd through the reference, for one random ``do``."""
    ref = batch["ref"]
    assert out.shape == ref.shape and out.dtype == batch["q"].dtype
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) < fwd_tol, _rel_err(out, ref)
    do = torch.randn_like(ref)
    got = torch.autograd.grad(out, (batch["q"], batch["k"], batch["v"]), do.to(out.dtype))
    want = torch.autograd.grad(ref, (batch["q32"], batch["k32"], batch["v32"]), do)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), name
        # Relative in norm, with a tiny absolute floor: some exact gradients are 0 (e.g. dq, window=1).
        floor = 1e-6 * w.numel() ** 0.5
        assert (g.float() - w).norm() <= grad_tol * w.norm() + floor, (name, _rel_err(g, w))


def _assert_sparse(blocks, lens_q, lens_k, slc_block):
    """Guard against vacuous tests: some queries must skip some of their eligible blocks."""
    pos = torch.cat([torch.arange(tk - tq, tk) for tk, tq in zip(lens_k, lens_q)]).to(blocks.device)
    eligible = pos // slc_block + 1
    taken = (blocks >= 0).sum(-1)[:, 0]
    assert (taken < eligible).any()


# ---------------------------------------------------------------- selected attention (CPU + GPU)

SLC_CASES = [
    # lens_k, lens_q, hq, hkv, d, dv
    ([97, 61], [97, 61], 4, 4, 16, 16),  # G=1, two sequences
    ([113], [113], 4, 2, 32, 16),  # G=2, D != Dv
    ([83, 70], [83, 70], 3, 1, 16, 16),  # G=3
    ([130], [130], 8, 2, 16, 16),  # G=4
    ([71, 95], [71, 95], 8, 1, 16, 32),  # G=8, Dv > D
    ([101], [101], 16, 1, 16, 16),  # G=16
    ([120, 75, 9], [31, 75, 1], 12, 2, 16, 16),  # G=6, Tq < Tk (decode-like), a tiny sequence
]


@pytest.mark.parametrize("lens_k,lens_q,hq,hkv,d,dv", SLC_CASES)
def test_selected_matches_reference_fp32(lens_k, lens_q, hq, hkv, d, dv):
    params = NSAParams(**TINY)
    batch = _make_batch(lens_k, lens_q, hq, hkv, d, dv, params, torch.float32)
    _assert_sparse(batch["blocks"], lens_q, lens_k, params.slc_block)
    out = parallel_slc(
        batch["q"], batch["k"], batch["v"], batch["blocks"], batch["cu_q"], batch["cu_k"], params.slc_block, batch["scale"]
    )
    _check_fwd_bwd(out, batch, 1e-5, 1e-5)


@pytest.mark.parametrize("tokens_per_program,union_pct", [(1, 67), (3, 100), (8, 100), (5, 0)])
def test_selected_token_tiles_agree(tokens_per_program, union_pct):
    """Both work splits compute the reference: tiles of several tokens walking the union of their
    blocks (union_pct=100 forces it) and tokens walking their own blocks (union_pct=0), including
    tiles that straddle two sequences; a non-power-of-two block size (24) is used."""
    params = NSAParams(cmp_block=8, cmp_stride=4, slc_block=24, slc_count=3, init_blocks=1, local_blocks=1, window=8)
    lens = [100, 53]
    batch = _make_batch(lens, lens, 4, 2, 16, 16, params, torch.float32)
    args = (batch["q"].detach(), batch["k"].detach(), batch["v"].detach(), batch["blocks"], batch["cu_q"], batch["cu_k"])
    o, lse = slc_mod._fwd(
        *args, params.slc_block, batch["scale"], tokens_per_program=tokens_per_program, union_pct=union_pct
    )
    assert _rel_err(o, batch["ref"]) < 1e-5
    do = torch.randn_like(o)
    dq, dk, dv = slc_mod._bwd(
        do, *args[:3], o, lse, *args[3:], params.slc_block, batch["scale"],
        tokens_per_program=tokens_per_program, union_pct=union_pct, chunk_tokens=7,
    )
    want = torch.autograd.grad(batch["ref"], (batch["q32"], batch["k32"], batch["v32"]), do)
    for g, w in zip((dq, dk, dv), want):
        assert _rel_err(g, w) < 1e-5


def test_selected_fp16_and_unused_slots():
    """float16 inputs; extra ``-1`` slots and blocks after the query are ignored; a query with no
    usable block gets zeros and zero gradients (never NaN)."""
    params = NSAParams(**TINY)
    lens = [90]
    batch = _make_batch(lens, lens, 4, 1, 16, 16, params, torch.float16)
    own = (torch.arange(90) // params.slc_block)[:, None, None]
    later = own + 1 + torch.randint(0, 3, (90, 1, 1))  # starts after the query: must be ignored
    blocks = torch.cat([batch["blocks"], torch.full_like(batch["blocks"][..., :1], -1), later.int()], dim=-1)
    blocks = blocks[..., torch.randperm(blocks.shape[-1])].contiguous()  # slot order does not matter
    out = parallel_slc(batch["q"], batch["k"], batch["v"], blocks, batch["cu_q"], batch["cu_k"], 16)
    assert _rel_err(out, batch["ref"]) < 3e-3
    empty = torch.full_like(batch["blocks"], -1)
    q = batch["q"].detach().requires_grad_()
    o = parallel_slc(q, batch["k"], batch["v"], empty, batch["cu_q"], batch["cu_k"], 16)
    assert torch.equal(o, torch.zeros_like(o))
    (dq,) = torch.autograd.grad(o.float().sum(), (q,))
    assert torch.equal(dq, torch.zeros_like(dq))


# ---------------------------------------------------------------- window attention (CPU + GPU)

WIN_CASES = [
    # lens_k, lens_q, hq, hkv, d, dv, window
    ([97, 61], [97, 61], 2, 2, 16, 16, 24),  # G=1
    ([150], [150], 6, 3, 32, 16, 24),  # G=2, D != Dv
    ([83, 70], [83, 70], 3, 1, 16, 16, 7),  # G=3, small window
    ([130, 33], [130, 33], 8, 2, 16, 16, 40),  # G=4, window > second sequence
    ([71], [71], 8, 1, 16, 32, 1),  # G=8, window 1 (only the query's own key)
    ([101, 64], [101, 64], 16, 1, 16, 16, 24),  # G=16
    ([120, 75, 9], [31, 75, 1], 12, 2, 16, 16, 24),  # G=6, Tq < Tk
]


@pytest.mark.parametrize("lens_k,lens_q,hq,hkv,d,dv,window", WIN_CASES)
def test_window_matches_reference_fp32(lens_k, lens_q, hq, hkv, d, dv, window):
    params = NSAParams(**{**TINY, "window": window})
    batch = _make_batch(lens_k, lens_q, hq, hkv, d, dv, params, torch.float32, branch=WIN)
    out = parallel_win(batch["q"], batch["k"], batch["v"], batch["cu_q"], batch["cu_k"], window, batch["scale"])
    _check_fwd_bwd(out, batch, 1e-5, 1e-5)


@pytest.mark.parametrize("block_m,block_n,kv_m,kv_n", [(16, 16, None, None), (32, 64, 16, 32)])
def test_window_tile_sizes_agree_fp16(block_m, block_n, kv_m, kv_n):
    """Other tile shapes, float16 inputs, a window that is not a multiple of any tile."""
    params = NSAParams(**{**TINY, "window": 21})
    lens = [77, 40]
    batch = _make_batch(lens, lens, 4, 1, 16, 16, params, torch.float16, branch=WIN)
    args = (batch["q"].detach(), batch["k"].detach(), batch["v"].detach(), batch["cu_q"], batch["cu_k"], 21, batch["scale"])
    o, lse = win_mod._fwd(*args, block_m=block_m, block_n=block_n)
    assert _rel_err(o, batch["ref"]) < 3e-3
    do = torch.randn_like(batch["ref"])
    grads = win_mod._bwd(
        do.half(), *args[:3], o, lse, *args[3:], block_m=block_m, block_n=block_n, dkdv_block_m=kv_m, dkdv_block_n=kv_n
    )
    want = torch.autograd.grad(batch["ref"], (batch["q32"], batch["k32"], batch["v32"]), do)
    for g, w in zip(grads, want):
        assert _rel_err(g, w) < 5e-3


# ---------------------------------------------------------------- input validation


def _small():
    q = torch.randn(10, 4, 16)
    k = torch.randn(10, 2, 16)
    v = torch.randn(10, 2, 8)
    cu = torch.tensor([0, 10], dtype=torch.int32)
    blocks = torch.zeros(10, 2, 2, dtype=torch.int32)
    return q, k, v, cu, blocks


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(k=torch.randn(10, 3, 16)), "multiple of key/value heads"),
        (dict(q=torch.randn(10, 4, 8)), "head_dim"),
        (dict(v=torch.randn(9, 2, 8)), "same tokens and heads"),
        (dict(cu=torch.tensor([0, 10], dtype=torch.int64)), "int32"),
        (dict(q=torch.randn(10, 4, 16, dtype=torch.float64)), "dtype"),
    ],
)
def test_bad_inputs_raise(change, match):
    q, k, v, cu, blocks = _small()
    q, k, v, cu = (change.get(n, x) for n, x in zip(("q", "k", "v", "cu"), (q, k, v, cu)))
    with pytest.raises(ValueError, match=match):
        parallel_win(q, k, v, cu, cu, 4)
    with pytest.raises(ValueError, match=match):
        parallel_slc(q, k, v, blocks, cu, cu, 4)


def test_bad_settings_raise():
    q, k, v, cu, blocks = _small()
    with pytest.raises(ValueError, match="window=0"):
        parallel_win(q, k, v, cu, cu, 0)
    with pytest.raises(ValueError, match="slc_block=0"):
        parallel_slc(q, k, v, blocks, cu, cu, 0)
    with pytest.raises(ValueError, match="block_indices"):
        parallel_slc(q, k, v, blocks[:, :1], cu, cu, 4)
    with pytest.raises(ValueError, match="block_indices"):
        parallel_slc(q, k, v, blocks.long(), cu, cu, 4)


# ---------------------------------------------------------------- realistic shapes on the GPU

PAPER = NSAParams()  # l=32, d=16, l'=64, n=16, w=512


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(16, 4), (16, 1)])
@pytest.mark.parametrize("branch", [SLC, WIN])
def test_gpu_bf16_realistic(hq, hkv, branch):
    """bf16, D=128, paper sizes, two documents of odd lengths (4096 tokens in all), G = 4 and 16."""
    lens = [3001, 1095]
    batch = _make_batch(lens, lens, hq, hkv, 128, 128, PAPER, torch.bfloat16, device="cuda", branch=branch)
    if branch == SLC:
        _assert_sparse(batch["blocks"], lens, lens, PAPER.slc_block)
        out = parallel_slc(
            batch["q"], batch["k"], batch["v"], batch["blocks"], batch["cu_q"], batch["cu_k"], 64, batch["scale"]
        )
    else:
        out = parallel_win(batch["q"], batch["k"], batch["v"], batch["cu_q"], batch["cu_k"], 512, batch["scale"])
    _check_fwd_bwd(out, batch, 1e-2, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d,dv", [(32, 8, 128, 128), (24, 8, 192, 128)])
def test_gpu_bf16_8k_decode_and_dv(hq, hkv, d, dv):
    """8k keys, the last 1500 queries only (Tq < Tk) plus a full 700-token document; D=192/Dv=128."""
    lens_k, lens_q = [8192, 700], [1500, 700]
    for branch in (SLC, WIN):
        batch = _make_batch(lens_k, lens_q, hq, hkv, d, dv, PAPER, torch.bfloat16, device="cuda", branch=branch)
        if branch == SLC:
            out = parallel_slc(
                batch["q"], batch["k"], batch["v"], batch["blocks"], batch["cu_q"], batch["cu_k"], 64, batch["scale"]
            )
        else:
            out = parallel_win(batch["q"], batch["k"], batch["v"], batch["cu_q"], batch["cu_k"], 512, batch["scale"])
        _check_fwd_bwd(out, batch, 1e-2, 2e-2)


@pytest.mark.gpu
def test_gpu_fp32_exact_dots():
    """float32 inputs use exact (non-tf32) dots: agreement far under bf16 rounding."""
    lens = [777, 1290]
    for branch in (SLC, WIN):
        batch = _make_batch(lens, lens, 8, 2, 64, 64, PAPER, torch.float32, device="cuda", branch=branch)
        if branch == SLC:
            out = parallel_slc(
                batch["q"], batch["k"], batch["v"], batch["blocks"], batch["cu_q"], batch["cu_k"], 64, batch["scale"]
            )
        else:
            out = parallel_win(batch["q"], batch["k"], batch["v"], batch["cu_q"], batch["cu_k"], 512, batch["scale"])
        _check_fwd_bwd(out, batch, 1e-5, 1e-5)
