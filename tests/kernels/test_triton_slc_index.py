"""The dk/dv inverted index of the selected branch (two Triton kernels) against the torch version it
replaced (a stable torch sort of all (token, slot) entries by key, kept here as the reference): the
same tokens in the same order, the same work items in the same order, the same block table."""
import pytest
import torch

from nsa_kernels import slc as slc_mod
from nsa_kernels.primitives import BIG

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _torch_inverted_index(sel, cu_seqlens_k, nk, slc_block, chunk):
    """The former torch implementation (about 30 ops, one stable sort), unchanged."""
    device = sel.device
    nq, hkv, nsel = sel.shape
    bsz = cu_seqlens_k.numel() - 1
    lens_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    nblk = (lens_k + slc_block - 1) // slc_block
    blk_off = torch.zeros(bsz + 1, dtype=torch.long, device=device)
    blk_off[1:] = torch.cumsum(nblk, 0)
    nb = nk // slc_block + bsz
    blk_ids = torch.arange(nb, device=device)
    blk_seq = torch.searchsorted(blk_off[1:], blk_ids, right=True).clamp_max(bsz - 1)
    local = blk_ids - blk_off[blk_seq]
    blk_start = cu_seqlens_k[blk_seq].long() + local * slc_block
    seq_end = cu_seqlens_k[blk_seq + 1].long()
    blk_len = (seq_end - blk_start).clamp(min=0, max=slc_block)
    blk_len = torch.where(blk_ids < blk_off[-1], blk_len, 0)
    flat = sel.reshape(-1).long()
    valid = flat != BIG
    tok_of = torch.arange(flat.numel(), device=device) // (hkv * nsel)
    h_of = (torch.arange(flat.numel(), device=device) // nsel) % hkv
    flat = torch.where(valid, flat, 0)
    seq_q = torch.searchsorted(cu_seqlens_k[1:].long(), flat, right=True).clamp_max(bsz - 1)
    blk = blk_off[seq_q] + (flat - cu_seqlens_k[seq_q].long()) // slc_block
    nkeys = hkv * nb
    key = torch.where(valid, h_of * nb + blk, nkeys)
    sorted_key, order = torch.sort(key, stable=True)
    toks = tok_of[order].to(torch.int32).contiguous()
    bounds = torch.searchsorted(sorted_key, torch.arange(nkeys + 1, device=device))
    counts = bounds[1:] - bounds[:-1]
    offs = bounds[:-1]
    chunks = (counts + chunk - 1) // chunk
    cum = torch.cumsum(chunks, 0)
    n_prog = flat.numel() // chunk + nkeys
    pids = torch.arange(n_prog, device=device)
    wkey = torch.searchsorted(cum, pids, right=True)
    live = wkey < nkeys
    wkey_c = wkey.clamp_max(nkeys - 1)
    c = pids - (cum[wkey_c] - chunks[wkey_c])
    wstart = offs[wkey_c] + c * chunk
    wend = torch.minimum(wstart + chunk, offs[wkey_c] + counts[wkey_c])
    return (
        toks,
        torch.where(live, wkey_c, -1).to(torch.int32).contiguous(),
        wstart.to(torch.int32).contiguous(),
        wend.to(torch.int32).contiguous(),
        blk_start.to(torch.int32).contiguous(),
        blk_len.to(torch.int32).contiguous(),
        nb,
    )


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
    ref = _torch_inverted_index(sel, cu_k, nk, slc_block, chunk)
    got = slc_mod._build_inverted_index(sel, cu_q, cu_k, nk, slc_block, chunk, lanes=lanes, wide=wide)
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
    monkeypatch.setattr(
        slc_mod, "_build_inverted_index",
        lambda sel, cu_q_, cu_k_, nk_, blk, ch: _torch_inverted_index(sel, cu_k_, nk_, blk, ch),
    )
    old = slc_mod._bwd(do, q, k, v, o, lse, bi, cu_q, cu_k, slc_block, scale, chunk_tokens=chunk)
    for a, b in zip(new, old):
        assert torch.equal(a, b)
