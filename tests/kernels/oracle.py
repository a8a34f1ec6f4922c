"""Brute-force NSA oracle: one query, one head at a time, index sets built explicitly, float64.

Deliberately shares no code with kernels/reference.py: it re-derives every branch from the paper's
definitions with Python loops, so agreement between the two is evidence for both.
"""
from __future__ import annotations

import torch


def _softmax_attend(q, keys, values, scale):
    if keys.shape[0] == 0:
        return torch.zeros(values.shape[-1], dtype=q.dtype)
    p = torch.softmax((keys @ q) * scale, dim=0)
    return p @ values, p


def oracle_sequence(q, k, v, cmp_k, cmp_v, gates, params, scale):
    """Same contract as ``nsa_kernels.reference.nsa_sequence``; returns (out, chosen) where chosen
    maps (query index, kv head) -> sorted list of selection blocks."""
    l, d, lp = params.cmp_block, params.cmp_stride, params.slc_block
    tq, hq, _ = q.shape
    tk, hkv, _ = k.shape
    group = hq // hkv
    rows, chosen = [], {}
    for qi in range(tq):
        t = tk - tq + qi
        visible = [i for i in range(cmp_k.shape[0]) if i * d + l - 1 <= t]
        head_out = [None] * hq
        for kh in range(hkv):
            own = t // lp
            score = {j: 0.0 for j in range(own + 1)}
            o_cmp = {}
            for h in range(kh * group, (kh + 1) * group):
                if visible:
                    o, p = _softmax_attend(q[qi, h], cmp_k[visible, kh], cmp_v[visible, kh], scale)
                    for i, pi in zip(visible, p.detach().tolist()):
                        for c in range(l // d):  # each stride-chunk of block i votes for its block
                            score[(i * d + c * d) // lp] = score.get((i * d + c * d) // lp, 0.0) + pi
                else:
                    o = torch.zeros(v.shape[-1], dtype=q.dtype)
                o_cmp[h] = o
            forced = {j for j in range(own + 1) if j < params.init_blocks or j > own - params.local_blocks}
            rest = sorted((j for j in range(own + 1) if j not in forced), key=lambda j: (-score[j], j))
            picked = sorted(forced | set(rest[: max(0, params.slc_count - len(forced))]))
            chosen[(qi, kh)] = picked
            slc_keys = [s for s in range(t + 1) if s // lp in picked]
            win_keys = list(range(max(0, t - params.window + 1), t + 1))
            for h in range(kh * group, (kh + 1) * group):
                o_slc, _ = _softmax_attend(q[qi, h], k[slc_keys, kh], v[slc_keys, kh], scale)
                o_win, _ = _softmax_attend(q[qi, h], k[win_keys, kh], v[win_keys, kh], scale)
                g = gates[qi, h]
                head_out[h] = g[0] * o_cmp[h] + g[1] * o_slc + g[2] * o_win
        rows.append(torch.stack(head_out))
    return torch.stack(rows), chosen
