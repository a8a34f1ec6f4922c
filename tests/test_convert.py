"""Conversion of dense Llama checkpoints into NSA-Llama: exact weight copy, the report's measurements,
the saved folder (weights, config, tokenizer, card), and errors. Tiny models built here; no hub."""
import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import nsa_hf  # noqa: F401  (registers NSA-Llama)
from nsa_hf.convert import (
    convert_llama_to_nsa,
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


def test_non_llama_sources_are_rejected(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="model_type 'mistral'"):
        convert_llama_to_nsa(mistral, progress=False)
    mistral.save_pretrained(tmp_path / "mistral")
    with pytest.raises(ValueError, match="model_type 'mistral'"):
        convert_llama_to_nsa(tmp_path / "mistral", progress=False)
    with pytest.raises(ValueError, match="dtype='float8'"):
        convert_llama_to_nsa(tiny_llama(), dtype="float8", progress=False)


def test_converting_an_nsa_checkpoint_is_refused(converted):
    _, _, dst = converted
    with pytest.raises(ValueError, match="already an NSA-Llama"):
        convert_llama_to_nsa(dst, progress=False)


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
