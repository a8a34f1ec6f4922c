"""Pure-PyTorch reference of Native Sparse Attention, written to be read as the specification.

Layout: packed ("varlen") tensors, tokens first. Sequence ``b`` owns keys
``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` and queries ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``; its ``Tq``
queries are the *last* ``Tq`` of its ``Tk`` key positions (``Tq == Tk`` in training, ``Tq < Tk`` when
decoding from a cache). Query head ``h`` reads KV head ``h // G`` with ``G = Hq // Hkv`` (GQA).

For a query at position ``t`` (0-based inside its sequence) and query head ``h``:

* **cmp** attends to every complete compression block ``i`` (``i*d + l - 1 <= t``) through the
  compressed keys/values; ``p_cmp[h, t, i]`` are its softmax probabilities.
* **slc** scores selection block ``j`` (key positions ``[j*l', (j+1)*l')``) by spreading each
  compression block's probability over the selection blocks its ``l/d`` stride-chunks fall in:
  ``score[j] = sum_i p_cmp[i] * #{chunks of block i inside block j}`` (the paper's Eq. 9), summed over
  the ``G`` query heads sharing the KV head. Blocks ``j <= t // l'`` are eligible; the first
  ``init_blocks`` and the ``local_blocks`` most recent ones are always taken; the rest of the
  ``slc_count`` come by score, ties to the lower block index. The query attends at full resolution
  to the keys ``<= t`` of the chosen blocks.
* **win** attends to the keys ``t - w < s <= t``.
* output ``= g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`` with per-head gates in ``[0, 1]``.

Everything is differentiable except the choice of blocks (an index set), as in the paper.
"""
from __future__ import annotations

import torch

from .params import NSAParams

_QUERY_CHUNK = 256  # queries processed at once: bounds the (Hq, chunk, Tk) masks in memory


def _masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to ``allowed``; rows with nothing allowed give zeros
    (and zero gradients, never NaN)."""
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) * allowed


def chunk_overlap_matrix(n_cmp: int, n_slc: int, params: NSAParams, device=None) -> torch.Tensor:
    """``M[i, j]`` = how many of compression block ``i``'s ``l/d`` stride-chunks lie in selection
    block ``j``. Selection scores are ``p_cmp @ M``."""
    chunks = params.cmp_block // params.cmp_stride
    chunk_start = (
        torch.arange(n_cmp, device=device)[:, None] * params.cmp_stride
        + torch.arange(chunks, device=device)[None, :] * params.cmp_stride
    )  # (n_cmp, chunks): first key position of every chunk
    slc_of_chunk = chunk_start // params.slc_block
    m = torch.zeros(n_cmp, n_slc + chunks, device=device)  # room for chunks past the last block
    m.scatter_add_(1, slc_of_chunk, torch.ones_like(slc_of_chunk, dtype=m.dtype))
    return m[:, :n_slc]


def selection_block_masks(q_pos: torch.Tensor, n_slc: int, params: NSAParams) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eligible, forced)``, each ``(Tq, n_slc)`` bool, for queries at ``q_pos``: the causal blocks
    (``j <= t // l'``), and among them the ones always taken (the first ``init_blocks`` and the
    ``local_blocks`` most recent). The rest of the eligible blocks compete by score."""
    j = torch.arange(n_slc, device=q_pos.device)[None, :]
    own = (q_pos // params.slc_block)[:, None]  # (Tq, 1) the query's own block
    eligible = j <= own
    forced = eligible & ((j < params.init_blocks) | (j > own - params.local_blocks))
    return eligible, forced


def compressed_attention_probs(q: torch.Tensor, cmp_k: torch.Tensor, q_pos: torch.Tensor,
                               params: NSAParams, scale: float) -> torch.Tensor:
    """``p_cmp (..., H, Tq, N_cmp)``: softmax of the queries ``q (..., H, Tq, D)`` at positions ``q_pos (Tq,)``
    over the compression blocks of ``cmp_k (..., H, N_cmp, D)`` (heads already matched) that are complete
    at each query (``i*d + l - 1 <= t``)."""
    cmp_end = torch.arange(cmp_k.shape[-2], device=q.device) * params.cmp_stride + params.cmp_block - 1
    scores = torch.einsum("...qd,...cd->...qc", _acc(q), _acc(cmp_k)) * scale
    return _masked_softmax(scores, cmp_end[None, :] <= q_pos[:, None])


def selection_block_scores(p_cmp: torch.Tensor, overlap: torch.Tensor, group: int) -> torch.Tensor:
    """Block importance ``(..., Hkv, Tq, n_slc)`` from ``p_cmp (..., Hq, Tq, N_cmp)``: each compression
    block's probability spread over the selection blocks by ``overlap`` (:func:`chunk_overlap_matrix`,
    the paper's Eq. 9), summed over the ``group`` query heads of each KV head."""
    scores = p_cmp @ overlap.to(p_cmp.dtype)
    return scores.unflatten(-3, (scores.shape[-3] // group, group)).sum(dim=-3)


def _top_blocks(block_scores: torch.Tensor, eligible: torch.Tensor, forced: torch.Tensor, count: int):
    """``(order, taken)``: the ``count`` best blocks of each row of ``block_scores`` (forced ones first,
    non-eligible ones last; a stable sort, so among equal scores the lower block index comes first) and
    whether each is eligible (masks broadcast against the scores)."""
    scores = block_scores.masked_fill(forced, float("inf")).masked_fill(~eligible, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :count]
    return order, torch.gather(eligible.expand_as(scores), -1, order)


def select_blocks(
    block_scores: torch.Tensor, q_pos: torch.Tensor, params: NSAParams
) -> torch.Tensor:
    """Choose the selection blocks of each query.

    Args:
        block_scores: ``(Hkv, Tq, n_slc)`` importance of each selection block (already summed over
            the query heads of each GQA group).
        q_pos: ``(Tq,)`` position of each query in its sequence.

    Returns:
        ``(Tq, Hkv, slc_count)`` int32 block indices, ascending, ``-1`` padding where fewer than
        ``slc_count`` blocks are eligible.
    """
    n_slc = block_scores.shape[-1]
    eligible, forced = selection_block_masks(q_pos, n_slc, params)
    order, taken = _top_blocks(_acc(block_scores), eligible, forced, params.slc_count)
    idx = torch.where(taken, order, n_slc)  # not eligible -> sorts last, becomes -1
    idx = torch.sort(idx, dim=-1).values
    idx = torch.where(idx == n_slc, -1, idx)
    if idx.shape[-1] < params.slc_count:
        idx = torch.nn.functional.pad(idx, (0, params.slc_count - idx.shape[-1]), value=-1)
    return idx.permute(1, 0, 2).to(torch.int32).contiguous()


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Accumulation precision: float64 stays float64 (oracle checks), anything else becomes float32."""
    return x if x.dtype == torch.float64 else x.float()


def _attend(q, k, v, allowed, scale):
    """Dense attention of ``q`` ``(H, Tq, D)`` over ``k, v`` ``(H, Tk, D)`` where ``allowed``."""
    scores = torch.einsum("hqd,hkd->hqk", _acc(q), _acc(k)) * scale
    return torch.einsum("hqk,hkd->hqd", _masked_softmax(scores, allowed), _acc(v))


def nsa_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cmp_k: torch.Tensor,
    cmp_v: torch.Tensor,
    gates: torch.Tensor,
    params: NSAParams,
    scale: float,
    return_block_indices: bool = False,
):
    """NSA for one sequence. ``q (Tq, Hq, D)``, ``k (Tk, Hkv, D)``, ``v (Tk, Hkv, Dv)``,
    ``cmp_k (N_cmp, Hkv, D)``, ``cmp_v (N_cmp, Hkv, Dv)``, ``gates (Tq, Hq, 3)`` ordered
    (cmp, slc, win). Returns ``o (Tq, Hq, Dv)`` in float32 (float64 for float64 inputs) (and the chosen blocks if asked)."""
    tq, hq, _ = q.shape
    tk, hkv, _ = k.shape
    group = hq // hkv
    n_cmp = cmp_k.shape[0]
    n_slc = -(-tk // params.slc_block)
    device = q.device

    # Heads first; KV heads repeated so that query head h reads KV head h // group.
    qh = q.transpose(0, 1)
    kh, vh = (x.transpose(0, 1).repeat_interleave(group, dim=0) for x in (k, v))
    ckh, cvh = (x.transpose(0, 1).repeat_interleave(group, dim=0) for x in (cmp_k, cmp_v))
    overlap = chunk_overlap_matrix(n_cmp, n_slc, params, device)
    key_pos = torch.arange(tk, device=device)

    outs, chosen = [], []
    for start in range(0, tq, _QUERY_CHUNK):
        q_pos = torch.arange(start, min(start + _QUERY_CHUNK, tq), device=device) + (tk - tq)
        qc = qh[:, start : start + q_pos.shape[0]]

        # cmp: attention over the complete compression blocks.
        p_cmp = compressed_attention_probs(qc, ckh, q_pos, params, scale)
        o_cmp = torch.einsum("hqc,hcd->hqd", p_cmp, _acc(cvh))

        # slc: block importance from p_cmp, shared by the query heads of a GQA group.
        with torch.no_grad():
            block_scores = selection_block_scores(p_cmp, overlap, group)
            blocks = select_blocks(block_scores, q_pos, params)  # (tq_chunk, Hkv, n)
        in_chosen = torch.zeros(q_pos.shape[0], hkv, n_slc + 1, dtype=torch.bool, device=device)
        in_chosen.scatter_(-1, torch.where(blocks < 0, n_slc, blocks).long(), True)
        key_chosen = in_chosen[..., :n_slc].repeat_interleave(params.slc_block, dim=-1)[..., :tk]
        causal = key_pos[None, :] <= q_pos[:, None]
        slc_allowed = key_chosen.permute(1, 0, 2).repeat_interleave(group, dim=0) & causal
        o_slc = _attend(qc, kh, vh, slc_allowed, scale)

        # win: the last w keys.
        win_allowed = causal & (key_pos[None, :] > q_pos[:, None] - params.window)
        o_win = _attend(qc, kh, vh, win_allowed, scale)

        g = _acc(gates[start : start + q_pos.shape[0]].transpose(0, 1))  # (Hq, tq_chunk, 3)
        o = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win
        outs.append(o.transpose(0, 1))
        chosen.append(blocks)
    out = torch.cat(outs, dim=0)
    if return_block_indices:
        return out, torch.cat(chosen, dim=0)
    return out


def nsa_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cmp_k_cache: torch.Tensor,
    cmp_v_cache: torch.Tensor,
    gates: torch.Tensor,
    k_start: torch.Tensor,
    k_len: torch.Tensor,
    cmp_start: torch.Tensor,
    cmp_len: torch.Tensor,
    params: NSAParams,
    scale: float | None = None,
) -> torch.Tensor:
    """NSA for the last ``Tq`` positions of every row of a KV cache: the same function as
    :func:`nsa_sequence` applied to each row, computed for the whole batch at once with explicit
    positions and masks (no host synchronisation, every shape a function of the input shapes, so it can
    be traced by ``torch.compile`` / ``torch.export`` and captured in a CUDA graph). Same arguments as
    :func:`nsa_kernels.decode.nsa_decode`:

    Args:
        q: ``(B, Tq, Hq, D)``; row ``b``'s queries are the last ``Tq`` of its ``k_len[b]`` positions.
        k_cache, v_cache: ``(B, Hkv, S, D)`` / ``(B, Hkv, S, Dv)``; row ``b``'s position ``p`` is at cache
            index ``k_start[b] + p``.
        cmp_k_cache, cmp_v_cache: ``(B, Hkv, Sc, D)`` / ``(B, Hkv, Sc, Dv)``; row ``b``'s compressed token
            ``i`` (block ``[i*d, i*d + l)``) is at ``cmp_start[b] + i``, for ``i < cmp_len[b]``.
        gates: ``(B, Tq, Hq, 3)``; k_start, k_len, cmp_start, cmp_len: ``(B,)`` integer tensors.
        scale: softmax scale, ``D ** -0.5`` by default.

    Returns:
        ``(B, Tq, Hq, Dv)`` in ``q.dtype``. Lengths are not checked (they stay on the device).
    """
    bsz, tq, hq, dim = q.shape
    hkv, slots = k_cache.shape[1], k_cache.shape[2]
    n_slots_cmp = cmp_k_cache.shape[2]
    group = hq // hkv
    scale = dim ** -0.5 if scale is None else scale
    device = q.device
    l, d, ls = params.cmp_block, params.cmp_stride, params.slc_block
    n_slc = -(-slots // ls)

    # Query positions t (B, Tq) inside each row; key and compressed positions of every cache slot.
    t = (k_len.long()[:, None] - tq + torch.arange(tq, device=device))
    pos = torch.arange(slots, device=device)[None, :] - k_start.long()[:, None]  # (B, S), < 0: before the row
    cpos = torch.arange(n_slots_cmp, device=device)[None, :] - cmp_start.long()[:, None]  # (B, Sc)
    qg = _acc(q).view(bsz, tq, hkv, group, dim).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, Tq, D)

    # cmp: complete blocks (i*d + l - 1 <= t) that exist in the cache (0 <= i < cmp_len).
    cmp_ok = (cpos >= 0) & (cpos < cmp_len.long()[:, None])
    cmp_allowed = cmp_ok[:, None, :] & (cpos[:, None, :] * d + l - 1 <= t[:, :, None])  # (B, Tq, Sc)
    scores = torch.einsum("bhgqd,bhcd->bhgqc", qg, _acc(cmp_k_cache)) * scale
    p_cmp = _masked_softmax(scores, cmp_allowed[:, None, None])  # (B, Hkv, G, Tq, Sc)
    o_cmp = torch.einsum("bhgqc,bhcd->bhgqd", p_cmp, _acc(cmp_v_cache))

    # slc: block scores p_cmp @ overlap (per row: compressed slot -> its row's block index), summed over
    # the group; selection as in select_blocks.
    with torch.no_grad():
        chunks = cpos[:, :, None] * d + torch.arange(l // d, device=device) * d  # (B, Sc, l/d) chunk starts
        blk = torch.where(cmp_ok[:, :, None], chunks // ls, n_slc).clamp_(0, n_slc)
        overlap = torch.zeros(bsz, n_slots_cmp, n_slc + 1, device=device, dtype=p_cmp.dtype)
        overlap.scatter_add_(2, blk, torch.ones_like(blk, dtype=p_cmp.dtype))
        block_scores = (p_cmp @ overlap[:, None, None, :, :n_slc]).sum(dim=2)  # (B, Hkv, Tq, n_slc)
        masks = selection_block_masks(t.reshape(-1), n_slc, params)  # per (row, query), then (B, 1, Tq, n_slc)
        eligible, forced = (m.view(bsz, 1, tq, n_slc) for m in masks)
        order, taken = _top_blocks(block_scores, eligible, forced, params.slc_count)
        chosen = torch.zeros(bsz, hkv, tq, n_slc + 1, dtype=torch.bool, device=device)
        chosen.scatter_(-1, torch.where(taken, order, n_slc), True)
        key_blk = torch.where(pos >= 0, pos // ls, n_slc).clamp_(0, n_slc)  # (B, S)
        key_chosen = torch.gather(chosen, -1, key_blk[:, None, None, :].expand(bsz, hkv, tq, slots))
    causal = (pos[:, None, :] >= 0) & (pos[:, None, :] <= t[:, :, None])  # (B, Tq, S)
    slc_allowed = (key_chosen & causal[:, None])[:, :, None]  # (B, Hkv, 1, Tq, S)
    win_allowed = (causal & (pos[:, None, :] > t[:, :, None] - params.window))[:, None, None]
    dense = torch.einsum("bhgqd,bhsd->bhgqs", qg, _acc(k_cache)) * scale
    vals = _acc(v_cache)
    o_slc = torch.einsum("bhgqs,bhsd->bhgqd", _masked_softmax(dense, slc_allowed), vals)
    o_win = torch.einsum("bhgqs,bhsd->bhgqd", _masked_softmax(dense, win_allowed), vals)

    g = _acc(gates).view(bsz, tq, hkv, group, 3).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, Tq, 3)
    o = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win
    return o.permute(0, 3, 1, 2, 4).reshape(bsz, tq, hq, -1).to(q.dtype)


def nsa_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cmp_k: torch.Tensor,
    cmp_v: torch.Tensor,
    gates: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    cu_seqlens_cmp: torch.Tensor,
    params: NSAParams,
    scale: float | None = None,
    backend: str = "reference",
    *,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> torch.Tensor:
    """NSA over packed sequences (see the module docstring). Returns ``(Nq, Hq, Dv)`` in ``q.dtype``.
    Same signature as the dispatching :func:`nsa_kernels.nsa_attention_varlen`, so that this function
    can stand in for it (Hub remote code bundles only the reference): ``backend`` must be ``"reference"``
    or ``"auto"``; ``max_seqlen_q`` / ``max_seqlen_k`` are ignored.

    Args:
        q: ``(Nq, Hq, D)``; k: ``(Nk, Hkv, D)``; v: ``(Nk, Hkv, Dv)``.
        cmp_k, cmp_v: ``(N_cmp, Hkv, D)`` / ``(N_cmp, Hkv, Dv)`` compressed keys/values, every
            complete block of each sequence in order (see :mod:`compression`).
        gates: ``(Nq, Hq, 3)`` gate values in [0, 1], ordered (cmp, slc, win).
        cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp: ``(B + 1,)`` offsets of each sequence.
        scale: softmax scale, ``D ** -0.5`` by default.
        max_seqlen_q, max_seqlen_k: accepted for the Triton path's signature (there they spare a host
            copy of the offsets); unused here.
    """
    if backend not in ("reference", "auto"):
        raise ValueError(f"backend={backend!r}: this is the PyTorch reference (allowed: 'reference', 'auto'); the "
                         "Triton kernels need nsa_kernels.nsa_attention_varlen with triton installed")
    check_nsa_inputs(q, k, v, cmp_k, cmp_v, gates, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    bq, bk, bc = (c.tolist() for c in (cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp))
    for b in range(len(bq) - 1):
        if bq[b + 1] == bq[b]:
            continue
        out[bq[b] : bq[b + 1]] = nsa_sequence(
            q[bq[b] : bq[b + 1]],
            k[bk[b] : bk[b + 1]],
            v[bk[b] : bk[b + 1]],
            cmp_k[bc[b] : bc[b + 1]],
            cmp_v[bc[b] : bc[b + 1]],
            gates[bq[b] : bq[b + 1]],
            params,
            scale,
        ).to(q.dtype)
    return out


def check_nsa_inputs(q, k, v, cmp_k, cmp_v, gates, cu_seqlens_q, cu_seqlens_k, cu_seqlens_cmp, params):
    """Validate shapes of the varlen NSA inputs; raise ``ValueError`` naming the bad value."""
    from .params import num_cmp_blocks

    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be (tokens, heads, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA")
    if k.shape[:2] != v.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} / q {tuple(q.shape)} shapes disagree")
    if gates.shape != (q.shape[0], hq, 3):
        raise ValueError(f"gates must be (tokens, Hq, 3) = {(q.shape[0], hq, 3)}; got {tuple(gates.shape)}")
    lq = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    lk = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    if bool((lq > lk).any()):
        raise ValueError(
            f"every sequence needs at least as many keys as queries (queries are the last Tq of Tk); "
            f"got query lengths {lq.tolist()} and key lengths {lk.tolist()}"
        )
    expect = [num_cmp_blocks(n, params.cmp_block, params.cmp_stride) for n in lk.tolist()]
    got = (cu_seqlens_cmp[1:] - cu_seqlens_cmp[:-1]).tolist()
    if got != expect:
        raise ValueError(
            f"cu_seqlens_cmp gives {got} compressed tokens per sequence; the key lengths "
            f"{lk.tolist()} have {expect} complete blocks (l={params.cmp_block}, d={params.cmp_stride})"
        )


def gate_combine(o_cmp, o_slc, o_win, gates):
    """The PyTorch formula (fp32 accumulation, fp64 for fp64 inputs; output in the dtype of ``o_cmp``)."""
    acc = torch.promote_types(torch.promote_types(torch.float32, o_cmp.dtype), gates.dtype)
    g = gates.to(acc)
    out = g[..., 0:1] * o_cmp.to(acc) + g[..., 1:2] * o_slc.to(acc) + g[..., 2:3] * o_win.to(acc)
    return out.to(o_cmp.dtype)
