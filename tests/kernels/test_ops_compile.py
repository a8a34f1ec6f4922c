"""The ``nsa_kernels::*`` custom ops (kernels/ops.py): registration checks (torch.library.opcheck), the
op path against the reference in fp32 (GQA groups 1, 2, 3; odd lengths; 2-3 packed sequences),
host synchronisation counts, and ``torch.compile(fullgraph=True)`` of a small model using them.

On CPU the Triton kernels run in the interpreter (tiny shapes) and torch.compile uses the
``aot_eager`` backend (it traces forward and backward graphs through the ops' fake and autograd
registrations, without needing a C++ compiler for inductor); on GPU the ``gpu`` tests use inductor.
"""
import pytest
import torch

from nsa_kernels import NSAParams, nsa_attention_varlen, ops
from nsa_kernels.params import num_cmp_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Sparse at these lengths: 8-token selection blocks, 3 chosen, a window of 10.
TINY = NSAParams(cmp_block=8, cmp_stride=4, slc_block=8, slc_count=3, init_blocks=1, local_blocks=1, window=10)


def _cu(lens, device=DEVICE):
    return torch.tensor([0] + list(lens), device=device).cumsum(0).to(torch.int32)


def _cmp_index(lens, params):
    """Gather indices ``(N_cmp, cmp_block)`` of every complete compression block, and the offsets."""
    starts, counts, off = [], [], 0
    for n in lens:
        c = num_cmp_blocks(n, params.cmp_block, params.cmp_stride)
        starts += [off + i * params.cmp_stride for i in range(c)]
        counts.append(c)
        off += n
    idx = torch.tensor(starts, dtype=torch.long).reshape(-1, 1) + torch.arange(params.cmp_block)
    return idx.to(DEVICE), _cu(counts)


def _inputs(lens, hq, hkv, d=16, dv=16, params=TINY, dtype=torch.float32):
    n = sum(lens)
    q = torch.randn(n, hq, d, device=DEVICE, dtype=dtype)
    k = torch.randn(n, hkv, d, device=DEVICE, dtype=dtype)
    v = torch.randn(n, hkv, dv, device=DEVICE, dtype=dtype)
    idx, cu_c = _cmp_index(lens, params)
    # Compressed tokens: block means plus noise, so that selection scores differ between blocks.
    cmp_k = k[idx].mean(1) + torch.randn(idx.shape[0], hkv, d, device=DEVICE, dtype=dtype)
    cmp_v = v[idx].mean(1)
    gates = torch.rand(n, hq, 3, device=DEVICE, dtype=dtype)
    return dict(q=q, k=k, v=v, cmp_k=cmp_k, cmp_v=cmp_v, gates=gates, cu_q=_cu(lens), cu_k=_cu(lens), cu_c=cu_c)


def _nsa(case, backend, **kw):
    leaves = {n: case[n].detach().clone().requires_grad_() for n in ("q", "k", "v", "cmp_k", "cmp_v", "gates")}
    out = nsa_attention_varlen(
        leaves["q"], leaves["k"], leaves["v"], leaves["cmp_k"], leaves["cmp_v"], leaves["gates"],
        case["cu_q"], case["cu_k"], case["cu_c"], TINY, backend=backend, **kw,
    )
    return out, leaves


# ------------------------------------------------------------------------------------------------
# Registration checks
# ------------------------------------------------------------------------------------------------

_OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_opcheck_branch_ops():
    """Schema, autograd registration, fake tensors and AOT dispatch (dynamic shapes) of every op."""
    c = _inputs([11, 6], 2, 1)
    n = c["q"].shape[0]
    req = {name: c[name].clone().requires_grad_() for name in ("q", "k", "v", "cmp_k", "cmp_v")}
    sizes = (11, num_cmp_blocks(11, TINY.cmp_block, TINY.cmp_stride))
    cmp_args = (req["q"], req["cmp_k"], req["cmp_v"], c["cu_q"], c["cu_k"], c["cu_c"], *sizes,
                TINY.cmp_block, TINY.cmp_stride, 0.25, TINY.slc_block, TINY.slc_count, TINY.init_blocks,
                TINY.local_blocks)
    torch.library.opcheck(ops.cmp_fwd, cmp_args, test_utils=_OPCHECK_TESTS)
    o, lse, blocks = ops.cmp_fwd(*(x.detach() if isinstance(x, torch.Tensor) else x for x in cmp_args))
    do = torch.randn_like(o)
    torch.library.opcheck(
        ops.cmp_bwd, (do, c["q"], c["cmp_k"], c["cmp_v"], o, lse, c["cu_q"], c["cu_k"], c["cu_c"], *sizes,
                      TINY.cmp_block, TINY.cmp_stride, 0.25), test_utils=_OPCHECK_TESTS,
    )
    torch.library.opcheck(
        ops.sel_fwd, (c["q"], c["cmp_k"], lse, c["cu_q"], c["cu_k"], c["cu_c"], 11, TINY.cmp_block,
                            TINY.cmp_stride, TINY.slc_block, TINY.slc_count, TINY.init_blocks, TINY.local_blocks, 0.25),
        test_utils=_OPCHECK_TESTS,
    )
    torch.library.opcheck(
        ops.slc_fwd, (req["q"], req["k"], req["v"], blocks, c["cu_q"], c["cu_k"], TINY.slc_block, 0.25),
        test_utils=_OPCHECK_TESTS,
    )
    out = ops.slc_fwd(c["q"], c["k"], c["v"], blocks, c["cu_q"], c["cu_k"], TINY.slc_block, 0.25)
    torch.library.opcheck(
        ops.slc_bwd, (do, c["q"], c["k"], c["v"], out[0], out[1], blocks, c["cu_q"], c["cu_k"], *out[2:],
                      TINY.slc_block, 0.25), test_utils=_OPCHECK_TESTS,
    )
    torch.library.opcheck(
        ops.win_fwd, (req["q"], req["k"], req["v"], c["cu_q"], c["cu_k"], TINY.window, 0.25),
        test_utils=_OPCHECK_TESTS,
    )
    o_w, lse_w = ops.win_fwd(c["q"], c["k"], c["v"], c["cu_q"], c["cu_k"], TINY.window, 0.25)
    torch.library.opcheck(
        ops.win_bwd, (do, c["q"], c["k"], c["v"], o_w, lse_w, c["cu_q"], c["cu_k"], TINY.window, 0.25),
        test_utils=_OPCHECK_TESTS,
    )
    assert blocks.shape == (n, 1, TINY.slc_count)


# ------------------------------------------------------------------------------------------------
# The op path against the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lens,hq,hkv",
    [([29, 17], 2, 2), ([27, 9, 33], 4, 2), ([31, 19], 3, 1)],
    ids=["G1-2seq", "G2-3seq", "G3-2seq"],
)
def test_op_path_matches_reference_fp32(lens, hq, hkv):
    if torch.cuda.is_available():
        pytest.skip("interpreter test; the GPU runs tests/kernels/test_nsa_dispatch.py at realistic shapes")
    case = _inputs(lens, hq, hkv)
    out, leaves = _nsa(case, "triton")
    ref, ref_leaves = _nsa({n: (x.double() if x.is_floating_point() else x) for n, x in case.items()}, "reference")
    # Guard against a vacuous test: some queries must skip some of their eligible blocks.
    assert max(lens) > TINY.slc_count * TINY.slc_block
    assert out.dtype == torch.float32
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-5, err
    dout = torch.randn_like(ref)
    got = torch.autograd.grad(out, list(leaves.values()), dout.float())
    want = torch.autograd.grad(ref, list(ref_leaves.values()), dout)
    for name, a, b in zip(leaves, got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        gerr = ((a.double() - b).norm() / b.norm()).item()
        assert gerr < 1e-5, (name, gerr)


def test_max_seqlen_arguments_give_the_same_result():
    """Exact maxima, upper bounds (max_seqlen_q defaults to max_seqlen_k) and none at all agree."""
    case = _inputs([19, 11], 2, 1)
    base, _ = _nsa(case, "triton")
    exact, _ = _nsa(case, "triton", max_seqlen_q=19, max_seqlen_k=19)
    bound, _ = _nsa(case, "triton", max_seqlen_k=25)
    assert torch.equal(base, exact) and torch.equal(base, bound)


# ------------------------------------------------------------------------------------------------
# Host synchronisation
# ------------------------------------------------------------------------------------------------


def _count_host_copies(monkeypatch, fn):
    """Calls of ``Tensor.tolist`` / ``Tensor.item`` on integer tensors (the offsets) while ``fn`` runs.
    (On CPU there is no real device-to-host copy: this counts the places that would make one.)"""
    calls = []
    for name in ("tolist", "item"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **kw):
            if not self.is_floating_point():
                calls.append((_name, tuple(self.shape)))
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    fn()
    monkeypatch.undo()
    return calls


def test_one_host_copy_or_none(monkeypatch):
    case = _inputs([19, 11], 2, 1)

    def run(**kw):
        out, leaves = _nsa(case, "triton", **kw)
        out.sum().backward()

    assert len(_count_host_copies(monkeypatch, run)) == 1  # validation + maxima, forward and backward
    assert _count_host_copies(monkeypatch, lambda: run(max_seqlen_q=19, max_seqlen_k=19)) == []


def test_validation_errors_name_the_value():
    case = _inputs([19, 11], 2, 1)
    bad_c = case["cu_c"].clone()
    bad_c[1] += 1
    with pytest.raises(ValueError, match=r"cu_seqlens_cmp gives \[4, 0\]"):
        _nsa({**case, "cu_c": bad_c}, "triton")
    with pytest.raises(ValueError, match=r"cu_seqlens_q=\[0, 19, 31\]"):
        _nsa({**case, "cu_q": torch.tensor([0, 19, 31], dtype=torch.int32, device=DEVICE)}, "triton")
    with pytest.raises(ValueError, match="int32"):
        _nsa({**case, "cu_k": case["cu_k"].long()}, "triton")
    with pytest.raises(ValueError, match="gates must be"):
        _nsa({**case, "gates": case["gates"][:, :1]}, "triton")


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------


class _TinyNSA(torch.nn.Module):
    """Projections + compression by block means + NSA + output projection: traceable end to end."""

    def __init__(self, hidden, hq, hkv, d):
        super().__init__()
        self.hq, self.hkv, self.d = hq, hkv, d
        self.q = torch.nn.Linear(hidden, hq * d)
        self.kv = torch.nn.Linear(hidden, 2 * hkv * d)
        self.g = torch.nn.Linear(hidden, hq * 3)
        self.o = torch.nn.Linear(hq * d, hidden)

    def forward(self, x, idx, cu, cu_c, **kw):
        n = x.shape[0]
        q = self.q(x).view(n, self.hq, self.d)
        k, v = self.kv(x).view(n, 2, self.hkv, self.d).unbind(1)
        cmp_k, cmp_v = k[idx].mean(1), v[idx].mean(1)
        gates = torch.sigmoid(self.g(x)).view(n, self.hq, 3)
        out = nsa_attention_varlen(q, k, v, cmp_k, cmp_v, gates, cu, cu, cu_c, TINY, backend="triton", **kw)
        return self.o(out.reshape(n, -1)).sum()


def _compile_case(lens, hq, hkv, compile_backend, tol=1e-5, **kw):
    model = _TinyNSA(32, hq, hkv, 16).to(DEVICE)
    x = torch.randn(sum(lens), 32, device=DEVICE)
    idx, cu_c = _cmp_index(lens, TINY)
    cu = _cu(lens)

    def step(m, fn):
        m.zero_grad()
        xx = x.clone().requires_grad_()
        loss = fn(xx, idx, cu, cu_c, **kw)
        loss.backward()
        return loss.detach(), [xx.grad] + [p.grad for p in m.parameters()]

    torch._dynamo.reset()
    want = step(model, model)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)  # fullgraph: a graph break raises
    got = step(model, compiled)
    assert torch.allclose(got[0], want[0], rtol=tol, atol=tol), (got[0], want[0])
    for a, b in zip(got[1], want[1]):
        err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
        assert err < tol, err
    return compiled


@pytest.mark.parametrize("given", [True, False], ids=["max_seqlen_given", "max_seqlen_inside_op"])
def test_torch_compile_fullgraph_matches_eager(given):
    if torch.cuda.is_available():
        pytest.skip("interpreter test (aot_eager); see test_torch_compile_inductor_gpu")
    kw = dict(max_seqlen_q=21, max_seqlen_k=21) if given else {}
    _compile_case([21, 14], 2, 1, "aot_eager", **kw)


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")
def test_compiled_graph_contains_the_ops():
    if torch.cuda.is_available():
        pytest.skip("interpreter test")
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    rec = AotEagerAndRecordGraphs()
    _compile_case([12, 9], 2, 2, rec, max_seqlen_k=12)
    fwd = "\n".join(g.code for g in rec.fw_graphs)
    bwd = "\n".join(g.code for g in rec.bw_graphs)
    for name in ("cmp_fwd", "slc_fwd", "win_fwd", "gate_fwd"):
        assert f"nsa_kernels.{name}" in fwd, name
    for name in ("cmp_bwd", "slc_bwd", "win_bwd", "gate_bwd"):
        assert f"nsa_kernels.{name}" in bwd, name
    assert len(rec.graphs) == 1  # one dynamo graph: no breaks


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_gpu(compile_backend):
    # Inductor may round the projections differently from eager, which can flip near-tied block choices.
    _compile_case([700, 333, 1024], 8, 2, compile_backend, tol=1e-3, max_seqlen_k=1024)
    _compile_case([700, 333], 6, 2, compile_backend, tol=1e-3)


@pytest.mark.gpu
def test_no_host_sync_with_max_seqlen_gpu():
    """With max_seqlen given, forward + backward make no synchronising CUDA call; without, exactly one
    (in the forward: the offsets' copy)."""
    import warnings

    case = _inputs([700, 333, 1024], 8, 2, dtype=torch.bfloat16)
    _nsa(case, "triton", max_seqlen_k=1024)[0].sum().backward()  # warm-up: compile the kernels
    torch.cuda.synchronize()
    for kw, expected in ((dict(max_seqlen_k=1024), 0), ({}, 1)):
        out, leaves = _nsa(case, "triton", **kw)  # leaves made before sync debugging
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out2 = nsa_attention_varlen(
                    leaves["q"], leaves["k"], leaves["v"], leaves["cmp_k"], leaves["cmp_v"], leaves["gates"],
                    case["cu_q"], case["cu_k"], case["cu_c"], TINY, backend="triton", **kw,
                )
                out2.backward(torch.ones_like(out2))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) == expected, [str(w.message) for w in syncs]


def test_public_branch_functions_compile_fullgraph():
    """The per-branch public functions (no max_seqlen given: the ops copy the offsets themselves)."""
    if torch.cuda.is_available():
        pytest.skip("interpreter test")
    from nsa_kernels import (
        parallel_cmp, parallel_gate, parallel_sel, parallel_slc, parallel_win,
    )

    c = _inputs([12, 8], 2, 1)
    cu, cu_c = c["cu_q"], c["cu_c"]

    def f(q, k, v, ck, cv, g):
        o, lse = parallel_cmp(q, ck, cv, cu, cu, cu_c, TINY.cmp_block, TINY.cmp_stride)
        blocks = parallel_sel(q, ck, lse, cu, cu, cu_c, TINY)
        o_slc = parallel_slc(q, k, v, blocks, cu, cu, TINY.slc_block)
        o_win = parallel_win(q, k, v, cu, cu, TINY.window)
        return parallel_gate(o, o_slc, o_win, g).square().sum()

    leaves = [c[n].clone().requires_grad_() for n in ("q", "k", "v", "cmp_k", "cmp_v", "gates")]
    want = f(*leaves)
    want_grads = torch.autograd.grad(want, leaves)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    assert torch.allclose(got, want, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
