"""transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache`: NSA-Llama
accepts both names under every supported version, names its outputs as the installed transformers does,
keeps its own caches in generate(), and our own calls raise no deprecation warnings."""
import dataclasses
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from nsa_hf import NSACache, NSAStaticCache
from nsa_hf.cache import cache_kwarg
from nsa_hf.generation import StaticGreedyDecoder
from nsa_hf.modeling_nsa_llama import CACHE_NAME

from tests.hf.test_hf_generate import tiny_model

NEW_NAMES = "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}  # transformers >= 5.24


def output_cache(out):
    return getattr(out, CACHE_NAME)


def cache_deprecations(caught):
    return [w for w in caught if issubclass(w.category, FutureWarning) and "past_key_values" in str(w.message)]


def test_cache_name_matches_installed_transformers():
    assert CACHE_NAME == ("cache" if NEW_NAMES else "past_key_values")


def test_forward_accepts_both_names_with_equal_results():
    model = tiny_model()
    ids = torch.randint(3, 100, (2, 41))
    results = []
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for name in ("past_key_values", "cache"):
            cache = NSACache(config=model.config)
            first = model(ids[:, :30], use_cache=True, **{name: cache})
            assert output_cache(first) is cache
            second = model(ids[:, 30:], use_cache=True, **{name: cache})
            assert output_cache(second) is cache and cache.get_seq_length() == 41
            results.append(torch.cat([first.logits, second.logits], dim=1))
        # The bare model too, and the same cache under both names at once is accepted.
        cache = NSACache(config=model.config)
        out = model.model(ids, use_cache=True, past_key_values=cache, cache=cache)
        assert output_cache(out) is cache
    assert cache_deprecations(caught) == []
    torch.testing.assert_close(results[0], results[1])
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    torch.testing.assert_close(results[0], full, atol=5e-5, rtol=1e-5)


def test_two_different_caches_raise():
    model = tiny_model()
    with pytest.raises(ValueError, match="not both"):
        model(torch.randint(3, 100, (1, 9)), past_key_values=NSACache(config=model.config),
              cache=NSACache(config=model.config))


@pytest.mark.parametrize("implementation, cache_class", [(None, NSACache), ("static", NSAStaticCache)])
def test_generate_substitutes_nsa_caches_without_warnings(implementation, cache_class):
    model = tiny_model()
    prompt = torch.randint(3, 100, (2, 19))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(prompt, max_new_tokens=11, do_sample=False, return_dict_in_generate=True,
                             cache_implementation=implementation)
    cache = output_cache(out)
    assert type(cache) is cache_class
    assert cache.get_seq_length() == 19 + 11 - 1
    assert cache.layers[0].compressed_length()  # the compressed state was kept between steps
    assert cache_deprecations(caught) == []


def test_user_cache_is_reused_under_the_installed_name():
    model = tiny_model()
    prompt = torch.randint(3, 100, (1, 17))
    first = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    cache = output_cache(first)
    follow = torch.cat([first.sequences, torch.randint(3, 100, (1, 5))], dim=1)
    continued = model.generate(follow, max_new_tokens=7, do_sample=False, return_dict_in_generate=True,
                               **{CACHE_NAME: cache})
    assert output_cache(continued) is cache
    uncached = model.generate(follow, max_new_tokens=7, do_sample=False, use_cache=False)
    assert torch.equal(continued.sequences, uncached)


def test_gradient_checkpointing_still_drops_the_cache():
    """GradientCheckpointingLayer clears the cache argument under its version's name when training."""
    model = tiny_model().train()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 100, (1, 20))
    cache = NSACache(config=model.config)
    model(ids, labels=ids, past_key_values=cache, use_cache=True).loss.backward()
    assert cache.get_seq_length() == 0


def test_static_greedy_decoder_passes_the_cache_without_warnings_to_stock_llama():
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    llama = LlamaForCausalLM(cfg).eval()
    assert cache_kwarg(llama) == ("cache" if NEW_NAMES else "past_key_values")
    assert cache_kwarg(tiny_model()) == "cache"  # NSA-Llama takes both names under every version
    ids = torch.randint(3, 100, (1, 12))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoder = StaticGreedyDecoder(llama, max_cache_len=20, cuda_graph=False)
        first = decoder.prefill(ids)
        rest = decoder.decode(5)
    assert cache_deprecations(caught) == []
    reference = llama.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(torch.cat([ids, first[:, None], rest], dim=1), reference)
