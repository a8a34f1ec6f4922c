"""Static-shape decoding: NSAStaticCache through generate(cache_implementation="static") and
StaticGreedyDecoder, on the varlen/reference path and (interpreter) the graph-safe static decode path,
against the dynamic cache and uncached forwards; CUDA-graph replay on the GPU."""
import contextlib
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import nsa_hf.attention as nsa_attention
from nsa_hf import NSAStaticCache, NSAStaticCacheLayer, nsa_backend, static_greedy_generate
from nsa_hf.generation import StaticGreedyDecoder
from nsa_kernels import num_cmp_blocks

from tests.hf.test_hf_generate import full_logits, tiny_model

TOL = dict(atol=5e-5, rtol=1e-5)
cpu_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                     reason="needs TRITON_INTERPRET=1 (Triton kernels on CPU tensors)")


@pytest.fixture
def backend():
    """``backend(decode=..., varlen=...)``: the implementations for the rest of the test (nested
    :func:`nsa_hf.nsa_backend` blocks, the last one innermost, closed at teardown)."""
    with contextlib.ExitStack() as stack:
        yield lambda **choice: stack.enter_context(nsa_backend(**choice))


def left_padded(lengths, vocab=100, device="cpu"):
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, vocab, (n,), device=device)
        mask[i, width - n:] = 1
    return ids, mask


@pytest.fixture
def static_calls(monkeypatch):
    """Count the decode-kernel calls made by the static decode path (query lengths)."""
    calls = []
    original = nsa_attention.try_static_decode

    def counted(query, *args, **kwargs):
        out = original(query, *args, **kwargs)
        if out is not None:
            calls.append(query.shape[2])
        return out

    monkeypatch.setattr(nsa_attention, "try_static_decode", counted)
    return calls


def _generate(model, ids, mask, new, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                          return_dict_in_generate=True, output_logits=True, **kwargs)


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (3, 1)])
def test_generate_static_cache_equals_dynamic_on_the_varlen_path(heads, kv_heads, backend, static_calls):
    backend(decode="off")
    model = tiny_model(heads, kv_heads)
    ids, mask = left_padded([29, 17, 23])
    new = 21  # crosses cmp (4), slc (16) and window (24) boundaries
    dynamic = _generate(model, ids, mask, new)
    static = _generate(model, ids, mask, new, cache_implementation="static")
    assert isinstance(static.past_key_values, NSAStaticCache)
    assert static_calls == []  # decode path off: every step took the varlen path
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits, 1), torch.stack(dynamic.logits, 1), **TOL)


@cpu_interpreter
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (2, 2)])
def test_generate_static_cache_uses_static_decode_path(heads, kv_heads, backend, static_calls):
    backend(decode="off")
    model = tiny_model(heads, kv_heads, layers=1)
    lengths, new = [37, 12, 26], 14
    ids, mask = left_padded(lengths)
    reference = _generate(model, ids, mask, new)
    backend(decode="triton")
    static = _generate(model, ids, mask, new, cache_implementation="static")
    assert static_calls == [1] * (new - 1)
    assert torch.equal(static.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(static.logits, 1), torch.stack(reference.logits, 1), **TOL)
    layer = static.past_key_values.layers[0]
    assert isinstance(layer, NSAStaticCacheLayer) and layer.static_ready
    total = [n + new - 1 for n in lengths]
    assert layer.cmp_len.tolist() == [num_cmp_blocks(n, 8, 4) for n in total]
    assert layer.left_pad.tolist() == [max(lengths) - n for n in lengths]
    # every row's stored compressed tokens equal a fresh compression of its real keys
    for i, n in enumerate(lengths):
        row = torch.cat([ids[i, max(lengths) - n:], static.sequences[i, max(lengths):-1]])[None]
        torch.testing.assert_close(static.logits[-1][i], full_logits(model, row)[0, -1], **TOL)


@pytest.mark.parametrize("decode", ["off", pytest.param("triton", marks=cpu_interpreter)])
def test_static_greedy_decoder_eager_equals_generate(decode, backend, static_calls):
    backend(decode="off")
    model = tiny_model(4, 2, layers=2)
    ids, mask = left_padded([19, 33])
    new = 17
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    backend(decode=decode)
    out = static_greedy_generate(model, ids, mask, max_new_tokens=new, cuda_graph=False)
    assert torch.equal(out, reference)
    assert len(static_calls) == (2 * (new - 1) if decode == "triton" else 0)


def test_static_greedy_decoder_on_a_dense_llama():
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    ids, mask = left_padded([11, 20])
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False)
    decoder = StaticGreedyDecoder(model, ids.shape[1] + 9, cuda_graph=False)
    first = decoder.prefill(ids, mask)
    assert isinstance(decoder.cache, StaticCache) and not isinstance(decoder.cache, NSAStaticCache)
    out = torch.cat([ids, first[:, None], decoder.decode(8)], dim=1)
    assert torch.equal(out, reference)


def test_static_decoding_errors():
    model = tiny_model(4, 2, layers=1)
    ids, mask = left_padded([10, 6])
    right = mask.flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        static_greedy_generate(model, ids, right, max_new_tokens=3, cuda_graph=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        static_greedy_generate(model, ids, mask, max_new_tokens=0)
    decoder = StaticGreedyDecoder(model, ids.shape[1] + 2, cuda_graph=False)
    with pytest.raises(ValueError, match="prefill"):
        decoder.decode(1)
    decoder.prefill(ids, mask)
    with pytest.raises(ValueError, match="fit the cache"):
        decoder.decode(5)
    on_cpu = StaticGreedyDecoder(model, 20, cuda_graph=True)
    on_cpu.prefill(ids, mask)
    with pytest.raises(ValueError, match="cuda_graph=True needs"):
        on_cpu.decode(1)
    with pytest.raises(ValueError, match="max_cache_len"):
        NSAStaticCache(config=model.config, max_cache_len=0)


def test_static_cache_capacity_error_names_the_fix():
    layer = NSAStaticCacheLayer(max_cache_len=32)
    layer.cmp_block, layer.cmp_stride = 8, 4
    with pytest.raises(ValueError, match="larger max_cache_len"):
        layer.ensure_capacity(layer.static_capacity() + 1, 1, 1, 4, 4, torch.float32, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decoding_equals_eager(dtype, static_calls):
    # One step captured and replayed: same tokens as the eager static loop (same kernels), and, in fp32,
    # as generate() on the dynamic cache.
    model = tiny_model(8, 2, layers=2).to("cuda", dtype)
    ids, mask = left_padded([70, 23, 41], device="cuda")
    new = 40
    eager = static_greedy_generate(model, ids, mask, max_new_tokens=new, cuda_graph=False)
    static_calls.clear()
    decoder = StaticGreedyDecoder(model, ids.shape[1] + new, cuda_graph=True)
    first = decoder.prefill(ids, mask)
    graph = torch.cat([ids, first[:, None], decoder.decode(new - 1)], dim=1)
    assert decoder.graph is not None
    assert len(static_calls) == 2 * (decoder.warmup_steps + 1)  # eager warm-up steps + the capture
    assert torch.equal(graph, eager)
    if dtype == torch.float32:
        assert torch.equal(graph, model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False))


def test_plain_static_cache_without_mask_equals_uncached():
    """A plain transformers StaticCache (no compressed state) and no padding mask, as in transformers' export
    recipes: a prefill (varlen path on the written positions) then steps of 3 and 7 tokens (graph-safe decode
    steps recompressing the dense keys) give the uncached forward's logits."""
    model = tiny_model(4, 2, layers=2)
    ids = torch.randint(3, 100, (2, 30))
    cache = StaticCache(config=model.config, max_cache_len=40)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        for start, end in ((0, 20), (20, 23), (23, 30)):
            out = model(ids[:, start:end], past_key_values=cache, use_cache=True).logits
            torch.testing.assert_close(out, full[:, start:end], **TOL)
