"""Which selection blocks an NSA model chose where the retrieval probe scores it (a diagnostic for quality.py).

The span probe asks a model to copy a passage from far beyond its sliding window. An NSA layer can only
copy a token at full resolution if that token's selection block is among the blocks the query chose; the
choice (a top-n over the compressed attention's block scores) has no gradient. :class:`SelectionRecorder`
records, while a forward runs, the blocks every NSA layer chose for a few query rows (by the reference's
selection rule, ``nsa_kernels.reference.nsa_sequence``, on the layer's own queries and compressed keys;
the Triton kernels choose the same blocks up to floating-point near-ties),
and :func:`source_coverage` tells how often the block holding the token to be copied was among them,
split by whether the model got the token right: if the wrong tokens are the ones whose source block no
layer chose, retrieval is limited by the selection, not by what the model does with what it sees.
"""
from __future__ import annotations

import torch

import nsa_hf.attention as nsa_attention
from nsa_kernels.reference import nsa_sequence


class AnswerRowHook:
    """Context manager base: while active, every NSA attention call (one per layer, in layer order, on
    packed sequences whose queries are the last of their keys) first passes its arguments to
    :meth:`observe` (with ``scale`` resolved), then runs as usual; ``first_row .. last_row`` are the
    sequence positions of the query rows a subclass looks at (:func:`row_slices`)."""

    def __init__(self, first_row: int, last_row: int):
        if not 0 <= first_row <= last_row:
            raise ValueError(f"rows {first_row}..{last_row}: need 0 <= first_row <= last_row")
        self.first_row, self.last_row = first_row, last_row
        self._original = None

    def observe(self, q, k, v, cmp_k, cmp_v, gates, cu_q, cu_k, cu_cmp, params, scale) -> None:
        raise NotImplementedError

    def __enter__(self):
        self._original = nsa_attention._nsa_varlen

        def hooked(q, k, v, cmp_k, cmp_v, gates, cu_q, cu_k, cu_cmp, params, scale, *rest):
            resolved = q.shape[-1] ** -0.5 if scale is None else scale
            self.observe(q, k, v, cmp_k, cmp_v, gates, cu_q, cu_k, cu_cmp, params, resolved)
            return self._original(q, k, v, cmp_k, cmp_v, gates, cu_q, cu_k, cu_cmp, params, scale, *rest)

        nsa_attention._nsa_varlen = hooked
        return self

    def __exit__(self, *exc):
        nsa_attention._nsa_varlen = self._original
        return False


class SelectionRecorder(AnswerRowHook):
    """Records, for every NSA layer of a forward, the selection blocks of the query rows at sequence
    positions ``first_row .. last_row``.

    After a forward, ``layers`` holds one int tensor per layer, ``(sequences, rows, kv_heads, slc_count)``
    (``-1`` padding as in the reference), and ``gates`` one float tensor per layer, ``(sequences, rows,
    heads, 3)``, the gate values (cmp, slc, win) at those rows; :meth:`clear` empties both for the next
    forward."""

    def __init__(self, first_row: int, last_row: int):
        super().__init__(first_row, last_row)
        self.layers: list[torch.Tensor] = []
        self.gates: list[torch.Tensor] = []

    @torch.no_grad()
    def observe(self, q, k, v, cmp_k, cmp_v, gates, cu_q, cu_k, cu_cmp, params, scale) -> None:
        chosen, row_gates = [], []
        for rows, keys, cmp in row_slices(cu_q, cu_k, cu_cmp, self.first_row, self.last_row):
            _, blocks = nsa_sequence(q[rows], k[keys], v[keys], cmp_k[cmp], cmp_v[cmp], gates[rows], params, scale,
                                     return_block_indices=True)
            chosen.append(blocks)
            row_gates.append(gates[rows])
        self.layers.append(torch.stack(chosen).cpu())
        self.gates.append(torch.stack(row_gates).float().cpu())

    def clear(self) -> None:
        self.layers, self.gates = [], []


def row_slices(cu_q, cu_k, cu_cmp, first_row: int, last_row: int):
    """Per packed sequence: slices of its query rows at sequence positions ``first_row .. last_row``, of
    its keys up to ``last_row`` (so those rows are the last queries of the keys) and of its compressed
    blocks, from the ``cu_seqlens`` of an NSA attention call (queries are the last of their keys)."""
    cq, ck, cc = (c.tolist() for c in (cu_q, cu_k, cu_cmp))
    out = []
    for b in range(len(cq) - 1):
        len_q, len_k = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if last_row >= len_k:
            raise ValueError(f"row {last_row} is past sequence {b}'s {len_k} keys")
        first_q = first_row - (len_k - len_q)  # query index of the first row
        if first_q < 0:
            raise ValueError(f"row {first_row} has no query in sequence {b} (queries are its last {len_q} positions)")
        out.append((slice(cq[b] + first_q, cq[b] + first_q + last_row - first_row + 1),
                    slice(ck[b], ck[b] + last_row + 1), slice(cc[b], cc[b + 1])))
    return out


def source_hits(layers: list[torch.Tensor], source_pos: torch.Tensor, slc_block: int) -> torch.Tensor:
    """``(L, B, A)`` bool: whether layer ``l`` (any of its KV heads) chose the selection block holding
    ``source_pos[b, a]``, the position of the token that row ``a`` of sequence ``b`` must copy.
    ``layers``: per layer ``(B, A, Hkv, n)`` chosen blocks (:class:`SelectionRecorder`)."""
    src_block = (source_pos // slc_block)[..., None, None]
    return torch.stack([(blocks == src_block).any(-1).any(-1) for blocks in layers])


def source_coverage(hits: torch.Tensor, right: torch.Tensor) -> dict:
    """Summary of ``(L, N, A)`` :func:`source_hits` against ``(N, A)`` bool ``right`` (the model predicted
    the token): over the ``N * A`` scored tokens, ``per_layer`` (fraction whose source block that layer
    chose), ``any_layer``, and among the right and among the wrong tokens the fraction whose source block
    the most-choosing layer (``best_layer``) / any layer chose; for every layer, ``per_layer_missed`` counts
    the tokens whose source block it did not choose and ``per_layer_missed_wrong`` those of them the model
    got wrong (equal counts: every miss of that layer was an error)."""
    per_layer = hits.float().mean(dim=(1, 2))
    best = int(per_layer.argmax())
    any_layer = hits.any(0)
    wrong = ~right

    def frac(h: torch.Tensor, where: torch.Tensor):
        return round(float(h[where].float().mean()), 4) if bool(where.any()) else None

    return {"tokens": int(right.numel()), "wrong_tokens": int(wrong.sum()),
            "per_layer": [round(float(x), 4) for x in per_layer], "any_layer": frac(any_layer, right | wrong),
            "best_layer": best, "best_layer_right": frac(hits[best], right), "best_layer_wrong": frac(hits[best], wrong),
            "any_layer_right": frac(any_layer, right), "any_layer_wrong": frac(any_layer, wrong),
            "per_layer_missed": [int(x) for x in (~hits).sum(dim=(1, 2))],
            "per_layer_missed_wrong": [int(x) for x in (~hits & wrong).sum(dim=(1, 2))]}


def gate_means(gates: list[torch.Tensor], right: torch.Tensor) -> dict:
    """Mean gate values per layer and head at the scored rows, split by whether the model got the token
    right: ``{"right": [L][H][3], "wrong": [L][H][3]}`` (cmp, slc, win; ``None`` where there is no such
    token). ``gates``: per layer ``(N, A, H, 3)`` (:class:`SelectionRecorder`); ``right``: ``(N, A)`` bool.
    Shows whether the copying layer's heads lean on the selected branch where the copy fails."""
    out = {}
    for name, where in (("right", right), ("wrong", ~right)):
        if not bool(where.any()):
            out[name] = None
            continue
        out[name] = [[[round(float(x), 4) for x in head] for head in layer[where].mean(0)] for layer in gates]
    return out


ERROR_KINDS = ("target_adjacent", "target_other", "in_context", "not_in_context")  # error_kinds' keys, in order


def error_kinds(pred: torch.Tensor, answers: torch.Tensor, ids: torch.Tensor, passage_start: int, prefix: int,
                answer_pos: torch.Tensor) -> dict:
    """What the model predicted instead of each wrong answer token of the span probe.

    ``pred`` / ``answers``: ``(N, A)`` predicted and correct tokens; ``ids``: ``(N, S)`` the probes, whose
    target passage starts at ``passage_start`` (the answer copies its tokens from ``prefix`` on);
    ``answer_pos``: ``(A,)`` the answers' positions. Each wrong token counts once, as the first that fits of
    ``target_adjacent`` (the target passage's token one position before or after the right one: the copy
    slipped by a position), ``target_other`` (another token of the target passage), ``in_context`` (a token
    found earlier in the probe, e.g. a distractor passage or the filler) and ``not_in_context``."""
    span_len = prefix + answers.shape[1]
    kinds = dict.fromkeys(ERROR_KINDS, 0)
    for n, a in (pred != answers).nonzero().tolist():
        token = pred[n, a]
        passage = ids[n, passage_start : passage_start + span_len]
        offsets = ((passage == token).nonzero().flatten() - (prefix + a)).tolist()
        if offsets:
            kinds["target_adjacent" if any(abs(o) == 1 for o in offsets) else "target_other"] += 1
        elif bool((ids[n, : int(answer_pos[a])] == token).any()):
            kinds["in_context"] += 1
        else:
            kinds["not_in_context"] += 1
    return kinds
