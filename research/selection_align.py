"""An auxiliary fine-tune loss that moves NSA's selection scores toward where full attention looks
(an experiment for quality.py; not part of the NSA paper, whose selection is trained only through the
compression branch's output).

NSA chooses each query's blocks by a top-n over block scores made from the compressed attention
probabilities (summed over the query heads of a GQA group); the choice has no gradient. quality.py's
selection diagnostic found that a converted model's copying layer misses the source block of some answer
tokens and gets every one of those wrong. :func:`nsa_hf.alignment.selection_alignment_loss` (the
package's term, which began here) is the KL divergence from the block mass of full causal attention (the
same queries and keys, no gradient: where the layer would look if it could see every key) to the
selection's own block scores, both summed over the group and normalised over the blocks the selection may
choose (eligible, not forced); the queries are detached, so its gradient enters through the compressed
keys: the compression MLP, the key projection and, through the hidden states the keys are made from, the
layers below.
DeepSeek-V3.2's sparse attention trains its block indexer with a loss of this kind.
:class:`SelectionAligner` adds it, for a few query rows, to every NSA layer of a forward.
"""
from __future__ import annotations

import torch

from nsa_hf.alignment import selection_alignment_loss
from nsa_kernels import num_cmp_blocks
from .selection_probe import AnswerRowHook, row_slices


class SelectionAligner(AnswerRowHook):
    """Adds :func:`nsa_hf.alignment.selection_alignment_loss` for the query rows at sequence positions
    ``first_row .. last_row`` of every packed sequence (one loss per NSA layer, the mean over the sequences)
    to every NSA layer of a forward; :meth:`loss` is their mean over layers (0 if none ran, e.g. for a dense
    model). The attention output is unchanged."""

    def __init__(self, first_row: int, last_row: int):
        super().__init__(first_row, last_row)
        self.losses: list[torch.Tensor] = []

    def observe(self, q, k, v, cmp_k, cmp_v, gates, cu_q, cu_k, cu_cmp, params, scale) -> None:
        q_pos = torch.arange(self.first_row, self.last_row + 1)
        # the rows see only the compressed blocks complete by the last row (every sequence has those)
        n_cmp = num_cmp_blocks(self.last_row + 1, params.cmp_block, params.cmp_stride)
        losses = [selection_alignment_loss(q[rows], k[keys], cmp_k[cmp.start:cmp.start + n_cmp], q_pos, params, scale)
                  for rows, keys, cmp in row_slices(cu_q, cu_k, cu_cmp, self.first_row, self.last_row)]
        losses = [loss for loss in losses if loss is not None]
        if losses:  # the same rows in every sequence: the mean of the sequences' means is the mean of all rows
            self.losses.append(torch.stack(losses).mean())

    def loss(self) -> torch.Tensor:
        if not self.losses:
            return torch.zeros(())
        return torch.stack(self.losses).mean()
