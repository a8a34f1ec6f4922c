"""research/selection_probe.py: the blocks an NSA model chose at a few query rows, and how often they
hold the source of the token to copy."""

import pytest
import torch


def _tiny_nsa(layers=2):
    from nsa_hf import NSALlamaConfig, NSALlamaForCausalLM

    config = NSALlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, nsa_cmp_block=8, nsa_cmp_stride=4,
                            nsa_slc_block=8, nsa_slc_count=3, nsa_init_blocks=1, nsa_local_blocks=1, nsa_window=8)
    model = NSALlamaForCausalLM(config).eval()
    with torch.no_grad():  # a compressor far from its initialisation, so the scores are not near ties
        for layer in model.model.layers:
            layer.self_attn.nsa_cmp_k.down.weight.normal_(std=0.3)
    return model


def test_recorded_rows_match_the_full_sequence_selection():
    """The recorder cuts each sequence's keys after the last row and lets the reference choose for the rows
    as its last queries: the choice must equal the reference run on the whole sequence (all queries),
    layer by layer and sequence by sequence, odd lengths, with the rows in the middle."""
    import nsa_hf.attention as nsa_attention
    from nsa_kernels.reference import nsa_sequence
    from research.selection_probe import SelectionRecorder

    model = _tiny_nsa(layers=3)
    calls = []
    original = nsa_attention._nsa_varlen

    def keep(*a):
        calls.append([x.detach().clone() if torch.is_tensor(x) else x for x in a])
        return original(*a)

    ids = torch.randint(0, 64, (2, 77))
    first, last = 41, 58
    nsa_attention._nsa_varlen = keep
    try:
        with SelectionRecorder(first, last) as rec, torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        nsa_attention._nsa_varlen = original
    assert nsa_attention._nsa_varlen is original
    assert len(rec.layers) == len(calls) == 3
    for blocks, (q, k, v, cmp_k, cmp_v, g, cu_q, cu_k, cu_c, params, scale, *_) in zip(rec.layers, calls):
        assert blocks.shape == (2, last - first + 1, 2, 3)
        for b in range(2):
            s = slice(int(cu_q[b]), int(cu_q[b + 1]))
            c = slice(int(cu_c[b]), int(cu_c[b + 1]))
            _, full = nsa_sequence(q[s], k[s], v[s], cmp_k[c], cmp_v[c], g[s], params,
                                   scale or q.shape[-1] ** -0.5, return_block_indices=True)
            assert torch.equal(blocks[b], full[first : last + 1])
    # the gates at the rows, per layer: those the layer passed to the kernel, (sequences, rows, heads, 3)
    assert len(rec.gates) == 3
    for row_gates, (q, k, v, cmp_k, cmp_v, g, cu_q, *_) in zip(rec.gates, calls):
        assert row_gates.shape == (2, last - first + 1, 4, 3)
        for b in range(2):
            assert torch.equal(row_gates[b], g[int(cu_q[b]) + first : int(cu_q[b]) + last + 1].float())
    rec.clear()
    assert rec.layers == [] and rec.gates == []


def test_recorder_rejects_rows_outside_the_sequence():
    from research.selection_probe import SelectionRecorder

    model = _tiny_nsa(layers=1)
    with pytest.raises(ValueError, match="row 30 is past"), SelectionRecorder(10, 30), torch.no_grad():
        model(input_ids=torch.randint(0, 64, (1, 20)), use_cache=False)
    with pytest.raises(ValueError, match="first_row <= last_row"):
        SelectionRecorder(5, 4)


def test_source_coverage_counts_hits_by_layer_and_by_right_or_wrong():
    from research.selection_probe import source_coverage, source_hits

    slc = 8
    # 2 layers, 1 sequence, 3 answer rows, 1 KV head, 2 blocks each; sources in blocks 2, 3, 5
    source = torch.tensor([[17, 24, 40]])
    layer0 = torch.tensor([[[[0, 2]], [[0, 2]], [[0, 2]]]])  # has block 2 only: row 0
    layer1 = torch.tensor([[[[2, 3]], [[3, 4]], [[-1, 4]]]])  # rows 0 and 1
    hits = source_hits([layer0, layer1], source, slc)
    assert hits.tolist() == [[[True, False, False]], [[True, True, False]]]
    right = torch.tensor([[True, True, False]])
    cov = source_coverage(hits, right)
    assert cov["per_layer"] == [pytest.approx(1 / 3, abs=1e-4), pytest.approx(2 / 3, abs=1e-4)]
    assert cov["best_layer"] == 1 and cov["tokens"] == 3 and cov["wrong_tokens"] == 1
    assert cov["any_layer"] == pytest.approx(2 / 3, abs=1e-4)
    assert (cov["any_layer_right"], cov["any_layer_wrong"]) == (1.0, 0.0)
    assert (cov["best_layer_right"], cov["best_layer_wrong"]) == (1.0, 0.0)
    assert (cov["per_layer_missed"], cov["per_layer_missed_wrong"]) == ([2, 1], [1, 1])  # row 2: missed by layer 1, wrong
    right_but_missed = source_coverage(hits, torch.tensor([[True, False, True]]))
    best = right_but_missed["best_layer"]
    assert (right_but_missed["per_layer_missed"][best], right_but_missed["per_layer_missed_wrong"][best]) == (1, 0)
    assert source_coverage(hits, torch.ones_like(right))["any_layer_wrong"] is None


def test_error_kinds_classifies_each_wrong_token_once():
    from research.selection_probe import error_kinds

    # one probe: filler 100..139, target passage at 10 (prefix 2, answer 4: tokens 202..205 copied at 40..43)
    ids = torch.arange(100, 144)[None].clone()
    ids[0, 10:16] = torch.tensor([200, 201, 202, 203, 204, 205])
    ids[0, 20] = 300  # a distractor's token
    answer_pos = torch.arange(40, 44)
    answers = torch.tensor([[202, 203, 204, 205]])
    ids[0, 40:44] = answers[0]
    assert error_kinds(answers.clone(), answers, ids, 10, 2, answer_pos) == dict.fromkeys(
        ("target_adjacent", "target_other", "in_context", "not_in_context"), 0)
    # 203 instead of 202 (next token), 200 instead of 203 (3 back), 300 (the distractor), 999 (nowhere)
    pred = torch.tensor([[203, 200, 300, 999]])
    assert error_kinds(pred, answers, ids, 10, 2, answer_pos) == {
        "target_adjacent": 1, "target_other": 1, "in_context": 1, "not_in_context": 1}
    # a token of the probe only after the answer row is not "in context"
    ids[0, 42] = 777
    assert error_kinds(torch.tensor([[202, 777, 204, 205]]), answers, ids, 10, 2, answer_pos)["not_in_context"] == 1


def test_gate_means_split_by_right_and_wrong():
    from research.selection_probe import gate_means

    g0 = torch.zeros(2, 3, 2, 3)
    g0[0, 0] = 1.0  # the only wrong token's gates (sequence 0, row 0): all ones
    right = torch.ones(2, 3, dtype=torch.bool)
    right[0, 0] = False
    out = gate_means([g0, g0 + 0.5], right)
    assert out["wrong"] == [[[1.0] * 3] * 2, [[1.5] * 3] * 2]
    assert out["right"] == [[[0.0] * 3] * 2, [[0.5] * 3] * 2]
    assert gate_means([g0], torch.ones(2, 3, dtype=torch.bool))["wrong"] is None
