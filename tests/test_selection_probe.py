"""examples/selection_probe.py: the blocks an NSA model chose at a few query rows, and how often they
hold the source of the token to copy."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


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
    from selection_probe import SelectionRecorder

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
    rec.clear()
    assert rec.layers == []


def test_recorder_rejects_rows_outside_the_sequence():
    from selection_probe import SelectionRecorder

    model = _tiny_nsa(layers=1)
    with pytest.raises(ValueError, match="row 30 is past"), SelectionRecorder(10, 30), torch.no_grad():
        model(input_ids=torch.randint(0, 64, (1, 20)), use_cache=False)
    with pytest.raises(ValueError, match="first_row <= last_row"):
        SelectionRecorder(5, 4)


def test_source_coverage_counts_hits_by_layer_and_by_right_or_wrong():
    from selection_probe import source_coverage, source_hits

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
