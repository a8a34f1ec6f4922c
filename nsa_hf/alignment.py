"""Selection alignment: an auxiliary training loss that moves NSA's block selection toward where full
attention looks (for converting a dense model; not part of the NSA paper).

NSA chooses each query's selection blocks by a top-n over block scores made from the compressed
attention probabilities; the choice itself gets no gradient, so plain continued training teaches the
selection only indirectly. :func:`selection_alignment_loss` is the KL divergence from the block mass of
full causal attention (same queries and keys, no gradient) to the selection's own block scores, both
summed over the query heads of a GQA group and normalised over the blocks the selection may choose
(causal, neither the initial nor the local blocks, which are always taken). The queries and keys of the
target are detached and the queries of the prediction too: the gradient enters through the compressed
keys, i.e. the key compressor, the key projection and the layers below. DeepSeek-V3.2 warms up its
sparse-attention indexer with a loss of this kind.

No ``T x T`` matrix is built: a few query rows per sequence are sampled and processed in chunks.

Three ways to use it:

* ``model.config.nsa_align_weight = w`` (and optionally ``nsa_align_rows``): an NSA model in training
  mode adds ``w`` x the term to the loss it returns with ``labels`` (so ``transformers.Trainer`` needs
  nothing more);
* :class:`SelectionAlignment`, a context manager for custom loops::

      with SelectionAlignment(model, rows=64) as align:
          out = model(**batch)
      loss = out.loss + 0.5 * align.loss()

* :func:`selection_alignment_loss` for one sequence's tensors.
"""
from __future__ import annotations

import torch

from nsa_kernels import num_cmp_blocks
from nsa_kernels.reference import (chunk_overlap_matrix, compressed_attention_probs, selection_block_masks,
                                   selection_block_scores)

from .packing import unpad_input

ROW_CHUNK = 64
"""Query rows processed at once: bounds the ``(Hq, rows, Tk)`` full-attention probabilities."""


def choosable_blocks(q_pos: torch.Tensor, n_slc: int, params) -> torch.Tensor:
    """``(R, n_slc)`` bool: the selection blocks a query at ``q_pos`` may choose by score (causal, neither
    the initial nor the local blocks, which are always taken)."""
    eligible, forced = selection_block_masks(q_pos, n_slc, params)
    return eligible & ~forced


def first_choosing_position(params) -> int:
    """The first query position that has a selection block to choose by score."""
    return (params.init_blocks + params.local_blocks) * params.slc_block


def selection_alignment_terms(q: torch.Tensor, k: torch.Tensor, cmp_k: torch.Tensor, q_pos: torch.Tensor, params,
                              scale: float) -> torch.Tensor:
    """The KL terms ``(Hkv, R')`` of the query rows of one sequence that have a block to choose (``R'`` of the
    ``R`` rows; ``(Hkv, 0)`` if none).

    ``q (R, Hq, D)`` rows at positions ``q_pos (R,)``; ``k (Tk, Hkv, D)`` the sequence's keys (at least up to
    the last row); ``cmp_k (N_cmp, Hkv, D)`` its compressed keys. Only ``cmp_k`` receives gradient."""
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    q_pos = q_pos.to(q.device)
    tk = int(q_pos.max()) + 1 if q_pos.numel() else 0
    k = k[:tk]
    n_slc = -(-tk // params.slc_block)
    n_cmp = min(cmp_k.shape[0], num_cmp_blocks(tk, params.cmp_block, params.cmp_stride))
    cmp_k = cmp_k[:n_cmp]
    allowed = choosable_blocks(q_pos, n_slc, params)
    keep = allowed.any(-1)
    q, q_pos, allowed = q[keep], q_pos[keep], allowed[keep]
    if q.shape[0] == 0:
        return cmp_k.new_zeros(hkv, 0, dtype=torch.float32)
    qh = q.detach().float().transpose(0, 1)  # (Hq, R, D)

    # predicted: the selection's block scores, as the reference computes them
    ck = cmp_k.float().transpose(0, 1).repeat_interleave(group, dim=0)  # (Hq, N_cmp, D)
    p_cmp = compressed_attention_probs(qh, ck, q_pos, params, scale)
    predicted = selection_block_scores(p_cmp, chunk_overlap_matrix(n_cmp, n_slc, params, q.device), group)

    # target: full causal attention's mass per selection block, summed over the group; no gradient
    with torch.no_grad():
        kh = k.detach().float().transpose(0, 1).repeat_interleave(group, dim=0)  # (Hq, Tk, D)
        causal = torch.arange(tk, device=q.device)[None, :] <= q_pos[:, None]
        scores = (qh @ kh.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))
        p_full = torch.softmax(scores, dim=-1)
        p_full = torch.nn.functional.pad(p_full, (0, n_slc * params.slc_block - tk))
        target = p_full.unflatten(-1, (n_slc, params.slc_block)).sum(-1).unflatten(0, (hkv, group)).sum(1)
        target = target * allowed
        target = target / target.sum(-1, keepdim=True).clamp_min(1e-12)

    predicted = predicted * allowed
    log_pred = torch.log(predicted / predicted.sum(-1, keepdim=True).clamp_min(1e-12) + 1e-12)
    return (target * (torch.log(target + 1e-12) - log_pred)).sum(-1)  # (Hkv, R')


def selection_alignment_loss(q: torch.Tensor, k: torch.Tensor, cmp_k: torch.Tensor, q_pos: torch.Tensor, params,
                             scale: float) -> torch.Tensor | None:
    """KL(full-attention block mass || selection block scores), the mean over the query rows that have a
    block to choose and the KV heads, for one sequence (shapes as in :func:`selection_alignment_terms`);
    ``None`` when no row has a block to choose."""
    terms = selection_alignment_terms(q, k, cmp_k, q_pos, params, scale)
    return terms.mean() if terms.numel() else None


def _sample_rows(length: int, rows: int, params, generator: torch.Generator) -> torch.Tensor:
    """Up to ``rows`` distinct positions of a sequence of ``length`` tokens that have a block to choose."""
    lo = first_choosing_position(params)
    if length <= lo:
        return torch.zeros(0, dtype=torch.long)
    pick = torch.randperm(length - lo, generator=generator)[:rows] + lo
    return pick.sort().values


class SelectionAlignment:
    """Collects the selection alignment loss of every NSA attention module of ``model`` during the forwards
    run inside a ``with`` block; :meth:`loss` is the mean over the layers (0 if none ran).

    Each layer samples ``rows`` query positions per sequence (padded rows and packed documents, through
    ``cu_seq_lens`` or restarting ``position_ids``, are split as the attention splits them). The attention
    output is unchanged. Works with gradient checkpointing (the term's own activations are kept, and the
    recomputation in the backward pass adds nothing) and bf16 (computed in float32). Forwards without
    gradient add nothing."""

    def __init__(self, model: torch.nn.Module, rows: int = 64, seed: int | None = None):
        if not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows={rows!r}: the query rows sampled per sequence must be an integer >= 1")
        self.modules = [m for m in model.modules() if hasattr(m, "nsa_cmp_k") and hasattr(m, "nsa_params")]
        self.rows = rows
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        self.losses: list[torch.Tensor] = []

    def __enter__(self) -> SelectionAlignment:
        for m in self.modules:
            m.nsa_alignment = self
        return self

    def __exit__(self, *exc) -> None:
        for m in self.modules:
            if getattr(m, "nsa_alignment", None) is self:
                del m.nsa_alignment

    def observe(self, module, query: torch.Tensor, key: torch.Tensor, attention_mask, kwargs) -> None:
        """Called by an NSA attention module with its ``query (B, Hq, Q, D)`` and rotated ``key (B, Hkv, KV, D)``,
        the backend's padding mask and keyword arguments."""
        if not torch.is_grad_enabled():
            return
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"selection alignment needs attn_implementation='nsa' (a 2D padding mask); got a mask "
                             f"of shape {tuple(attention_mask.shape)}")
        # Own saved-tensor hooks: under activation checkpointing the term keeps its activations instead of
        # registering them for a recomputation that will not compute it again.
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            q, k, _, _, layout = unpad_input(query, key, key, None, attention_mask, kwargs)
            params, scale = module.nsa_params, module.scaling
            terms, offset_q, offset_k = [], 0, 0
            for lq, lk in zip(layout.lens_q, layout.lens_k):
                pos = _sample_rows(lk, self.rows, params, self.generator)
                pos = pos[pos >= lk - lq]  # only positions that are queries of this forward
                if pos.numel():
                    seq_k = k[offset_k:offset_k + lk]
                    n_cmp = num_cmp_blocks(lk, params.cmp_block, params.cmp_stride)
                    idx = torch.arange(n_cmp)[:, None] * params.cmp_stride + torch.arange(params.cmp_block)
                    idx = idx.to(k.device)  # (N_cmp, l): the key positions of every complete compression block
                    cmp_k = module.nsa_cmp_k(seq_k[idx].transpose(1, 2))  # (N_cmp, Hkv, D)
                    rows = (pos - (lk - lq) + offset_q).to(q.device)
                    for start in range(0, pos.numel(), ROW_CHUNK):
                        sl = slice(start, start + ROW_CHUNK)
                        terms.append(selection_alignment_terms(q[rows[sl]], seq_k, cmp_k, pos[sl], params, scale)
                                     .flatten())
                offset_q, offset_k = offset_q + lq, offset_k + lk
            terms = torch.cat(terms) if terms else None
            if terms is not None and terms.numel():
                self.losses.append(terms.mean())

    def loss(self) -> torch.Tensor:
        """The mean over the NSA layers that ran of their mean KL term (a scalar; 0 if none ran)."""
        if not self.losses:
            return torch.zeros(())
        return torch.stack(self.losses).mean()


def alignment_settings(config) -> tuple[float, int]:
    """``(weight, rows)`` of a model config: ``nsa_align_weight`` (default 0, off) and ``nsa_align_rows``
    (default 64); raises ``ValueError`` naming a bad value."""
    weight = getattr(config, "nsa_align_weight", 0.0) or 0.0
    rows = getattr(config, "nsa_align_rows", None) or 64
    if not (isinstance(weight, (int, float)) and weight >= 0 and weight == weight):
        raise ValueError(f"config.nsa_align_weight={weight!r}: must be a number >= 0 (0 switches the term off)")
    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"config.nsa_align_rows={rows!r}: must be an integer >= 1 (query rows per sequence)")
    return float(weight), rows


__all__ = ["ROW_CHUNK", "SelectionAlignment", "alignment_settings", "choosable_blocks", "first_choosing_position",
           "selection_alignment_loss", "selection_alignment_terms"]
