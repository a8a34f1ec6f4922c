"""generate() through the Triton decode kernels (nsa_kernels.decode, run by the interpreter on CPU):
with the decode path forced on, cached decoding equals the varlen/reference path and uncached forwards
across block boundaries, GQA groups, left padding, multi-token steps, beam search and cache edits; each
test also checks that the decode kernels were actually called."""
import contextlib
import os

import pytest
import torch

import nsa_hf.decoding as nsa_decoding
from nsa_hf import NSACache, nsa_backend
from nsa_kernels import num_cmp_blocks

from tests.hf.test_hf_generate import full_logits, tiny_model

TOL = dict(atol=5e-5, rtol=1e-5)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The tiny CPU models below force the decode kernels onto CPU tensors: that needs the interpreter. On a
# CUDA machine (no TRITON_INTERPRET) those tests are skipped; the `gpu` test covers the CUDA path.
cpu_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                     reason="needs TRITON_INTERPRET=1 (Triton kernels on CPU tensors)")


@pytest.fixture
def backend():
    """``backend(decode=..., varlen=...)``: the implementations for the rest of the test (nested
    :func:`nsa_hf.nsa_backend` blocks, the last one innermost, closed at teardown)."""
    with contextlib.ExitStack() as stack:
        yield lambda **choice: stack.enter_context(nsa_backend(**choice))


def positions(mask):
    """Position ids of left-padded rows, as generate() makes them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.fixture
def decode_calls(monkeypatch, backend):
    """Force the decode path and count its kernel calls (query lengths, one entry per layer call)."""
    calls = []
    original = nsa_decoding._nsa_decode

    def counted(q, *args, **kwargs):
        calls.append(q.shape[1])
        return original(q, *args, **kwargs)

    monkeypatch.setattr(nsa_decoding, "_nsa_decode", counted)
    backend(decode="triton")
    return calls


def _generate(model, ids, decode, backend, **kwargs):
    backend(decode="triton" if decode else "off")
    out = model.generate(ids, do_sample=False, return_dict_in_generate=True, output_logits=True, **kwargs)
    backend(decode="triton")
    return out


@cpu_interpreter
@pytest.mark.parametrize("heads, kv_heads, prompt", [(2, 2, 33), (4, 2, 40), (4, 1, 31), (6, 2, 45)])
def test_greedy_decode_kernels_equal_reference_and_uncached(heads, kv_heads, prompt, decode_calls, backend):
    # prompt + 18 tokens crosses cmp (stride 4) and slc (16) boundaries and the window (24); from
    # position 48 one selection block is chosen by score (n=4: 1 initial + 2 local forced).
    model = tiny_model(heads, kv_heads, layers=1)
    ids = torch.randint(3, 100, (1, prompt))
    new = 18
    fast = _generate(model, ids, True, backend, max_new_tokens=new)
    assert decode_calls == [1] * (new - 1)  # every step after the prefill, one layer
    slow = _generate(model, ids, False, backend, max_new_tokens=new)
    assert torch.equal(fast.sequences, slow.sequences)
    fast_logits = torch.stack(fast.logits, dim=1)[0]
    torch.testing.assert_close(fast_logits, torch.stack(slow.logits, dim=1)[0], **TOL)
    torch.testing.assert_close(fast_logits, full_logits(model, fast.sequences)[0, prompt - 1:-1], **TOL)
    layer = fast.past_key_values.layers[0]
    assert layer.compressed_length() == [num_cmp_blocks(prompt + new - 1, 8, 4)]
    assert layer.cmp_len.tolist() == layer.compressed_length()


@cpu_interpreter
def test_left_padded_batch_decode_equals_reference(decode_calls, backend):
    model = tiny_model(2, 1, layers=1)
    prompts = [torch.randint(3, 100, (n,)) for n in (37, 12, 26)]
    length = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):], mask[i, length - len(p):] = p, 1
    new = 14
    fast = _generate(model, ids, True, backend, attention_mask=mask, max_new_tokens=new)
    assert decode_calls == [1] * (new - 1)
    slow = _generate(model, ids, False, backend, attention_mask=mask, max_new_tokens=new)
    assert torch.equal(fast.sequences, slow.sequences)
    torch.testing.assert_close(torch.stack(fast.logits, dim=1), torch.stack(slow.logits, dim=1), **TOL)
    for i, p in enumerate(prompts):  # each row on its own, uncached
        row = torch.cat([p, fast.sequences[i, length:]])[None]
        torch.testing.assert_close(torch.stack(fast.logits, dim=1)[i], full_logits(model, row)[0, len(p) - 1:-1],
                                   **TOL)
    total = [len(p) + new - 1 for p in prompts]
    assert fast.past_key_values.layers[0].compressed_length() == [num_cmp_blocks(n, 8, 4) for n in total]


@cpu_interpreter
def test_multi_token_steps_on_a_cache(decode_calls):
    # Chunks of Q = 3, 1, 5, 16 query tokens on an unpadded cache, then Q = 3, 2 on a left-padded batch.
    model = tiny_model(4, 2, layers=1)
    ids = torch.randint(3, 100, (2, 55))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # row 1: 7 padding positions, then real tokens
    for use_mask, cuts, queries in ((False, [30, 33, 34, 39, 55], [3, 1, 5, 16]), (True, [40, 43, 45], [3, 2])):
        decode_calls.clear()
        batch = 2 if use_mask else 1
        cache = NSACache(config=model.config)
        pieces = []
        with torch.no_grad():
            for a, b in zip([0] + cuts[:-1], cuts):
                kw = dict(attention_mask=mask[:, :b], position_ids=positions(mask)[:, a:b]) if use_mask else {}
                pieces.append(model(ids[:batch, a:b], past_key_values=cache, use_cache=True, **kw).logits)
        assert decode_calls == queries  # the prefill takes the varlen path
        logits = torch.cat(pieces, dim=1)
        if use_mask:
            torch.testing.assert_close(logits[0], full_logits(model, ids[:1, :45])[0], **TOL)
            torch.testing.assert_close(logits[1, 7:], full_logits(model, ids[1:, 7:45])[0], **TOL)
        else:
            torch.testing.assert_close(logits, full_logits(model, ids[:1]), **TOL)


@cpu_interpreter
def test_prompt_lookup_decoding_equals_greedy(decode_calls, backend):
    # Candidate chunks of up to 4 tokens are verified with the decode kernels, rejected ones cropped.
    model = tiny_model(4, 2, layers=1)
    prompt = torch.randint(3, 20, (1, 27))  # a small alphabet: n-gram lookups find candidates
    greedy = _generate(model, prompt, False, backend, max_new_tokens=16).sequences
    decode_calls.clear()
    backend(decode="triton")
    lookup = model.generate(prompt, max_new_tokens=16, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(lookup, greedy)
    assert decode_calls and max(decode_calls) > 1


@cpu_interpreter
def test_beam_search_decode_equals_reference(decode_calls, backend):
    model = tiny_model(2, 1, layers=1)
    prompt = torch.randint(3, 100, (1, 30))
    kwargs = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, output_scores=True)
    fast = _generate(model, prompt, True, backend, **kwargs)
    assert len(decode_calls) == 7
    slow = _generate(model, prompt, False, backend, **kwargs)
    assert torch.equal(fast.sequences, slow.sequences)
    torch.testing.assert_close(fast.sequences_scores, slow.sequences_scores, atol=1e-4, rtol=1e-4)


@cpu_interpreter
def test_compressed_state_in_decode_steps(decode_calls):
    # Blocks appear exactly when they complete, the past is never rewritten, capacity grows by doubling.
    model = tiny_model(2, 1, layers=1)
    ids = torch.randint(3, 100, (1, 44))
    cache = NSACache(config=model.config)
    with torch.no_grad():
        model(ids[:, :9], past_key_values=cache, use_cache=True)
        layer = cache.layers[0]
        previous, capacities = layer.cmp_k[0, :, : layer.cmp_counts[0]].clone(), set()
        for t in range(9, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            n = num_cmp_blocks(t + 1, 8, 4)
            assert layer.compressed_length() == [n] and layer.cmp_len.tolist() == [n]
            assert torch.equal(layer.cmp_k[0, :, : previous.shape[1]], previous)
            previous = layer.cmp_k[0, :, :n].clone()
            capacities.add(layer.capacity)
    assert len(decode_calls) == ids.shape[1] - 9
    assert capacities == {16}  # 10 blocks + 1 candidate: the initial capacity, no regrowth per step
    torch.testing.assert_close(out.logits[0, -1], full_logits(model, ids)[0, -1], **TOL)


@cpu_interpreter
def test_fallbacks_to_the_varlen_path(decode_calls):
    model = tiny_model(4, 2, layers=1)
    ids = torch.randint(3, 100, (2, 40))
    # 1. Stale state (a recorded mask that no longer matches): rebuilt by the varlen path.
    cache = NSACache(config=model.config)
    with torch.no_grad():
        model(ids[:, :30], past_key_values=cache, use_cache=True)
        layer = cache.layers[0]
        layer.cmp_k.add_(1.0)
        layer.valid = torch.zeros_like(layer.valid)
        logits = model(ids[:, 30:33], past_key_values=cache, use_cache=True).logits
        assert decode_calls == []
        torch.testing.assert_close(logits, full_logits(model, ids[:, :33])[:, 30:], **TOL)
        logits = model(ids[:, 33:34], past_key_values=cache, use_cache=True).logits  # state rebuilt: decode
        assert decode_calls == [1]
        torch.testing.assert_close(logits, full_logits(model, ids[:, :34])[:, 33:], **TOL)
    # 2. Right padding (not what generate() makes): varlen path, padded queries are zeros.
    decode_calls.clear()
    mask = torch.ones_like(ids)
    mask[1, 36:] = 0
    cache = NSACache(config=model.config)
    with torch.no_grad():
        model(ids[:, :32], attention_mask=mask[:, :32], past_key_values=cache, use_cache=True)
        logits = model(ids[:, 32:], attention_mask=mask, past_key_values=cache, use_cache=True).logits
    assert decode_calls == []
    torch.testing.assert_close(logits[0], full_logits(model, ids[:1])[0, 32:], **TOL)
    torch.testing.assert_close(logits[1, :4], full_logits(model, ids[1:, :36])[0, 32:], **TOL)
    # 3. A row with fewer real tokens than the step's queries: varlen path (padded queries).
    cache = NSACache(config=model.config)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :10] = 0
    with torch.no_grad():
        model(ids[:, :8], attention_mask=mask[:, :8], position_ids=positions(mask)[:, :8], past_key_values=cache,
              use_cache=True)
        logits = model(ids[:, 8:12], attention_mask=mask, position_ids=positions(mask)[:, 8:], past_key_values=cache,
                       use_cache=True).logits
    assert decode_calls == []
    torch.testing.assert_close(logits[0], full_logits(model, ids[:1, :12])[0, 8:], **TOL)
    torch.testing.assert_close(logits[1, 2:], full_logits(model, ids[1:, 10:12])[0], **TOL)


def test_decode_kernel_cmp_cache_exactly_full():
    # Regression: with exactly Sc = num_cmp_blocks(k_len) compressed slots and Sc a multiple of the cmp
    # split size, the last selection block is fed by a split that starts at Sc (its R-1 look-back).
    from nsa_kernels import NSAParams
    from nsa_kernels.decode import nsa_decode
    from nsa_kernels.reference import nsa_sequence

    params = NSAParams(cmp_block=8, cmp_stride=4, slc_block=16, slc_count=4, init_blocks=1, local_blocks=2, window=24)
    for length in (68, 132, 260):  # 16, 32 and 64 compressed tokens (split sizes: 16 on CPU, 64 on GPU)
        n = num_cmp_blocks(length, 8, 4)
        rand = lambda *shape: torch.randn(*shape, device=DEVICE)  # noqa: E731
        q, k, v, ck, cv = rand(1, 1, 3, 16), rand(1, 1, length, 16), rand(1, 1, length, 16), rand(1, 1, n, 16), rand(1, 1, n, 16)
        gates = torch.rand(1, 1, 3, 3, device=DEVICE)
        lens = lambda x: torch.tensor([x], dtype=torch.int32, device=DEVICE)  # noqa: E731
        out = nsa_decode(q, k, v, ck, cv, gates, lens(0), lens(length), lens(0), lens(n), params)
        t = lambda x: x[0].transpose(0, 1)  # noqa: E731
        expect = nsa_sequence(q[0], t(k), t(v), t(ck), t(cv), gates[0], params, 16 ** -0.5)
        torch.testing.assert_close(out[0], expect, atol=1e-5, rtol=1e-5)


def test_bench_generate_tiny_smoke(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gen.md"
    variants = ["nsa", "nsa-dynamic", "sdpa", "sdpa-static"]
    rows = bench.main(["--tiny", "--layers", "1", "--new-tokens", "3", "--configs", "1x40", "--out", str(out),
                       "--variants", ",".join(variants)])
    assert [r["variant"] for r in rows] == variants
    assert all("error" not in r for r in rows)
    text = out.read_text()
    for variant in variants:
        assert f"| 1x40 | {variant} |" in text


def selection_margins(model, rows):
    """Where block selection is a near-tie: for each sequence of token ids in ``rows`` (1-D, no padding) a
    ``(layers, T)`` float64 tensor, at every position the smallest relative gap, over KV heads, between the
    last block chosen by score and the best one left out (``inf`` where no block is chosen by score), from a
    float64 CPU copy of ``model`` run uncached through the reference. Where the gap is below the rounding
    error of the scores, two correct implementations may choose different blocks."""
    import copy

    import nsa_kernels.reference as ref

    reference, select, found = copy.deepcopy(model).to("cpu", torch.float64), ref.select_blocks, []

    def spy(scores, q_pos, params):
        eligible, forced = ref.selection_block_masks(q_pos, scores.shape[-1], params)
        need = (params.slc_count - forced.sum(-1)).clamp(0, scores.shape[-1])[None, :, None]
        need = need.expand(scores.shape[0], -1, 1)  # blocks chosen by score
        ranked = scores.masked_fill(forced | ~eligible, float("-inf")).sort(-1, descending=True).values
        ranked = torch.cat([ranked, torch.full_like(ranked[..., :1], float("-inf"))], -1)
        last, left_out = ranked.gather(-1, (need - 1).clamp(min=0)), ranked.gather(-1, need)
        contest = (need > 0) & (left_out > float("-inf")) & (last > 0)
        found.append(torch.where(contest, (last - left_out) / last, torch.inf)[..., 0].amin(0))
        return select(scores, q_pos, params)

    margins = []
    ref.select_blocks = spy
    try:
        with nsa_backend(varlen="reference"), torch.no_grad():
            for row in rows:
                found.clear()
                reference(row.cpu()[None], use_cache=False)
                assert len(found) == reference.config.num_hidden_layers  # one call per layer
                margins.append(torch.stack(found))
    finally:
        ref.select_blocks = select
    return margins


def near_tie_steps(model, ids, lengths, steps, tie_tol=1e-4):
    """``(rows, steps)`` bool: the teacher-forced steps of the test below whose block choice is a near-tie
    (:func:`selection_margins` at most ``tie_tol``). A tie in the last layer changes that step's logits
    only; one in an earlier layer reaches later steps too (through the keys/values above it), so the rest
    of the row counts as tied."""
    tied = torch.zeros(len(lengths), steps, dtype=torch.bool)
    width = max(lengths)
    rows = [ids[i, width - n:width - 1 + steps] for i, n in enumerate(lengths)]
    for i, (n, margin) in enumerate(zip(lengths, selection_margins(model, rows))):
        near = margin[:, n - 1:] <= tie_tol  # (layers, steps): step s scores the token at position n - 1 + s
        tied[i] = near.any(0) | (near[:-1].any(0).cumsum(0) > 0)
    return tied


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-3), (torch.bfloat16, 5e-2)])
def test_cuda_auto_uses_decode_kernels_and_matches_varlen(dtype, tol, monkeypatch, backend):
    # On CUDA the default ("auto") takes the decode path; teacher-forced steps (same tokens in both
    # modes) on a left-padded batch match the varlen training kernels.
    calls = []
    original = nsa_decoding._nsa_decode
    monkeypatch.setattr(nsa_decoding, "_nsa_decode", lambda q, *a, **k: (calls.append(q.shape[1]), original(q, *a, **k))[1])
    model = tiny_model(8, 2, layers=2).to("cuda", dtype)
    lengths, new = (70, 23, 41), 45
    ids = torch.randint(3, 100, (3, max(lengths) + new), device="cuda")
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, max(lengths) - n:] = 1
    pos = positions(mask)
    runs = {}
    for mode in ("auto", "off"):
        backend(decode=mode)
        calls.clear()
        cache, steps, start = NSACache(config=model.config), [], max(lengths)
        with torch.no_grad():
            steps.append(model(ids[:, :start], attention_mask=mask[:, :start], position_ids=pos[:, :start],
                               past_key_values=cache, use_cache=True).logits[:, -1:])
            t = start
            for q in [1] * 20 + [3, 1, 4, 1, 5] + [1] * 7:
                steps.append(model(ids[:, t:t + q], attention_mask=mask[:, :t + q], position_ids=pos[:, t:t + q],
                                   past_key_values=cache, use_cache=True).logits)
                t += q
        runs[mode] = (torch.cat(steps, dim=1).float(), list(calls))
    assert len(runs["auto"][1]) == 2 * 32 and runs["off"][1] == []
    fast, slow = runs["auto"][0], runs["off"][0]
    if dtype == torch.float32:  # equal, except at steps whose block choice is a float64 near-tie (rare)
        tied = near_tie_steps(model, ids, lengths, fast.shape[1]).to(fast.device)
        assert tied.float().mean() < 0.5, tied.nonzero().tolist()  # still compares most steps
        torch.testing.assert_close(fast[~tied], slow[~tied], atol=tol, rtol=tol)
    else:  # bf16 rounding may flip a near-tie block choice: allow rare outliers
        off = (fast - slow).abs() > tol * (1 + slow.abs())
        assert off.float().mean() < 0.01, float(off.float().mean())
