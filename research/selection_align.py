"""An auxiliary fine-tune loss that moves NSA's selection scores toward where full attention looks
(an experiment for quality.py; not part of the NSA paper, whose selection is trained only through the
compression branch's output).

NSA chooses each query's blocks by a top-n over block scores made from the compressed attention
probabilities (summed over the query heads of a GQA group); the choice has no gradient. quality.py's
selection diagnostic found that a converted model's copying layer misses the source block of some answer
tokens and gets every one of those wrong. :func:`selection_alignment_loss` is the KL divergence from the
block mass of full causal attention (the same queries and keys, no gradient: where the layer would look
if it could see every key) to the selection's own block scores, both summed over the group and
normalised over the blocks the selection may choose (eligible, not forced); the queries are detached, so
its gradient enters through the compressed keys: the compression MLP, the key projection and, through the
hidden states the keys are made from, the layers below.
DeepSeek-V3.2's sparse attention trains its block indexer with a loss of this kind.
:class:`SelectionAligner` adds it, for a few query rows, to every NSA layer of a forward.
"""
from __future__ import annotations

import torch

from nsa_kernels import num_cmp_blocks
from nsa_kernels.reference import (_acc, _masked_softmax, chunk_overlap_matrix, compressed_attention_probs,
                                   selection_block_masks, selection_block_scores)
from .selection_probe import AnswerRowHook, row_slices


def choosable_blocks(q_pos: torch.Tensor, n_slc: int, params) -> torch.Tensor:
    """``(R, n_slc)`` bool: selection blocks a query at ``q_pos`` may choose by score (causal, neither the
    initial nor the local blocks, which are always taken)."""
    eligible, forced = selection_block_masks(q_pos, n_slc, params)
    return eligible & ~forced


def selection_alignment_loss(q: torch.Tensor, k: torch.Tensor, cmp_k: torch.Tensor, q_pos: torch.Tensor, params,
                             scale: float) -> torch.Tensor | None:
    """KL(full-attention block mass || selection block scores) of query rows, mean over sequences, rows and
    KV heads; ``None`` when no row has a block to choose.

    One sequence: ``q (R, Hq, D)`` rows at positions ``q_pos (R,)``; ``k (Tk, Hkv, D)`` the sequence's keys
    up to the last row; ``cmp_k (N_cmp, Hkv, D)`` its compressed keys. Several sequences: the same with a
    leading ``(B,)`` axis on ``q``, ``k`` and ``cmp_k``. Only ``cmp_k`` receives gradient (``q``, ``k`` are
    detached). ``q_pos`` on the CPU avoids a device sync."""
    if q.dim() == 3:
        q, k, cmp_k = q[None], k[None], cmp_k[None]
    hq, hkv = q.shape[2], k.shape[2]
    group, tk, n_cmp = hq // hkv, k.shape[1], cmp_k.shape[1]
    n_slc = -(-tk // params.slc_block)
    allowed = choosable_blocks(q_pos, n_slc, params)  # (R, n_slc)
    keep = allowed.any(-1)
    if not bool(keep.any()):
        return None
    allowed, keep, q_pos = allowed.to(q.device), keep.to(q.device), q_pos.to(q.device)
    qh = q.detach().transpose(1, 2)  # (B, Hq, R, D)

    # predicted: the selection's block scores, computed as the reference computes them
    ck = cmp_k.transpose(1, 2).repeat_interleave(group, dim=1)  # (B, Hq, N_cmp, D)
    p_cmp = compressed_attention_probs(qh, ck, q_pos, params, scale)
    predicted = selection_block_scores(p_cmp, chunk_overlap_matrix(n_cmp, n_slc, params, q.device), group)

    # target: full causal attention's mass per selection block, group sum, no gradient
    with torch.no_grad():
        kh = _acc(k.detach()).transpose(1, 2).repeat_interleave(group, dim=1)  # (B, Hq, Tk, D)
        causal = torch.arange(tk, device=q.device)[None, :] <= q_pos[:, None]
        p_full = _masked_softmax(_acc(qh) @ kh.transpose(-1, -2) * scale, causal)
        p_full = torch.nn.functional.pad(p_full, (0, n_slc * params.slc_block - tk))
        target = p_full.unflatten(-1, (n_slc, params.slc_block)).sum(-1).unflatten(1, (hkv, group)).sum(2)
        target = target * allowed
        target = target / target.sum(-1, keepdim=True).clamp_min(1e-12)

    predicted = predicted * allowed
    log_pred = torch.log(predicted / predicted.sum(-1, keepdim=True).clamp_min(1e-12) + 1e-12)
    kl = (target * (torch.log(target + 1e-12) - log_pred)).sum(-1)  # (B, Hkv, R)
    return kl[..., keep].mean()


class SelectionAligner(AnswerRowHook):
    """Adds :func:`selection_alignment_loss` for the query rows at sequence positions ``first_row ..
    last_row`` of every packed sequence (one batched loss per NSA layer, the mean over the sequences) to
    every NSA layer of a forward; :meth:`loss` is their mean over layers (0 if none ran, e.g. for a dense
    model). The attention output is unchanged."""

    def __init__(self, first_row: int, last_row: int):
        super().__init__(first_row, last_row)
        self.losses: list[torch.Tensor] = []

    def observe(self, q, k, v, cmp_k, cmp_v, gates, cu_q, cu_k, cu_cmp, params, scale) -> None:
        q_pos = torch.arange(self.first_row, self.last_row + 1)  # CPU: no device sync in the loss
        slices = row_slices(cu_q, cu_k, cu_cmp, self.first_row, self.last_row)
        # the rows see only the compressed blocks complete by the last row: every sequence has those, so the
        # sequences stack into one batched loss whatever their lengths
        n_cmp = num_cmp_blocks(self.last_row + 1, params.cmp_block, params.cmp_stride)
        loss = selection_alignment_loss(torch.stack([q[rows] for rows, _, _ in slices]),
                                        torch.stack([k[keys] for _, keys, _ in slices]),
                                        torch.stack([cmp_k[cmp.start:cmp.start + n_cmp] for _, _, cmp in slices]),
                                        q_pos, params, scale)
        if loss is not None:
            self.losses.append(loss)

    def loss(self) -> torch.Tensor:
        if not self.losses:
            return torch.zeros(())
        return torch.stack(self.losses).mean()
