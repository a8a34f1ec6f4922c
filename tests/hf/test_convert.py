"""Conversion of dense checkpoints (Llama, Mistral, Qwen2, Qwen3) into NSA: exact weight copy, each family's
specifics, the report's measurements, the saved folder (weights, config, tokenizer, card), and errors.
Tiny models built here; no hub."""
import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import nsa_hf  # noqa: F401  (registers NSA-Llama)
from nsa_hf.convert import (
    convert_llama_to_nsa,
    convert_to_nsa,
    default_eval_len,
    fully_sparse_from_position,
    keys_per_query,
    sparse_from_position,
    stdlib_python_files,
)
from nsa_kernels import NSAParams
from nsa_kernels.reference import nsa_sequence

SMALL = dict(cmp_block=8, cmp_stride=4, slc_block=16, slc_count=4, init_blocks=1, local_blocks=2, window=32)


def tiny_llama(vocab_size=320, seed=0, tie_word_embeddings=False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie_word_embeddings,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init: peaked attention, visible gaps
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(std=0.3)
    return model


def _rope(rope_type, **extra):
    return {"rope_type": rope_type, "rope_theta": 10000.0, **extra}


FAMILIES = {
    # Each family with its specifics and a rope scaling it uses: Llama with biases and llama3 rope; Mistral with
    # a sliding window and head_dim != hidden/heads; Qwen2 with q/k/v biases, tied embeddings, sliding-window
    # layers and yarn; Qwen3 with q/k norms, head_dim != hidden/heads, tied embeddings and dynamic rope.
    "llama": ("LlamaConfig", dict(attention_bias=True, rope_parameters=_rope(
        "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64))),
    "mistral": ("MistralConfig", dict(sliding_window=40, head_dim=24, rope_parameters=_rope("linear", factor=2.0))),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=40,
                                  max_window_layers=1, rope_parameters=_rope(
                                      "yarn", factor=8.0, original_max_position_embeddings=64))),
    "qwen3": ("Qwen3Config", dict(head_dim=24, tie_word_embeddings=True, rope_parameters=_rope(
        "dynamic", factor=2.0))),
}


def tiny_dense(family: str, vocab_size=320, seed=0):
    """A tiny random stock model of ``family`` (a key of FAMILIES) with peaked attention."""
    import transformers

    name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, name)(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(std=0.3)
            elif n.endswith(("_proj.bias", "_norm.weight")) and "layernorm" not in n:
                p.normal_(std=0.5)  # biases and q/k norms that matter, so a dropped one shows
    return model


def tiny_tokenizer(texts, vocab_size=320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def sample_docs():
    return [p.read_text(encoding="utf-8") for p in list(stdlib_python_files(min_chars=20_000))[:3]]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, sample_docs):
    """A saved tiny Llama checkpoint with a tokenizer and a model card giving a license."""
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(1)
    tiny_llama().save_pretrained(path)
    tiny_tokenizer(sample_docs).save_pretrained(path)
    (path / "README.md").write_text("---\nlicense: mit\n---\n# tiny llama\n")
    return path


@pytest.fixture(scope="module")
def converted(llama_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("nsa") / "out"
    model, report = convert_llama_to_nsa(llama_dir, dst, progress=False, **SMALL)
    return model, report, dst


def test_saved_checkpoint_has_every_llama_weight_unchanged(llama_dir, converted):
    model, report, dst = converted
    src = load_file(llama_dir / "model.safetensors")
    saved = load_file(dst / "model.safetensors")
    for key, value in src.items():
        assert torch.equal(saved[key], value), key
    new = sorted(set(saved) - set(src))
    assert new and all(any(m in k for m in ("nsa_cmp_k", "nsa_cmp_v", "nsa_gate")) for k in new)
    assert report.weights_copied == len(src)
    assert report.parameters_copied == sum(v.numel() for v in src.values())
    assert report.new_parameters == sum(saved[k].numel() for k in new) > 0

    reloaded = AutoModelForCausalLM.from_pretrained(dst)
    assert type(reloaded).__name__ == "NSALlamaForCausalLM"
    assert reloaded.config.model_type == "nsa_llama"
    for key, want in SMALL.items():
        assert getattr(reloaded.config, f"nsa_{key}") == want
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_saved_folder_has_tokenizer_generation_config_and_card(llama_dir, converted):
    from huggingface_hub import ModelCard

    _, report, dst = converted
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (dst / name).read_bytes() == (llama_dir / name).read_bytes()
    assert (dst / "generation_config.json").is_file()
    assert json.loads((dst / "config.json").read_text())["model_type"] == "nsa_llama"
    card = ModelCard.load(dst / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert {"nsa", "native-sparse-attention"} <= set(card.data.tags)
    assert card.data.license == "mit"  # read from the source card
    assert card.data.base_model is None  # a local source has no Hub id
    assert f"{report.loss_converted:.4f}" in card.text and f"{report.loss_original:.4f}" in card.text
    assert "| `nsa_window` | 32 |" in card.text
    saved = json.loads((dst / "conversion_report.json").read_text())
    assert saved["loss_converted"] == report.loss_converted


_REMOTE_LOAD = """
import sys
sys.modules["nsa_kernels"] = None  # as on a machine without nsa-hf
sys.modules["nsa_hf"] = None
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
assert model.config._attn_implementation == "nsa", model.config._attn_implementation
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(input_ids=ids, use_cache=False).logits, sys.argv[3])
"""


def assert_loads_as_remote_code(folder, model, tmp_path, length: int = 100) -> None:
    """``folder`` loads with ``trust_remote_code=True`` in a subprocess where nsa_hf and nsa_kernels cannot be
    imported, and gives ``model``'s logits on random ids."""
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    torch.save(ids, tmp_path / "ids.pt")
    run = subprocess.run([sys.executable, "-c", _REMOTE_LOAD, str(folder), str(tmp_path / "ids.pt"),
                          str(tmp_path / "logits.pt")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want, rtol=1e-5, atol=1e-5)


def test_saved_folder_loads_as_remote_code_without_nsa_hf(converted, tmp_path):
    model, _, dst = converted
    assert (dst / "nsa_bundle.py").is_file() and "auto_map" in json.loads((dst / "config.json").read_text())
    assert_loads_as_remote_code(dst, model, tmp_path)


def test_report_measures_at_a_sparse_length(llama_dir, converted):
    model, report, _ = converted
    params = NSAParams(**SMALL)
    assert sparse_from_position(params) == 32 and fully_sparse_from_position(params) == 64  # window, 4 x 16
    assert report.eval_len == default_eval_len(params) == 128
    assert report.sparse_at_eval_len and report.fully_sparse_from_position == 64
    assert report.keys_per_query["nsa"] != report.keys_per_query["dense"]
    assert report.token_source.startswith("tokenizer")
    assert all(math.isfinite(v) for v in (report.loss_original, report.loss_converted))
    # Sparse attention at this length: the untrained NSA model is not the dense one...
    assert report.logit_max_abs_gap > 1e-4
    assert report.logit_mean_abs_gap <= report.logit_max_abs_gap
    # ...but it starts close to it.
    assert abs(report.loss_gap) < 0.5 * report.loss_original
    assert 0.0 <= report.top1_agreement <= 1.0


def test_report_losses_match_an_independent_computation(llama_dir, tmp_path):
    """The reported losses are the models' next-token cross-entropy on the given text."""
    text = "def add(a, b):\n    return a + b\n\n" * 40
    model, report = convert_llama_to_nsa(llama_dir, None, sample_text=text, eval_len=96, eval_sequences=1,
                                         progress=False, **SMALL)
    from transformers import AutoTokenizer

    ids = torch.tensor([AutoTokenizer.from_pretrained(llama_dir)(text, add_special_tokens=False)["input_ids"][:96]])
    dense = LlamaForCausalLM.from_pretrained(llama_dir)
    with torch.no_grad():
        want_dense = dense(input_ids=ids, labels=ids).loss.item()
        want_nsa = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
    assert report.eval_len == 96 and report.eval_tokens == 96
    assert report.loss_original == pytest.approx(want_dense, rel=1e-5)
    assert report.loss_converted == pytest.approx(want_nsa, rel=1e-5)


def test_instance_source_is_left_unchanged():
    llama = tiny_llama()
    before = copy.deepcopy(llama.state_dict())
    model, report = convert_llama_to_nsa(llama, dtype="bfloat16", evaluate=False, progress=False, **SMALL)
    assert model.dtype == torch.bfloat16 and llama.dtype == torch.float32
    for key, value in llama.state_dict().items():
        assert torch.equal(value, before[key])
        assert torch.equal(model.state_dict()[key], value.to(torch.bfloat16))
    assert report.eval_len is None and report.loss_original is None


def test_gap_vanishes_where_nsa_is_dense_equivalent():
    """With the cmp gate off, NSA equals dense attention until the window or the selection stops
    covering every key: the report's gap is ~0 at that length and clearly not beyond it."""
    llama = tiny_llama(vocab_size=300)
    settings = dict(SMALL, gate_init_bias=[-30.0, 0.0, 0.0])  # gates (0, 0.5, 0.5)
    text = "class A:\n    def f(self, x):\n        return [x] * 3\n" * 20
    kwargs = dict(sample_text=text, eval_sequences=1, progress=False, **settings)
    _, short = convert_llama_to_nsa(llama, eval_len=32, **kwargs)  # sparse from position min(32, 4 x 16)
    _, long = convert_llama_to_nsa(llama, eval_len=128, **kwargs)
    assert "UTF-8 bytes" in short.token_source  # no tokenizer anywhere
    assert not short.sparse_at_eval_len and "dense-equivalent" in short.format()
    assert short.logit_max_abs_gap < 1e-4
    assert long.sparse_at_eval_len and long.logit_max_abs_gap > 1e-2


@pytest.mark.parametrize(
    "bad, field",
    [(dict(cmp_block=8, cmp_stride=3), "cmp_block"), (dict(slc_count=2, init_blocks=1, local_blocks=2), "slc_count"),
     (dict(window=0), "window"), (dict(slc_block=20, cmp_stride=8, cmp_block=16), "slc_block")],
)
def test_invalid_settings_fail_before_touching_the_source(bad, field):
    with pytest.raises(ValueError, match=field):
        convert_llama_to_nsa("/nonexistent/checkpoint", None, progress=False, **bad)


def test_unsupported_sources_are_rejected_naming_the_supported_types(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    supported = "'llama', 'mistral', 'qwen2', 'qwen3'"
    with pytest.raises(ValueError, match="model_type 'gpt2'") as info:
        convert_llama_to_nsa(gpt2, progress=False)
    assert supported in str(info.value)
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        convert_llama_to_nsa(tmp_path / "gpt2", progress=False)
    with pytest.raises(ValueError, match="dtype='float8'"):
        convert_llama_to_nsa(tiny_llama(), dtype="float8", progress=False)


def test_converting_an_nsa_checkpoint_is_refused(converted):
    _, _, dst = converted
    with pytest.raises(ValueError, match="already an NSA checkpoint .model_type 'nsa_llama'"):
        convert_llama_to_nsa(dst, progress=False)


def test_params_and_keyword_sizes_are_the_same_conversion():
    a, _ = convert_to_nsa(tiny_llama(), None, NSAParams(**SMALL), evaluate=False, progress=False)
    b, _ = convert_llama_to_nsa(tiny_llama(), None, evaluate=False, progress=False, **SMALL)
    assert a.config.nsa_params() == b.config.nsa_params() == NSAParams(**SMALL)
    with pytest.raises(ValueError, match="not both"):
        convert_llama_to_nsa(tiny_llama(), None, NSAParams(), window=64, progress=False)


# -- families ------------------------------------------------------------------------------------------------


def _left_padded(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_converts_exactly_and_keeps_its_specifics(family, tmp_path):
    """Every dense weight bit for bit; the family's biases, q/k norms, tied head, rope scaling and sliding
    window kept: with a dense backend the converted model computes exactly the dense model (padding, and
    rows longer than the sliding window, included); the report measures the losses it states."""
    dense = tiny_dense(family)
    text = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}" for i in range(120))
    model, report = convert_to_nsa(dense, None, NSAParams(**SMALL), eval_len=96, eval_sequences=1,
                                   sample_text=text, device="cpu", progress=False)
    assert model.config.model_type == f"nsa_{family}" == report.nsa_model_type
    assert type(model) is AutoModelForCausalLM._model_mapping[type(model.config)]
    sd, sn = dense.state_dict(), model.state_dict()
    for key, value in sd.items():
        assert torch.equal(value, sn[key]) and value.dtype == sn[key].dtype, key
    assert set(sn) - set(sd) and all(".nsa_" in k for k in set(sn) - set(sd))
    assert report.weights_copied == len(sd)

    dense_attn, attn = dense.model.layers[1].self_attn, model.model.layers[1].self_attn
    assert (attn.q_proj.bias is None) == (dense_attn.q_proj.bias is None)
    assert (attn.o_proj.bias is None) == (dense_attn.o_proj.bias is None)
    assert (attn.q_norm is None) == (not hasattr(dense_attn, "q_norm"))
    window = getattr(dense_attn, "sliding_window", getattr(dense.config, "sliding_window", None))  # Mistral: config's
    assert attn.head_dim == dense_attn.head_dim and attn.sliding_window == window
    tied = dense.config.tie_word_embeddings
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    assert model.config.rope_parameters == dense.config.rope_parameters

    ids, mask = _left_padded(320, [90, 57])
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        dense.set_attn_implementation(impl)
        with torch.no_grad():
            want = dense(ids, attention_mask=mask).logits
            assert torch.equal(model(ids, attention_mask=mask).logits, want), impl
    model.set_attn_implementation("nsa")

    tokens = torch.tensor([[b % 320 for b in text.encode()][:96]])
    with torch.no_grad():
        loss = {name: torch.nn.functional.cross_entropy(m(tokens).logits[0, :-1], tokens[0, 1:]).item()
                for name, m in (("original", dense), ("converted", model))}
    assert report.eval_len == tokens.shape[1] == 96 and report.sparse_at_eval_len
    assert report.loss_original == pytest.approx(loss["original"], rel=1e-5)
    assert report.loss_converted == pytest.approx(loss["converted"], rel=1e-5)
    assert report.logit_max_abs_gap > 0


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_each_family_loads_as_remote_code_without_nsa_hf(family, tmp_path):
    model, report = convert_to_nsa(tiny_dense(family), tmp_path / "out", NSAParams(**SMALL), evaluate=False,
                                   progress=False)
    files = {p.name for p in (tmp_path / "out").glob("*.py")}
    assert {f"modeling_nsa_{family}.py", f"configuration_nsa_{family}.py", "modeling_nsa.py", "nsa_bundle.py"} <= files
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"model_type: nsa_{family}" in card and "trust_remote_code=True" in card
    assert_loads_as_remote_code(tmp_path / "out", model, tmp_path, length=70)


def test_continued_training_of_a_converted_qwen3_with_the_train_example(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    import train

    docs = [p.read_text(encoding="utf-8") for p in list(stdlib_python_files(min_chars=20_000))[:2]]
    data = []
    for i, d in enumerate(docs):
        (tmp_path / f"doc{i}.txt").write_text(d)
        data.append(str(tmp_path / f"doc{i}.txt"))
    convert_to_nsa(tiny_dense("qwen3"), tmp_path / "nsa", NSAParams(**SMALL), tokenizer=tiny_tokenizer(docs),
                   evaluate=False, progress=False)
    history = train.main(["--model", str(tmp_path / "nsa"), "--data", *data, "--output-dir", str(tmp_path / "run"),
                          "--seq-len", "96", "--batch-size", "2", "--max-steps", "2", "--nsa-only-steps", "1",
                          "--logging-steps", "1", "--lr", "3e-3"])
    assert history and all(math.isfinite(h["loss"]) for h in history if "loss" in h)
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "nsa")
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert after.config.model_type == "nsa_qwen3"
    sb, sa = before.state_dict(), after.state_dict()
    assert any(not torch.equal(sb[k], sa[k]) for k in sb if "nsa_gate" in k)


# -- error paths and options -------------------------------------------------------------------------------


def test_missing_local_source_and_bad_ids_fail_in_one_line(tmp_path):
    for src in ("./missing", str(tmp_path / "nothing-here"), "not a hub id"):
        with pytest.raises(ValueError, match="neither an existing directory nor a Hub model id") as info:
            convert_to_nsa(src, None, progress=False)
        assert "\n" not in str(info.value) and repr(src) in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        convert_to_nsa(tmp_path / "empty", None, progress=False)


def test_hub_id_offline_or_unreachable_fails_fast(monkeypatch):
    import time

    import huggingface_hub.constants
    import nsa_hf.convert as convert_module

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set and the model is not in the local Hub cache"):
        convert_to_nsa("nsa-hf-tests/no-such-model", None, progress=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(convert_module, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ValueError, match="cannot be reached") as info:
        convert_to_nsa("nsa-hf-tests/no-such-model", None, progress=False)
    assert "\n" not in str(info.value) and time.perf_counter() - start < 20


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a PyTorch without CUDA")
def test_cuda_device_without_cuda_is_refused():
    with pytest.raises(ValueError, match="device='cuda' but this PyTorch has no usable CUDA"):
        convert_to_nsa(tiny_llama(), None, device="cuda", progress=False)
    with pytest.raises(ValueError, match="device='gpu0' is not a torch device"):
        convert_to_nsa(tiny_llama(), None, device="gpu0", progress=False)


def test_eval_len_beyond_the_positions_is_refused():
    with pytest.raises(ValueError, match="eval_len=600 is above the model's max_position_embeddings=512"):
        convert_to_nsa(tiny_llama(), None, NSAParams(**SMALL), eval_len=600, progress=False)


def test_sample_text_may_be_a_path_string(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("print('hello world')\n" * 30)
    _, report = convert_llama_to_nsa(tiny_llama(), eval_len=64, sample_text=str(path), progress=False, **SMALL)
    assert report.text_source == str(path) and report.eval_len == 64
    with pytest.raises(ValueError, match="sample_text='corpus.txt' names no existing file"):
        convert_llama_to_nsa(tiny_llama(), sample_text="corpus.txt", progress=False, **SMALL)


def test_an_occupied_destination_needs_overwrite_which_clears_it(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "stale.bin").write_text("old")
    with pytest.raises(ValueError, match="already exists and is not empty: pass overwrite=True"):
        convert_to_nsa(tiny_llama(), dst, NSAParams(**SMALL), evaluate=False, progress=False)
    assert (dst / "stale.bin").is_file()
    convert_to_nsa(tiny_llama(), dst, NSAParams(**SMALL), evaluate=False, progress=False, overwrite=True)
    assert not (dst / "stale.bin").exists() and (dst / "model.safetensors").is_file()


def test_dtype_labels_keep_the_source_dtype(llama_dir):
    _, report = convert_llama_to_nsa(llama_dir, dtype="bfloat16", evaluate=False, progress=False, **SMALL)
    assert report.source_dtype == "float32" and report.dtype == "bfloat16"
    assert "stored as float32, converted to bfloat16" in report.format()


def test_no_remote_code_writes_no_modeling_code_and_says_so(llama_dir, tmp_path):
    model, _ = convert_llama_to_nsa(llama_dir, tmp_path / "plain", remote_code=False, evaluate=False, progress=False,
                                    **SMALL)
    assert not list((tmp_path / "plain").glob("*.py"))
    assert "auto_map" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    card = (tmp_path / "plain" / "README.md").read_text()
    assert "trust_remote_code=True)" not in card and "carries no modeling code" in card
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert torch.equal(reloaded.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"])
    model.save_pretrained(tmp_path / "again")  # the model itself still exports remote code afterwards
    assert "auto_map" in json.loads((tmp_path / "again" / "config.json").read_text())


def test_keys_per_query_matches_the_reference_selection():
    """The analytic mean of attended keys agrees with counting the reference's chosen blocks."""
    params = NSAParams(cmp_block=8, cmp_stride=4, slc_block=16, slc_count=3, init_blocks=1, local_blocks=1, window=20)
    t = 100
    q, k, v = torch.randn(t, 2, 8), torch.randn(t, 1, 8), torch.randn(t, 1, 8)
    n_cmp = (t - params.cmp_block) // params.cmp_stride + 1
    gates = torch.rand(t, 2, 3)
    _, blocks = nsa_sequence(q, k, v, torch.randn(n_cmp, 1, 8), torch.randn(n_cmp, 1, 8), gates, params,
                             scale=8 ** -0.5, return_block_indices=True)
    slc = 0
    for pos in range(t):
        for b in blocks[pos, 0].tolist():
            if b >= 0:
                slc += min(params.slc_block, pos + 1 - b * params.slc_block)
    cmp = sum(max(0, (p + 1 - params.cmp_block) // params.cmp_stride + 1) for p in range(t))
    got = keys_per_query(params, t)
    assert got["slc"] == pytest.approx(slc / t)
    assert got["cmp"] == pytest.approx(cmp / t)
    assert got["win"] == pytest.approx(sum(min(p + 1, 20) for p in range(t)) / t)
    assert got["dense"] == pytest.approx((t + 1) / 2)
    assert got["nsa"] == pytest.approx(got["cmp"] + got["slc"] + got["win"])


def check_bf16_logits(model, ids, mask, got, want, tie_tol=2e-2, max_bad=0.05):
    """bf16 logits ``got`` against the float32 reference ``want`` of the same weights (left-padded ``ids``,
    ``mask``): every token within atol 0.1 / rtol 0.05, except a few (at most ``max_bad`` of them) that a
    near-tie of the block choice explains. bf16 keeps 8 significant bits, so the block scores (sums of
    softmax probabilities over bf16 queries and compressed keys) carry relative errors near 1e-2, and where
    the best blocks' scores are that close bf16 may take the other block: a different but equally valid
    attention pattern, not an error (mistral's tiny model: layer 0 flips at a relative gap of 5e-3, layer 1
    at 2.7e-4 and 1.5e-2; 110 of 63040 logits off by up to 0.23, at three tokens). A token is excused where
    the float64 reference (:func:`selection_margins`) has a gap of at most ``tie_tol`` at that token in some
    layer, or at an earlier token of its row in a layer below the last (whose keys/values later tokens
    read); a real error (a wrong key range, a wrong block, a wrong gate) shows at tokens without ties or at
    more than ``max_bad`` of them."""
    from tests.hf.test_hf_decode_kernels import selection_margins

    keep = mask.bool().cpu()
    got, want = got.cpu().float(), want.cpu().float()
    bad = ((got - want).abs() > 0.1 + 0.05 * want.abs()).any(-1) & keep  # (rows, width) tokens
    excused = torch.zeros_like(keep)
    for i, margin in enumerate(selection_margins(model, [ids.cpu()[i, keep[i]] for i in range(len(ids))])):
        near = margin <= tie_tol  # (layers, T)
        excused[i, keep[i]] = near.any(0) | (near[:-1].any(0).cumsum(0) > 0)
    diff = (got - want).abs().amax(-1)
    assert not (bad & ~excused).any(), [(i, j, float(diff[i, j])) for i, j in (bad & ~excused).nonzero().tolist()]
    assert bad.sum() <= max_bad * keep.sum(), [(i, j, float(diff[i, j])) for i, j in bad.nonzero().tolist()]


@pytest.mark.gpu
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_in_bfloat16_on_cuda(family):
    """bf16 on the GPU (Triton kernels): the conversion copies the bf16 weights exactly, sdpa equals the dense
    model, NSA is close to the float32 CPU reference run of the same weights (:func:`check_bf16_logits`:
    except at a few tokens explained by a near-tie of the block choice), and the scores of cached decoding
    (decode kernels) match a full uncached forward over the generated tokens."""
    dense = tiny_dense(family).to("cuda", torch.bfloat16)
    model, report = convert_to_nsa(dense, None, NSAParams(**SMALL), dtype="bfloat16", evaluate=False, progress=False)
    assert report.dtype == "bfloat16" and model.dtype == torch.bfloat16 and model.device.type == "cuda"
    ids, mask = _left_padded(320, [120, 77])
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        dense.set_attn_implementation("sdpa")
        assert torch.equal(model(ids, attention_mask=mask).logits, dense(ids, attention_mask=mask).logits)
        model.set_attn_implementation("nsa")
        got = model(ids, attention_mask=mask).logits.float()
        reference = copy.deepcopy(model).to("cpu", torch.float32)
        want = reference(ids.cpu(), attention_mask=mask.cpu()).logits
    check_bf16_logits(model, ids, mask, got, want)
    prompt = ids[:1, -70:]
    out = model.generate(prompt, max_new_tokens=24, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        full = model(out.sequences, use_cache=False).logits[0, prompt.shape[1] - 1 : -1].float()
    scores = torch.stack(out.scores, 1)[0].float()
    torch.testing.assert_close(scores, full, atol=0.1, rtol=0.05)
