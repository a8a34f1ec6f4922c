"""Triton compressed attention (forward, gradients) and block selection against the reference.

CPU runs use the Triton interpreter (see conftest) on tiny shapes; ``gpu`` tests use realistic ones.
Block sets may differ from the reference only where two block scores are within rounding of the
cut-off: every disagreement is checked to be such a near-tie.
"""
import random

import pytest
import torch

from nsa_kernels import reference
from nsa_kernels import sel as _sel
from nsa_kernels.parallel import parallel_sel
from nsa_kernels.parallel import parallel_cmp
from nsa_kernels.compression import MLPCompressor, MeanPoolCompressor, compress_varlen
from nsa_kernels.params import NSAParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = NSAParams(cmp_block=8, cmp_stride=4, slc_block=16, slc_count=4, init_blocks=1, local_blocks=2, window=32)
PAPER = NSAParams()  # l=32, d=16, l'=64, n=16


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def make_case(key_lens, query_lens, hkv, group, d, dv, dtype, params, compressor="mean", device=DEVICE):
    """Random packed inputs; compressed keys/values through ``compress_varlen``."""
    cu_k = torch.tensor([0] + list(key_lens)).cumsum(0).to(torch.int32).to(device)
    cu_q = torch.tensor([0] + list(query_lens)).cumsum(0).to(torch.int32).to(device)
    k = torch.randn(sum(key_lens), hkv, d, device=device)
    v = torch.randn(sum(key_lens), hkv, dv, device=device)
    if compressor == "mlp":
        comp_k = MLPCompressor(d, params.cmp_block).to(device)
        comp_v = MLPCompressor(dv, params.cmp_block).to(device)
        for m in (comp_k, comp_v):  # move away from plain mean pooling
            torch.nn.init.normal_(m.down.weight, std=0.3)
            torch.nn.init.normal_(m.pos_embed, std=0.3)
    else:
        comp_k = comp_v = MeanPoolCompressor(params.cmp_block)
    # Sharper scores than plain means give: a softmax that is not nearly uniform.
    cmp_k, cu_c = compress_varlen(k * 3.0, cu_k, comp_k, params.cmp_block, params.cmp_stride)
    cmp_v, _ = compress_varlen(v, cu_k, comp_v, params.cmp_block, params.cmp_stride)
    q = torch.randn(sum(query_lens), hkv * group, d, device=device)
    return dict(
        q=q.to(dtype), cmp_k=cmp_k.detach().to(dtype), cmp_v=cmp_v.detach().to(dtype),
        cu_q=cu_q, cu_k=cu_k, cu_c=cu_c, comp=(comp_k, comp_v), k=k, v=v,
    )


def reference_cmp(case, params, scale, dtype=torch.float64, return_blocks=False):
    """o_cmp (and blocks) from ``reference.nsa_sequence`` with gates (1, 0, 0), per sequence."""
    q, ck, cv = (case[n].to(dtype) for n in ("q", "cmp_k", "cmp_v"))
    k, v = case["k"].to(dtype), case["v"].to(dtype)
    bq, bk, bc = (case[n].tolist() for n in ("cu_q", "cu_k", "cu_c"))
    outs, blocks = [], []
    for b in range(len(bq) - 1):
        qs, ks, cs = slice(bq[b], bq[b + 1]), slice(bk[b], bk[b + 1]), slice(bc[b], bc[b + 1])
        if bq[b + 1] == bq[b]:
            continue
        gates = torch.zeros(bq[b + 1] - bq[b], q.shape[1], 3, dtype=dtype, device=q.device)
        gates[..., 0] = 1
        o, blk = reference.nsa_sequence(q[qs], k[ks], v[ks], ck[cs], cv[cs], gates, params, scale, True)
        outs.append(o)
        blocks.append(blk)
    o = torch.cat(outs)
    return (o, torch.cat(blocks)) if return_blocks else o


def block_scores_f64(case, params, scale):
    """``(Nq, Hkv, n_slc_max)`` float64 selection-block scores (the reference's formula)."""
    q, ck = case["q"].double(), case["cmp_k"].double()
    hq, hkv = q.shape[1], ck.shape[1]
    group = hq // hkv
    bq, bk, bc = (case[n].tolist() for n in ("cu_q", "cu_k", "cu_c"))
    n_slc_max = max(-(-(bk[b + 1] - bk[b]) // params.slc_block) for b in range(len(bk) - 1))
    out = torch.zeros(q.shape[0], hkv, n_slc_max, dtype=torch.float64, device=q.device)
    for b in range(len(bq) - 1):
        tq, tk, nc = bq[b + 1] - bq[b], bk[b + 1] - bk[b], bc[b + 1] - bc[b]
        if tq == 0:
            continue
        pos = torch.arange(tq, device=q.device) + tk - tq
        end = torch.arange(nc, device=q.device) * params.cmp_stride + params.cmp_block - 1
        s = torch.einsum("thd,chd->htc", q[bq[b] : bq[b + 1]], ck[bc[b] : bc[b + 1]].repeat_interleave(group, 1))
        p = reference._masked_softmax(s * scale, (end[None, :] <= pos[:, None])[None])
        n_slc = -(-tk // params.slc_block)
        m = reference.chunk_overlap_matrix(nc, n_slc, params, q.device).double()
        out[bq[b] : bq[b + 1], :, :n_slc] = (p @ m).unflatten(0, (hkv, group)).sum(1).permute(1, 0, 2)
    return out


def query_positions(cu_q, cu_k):
    """Position of every packed query inside its sequence."""
    bq, bk = cu_q.tolist(), cu_k.tolist()
    return torch.cat([
        torch.arange(bq[b + 1] - bq[b]) + (bk[b + 1] - bk[b]) - (bq[b + 1] - bq[b]) for b in range(len(bq) - 1)
    ])


def assert_same_blocks_up_to_near_ties(got, want, scores, params, rtol, q_pos):
    """Every (query, KV head) whose chosen set differs must differ only in blocks whose score is
    within ``rtol`` (relative) of the cut-off score of that row: the weakest block chosen by score
    (forced blocks excluded) in either set."""
    assert got.shape == want.shape and got.dtype == torch.int32
    got, want, scores = got.cpu(), want.cpu(), scores.cpu()
    # Ascending with -1 padding at the end, no duplicates.
    valid = got >= 0
    assert bool((valid[..., 1:] <= valid[..., :-1]).all()), "-1 padding must come last"
    diffs = got[..., 1:] - got[..., :-1]
    assert bool(((diffs > 0) | ~valid[..., 1:]).all()), "indices must be strictly ascending"
    rows = (got != want).any(-1).nonzero().tolist()
    assert len(rows) <= max(2, 0.02 * got.shape[0] * got.shape[1]), f"{len(rows)} rows differ"
    for t, h in rows:
        a = set(got[t, h].tolist()) - {-1}
        b = set(want[t, h].tolist()) - {-1}
        assert len(a) == len(b), (t, h, sorted(a), sorted(b))
        s = scores[t, h]
        own = int(q_pos[t]) // params.slc_block
        forced = {j for j in range(own + 1) if j < params.init_blocks or j > own - params.local_blocks}
        assert forced <= a and forced <= b, (t, h, sorted(forced), sorted(a), sorted(b))
        cutoff = min(float(s[j]) for j in (a | b) - forced)  # the weakest block chosen by score
        for j in a ^ b:
            assert abs(float(s[j]) - cutoff) <= rtol * max(1.0, abs(cutoff)), (
                f"row {(t, h)}: block {j} score {float(s[j])} is not a near-tie of cut-off {cutoff}"
            )


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def random_lengths(n_seq, lo, hi, params):
    """Odd key lengths (not multiples of any block size) and query lengths <= them."""
    key_lens = []
    while len(key_lens) < n_seq:
        t = random.randint(lo, hi) | 1
        if t % params.slc_block and t % params.cmp_block and t % params.cmp_stride:
            key_lens.append(t)
    query_lens = [t if i % 2 == 0 else random.randint(1, t) for i, t in enumerate(key_lens)]
    return key_lens, query_lens


@pytest.fixture(autouse=True)
def _python_seed():
    random.seed(torch.initial_seed())


# ------------------------------------------------------------------------------------------------
# CPU (interpreter) tests, tiny shapes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hkv,group", [(2, 1), (1, 2), (2, 3), (1, 4), (1, 8), (1, 16)])
def test_cmp_forward_and_grads_fp32(hkv, group):
    key_lens, query_lens = random_lengths(2, 50, 140, TINY)
    key_lens.append(5)  # shorter than a compression block: no compressed token, output 0
    query_lens.append(3)
    d, dv = 16, (32 if group % 2 else 16)
    case = make_case(key_lens, query_lens, hkv, group, d, dv, torch.float32, TINY)
    scale = d**-0.5
    q, ck, cv = (case[n].clone().requires_grad_() for n in ("q", "cmp_k", "cmp_v"))
    o, lse = parallel_cmp(q, ck, cv, case["cu_q"], case["cu_k"], case["cu_c"], TINY.cmp_block, TINY.cmp_stride)
    assert o.dtype == torch.float32 and o.shape == (q.shape[0], q.shape[1], dv)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, ck, cv), do)

    ref_in = {n: case[n].double().requires_grad_() for n in ("q", "cmp_k", "cmp_v")}
    ref_o = reference_cmp({**case, **ref_in}, TINY, scale)
    ref_grads = torch.autograd.grad(ref_o, tuple(ref_in.values()), do.double())
    assert rel_err(o, ref_o) < 1e-5
    for name, g, rg in zip(("dq", "dcmp_k", "dcmp_v"), grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, rg) < 1e-5, name
    # The last sequence sees no compressed token: output 0, p = exp(s - lse) = 0.
    assert o[-3:].abs().max() == 0 and bool(torch.isposinf(lse[-3:]).all())


# The Triton interpreter (CPU) cannot do bf16 dots (numpy has no bf16): bf16 runs on the GPU only.
@pytest.mark.gpu
@pytest.mark.parametrize("hkv,group", [(1, 2), (2, 3)])
def test_cmp_forward_and_grads_bf16(hkv, group):
    key_lens, query_lens = random_lengths(2, 60, 120, TINY)
    case = make_case(key_lens, query_lens, hkv, group, 32, 16, torch.bfloat16, TINY)
    scale = 32**-0.5
    q, ck, cv = (case[n].clone().requires_grad_() for n in ("q", "cmp_k", "cmp_v"))
    o, lse = parallel_cmp(q, ck, cv, case["cu_q"], case["cu_k"], case["cu_c"], TINY.cmp_block, TINY.cmp_stride)
    assert o.dtype == torch.bfloat16
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, ck, cv), do)
    ref_in = {n: case[n].double().requires_grad_() for n in ("q", "cmp_k", "cmp_v")}
    ref_o = reference_cmp({**case, **ref_in}, TINY, scale)
    ref_grads = torch.autograd.grad(ref_o, tuple(ref_in.values()), do.double())
    assert rel_err(o, ref_o) < 2e-2
    for name, g, rg in zip(("dq", "dcmp_k", "dcmp_v"), grads, ref_grads):
        assert g.dtype == torch.bfloat16, name
        assert rel_err(g, rg) < 3e-2, name


def test_cmp_grads_reach_mlp_compressor():
    """Gradients w.r.t. cmp_k / cmp_v flow on into the compressor's parameters, as the reference's do."""
    params = NSAParams(cmp_block=8, cmp_stride=4, slc_block=16, slc_count=4, init_blocks=1, local_blocks=2)
    key_lens, query_lens = [97, 61], [97, 40]
    case = make_case(key_lens, query_lens, 2, 2, 16, 16, torch.float32, params, compressor="mlp")
    comp_k, comp_v = case["comp"]
    do = torch.randn(case["q"].shape[0], 4, 16, device=DEVICE)

    def param_grads(use_triton):
        ck, cu_c = compress_varlen(case["k"] * 3.0, case["cu_k"], comp_k, 8, 4)
        cv, _ = compress_varlen(case["v"], case["cu_k"], comp_v, 8, 4)
        if use_triton:
            o, _ = parallel_cmp(case["q"], ck, cv, case["cu_q"], case["cu_k"], cu_c, 8, 4)
        else:
            o = reference_cmp({**case, "cmp_k": ck, "cmp_v": cv}, params, 0.25, dtype=torch.float32)
        ps = list(comp_k.parameters()) + list(comp_v.parameters())
        return torch.autograd.grad(o, ps, do)

    got, want = param_grads(True), param_grads(False)
    # One flat vector: some parameters (the key bias: softmax is shift-invariant) have zero gradient.
    assert rel_err(torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in want])) < 1e-5
    assert all(float(g.abs().max()) > 0 for g in want[:2])


@pytest.mark.parametrize("hkv,group", [(2, 1), (1, 2), (2, 3), (1, 4), (1, 8), (1, 16)])
def test_select_blocks_fp32(hkv, group):
    key_lens, query_lens = random_lengths(2, 80, 200, TINY)
    key_lens.append(7)
    query_lens.append(7)
    case = make_case(key_lens, query_lens, hkv, group, 16, 16, torch.float32, TINY)
    scale = 16**-0.5
    _, lse = parallel_cmp(case["q"], case["cmp_k"], case["cmp_v"], case["cu_q"], case["cu_k"], case["cu_c"], 8, 4)
    got = parallel_sel(case["q"], case["cmp_k"], lse, case["cu_q"], case["cu_k"], case["cu_c"], TINY)
    _, want = reference_cmp(case, TINY, scale, dtype=torch.float32, return_blocks=True)
    assert_same_blocks_up_to_near_ties(got, want, block_scores_f64(case, TINY, scale), TINY, rtol=1e-5,
                                        q_pos=query_positions(case["cu_q"], case["cu_k"]))
    # Skipping the top-n merge of tiles below the cut-off changes nothing (bit for bit).
    no_skip = _sel._fwd(case["q"], case["cmp_k"], lse, case["cu_q"], case["cu_k"], case["cu_c"], max(query_lens), 8, 4,
                        TINY.slc_block, TINY.slc_count, TINY.init_blocks, TINY.local_blocks, scale, _skip=False)
    assert torch.equal(got, no_skip)
    # The query's own block and the first block are always chosen.
    own = torch.cat([torch.arange(tk - tq, tk) for tq, tk in zip(query_lens, key_lens)]) // TINY.slc_block
    assert bool((got == own[:, None, None].to(got.device)).any(-1).all())
    assert bool((got[..., 0] == 0).all())


@pytest.mark.parametrize("group", [1, 3, 4, 16])
def test_select_blocks_cutoff_skip_is_exact(group):
    """The running top-n skips the merge of a tile when no candidate beats the cut-off: the same blocks
    as merging every tile (bit for bit) and as the reference. "Coherent" inputs make skipping certain:
    the first selection blocks' keys align with every query, so for the later queries no block of the
    middle tiles beats them (their forced local blocks lie in the last tile); odd lengths, 4 tiles."""
    key_lens, query_lens = [221, 99], [221, 58]
    case = make_case(key_lens, query_lens, 1, group, 16, 16, torch.float32, TINY)
    direction = torch.randn(16)
    case["q"] = case["q"] * 0.3 + direction
    early = case["cmp_k"].new_zeros(case["cmp_k"].shape[0], 1, 1)
    for b in range(2):  # compressed tokens of the first 3 selection blocks of each sequence
        c0 = int(case["cu_c"][b])
        early[c0 : c0 + 3 * TINY.slc_block // TINY.cmp_stride] = 1.0
    case["cmp_k"] = case["cmp_k"] * 0.3 + early * 2.0 * direction
    scale = 16**-0.5
    _, lse = parallel_cmp(case["q"], case["cmp_k"], case["cmp_v"], case["cu_q"], case["cu_k"], case["cu_c"], 8, 4)
    args = (case["q"], case["cmp_k"], lse, case["cu_q"], case["cu_k"], case["cu_c"], max(query_lens), 8, 4,
            TINY.slc_block, TINY.slc_count, TINY.init_blocks, TINY.local_blocks, scale)
    got = _sel._fwd(*args)
    assert torch.equal(got, _sel._fwd(*args, _skip=False))
    _, want = reference_cmp(case, TINY, scale, dtype=torch.float32, return_blocks=True)
    assert_same_blocks_up_to_near_ties(got, want, block_scores_f64(case, TINY, scale), TINY, rtol=1e-5,
                                        q_pos=query_positions(case["cu_q"], case["cu_k"]))
    # The late queries chose one of the aligned blocks 1, 2 by score: the middle tiles lost to the cut-off.
    assert bool(((got[150:221] == 1) | (got[150:221] == 2)).any(-1).all())


@pytest.mark.parametrize("params", [
    NSAParams(cmp_block=8, cmp_stride=4, slc_block=8, slc_count=3, init_blocks=0, local_blocks=1),
    NSAParams(cmp_block=4, cmp_stride=4, slc_block=16, slc_count=5, init_blocks=2, local_blocks=1),
    NSAParams(cmp_block=8, cmp_stride=2, slc_block=8, slc_count=20, init_blocks=1, local_blocks=3),
])
def test_select_blocks_other_sizes(params):
    """l == l', d == l (no overlap), and slc_count beyond the blocks available (padding) / > 16."""
    key_lens, query_lens = [93, 41], [93, 30]
    case = make_case(key_lens, query_lens, 1, 3, 16, 16, torch.float32, params)
    scale = 0.3
    _, lse = parallel_cmp(
        case["q"], case["cmp_k"], case["cmp_v"], case["cu_q"], case["cu_k"], case["cu_c"],
        params.cmp_block, params.cmp_stride, scale,
    )
    got = parallel_sel(case["q"], case["cmp_k"], lse, case["cu_q"], case["cu_k"], case["cu_c"], params, scale)
    _, want = reference_cmp(case, params, scale, dtype=torch.float32, return_blocks=True)
    assert_same_blocks_up_to_near_ties(got, want, block_scores_f64(case, params, scale), params, rtol=1e-5,
                                        q_pos=query_positions(case["cu_q"], case["cu_k"]))


@pytest.mark.gpu
def test_select_blocks_bf16():
    key_lens, query_lens = random_lengths(2, 100, 200, TINY)
    case = make_case(key_lens, query_lens, 2, 4, 32, 32, torch.bfloat16, TINY)
    scale = 32**-0.5
    _, lse = parallel_cmp(case["q"], case["cmp_k"], case["cmp_v"], case["cu_q"], case["cu_k"], case["cu_c"], 8, 4)
    got = parallel_sel(case["q"], case["cmp_k"], lse, case["cu_q"], case["cu_k"], case["cu_c"], TINY)
    _, want = reference_cmp(case, TINY, scale, dtype=torch.float32, return_blocks=True)
    # bf16 operands are exact in fp32 products; lse and sums round differently: slightly wider ties.
    assert_same_blocks_up_to_near_ties(got, want, block_scores_f64(case, TINY, scale), TINY, rtol=1e-3,
                                        q_pos=query_positions(case["cu_q"], case["cu_k"]))


def test_errors_name_the_bad_value():
    case = make_case([40], [40], 2, 2, 16, 16, torch.float32, TINY)
    args = (case["q"], case["cmp_k"], case["cmp_v"], case["cu_q"], case["cu_k"], case["cu_c"])
    with pytest.raises(ValueError, match="cu_seqlens_cmp"):
        parallel_cmp(*args[:5], case["cu_c"] + torch.tensor([0, 1], dtype=torch.int32, device=DEVICE), 8, 4)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        parallel_cmp(case["q"][:, :3], *args[1:], 8, 4)
    with pytest.raises(ValueError, match="dtypes differ"):
        parallel_cmp(case["q"].double().float().half(), *args[1:], 8, 4)
    with pytest.raises(ValueError, match="int32"):
        parallel_cmp(*args[:3], case["cu_q"].long(), *args[4:], 8, 4)
    with pytest.raises(ValueError, match="cmp_block=6"):
        parallel_cmp(*args, 6, 4)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        parallel_cmp(*args[:3], case["cu_q"] * 2, *args[4:], 8, 4)
    lse = torch.zeros(case["q"].shape[:2], device=DEVICE)
    big_l = NSAParams(cmp_block=32, cmp_stride=4, slc_block=16, slc_count=4)
    with pytest.raises(ValueError, match="cmp_block=32"):
        parallel_sel(case["q"], case["cmp_k"], lse, case["cu_q"], case["cu_k"], case["cu_c"], big_l)
    with pytest.raises(ValueError, match="lse"):
        parallel_sel(case["q"], case["cmp_k"], lse[:, :1], case["cu_q"], case["cu_k"], case["cu_c"], TINY)


# ------------------------------------------------------------------------------------------------
# GPU tests, realistic shapes
# ------------------------------------------------------------------------------------------------


def dense_cmp_fp32(q, ck, cv, tk, params, scale):
    """One sequence, queries = all ``tk`` positions: o and p_cmp in fp32 (dense, for checking)."""
    hq, hkv = q.shape[1], ck.shape[1]
    group = hq // hkv
    pos = torch.arange(tk, device=q.device)
    end = torch.arange(ck.shape[0], device=q.device) * params.cmp_stride + params.cmp_block - 1
    s = torch.einsum("thd,chd->htc", q.float(), ck.float().repeat_interleave(group, 1)) * scale
    p = reference._masked_softmax(s, (end[None, :] <= pos[:, None])[None])
    o = torch.einsum("htc,chd->thd", p, cv.float().repeat_interleave(group, 1))
    return o, p


@pytest.mark.gpu
@pytest.mark.parametrize("t,hq,hkv", [(4099, 64, 4), (8191, 32, 8)])
def test_gpu_realistic_bf16(t, hq, hkv):
    params, d = PAPER, 128
    case = make_case([t], [t], hkv, hq // hkv, d, d, torch.bfloat16, params)
    scale = d**-0.5
    q, ck, cv = (case[n].clone().requires_grad_() for n in ("q", "cmp_k", "cmp_v"))
    o, lse = parallel_cmp(q, ck, cv, case["cu_q"], case["cu_k"], case["cu_c"], 32, 16)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, ck, cv), do)
    ref_in = [x.float().requires_grad_() for x in (case["q"], case["cmp_k"], case["cmp_v"])]
    ref_o, p = dense_cmp_fp32(*ref_in, t, params, scale)
    ref_grads = torch.autograd.grad(ref_o, ref_in, do.float())
    assert rel_err(o, ref_o) < 1e-2
    for name, g, rg in zip(("dq", "dcmp_k", "dcmp_v"), grads, ref_grads):
        assert rel_err(g, rg) < 2e-2, name
    got = parallel_sel(case["q"], case["cmp_k"], lse, case["cu_q"], case["cu_k"], case["cu_c"], params)
    with torch.no_grad():
        n_slc = -(-t // params.slc_block)
        m = reference.chunk_overlap_matrix(ck.shape[0], n_slc, params, q.device)
        scores = (p.detach() @ m).unflatten(0, (hkv, hq // hkv)).sum(1)  # (Hkv, T, n_slc)
        want = reference.select_blocks(scores, torch.arange(t, device=q.device), params)
    assert_same_blocks_up_to_near_ties(got, want, scores.permute(1, 0, 2), params, rtol=1e-4,
                                        q_pos=query_positions(case["cu_q"], case["cu_k"]))


@pytest.mark.gpu
def test_gpu_varlen_bf16_matches_reference():
    params, d = PAPER, 128
    case = make_case([1000, 3001, 17, 777], [1000, 2000, 17, 1], 2, 6, d, 64, torch.bfloat16, params)
    scale = d**-0.5
    q, ck, cv = (case[n].clone().requires_grad_() for n in ("q", "cmp_k", "cmp_v"))
    o, lse = parallel_cmp(q, ck, cv, case["cu_q"], case["cu_k"], case["cu_c"], 32, 16)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, ck, cv), do)
    ref_in = {n: case[n].float().requires_grad_() for n in ("q", "cmp_k", "cmp_v")}
    ref_o, want = reference_cmp({**case, **ref_in}, params, scale, dtype=torch.float32, return_blocks=True)
    ref_grads = torch.autograd.grad(ref_o, tuple(ref_in.values()), do.float())
    assert rel_err(o, ref_o) < 1e-2
    for name, g, rg in zip(("dq", "dcmp_k", "dcmp_v"), grads, ref_grads):
        assert rel_err(g, rg) < 2e-2, name
    got = parallel_sel(case["q"], case["cmp_k"], lse, case["cu_q"], case["cu_k"], case["cu_c"], params)
    assert_same_blocks_up_to_near_ties(got, want, block_scores_f64(case, params, scale), params, rtol=1e-4,
                                        q_pos=query_positions(case["cu_q"], case["cu_k"]))
