"""Triton NSA decode kernels (kernels/decode.py) against the reference (kernels/reference.py), and the
batched reference decode (``reference.nsa_decode_reference``) and the ``nsa_kernels::decode`` op against
the reference applied row by row.

Each case builds a ragged KV cache (left padding, different lengths per row, optionally strided
views), gathers every row's valid keys into packed tensors and calls the reference on them with the
last ``Tq`` positions as queries. Selections are compared as sets; a block that differs must be a
near-tie of the reference scores (fp rounding may order near-equal scores either way), and only rows
whose selection matches are compared numerically.
"""
from __future__ import annotations

import pytest
import torch

from nsa_kernels import NSAParams, num_cmp_blocks
from nsa_kernels.decode import nsa_decode
from nsa_kernels.ops import nsa_decode_op
from nsa_kernels.reference import chunk_overlap_matrix, nsa_attention_varlen, nsa_decode_reference, nsa_sequence

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = NSAParams(cmp_block=8, cmp_stride=4, slc_block=12, slc_count=4, init_blocks=1, local_blocks=2, window=24)


def make_case(lens, tq, hq, hkv, d, dv, params, dtype=torch.float32, device=DEVICE, pad=(0, 5), strided=False,
              cmp_extra=3):
    """A ragged cache: row b has ``lens[b]`` valid keys starting at a random left padding."""
    bsz = len(lens)
    starts = [int(torch.randint(pad[0], pad[1] + 1, ())) for _ in lens]
    s = max(st + n for st, n in zip(starts, lens)) + 2
    n_cmp = [num_cmp_blocks(n, params.cmp_block, params.cmp_stride) for n in lens]
    cstarts = [int(torch.randint(0, 3, ())) for _ in lens]
    sc = max(cs + n for cs, n in zip(cstarts, n_cmp)) + cmp_extra

    def cache(slots, dim):
        if strided:  # (B, S, H, dim) storage seen as (B, H, S, dim), with extra room in dim
            return torch.randn(bsz, slots, hkv, dim + 8, dtype=dtype, device=device)[..., :dim].transpose(1, 2)
        return torch.randn(bsz, hkv, slots, dim, dtype=dtype, device=device)

    q = torch.randn(bsz, tq, hq, d, dtype=dtype, device=device)
    if strided:
        q = torch.randn(bsz, hq, tq, d, dtype=dtype, device=device).transpose(1, 2)
    k, v, ck, cv = cache(s, d), cache(s, dv), cache(sc, d), cache(sc, dv)
    gates = torch.rand(bsz, tq, hq, 3, dtype=dtype, device=device)
    idx = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    return dict(q=q, k_cache=k, v_cache=v, cmp_k_cache=ck, cmp_v_cache=cv, gates=gates, k_start=idx(starts),
                k_len=idx(lens), cmp_start=idx(cstarts), cmp_len=idx(n_cmp))


def rows_of(case, b):
    ks, kl = int(case["k_start"][b]), int(case["k_len"][b])
    cs, cl = int(case["cmp_start"][b]), int(case["cmp_len"][b])
    t = lambda x: x[b].transpose(0, 1)  # noqa: E731  (H, S, D) -> (S, H, D)
    return (case["q"][b], t(case["k_cache"])[ks : ks + kl], t(case["v_cache"])[ks : ks + kl],
            t(case["cmp_k_cache"])[cs : cs + cl], t(case["cmp_v_cache"])[cs : cs + cl], case["gates"][b])


def reference(case, params, scale=None):
    """Output via the packed reference API, blocks and float64 block scores per row."""
    bsz, tq = case["q"].shape[:2]
    parts = [rows_of(case, b) for b in range(bsz)]
    cat = lambda i: torch.cat([p[i] for p in parts])  # noqa: E731
    cu = lambda ls: torch.tensor([0] + ls, dtype=torch.int32).cumsum(0).to(case["q"].device)  # noqa: E731
    out = nsa_attention_varlen(
        cat(0), cat(1), cat(2), cat(3), cat(4), cat(5), cu([tq] * bsz), cu([p[1].shape[0] for p in parts]),
        cu([p[3].shape[0] for p in parts]), params, scale,
    ).view(bsz, tq, *case["q"].shape[2:3], -1)
    scale = case["q"].shape[-1] ** -0.5 if scale is None else scale
    blocks, scores = [], []
    for (q, k, v, ck, cv, g) in parts:
        blocks.append(nsa_sequence(q, k, v, ck, cv, g, params, scale, return_block_indices=True)[1])
        scores.append(block_scores64(q, k.shape[0], ck, params, scale))
    return out, blocks, scores


def block_scores64(q, tk, ck, params, scale):
    """(Tq, Hkv, n_slc) selection scores of the reference, in float64."""
    tq, hq, _ = q.shape
    hkv = ck.shape[1]
    n_cmp, n_slc = ck.shape[0], -(-tk // params.slc_block)
    pos = torch.arange(tk - tq, tk, device=q.device)
    ends = torch.arange(n_cmp, device=q.device) * params.cmp_stride + params.cmp_block - 1
    s = torch.einsum("qhd,chd->hqc", q.double(), ck.double().repeat_interleave(hq // hkv, dim=1)) * scale
    allowed = ends[None, None, :] <= pos[None, :, None]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0) * allowed
    sc = p @ chunk_overlap_matrix(n_cmp, n_slc, params, q.device).double()
    return sc.unflatten(0, (hkv, hq // hkv)).sum(1).transpose(0, 1)


def check(case, params, atol, rtol, scale=None, max_ties=0, tie_tol=1e-4, **kw):
    out, idx = nsa_decode(**case, params=params, scale=scale, return_block_indices=True, **kw)
    ref, ref_blocks, ref_scores = reference(case, params, scale)
    assert out.shape == ref.shape and out.dtype == case["q"].dtype
    assert torch.isfinite(out.float()).all()
    bsz, tq, hq, _ = out.shape
    hkv = case["k_cache"].shape[1]
    g = hq // hkv
    keep = torch.ones(bsz, tq, hq, dtype=torch.bool)
    ties = 0
    for b in range(bsz):
        for t in range(tq):
            for h in range(hkv):
                ours = set(idx[b, h, t].tolist()) - {-1}
                theirs = set(ref_blocks[b][t, h].tolist()) - {-1}
                assert len(ours) == len(theirs), (b, t, h, ours, theirs)
                if ours == theirs:
                    continue
                sc = ref_scores[b][t, h]
                for j in ours - theirs:  # every swapped pair must be a near-tie of the reference scores
                    for j2 in theirs - ours:
                        gap = abs(float(sc[j]) - float(sc[j2]))
                        assert gap <= tie_tol * float(sc[j2]), (b, t, h, ours, theirs, j, j2, gap)
                ties += 1
                keep[b, t, h * g : (h + 1) * g] = False
    assert ties <= max_ties, f"{ties} selections differ from the reference (near-ties)"
    torch.testing.assert_close(out[keep.to(out.device)].float(), ref[keep.to(ref.device)].float(), atol=atol, rtol=rtol)
    return out, idx


@pytest.mark.parametrize("group", [1, 2, 3, 4, 16])
@pytest.mark.parametrize("tq", [1, 3])
def test_decode_matches_reference_fp32(group, tq):
    hkv = 2 if group <= 4 else 1
    lens = [int(x) for x in torch.randint(60, 170, (3,))]
    lens[1] = max(lens[1], 150)  # at least one long row, one at most 50 (below the window + blocks)
    lens[2] = int(torch.randint(tq, 50, ()))
    case = make_case(lens, tq, group * hkv, hkv, d=32, dv=16 if group % 2 else 32, params=SMALL)
    check(case, SMALL, atol=1e-4, rtol=1e-4, max_ties=1)


@pytest.mark.parametrize(
    "params",
    [
        NSAParams(cmp_block=8, cmp_stride=4, slc_block=16, slc_count=4, init_blocks=1, local_blocks=2, window=24),
        NSAParams(cmp_block=4, cmp_stride=4, slc_block=8, slc_count=5, init_blocks=0, local_blocks=1, window=16),
        NSAParams(cmp_block=12, cmp_stride=4, slc_block=4, slc_count=6, init_blocks=2, local_blocks=3, window=8),
    ],
    ids=["l8d4s16", "l4d4s8-noinit", "l12d4s4"],
)
def test_decode_params_and_splits(params):
    """Other block geometries (l == d, l' < l, no initial block), forced small work units so that
    several cmp splits, slc units and window units are merged, and strided cache views."""
    lens = [int(x) for x in torch.randint(80, 200, (2,))]
    case = make_case(lens, 2, 6, 2, d=16, dv=32, params=params, strided=True)
    cpb = params.slc_block // params.cmp_stride
    chunk = 16 * cpb // __import__("math").gcd(16, cpb)
    check(case, params, atol=1e-4, rtol=1e-4, max_ties=1, _cmp_chunk=chunk, _slc_per_unit=1, _win_per_unit=16)
    check(case, params, atol=1e-4, rtol=1e-4, max_ties=1, _cmp_chunk=chunk * 8, _slc_per_unit=params.slc_count,
          _win_per_unit=256, scale=0.3)


def test_decode_short_rows():
    """Rows shorter than a compression block (no cmp token), k_len == Tq, a row with its cmp cache
    at the end of its slots, and zero gates on one branch."""
    p = SMALL
    case = make_case([3, 7, 40, 9], 3, 4, 2, d=16, dv=16, params=p, cmp_extra=0)
    case["gates"][..., 0] = 0.0
    out, idx = check(case, p, atol=1e-4, rtol=1e-4)
    assert (idx[0, :, :, 2:] == -1).all()  # 3 keys: only block 0 is eligible... with up to n=4 slots


@pytest.mark.gpu  # the Triton interpreter (3.9) computes bf16 dots wrongly
def test_decode_bf16_small():
    lens = [130, 77, 31]
    case = make_case(lens, 3, 8, 2, d=32, dv=32, params=SMALL, dtype=torch.bfloat16)
    check(case, SMALL, atol=3e-2, rtol=3e-2, max_ties=1, tie_tol=1e-3)


def test_decode_errors():
    case = make_case([40, 50], 1, 4, 2, d=16, dv=16, params=SMALL)
    with pytest.raises(ValueError, match="k_len"):
        nsa_decode(**{**case, "k_len": case["k_len"].clone().fill_(0)}, params=SMALL)
    with pytest.raises(ValueError, match="k_start"):
        nsa_decode(**{**case, "k_start": case["k_start"] + 100}, params=SMALL)
    with pytest.raises(ValueError, match="cmp_len"):
        nsa_decode(**{**case, "cmp_len": case["cmp_len"] + 100}, params=SMALL)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        nsa_decode(**{**case, "q": case["q"][:, :, :3], "gates": case["gates"][:, :, :3]}, params=SMALL)
    with pytest.raises(ValueError, match="gates"):
        nsa_decode(**{**case, "gates": case["gates"][..., :2]}, params=SMALL)
    with pytest.raises(ValueError, match="k_start"):
        nsa_decode(**{**case, "k_start": case["k_start"].float()}, params=SMALL)
    with pytest.raises(ValueError, match="head dim"):
        nsa_decode(**{**case, "cmp_v_cache": case["cmp_v_cache"][..., :8]}, params=SMALL)


# ---------------------------------------------------------------------------------------------
# The batched reference decode and the decode op
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("tq", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_decode_equals_reference_rows(group, tq, dtype):
    """``nsa_decode_reference`` (whole batch, masks) against ``nsa_sequence`` on each row's packed keys:
    ragged left-padded rows of odd lengths (one shorter than a compression block, one with ``k_len == Tq``),
    compressed tokens at per-row offsets. The same selection rules and accumulation order: equal to
    rounding."""
    lens = [int(torch.randint(40, 90, ())) | 1, 5, tq, int(torch.randint(10, 30, ()))]
    case = make_case(lens, tq, 2 * group, 2, d=16, dv=8 if group == 3 else 16, params=SMALL, dtype=dtype,
                     device="cpu", pad=(0, 7))
    out = nsa_decode_reference(**case, params=SMALL)
    assert out.shape == (4, tq, 2 * group, case["v_cache"].shape[-1]) and out.dtype == dtype
    for b in range(len(lens)):
        ref = nsa_sequence(*rows_of(case, b), SMALL, 16 ** -0.5).to(dtype)
        torch.testing.assert_close(out[b], ref, atol=1e-6 if dtype == torch.float32 else 0.0, rtol=1e-5 if
                                   dtype == torch.float32 else 0.0)


def test_reference_decode_scale_and_no_compressed_tokens():
    """A given scale, and rows whose compressed tokens are hidden (``cmp_len = 0``: the cmp branch is zero)."""
    case = make_case([33, 21], 2, 4, 2, d=16, dv=16, params=SMALL, device="cpu")
    case["cmp_len"] = torch.zeros_like(case["cmp_len"])
    out = nsa_decode_reference(**case, params=SMALL, scale=0.3)
    for b in range(2):
        q, k, v, ck, cv, g = rows_of(case, b)
        torch.testing.assert_close(out[b], nsa_sequence(q, k, v, ck, cv, g, SMALL, 0.3), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("use_triton", [False, True])
def test_decode_op_equals_reference_decode(use_triton):
    """The ``nsa_kernels::decode`` op: the reference implementation exactly, the Triton one (interpreter on a
    CPU) to rounding (the selection compared as in ``check``)."""
    case = make_case([57, 23, 40], 2, 6, 2, d=16, dv=16, params=SMALL)
    out = nsa_decode_op(**case, params=SMALL, use_triton=use_triton)
    ref = nsa_decode_reference(**case, params=SMALL)
    if use_triton:
        check(case, SMALL, atol=1e-4, rtol=1e-4, max_ties=1)
        torch.testing.assert_close(out, nsa_decode(**case, params=SMALL))
    else:
        assert torch.equal(out, ref)


def test_decode_op_opcheck():
    """Schema, fake tensor and AOT dispatch checks of the decode op (reference implementation)."""
    case = make_case([19, 12], 1, 4, 2, d=16, dv=16, params=SMALL, device="cpu")
    args = tuple(case.values()) + (SMALL.cmp_block, SMALL.cmp_stride, SMALL.slc_block, SMALL.slc_count,
                                   SMALL.init_blocks, SMALL.local_blocks, SMALL.window, 0.25, False)
    torch.library.opcheck(torch.ops.nsa_kernels.decode.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ---------------------------------------------------------------------------------------------
# GPU: realistic shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(16, 4), (64, 4), (12, 4)])
@pytest.mark.parametrize("tq", [1, 4])
def test_decode_gpu_bf16_16k(hq, hkv, tq):
    params = NSAParams()
    lens = [16384, 9000, 16000 - 37]
    case = make_case(lens, tq, hq, hkv, d=128, dv=128, params=params, dtype=torch.bfloat16, pad=(0, 300))
    check(case, params, atol=2e-2, rtol=2e-2, max_ties=2, tie_tol=1e-3)


@pytest.mark.gpu
def test_decode_gpu_fp32_strided_dv():
    params = NSAParams()
    case = make_case([4096, 3001], 2, 32, 8, d=128, dv=64, params=params, strided=True, pad=(0, 100))
    check(case, params, atol=1e-4, rtol=1e-4, max_ties=1)


def test_decode_many_queries_row_blocks():
    """Tq * G > 64 query rows per KV head: several row blocks in the compressed pass (chunked
    prefill / speculative decoding)."""
    lens = [int(torch.randint(70, 120, ())), 40]
    case = make_case(lens, 9, 16, 2, d=16, dv=16, params=SMALL)
    check(case, SMALL, atol=1e-4, rtol=1e-4, max_ties=1)
