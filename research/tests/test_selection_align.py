"""research/selection_align.py: the auxiliary loss that moves NSA's selection scores toward full attention's
block mass (an experiment of quality.py)."""
import math

import pytest
import torch


def _params(**kw):
    from nsa_kernels import NSAParams

    base = dict(cmp_block=8, cmp_stride=4, slc_block=8, slc_count=3, init_blocks=1, local_blocks=1, window=8)
    base.update(kw)
    return NSAParams(**base)


def _brute_force_kl(q, k, cmp_k, q_pos, params, scale):
    """The loss written out with loops: per KV head and row, block masses of both distributions over the
    choosable blocks, normalised, then KL(target || predicted)."""
    hq, hkv, tk = q.shape[1], k.shape[1], k.shape[0]
    group, n_cmp = hq // hkv, cmp_k.shape[0]
    n_slc = math.ceil(tk / params.slc_block)
    kls = []
    for r, pos in enumerate(q_pos.tolist()):
        own = pos // params.slc_block
        choosable = [j for j in range(n_slc) if j <= own and j >= params.init_blocks and j <= own - params.local_blocks]
        if not choosable:
            continue
        for h in range(hkv):
            pred = [0.0] * n_slc
            targ = [0.0] * n_slc
            for g in range(group):
                qv = q[r, h * group + g]
                complete = [c for c in range(n_cmp) if c * params.cmp_stride + params.cmp_block - 1 <= pos]
                cmp_p = torch.softmax(torch.stack([qv @ cmp_k[c, h] * scale for c in complete]), 0)
                for c, p in zip(complete, cmp_p.tolist()):
                    for chunk in range(params.cmp_block // params.cmp_stride):
                        block = (c * params.cmp_stride + chunk * params.cmp_stride) // params.slc_block
                        if block < n_slc:
                            pred[block] += p
                full_p = torch.softmax(torch.stack([qv @ k[t, h] * scale for t in range(pos + 1)]), 0)
                for t, p in enumerate(full_p.tolist()):
                    targ[t // params.slc_block] += p
            ps = sum(pred[j] for j in choosable)
            ts = sum(targ[j] for j in choosable)
            kls.append(sum(targ[j] / ts * math.log((targ[j] / ts) / (pred[j] / ps)) for j in choosable if targ[j] > 0))
    return sum(kls) / len(kls)


@pytest.mark.parametrize("group", [1, 3])
def test_alignment_loss_matches_a_loop_written_version(group):
    from research.selection_align import selection_alignment_loss

    torch.manual_seed(group)
    params = _params()
    hkv, d, tk = 2, 8, 53  # odd length: the last selection block is partial
    q_pos = torch.arange(40, tk)
    q = torch.randn(len(q_pos), hkv * group, d, dtype=torch.float64)
    k = torch.randn(tk, hkv, d, dtype=torch.float64)
    n_cmp = (tk - params.cmp_block) // params.cmp_stride + 1
    cmp_k = torch.randn(n_cmp, hkv, d, dtype=torch.float64)
    loss = selection_alignment_loss(q, k, cmp_k, q_pos, params, d ** -0.5)
    assert float(loss) == pytest.approx(_brute_force_kl(q, k, cmp_k, q_pos, params, d ** -0.5), rel=1e-4)
    assert float(loss) > 0
    # rows with nothing to choose (only forced blocks before them) give no loss
    assert selection_alignment_loss(q[:2], k[:9], cmp_k[:1], torch.tensor([7, 8]), params, 0.3) is None


def test_alignment_gradient_reaches_only_the_compressed_keys():
    from research.selection_align import selection_alignment_loss

    torch.manual_seed(0)
    params = _params()
    q = torch.randn(5, 4, 8, requires_grad=True)
    k = torch.randn(45, 2, 8, requires_grad=True)
    cmp_k = torch.randn(10, 2, 8, requires_grad=True)
    selection_alignment_loss(q, k, cmp_k, torch.arange(40, 45), params, 0.35).backward()
    assert q.grad is None and k.grad is None
    assert torch.isfinite(cmp_k.grad).all() and cmp_k.grad.abs().sum() > 0


def test_aligner_batches_packed_sequences_of_different_lengths_exactly():
    """observe() on a packed call of sequences of 53, 61 and 48 tokens (rows 40..47) gives the mean of the
    per-sequence losses computed on each sequence alone with all of its compressed blocks."""
    from nsa_kernels import num_cmp_blocks
    from research.selection_align import SelectionAligner, selection_alignment_loss

    torch.manual_seed(7)
    params = _params()
    hq, hkv, d, lengths = 6, 2, 8, [53, 61, 48]
    n_cmp = [num_cmp_blocks(t, params.cmp_block, params.cmp_stride) for t in lengths]
    q, k = torch.randn(sum(lengths), hq, d, dtype=torch.float64), torch.randn(sum(lengths), hkv, d, dtype=torch.float64)
    cmp_k = torch.randn(sum(n_cmp), hkv, d, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    cu_cmp = torch.tensor([0, *torch.tensor(n_cmp).cumsum(0).tolist()])
    aligner = SelectionAligner(40, 47)
    aligner.observe(q, k, None, cmp_k, None, None, cu, cu, cu_cmp, params, d ** -0.5)
    q_pos = torch.arange(40, 48)
    alone = [selection_alignment_loss(q[cu[b] + 40:cu[b] + 48], k[cu[b]:cu[b] + 48], cmp_k[cu_cmp[b]:cu_cmp[b + 1]],
                                      q_pos, params, d ** -0.5) for b in range(3)]
    assert len(aligner.losses) == 1
    assert float(aligner.loss()) == pytest.approx(float(torch.stack(alone).mean()), rel=1e-10)


def test_training_on_the_alignment_loss_brings_the_attended_block_into_the_selection():
    """Full attention looks at one key in block 3; the compressed keys initially point the selection at
    block 5. Gradient steps on the alignment loss alone (compressed keys free) must make the reference's
    selection choose block 3."""
    from nsa_kernels.reference import nsa_sequence
    from research.selection_align import selection_alignment_loss

    torch.manual_seed(1)
    params = _params(slc_count=3)  # initial block + local block + one chosen by score
    hq, hkv, d, tk = 4, 2, 16, 64
    direction = torch.randn(d)
    q = direction.expand(1, hq, d).clone() + 0.05 * torch.randn(1, hq, d)
    k = 0.3 * torch.randn(tk, hkv, d)
    k[29] = 3.0 * direction  # block 3 holds the key every head attends to
    n_cmp = (tk - params.cmp_block) // params.cmp_stride + 1
    cmp_k = 0.1 * torch.randn(n_cmp, hkv, d)
    cmp_k[10:12] = 2.0 * direction  # compression blocks 10-11 cover selection block 5
    cmp_k.requires_grad_(True)
    q_pos = torch.tensor([tk - 1])
    v = torch.randn(tk, hkv, d)
    gates = torch.full((1, hq, 3), 1 / 3)

    def chosen():
        with torch.no_grad():
            _, blocks = nsa_sequence(q, k, v, cmp_k, torch.zeros_like(cmp_k), gates, params, d ** -0.5,
                                     return_block_indices=True)
        return set(blocks[0].flatten().tolist())

    assert 3 not in chosen() and 5 in chosen()
    opt = torch.optim.Adam([cmp_k], lr=0.05)
    first = None
    for _ in range(150):
        opt.zero_grad()
        loss = selection_alignment_loss(q, k, cmp_k, q_pos, params, d ** -0.5)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert 3 in chosen()


def test_aligner_adds_a_loss_per_layer_without_changing_the_output():
    from research.selection_align import SelectionAligner
    from test_selection_probe import _tiny_nsa

    model = _tiny_nsa(layers=3)
    ids = torch.randint(0, 64, (2, 61))
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits
    with SelectionAligner(40, 55) as aligner:
        logits = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(logits, plain)
    assert len(aligner.losses) == 3  # one per layer, both sequences batched
    aligner.loss().backward()
    for layer in model.model.layers:  # every layer's key compressor learns
        assert layer.self_attn.nsa_cmp_k.down.weight.grad.abs().sum() > 0
    # queries are detached: the last layer's query projection gets nothing (earlier layers' do, through the
    # hidden states that later layers' keys are made from)
    assert model.model.layers[-1].self_attn.q_proj.weight.grad is None
    assert SelectionAligner(3, 4).loss().item() == 0.0  # nothing ran: zero
    with pytest.raises(ValueError, match="first_row <= last_row"):
        SelectionAligner(5, 4)
