"""generate() with NSA-Llama and the NSA cache: cached decoding equals uncached forwards across
compression/selection block boundaries, padding, sampling, beam search, cache reuse and cache edits."""
import pytest
import torch

from nsa_hf import NSACache, NSACacheLayer, NSALlamaConfig, NSALlamaForCausalLM
from nsa_kernels import num_cmp_blocks
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

SMALL_NSA = dict(nsa_cmp_block=8, nsa_cmp_stride=4, nsa_slc_block=16, nsa_slc_count=4, nsa_init_blocks=1,
                 nsa_local_blocks=2, nsa_window=24)


def tiny_model(heads=4, kv_heads=2, layers=2):
    cfg = NSALlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
                         max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=None, **SMALL_NSA)
    model = NSALlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # gates that vary per token and head, compressors that are not mean pooling
        for name, param in model.named_parameters():
            if ".nsa_" in name:
                param.add_(torch.randn_like(param) * 0.3)
    return model


def full_logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 1)])
def test_cached_greedy_equals_uncached_forward_every_step(heads, kv_heads):
    model = tiny_model(heads, kv_heads)
    prompt = torch.randint(3, 100, (1, 23))  # odd length; 23 + 45 crosses many cmp (4) / slc (16) boundaries
    out = model.generate(prompt, max_new_tokens=45, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    assert isinstance(out.past_key_values, NSACache)
    seq = out.sequences
    assert seq.shape[1] == 23 + 45
    steps = torch.stack(out.logits, dim=1)[0]
    reference = full_logits(model, seq)[0, 22:-1]
    torch.testing.assert_close(steps, reference, atol=5e-5, rtol=1e-5)
    # Greedy tokens are the argmax of the uncached logits.
    assert torch.equal(seq[0, 23:], reference.argmax(-1))


def test_left_padded_batch_generate_equals_per_sequence():
    model = tiny_model()
    prompts = [torch.randint(3, 100, (n,)) for n in (29, 11, 20)]
    length = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):], mask[i, length - len(p):] = p, 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                           return_dict_in_generate=True, output_logits=True)
    batch_logits = torch.stack(batch.logits, dim=1)
    for i, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=30, do_sample=False, return_dict_in_generate=True,
                                output_logits=True)
        assert torch.equal(batch.sequences[i, length:], single.sequences[0, len(p):])
        torch.testing.assert_close(batch_logits[i], torch.stack(single.logits, dim=1)[0], atol=5e-5, rtol=1e-5)
    # Each row's compressed state covers its own real tokens only.
    total = [len(p) + 30 - 1 for p in prompts]  # the last generated token is never fed back
    assert batch.past_key_values.layers[0].compressed_length() == [num_cmp_blocks(n, 8, 4) for n in total]


def test_sampling_with_cache_equals_sampling_without():
    model = tiny_model()
    prompt = torch.randint(3, 100, (2, 17))
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(1234)
        runs.append(model.generate(prompt, max_new_tokens=25, do_sample=True, top_k=20, temperature=1.3,
                                   use_cache=use_cache))
    assert torch.equal(runs[0], runs[1])


def test_beam_search_with_cache_equals_without():
    # Beam search reorders the cache every step (reorder_cache); a wrong reorder of the compressed
    # state changes the beams.
    model = tiny_model()
    prompt = torch.randint(3, 100, (2, 13))
    kwargs = dict(max_new_tokens=22, num_beams=3, num_return_sequences=2, do_sample=False,
                  return_dict_in_generate=True, output_scores=True)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-4, rtol=1e-4)


def test_past_key_values_reused_across_generate_calls():
    model = tiny_model()
    prompt = torch.randint(3, 100, (1, 19))
    first = model.generate(prompt, max_new_tokens=14, do_sample=False, return_dict_in_generate=True)
    cache = first.past_key_values
    assert isinstance(cache, NSACache) and cache.get_seq_length() == 19 + 14 - 1
    follow_up = torch.cat([first.sequences, torch.randint(3, 100, (1, 5))], dim=1)
    from nsa_hf.modeling_nsa import CACHE_NAME  # generate()'s cache keyword: "cache" from transformers 5.24

    continued = model.generate(follow_up, max_new_tokens=20, do_sample=False, **{CACHE_NAME: cache})
    fresh = model.generate(follow_up, max_new_tokens=20, do_sample=False)
    assert torch.equal(continued, fresh)
    assert cache.layers[1].compressed_length() == [num_cmp_blocks(continued.shape[1] - 1, 8, 4)]


def test_compressed_cache_grows_exactly_when_blocks_complete():
    model = tiny_model()
    calls = []
    attn = model.model.layers[0].self_attn
    hook = attn.nsa_cmp_k.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    ids = torch.randint(3, 100, (1, 60))
    cache = NSACache(config=model.config)
    prompt = 11
    with torch.no_grad():
        model(ids[:, :prompt], past_key_values=cache, use_cache=True)
        layer = cache.layers[0]
        assert isinstance(layer, NSACacheLayer)
        assert calls == [num_cmp_blocks(prompt, 8, 4)]
        previous = layer.cmp_keys[0].clone()
        for t in range(prompt, ids.shape[1]):
            calls.clear()
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            expected = num_cmp_blocks(t + 1, 8, 4)
            new_blocks = expected - num_cmp_blocks(t, 8, 4)
            assert layer.compressed_length() == [expected]
            assert calls == ([new_blocks] if new_blocks else [])  # only the block that just completed
            assert torch.equal(layer.cmp_keys[0][: previous.shape[0]], previous)  # the past is never recompressed
            previous = layer.cmp_keys[0].clone()
    hook.remove()
    torch.testing.assert_close(out.logits[0, -1], full_logits(model, ids)[0, -1], atol=5e-5, rtol=1e-5)


def _feed(model, cache, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits


def test_crop_then_continue_equals_uncached():
    model = tiny_model()
    ids = torch.randint(3, 100, (1, 50))
    cache = NSACache(config=model.config)
    _feed(model, cache, ids[:, :45])
    cache.crop(-9)  # back to 36 tokens: blocks completed by tokens 37..45 are dropped
    assert cache.get_seq_length() == 36
    assert cache.layers[0].compressed_length() == [num_cmp_blocks(36, 8, 4)]
    logits = _feed(model, cache, ids[:, 36:])
    torch.testing.assert_close(logits[0], full_logits(model, ids)[0, 36:], atol=5e-5, rtol=1e-5)


def test_reorder_select_repeat_keep_rows_consistent():
    model = tiny_model()
    ids = torch.randint(3, 100, (3, 40))
    cache = NSACache(config=model.config)
    _feed(model, cache, ids[:, :33])
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    logits = _feed(model, cache, ids[[2, 0, 1], 33:])
    torch.testing.assert_close(logits, full_logits(model, ids[[2, 0, 1]])[:, 33:], atol=5e-5, rtol=1e-5)

    cache = NSACache(config=model.config)
    _feed(model, cache, ids[:, :33])
    cache.batch_select_indices(torch.tensor([1]))
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].compressed_length() == [num_cmp_blocks(33, 8, 4)] * 2
    logits = _feed(model, cache, ids[[1, 1], 33:])
    torch.testing.assert_close(logits[1], full_logits(model, ids[1:2])[0, 33:], atol=5e-5, rtol=1e-5)

    cache.reset()  # (transformers 5.17 zeroes the dense keys in place, 5.23 drops them)
    assert cache.layers[0].compressed_length() == [] and cache.layers[0].valid is None


def test_stale_compressed_state_is_rebuilt():
    # A cache whose rows no longer match the compressed state (here: a mask that changes the past)
    # must not be used blindly: the backend rebuilds the state from the dense keys.
    model = tiny_model()
    ids = torch.randint(3, 100, (1, 40))
    cache = NSACache(config=model.config)
    _feed(model, cache, ids[:, :30])
    layer = cache.layers[0]
    layer.cmp_k.add_(1.0)  # corrupt, then change the recorded validity
    layer.valid = torch.zeros_like(layer.valid)
    logits = _feed(model, cache, ids[:, 30:])
    torch.testing.assert_close(logits[0], full_logits(model, ids)[0, 30:], atol=5e-5, rtol=1e-5)


def test_stock_llama_fallback_generate_equals_uncached():
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, eos_token_id=None, **SMALL_NSA)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="nsa").eval()
    prompt = torch.randint(3, 100, (1, 21))
    out = model.generate(prompt, max_new_tokens=40, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    assert type(out.past_key_values) is DynamicCache  # the fallback recompresses from the dense cache
    steps = torch.stack(out.logits, dim=1)[0]
    torch.testing.assert_close(steps, full_logits(model, out.sequences)[0, 20:-1], atol=5e-5, rtol=1e-5)


def test_cache_built_from_dense_data_continues_correctly():
    model = tiny_model()
    ids = torch.randint(3, 100, (2, 44))
    dense = DynamicCache()
    with torch.no_grad():
        model(ids[:, :37], past_key_values=dense, use_cache=True)
    cache = NSACache([(layer.keys, layer.values) for layer in dense.layers])
    assert cache.get_seq_length() == 37 and cache.layers[0].compressed_length() == []
    logits = _feed(model, cache, ids[:, 37:])  # compressed state built from the dense keys
    assert cache.layers[0].compressed_length() == [num_cmp_blocks(44, 8, 4)] * 2
    torch.testing.assert_close(logits, full_logits(model, ids)[:, 37:], atol=5e-5, rtol=1e-5)


def test_assisted_and_prompt_lookup_decoding_equal_greedy(monkeypatch):
    # Both verify candidate tokens and crop the rejected ones off the cache (NSACacheLayer.crop).
    crops = []
    original = NSACacheLayer.crop
    monkeypatch.setattr(NSACacheLayer, "crop", lambda self, n: (crops.append(n), original(self, n))[1])
    model, assistant = tiny_model(), tiny_model(layers=1)
    prompt = torch.randint(3, 100, (1, 21))
    greedy = model.generate(prompt, max_new_tokens=40, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=40, do_sample=False, assistant_model=assistant), greedy)
    assert torch.equal(model.generate(prompt, max_new_tokens=40, do_sample=False, prompt_lookup_num_tokens=3), greedy)
    assert crops  # rejected candidates were cropped
