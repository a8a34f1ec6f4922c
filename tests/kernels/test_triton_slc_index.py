"""The dk/dv inverted index of the selected branch (two Triton kernels) against the stable torch sort of
all (token, slot) entries by key (``_inverted_index_by_sort``, what long sequences use): the same tokens in
the same order, the same work items in the same order, the same block table."""
import pytest
import torch

from nsa_kernels import slc as slc_mod
from nsa_kernels.primitives import BIG

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _random_case(gen, lens_k, lens_q, hkv, nsel, slc_block, unused):
    """Random block indices (distinct per token and head, some -1, some after the query) through the
    forward's index preparation, which gives the ``sel`` the backward sees."""
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    rows = []
    for tk, tq in zip(lens_k, lens_q):
        nblk = max(1, -(-tk // slc_block))
        for _ in range(tq):
            for _ in range(hkv):
                perm = torch.randperm(max(nblk, nsel), generator=gen)[:nsel]  # >= nblk: a later block
                perm = torch.where(perm < nblk + 1, perm, -1)
                drop = torch.rand(nsel, generator=gen) < unused
                rows.append(torch.where(drop, -1, perm))
    nq = sum(lens_q)
    bi = (torch.stack(rows) if rows else torch.empty(0, nsel, dtype=torch.long)).reshape(nq, hkv, nsel)
    bi = bi.to(torch.int32).to(DEVICE).contiguous()
    return bi, cu_q.to(DEVICE), cu_k.to(DEVICE)


CASES = [
    # lens_k, lens_q, hkv, nsel, slc_block, chunk
    ((40, 23), (40, 23), 2, 4, 16, 256),
    ((37,), (37,), 1, 3, 8, 4),
    ((0, 33, 0, 9, 17), (0, 30, 0, 9, 5), 3, 5, 8, 3),
    ((1, 64, 5), (1, 60, 5), 4, 7, 16, 7),
    ((50, 0), (50, 0), 2, 16, 4, 16),
    ((29, 31, 2), (29, 11, 2), 16, 3, 4, 5),
    ((70,), (3,), 1, 6, 8, 1),
    ((90, 45), (90, 45), 3, 9, 5, 32),
    # 70 sequences (some empty): the kernels read the offsets 64 at a time
    (tuple((i * 7) % 11 for i in range(70)), tuple((i * 7) % 11 // 2 for i in range(70)), 2, 3, 4, 5),
]


@pytest.mark.parametrize("lens_k, lens_q, hkv, nsel, slc_block, chunk", CASES)
@pytest.mark.parametrize("unused", [0.0, 0.3, 1.0])
def test_inverted_index_matches_torch(lens_k, lens_q, hkv, nsel, slc_block, chunk, unused):
    _check(lens_k, lens_q, hkv, nsel, slc_block, chunk, unused, 2048, None)


@pytest.mark.parametrize("lens_k, lens_q, hkv, nsel, slc_block, chunk", CASES)
@pytest.mark.parametrize("lanes", [1, 64])
def test_inverted_index_small_token_chunks(lens_k, lens_q, hkv, nsel, slc_block, chunk, lanes):
    """Many token chunks (down to one token each): a key's entries come from several chunks."""
    _check(lens_k, lens_q, hkv, nsel, slc_block, chunk, 0.3, lanes, None)


@pytest.mark.parametrize("lens_k, lens_q, hkv, nsel, slc_block, chunk", CASES[:3])
def test_inverted_index_wide_sort_key(lens_k, lens_q, hkv, nsel, slc_block, chunk):
    """The int64 sort key (used when key << log2(lanes) could pass 2**31) gives the same index."""
    _check(lens_k, lens_q, hkv, nsel, slc_block, chunk, 0.3, 2048, True)


def _check(lens_k, lens_q, hkv, nsel, slc_block, chunk, unused, lanes, wide):
    gen = torch.Generator().manual_seed(hash((lens_k, hkv, nsel, slc_block, chunk, unused)) % 2**31)
    bi, cu_q, cu_k = _random_case(gen, lens_k, lens_q, hkv, nsel, slc_block, unused)
    nq, nk = sum(lens_q), sum(lens_k)
    if nq == 0:
        pytest.skip("the backward skips the index with no queries")
    sel = slc_mod._prepare(bi, cu_q, cu_k, nq, slc_block, 1)[1]
    ref = slc_mod._inverted_index_by_sort(sel, cu_k, nk, slc_block, chunk)
    got = slc_mod._build_inverted_index(sel, cu_q, cu_k, nk, slc_block, chunk, lanes=lanes, wide=wide,
                                       sort_above=None)
    toks, wkey, wstart, wend, blk_start, blk_len, nb = got
    r_toks, r_wkey, r_wstart, r_wend, r_blk_start, r_blk_len, r_nb = ref
    assert nb == r_nb
    torch.testing.assert_close(toks, r_toks, rtol=0, atol=0)  # every entry, unused slots' tokens last
    torch.testing.assert_close(blk_start, r_blk_start, rtol=0, atol=0)
    torch.testing.assert_close(blk_len, r_blk_len, rtol=0, atol=0)
    # The same grid, and the same live work items in the same order (idle programs may sit between keys).
    assert wkey.shape == r_wkey.shape
    live, r_live = wkey >= 0, r_wkey >= 0
    torch.testing.assert_close(wkey[live], r_wkey[r_live], rtol=0, atol=0)
    torch.testing.assert_close(wstart[live], r_wstart[r_live], rtol=0, atol=0)
    torch.testing.assert_close(wend[live], r_wend[r_live], rtol=0, atol=0)
    n_valid = int((sel != BIG).sum())
    assert int((wend[live] - wstart[live]).sum()) == n_valid


@pytest.mark.parametrize("lens_k, lens_q, hkv, group, nsel, chunk", [
    ((40, 23), (40, 23), 2, 2, 4, 256),
    ((0, 33, 9), (0, 30, 9), 1, 3, 3, 3),
    ((29, 31), (29, 11), 1, 16, 5, 4),
])
def test_backward_bit_identical_to_torch_index(monkeypatch, lens_k, lens_q, hkv, group, nsel, chunk):
    """The whole selected-branch backward gives the same dq/dk/dv bits with either index."""
    slc_block, d = 8, 16
    gen = torch.Generator().manual_seed(7)
    bi, cu_q, cu_k = _random_case(gen, lens_k, lens_q, hkv, nsel, slc_block, 0.2)
    nq, nk = sum(lens_q), sum(lens_k)
    q = torch.randn(nq, hkv * group, d, device=DEVICE)
    k = torch.randn(nk, hkv, d, device=DEVICE)
    v = torch.randn(nk, hkv, d, device=DEVICE)
    scale = d**-0.5
    o, lse = slc_mod._fwd(q, k, v, bi, cu_q, cu_k, slc_block, scale)
    do = torch.randn_like(o)
    new = slc_mod._bwd(do, q, k, v, o, lse, bi, cu_q, cu_k, slc_block, scale, chunk_tokens=chunk)
    sort = slc_mod._inverted_index_by_sort
    monkeypatch.setattr(
        slc_mod, "_build_inverted_index",
        lambda sel, cu_q_, cu_k_, nk_, blk, ch: sort(sel, cu_k_, nk_, blk, ch),
    )
    old = slc_mod._bwd(do, q, k, v, o, lse, bi, cu_q, cu_k, slc_block, scale, chunk_tokens=chunk)
    for a, b in zip(new, old):
        assert torch.equal(a, b)


@pytest.mark.parametrize("lanes, sorted_", [(2048, False), (1, True)])
def test_long_sequences_take_the_sort(monkeypatch, lanes, sorted_):
    """The kernels' count table grows with the square of the tokens: where it would hold more than
    ``sort_above`` (6) times the entries, the torch sort builds the index instead (same result)."""
    gen = torch.Generator().manual_seed(3)
    lens = (300, 211)
    bi, cu_q, cu_k = _random_case(gen, lens, lens, 2, 4, 8, 0.3)
    sel = slc_mod._prepare(bi, cu_q, cu_k, sum(lens), 8, 1)[1]
    calls, sort = [], slc_mod._inverted_index_by_sort
    monkeypatch.setattr(slc_mod, "_inverted_index_by_sort", lambda *a: calls.append(1) or sort(*a))
    got = slc_mod._build_inverted_index(sel, cu_q, cu_k, sum(lens), 8, 16, lanes=lanes)
    assert bool(calls) == sorted_
    ref = sort(sel, cu_k, sum(lens), 8, 16)
    assert torch.equal(got[0], ref[0])
