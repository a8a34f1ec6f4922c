"""generate()'s fast path, on a CPU: the static NSA cache that NSA models choose by default on CUDA, forced
here through transformers' own flag for compiling on any device (``compile_config._compile_all_devices``),
with the decoding steps run eagerly (``disable_compile=True``) or compiled (when the static decode step is a
custom op that compiles). Every decoding strategy is checked against today's path, the dynamic
``NSACache`` that a CPU still gets by default: same greedy tokens and logits (fp32), same samples for a
seed, same beams, left-padded batches equal per-row runs, EOS and stopping criteria, streamers, the
text-generation pipeline, assisted decoding, prompt lookup and chunked prefill (several query tokens per
step on the static cache, cropped when rejected)."""
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CompileConfig, DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          StoppingCriteria, StoppingCriteriaList, pipeline)
from transformers.generation.streamers import BaseStreamer

import nsa_hf.attention as nsa_attention
import nsa_hf.modeling_nsa as modeling_nsa
from nsa_hf import NSACache, NSAStaticCache, NSAStaticCacheLayer, nsa_backend
from nsa_hf.cache import static_cache_length
from nsa_hf.modeling_nsa import CACHE_NAME

from tests.hf.test_hf_generate import SMALL_NSA, full_logits, tiny_model
from tests.hf.test_hf_static_cache import left_padded, static_calls  # noqa: F401  (fixture)

TOL = dict(atol=5e-5, rtol=1e-5)


def as_on_cuda(compiled: bool = False, backend="eager") -> dict:
    """``generate()`` kwargs under which a CPU model makes the choice it makes on CUDA: a device where
    transformers compiles decoding steps; the steps then run eagerly unless ``compiled``."""
    config = CompileConfig(backend=backend, mode=None, fullgraph=False)
    config._compile_all_devices = True
    return dict(compile_config=config, disable_compile=not compiled)


def cache_of(out):
    """The cache a ``generate(return_dict_in_generate=True)`` output holds (field name of the installed
    transformers)."""
    return getattr(out, CACHE_NAME)


def decode_op_compiles() -> bool:
    """Whether the static decode step is the ``nsa_kernels::decode`` custom op, which ``torch.compile``
    traces (without it, compiling a decoding step traces into the Triton interpreter)."""
    import nsa_kernels.ops  # noqa: F401  (registers the custom ops)

    try:
        torch.ops.nsa_kernels.decode
    except (AttributeError, RuntimeError):
        return False
    return True


@pytest.fixture
def static_caches(monkeypatch):
    """The lengths of the static NSA caches that generate() builds by default or on request."""
    lengths = []

    class Recorded(NSAStaticCache):
        def __init__(self, *args, **kwargs):
            lengths.append(kwargs.get("max_cache_len"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(modeling_nsa, "NSAStaticCache", Recorded)
    return lengths


def _greedy(model, ids, mask, new, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                          return_dict_in_generate=True, output_logits=True, **kwargs)


def test_static_cache_length_buckets():
    lengths = list(range(1, 3000)) + [33024, 65600, 131328]
    buckets = [static_cache_length(n) for n in lengths]
    assert static_cache_length(1) == static_cache_length(256) == 256 and static_cache_length(257) == 320
    assert static_cache_length(32768 + 256) == 40960
    for n, b in zip(lengths, buckets):
        assert n <= b <= max(256, 1.25 * n)
    assert buckets == sorted(buckets)
    for k in range(8, 11):  # four buckets per power of two
        assert len({b for n, b in zip(lengths, buckets) if 2**k < n <= 2 ** (k + 1)}) == 4


def test_default_cache_choice():
    model = tiny_model(2, 1, layers=1)
    ids, mask = left_padded([9, 6])

    def built(mask=mask, **kwargs):
        return type(cache_of(_greedy(model, ids, mask, 2, **kwargs)))

    assert built() is NSACache  # a CPU keeps the dynamic cache by default
    out = _greedy(model, ids, mask, 2, **as_on_cuda())
    assert type(cache_of(out)) is NSAStaticCache  # the choice made on CUDA
    assert cache_of(out).layers[0].max_cache_len == static_cache_length(ids.shape[1] + 2 - 1) == 256
    assert built(cache_implementation="dynamic", **as_on_cuda()) is NSACache  # the switch off
    assert built(mask=mask.flip(1), **as_on_cuda()) is NSACache  # right padding: not what the static path reads
    with nsa_backend(decode="off"):
        assert built(**as_on_cuda()) is NSACache
    assert built(cache_implementation="static") is NSAStaticCache  # an explicit choice is kept on a CPU


def test_greedy_left_padded_batch_equals_dynamic_and_per_row():
    model = tiny_model(4, 2, layers=2)
    lengths, new = [23, 9, 17], 12  # crosses cmp (4) and slc (16) blocks and the window (24)
    ids, mask = left_padded(lengths)
    dynamic = _greedy(model, ids, mask, new)
    fast = _greedy(model, ids, mask, new, **as_on_cuda())
    assert type(cache_of(fast)) is NSAStaticCache
    assert torch.equal(fast.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(fast.logits, 1), torch.stack(dynamic.logits, 1), **TOL)
    width = ids.shape[1]
    for i, n in enumerate(lengths):
        row = ids[i:i + 1, width - n:]
        single = model.generate(row, max_new_tokens=new, do_sample=False, **as_on_cuda())
        assert torch.equal(single[0, n:], fast.sequences[i, width:])


def test_sampling_with_a_seed_is_the_same_on_both_paths():
    model = tiny_model(2, 1, layers=1)
    ids, mask = left_padded([14, 8])
    runs = []
    for kwargs in ({}, as_on_cuda()):
        torch.manual_seed(1234)
        runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=1.3,
                                   top_k=20, top_p=0.9, **kwargs))
    assert torch.equal(runs[0], runs[1])


def test_beam_search_reorders_the_static_cache_in_place(monkeypatch):
    addresses = []
    original = NSAStaticCacheLayer.reorder_cache

    def reorder(self, beam_idx):
        before = (self.keys.data_ptr(), self.cmp_k.data_ptr(), self.left_pad.data_ptr())
        original(self, beam_idx)
        addresses.append(before == (self.keys.data_ptr(), self.cmp_k.data_ptr(), self.left_pad.data_ptr()))

    monkeypatch.setattr(NSAStaticCacheLayer, "reorder_cache", reorder)
    model = tiny_model(2, 1, layers=1)
    ids, mask = left_padded([13, 7])
    kwargs = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False,
                  return_dict_in_generate=True, output_scores=True)
    dynamic = model.generate(ids, **kwargs)
    assert addresses == []
    fast = model.generate(ids, **kwargs, **as_on_cuda())
    assert type(cache_of(fast)) is NSAStaticCache
    assert addresses and all(addresses)  # reordered every step, buffers kept their addresses
    assert torch.equal(fast.sequences, dynamic.sequences)
    torch.testing.assert_close(fast.sequences_scores, dynamic.sequences_scores, atol=1e-4, rtol=1e-4)


class _Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.chunks.append("end")


class _StopAtLength(StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_eos_stopping_criteria_and_streamer_match_the_dynamic_path():
    model = tiny_model(2, 1, layers=1)
    ids, mask = left_padded([15, 11])
    width = ids.shape[1]
    free = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    eos = int(free[0, width + 3])  # row 0 emits it as its 4th new token
    outs, streams = [], []
    for kwargs in ({}, as_on_cuda()):
        streamer = _Collect()
        outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                                   pad_token_id=0, streamer=streamer,
                                   stopping_criteria=StoppingCriteriaList([_StopAtLength(width + 9)]), **kwargs))
        streams.append(streamer.chunks)
    fast = outs[1]
    assert torch.equal(fast, outs[0])
    first_eos = (free[0, width:] == eos).nonzero()[0, 0] + width
    assert torch.equal(fast[0, :first_eos + 1], free[0, :first_eos + 1])
    assert (fast[0, first_eos + 1:] == 0).all()  # the row stopped at EOS, padding follows
    assert fast.shape[1] <= width + 9  # the custom criterion
    chunks = streams[1]
    assert chunks[-1] == "end" and torch.equal(chunks[0], ids)
    assert torch.equal(torch.stack(chunks[1:-1], dim=1), fast[:, width:])


def _word_tokenizer(vocab_size=100):
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    tokenizer.padding_side = "left"
    return tokenizer


def test_text_generation_pipeline_takes_the_static_cache(static_caches):
    model = tiny_model(2, 1, layers=1)
    pipe = pipeline("text-generation", model=model, tokenizer=_word_tokenizer(), device="cpu")
    prompts = ["w5 w7 w9 w11 w13 w3 w4 w40 w41 w42 w43", "w20 w21 w22"]
    kwargs = dict(max_new_tokens=7, do_sample=False, batch_size=2)
    dynamic = pipe(prompts, **kwargs)
    assert static_caches == []
    fast = pipe(prompts, **kwargs, **as_on_cuda())
    assert static_caches == [256]  # one batch of two left-padded prompts
    assert fast == dynamic
    assert all(len(r[0]["generated_text"].split()) > len(p.split()) for r, p in zip(fast, prompts))


def test_prompt_lookup_verifies_candidates_on_the_static_decode_path(static_calls, monkeypatch):
    # Candidate chunks of up to 4 tokens go through the static decode kernels in one step; rejected ones
    # are cropped off the static cache; the tokens are those of greedy decoding on the dynamic path.
    crops = []
    original = NSAStaticCacheLayer.crop
    monkeypatch.setattr(NSAStaticCacheLayer, "crop", lambda self, n: (crops.append(n), original(self, n))[1])
    model = tiny_model(2, 1, layers=1)
    prompt = torch.randint(3, 20, (1, 27))  # a small alphabet: n-gram lookups find candidates
    greedy = model.generate(prompt, max_new_tokens=10, do_sample=False)
    with nsa_backend(decode="triton"):
        lookup = model.generate(prompt, max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3,
                                **as_on_cuda())
    assert torch.equal(lookup, greedy)
    assert static_calls and max(static_calls) > 1  # several query tokens in one static step
    assert any(n < 0 for n in crops)


def _no_compile_backend():
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    return frames, backend


def test_assisted_decoding_and_chunked_prefill_run_eagerly_on_the_static_cache(static_caches):
    # Their steps vary in length (candidates, chunks): the static cache takes them, and generate() does
    # not compile them even where it compiles decoding steps (no frame reaches the compiler).
    model, assistant = tiny_model(2, 1, layers=1), tiny_model(2, 1, layers=1)
    prompt = torch.randint(3, 100, (1, 21))
    greedy = model.generate(prompt, max_new_tokens=10, do_sample=False)
    frames, backend = _no_compile_backend()
    assisted = model.generate(prompt, max_new_tokens=10, do_sample=False, assistant_model=assistant,
                              **as_on_cuda(compiled=True, backend=backend))
    chunked = model.generate(prompt, max_new_tokens=10, do_sample=False, prefill_chunk_size=8,
                             **as_on_cuda(compiled=True, backend=backend))
    assert static_caches == [256, 256] and frames == []
    assert torch.equal(assisted, greedy) and torch.equal(chunked, greedy)


@pytest.mark.parametrize("decode", ["auto", "triton"])
def test_cache_edits_keep_the_static_cache_consistent(decode):
    # Beam reordering, row selection/repetition and cropping, each followed by a multi-token step,
    # against uncached forwards of the edited rows. With decode "triton" the steps take the static
    # decode kernels; with "auto" (on a CPU) the steps after an edit rebuild what they read.
    model = tiny_model(2, 1, layers=1)
    ids = torch.randint(3, 100, (3, 44))
    cache = NSAStaticCache(config=model.config, max_cache_len=64)
    layer = cache.layers[0]

    def step(rows, a, b):
        with torch.no_grad():
            return model(ids[rows, a:b], past_key_values=cache, use_cache=True).logits

    with nsa_backend(decode=decode):
        step([0, 1, 2], 0, 30)
        keys = layer.keys.data_ptr()
        cache.reorder_cache(torch.tensor([2, 0, 1]))
        assert layer.keys.data_ptr() == keys
        torch.testing.assert_close(step([2, 0, 1], 30, 33), full_logits(model, ids[[2, 0, 1], :33])[:, 30:], **TOL)
        cache.crop(-2)  # back to 31 positions
        assert int(cache.get_seq_length()) == 31
        torch.testing.assert_close(step([2, 0, 1], 31, 36), full_logits(model, ids[[2, 0, 1], :36])[:, 31:], **TOL)
        cache.batch_select_indices(torch.tensor([1]))  # row 0 of the batch
        cache.batch_repeat_interleave(2)
        logits = step([0, 0], 36, 38)
        torch.testing.assert_close(logits, full_logits(model, ids[[0, 0], :38])[:, 36:], **TOL)
    with pytest.raises(ValueError, match="minus the number of positions"):
        cache.crop(3)


def test_stock_llama_keeps_its_cache():
    # A stock Llama with attn_implementation="nsa" has no NSA cache (its attention modules do not hand the
    # cache to the attention function): its generate() is transformers' own, a DynamicCache, whatever the
    # device, and the NSA fallback recompresses from the dense keys at every step.
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=None, **SMALL_NSA)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="nsa").eval()
    prompt = torch.randint(3, 100, (1, 21))
    out = _greedy(model, prompt, None, 4, **as_on_cuda())
    assert type(cache_of(out)) is DynamicCache
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], full_logits(model, out.sequences)[0, 20:-1], **TOL)


@pytest.mark.slow
@pytest.mark.skipif(not decode_op_compiles(), reason="the static decode step is not a compilable custom op yet")
def test_compiled_decoding_steps_equal_eager_and_compile_once_per_bucket():
    frames, backend = _no_compile_backend()
    model = tiny_model(2, 1, layers=1)
    compiled = as_on_cuda(compiled=True, backend=backend)
    for i, length in enumerate([20, 27]):  # one bucket (256 positions)
        prompt = torch.randint(3, 100, (1, length))
        eager = model.generate(prompt, max_new_tokens=6, do_sample=False)
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, **compiled)
        assert torch.equal(out, eager)
        if i == 0:
            assert frames  # the decoding step was compiled
            first = len(frames)
    assert len(frames) == first  # a new prompt length in the same bucket compiles nothing new


@pytest.mark.gpu
def test_cuda_default_is_the_compiled_static_path():
    # On CUDA nothing is forced: plain generate() builds the static NSA cache and transformers compiles the
    # decoding step (inductor, CUDA graphs); fp32 greedy tokens equal the eager dynamic path's, also for a
    # second prompt length in the same bucket.
    model = tiny_model(8, 2, layers=2).to("cuda")
    for lengths in ([70, 23, 41], [66, 30, 12]):
        ids, mask = left_padded(lengths, device="cuda")
        fast = _greedy(model, ids, mask, 24)
        assert type(cache_of(fast)) is NSAStaticCache
        dynamic = _greedy(model, ids, mask, 24, cache_implementation="dynamic")
        assert type(cache_of(dynamic)) is NSACache
        assert torch.equal(fast.sequences, dynamic.sequences)
