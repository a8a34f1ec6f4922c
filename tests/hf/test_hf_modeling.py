"""NSA modeling (NSA-Llama, and every family at the end) and the "nsa" attention backend on tiny CPU models.

Small NSA sizes (compression 8/4, selection 16 x 4, window 24) make the sparsity matter at ~100 tokens.
"""
import warnings

import pytest
import torch

import nsa_hf
import nsa_hf.attention as nsa_attention
from nsa_hf import NSACache, NSALlamaConfig, NSALlamaForCausalLM, NSALlamaModel
from nsa_kernels import NSAParams, compress_varlen, nsa_attention_varlen
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

SMALL_NSA = dict(nsa_cmp_block=8, nsa_cmp_stride=4, nsa_slc_block=16, nsa_slc_count=4, nsa_init_blocks=1,
                 nsa_local_blocks=2, nsa_window=24)
GQA = [(4, 4), (4, 2), (4, 1)]


def tiny_config(heads=4, kv_heads=2, layers=2, **kwargs):
    base = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=512,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, **SMALL_NSA)
    return NSALlamaConfig(**{**base, **kwargs})


def randomize_nsa(model, std=0.3):
    """Move the NSA modules away from their init so the gates vary per token and head and the
    compressors are not plain mean pooling."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".nsa_" in name:
                param.add_(torch.randn_like(param) * std)
    return model


def tiny_model(heads=4, kv_heads=2, randomize=True, **kwargs):
    model = NSALlamaForCausalLM(tiny_config(heads, kv_heads, **kwargs)).eval()
    return randomize_nsa(model) if randomize else model


def logits_with(model, impl, ids, **kwargs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


# -- structure and initialisation ---------------------------------------------------------------------


def test_default_implementation_is_nsa_and_explicit_choice_wins():
    cfg = tiny_config()
    assert NSALlamaForCausalLM(cfg).config._attn_implementation == "nsa"
    assert NSALlamaForCausalLM._from_config(tiny_config(), attn_implementation="sdpa").config._attn_implementation == "sdpa"
    assert NSALlamaModel._from_config(tiny_config(), attn_implementation="eager").config._attn_implementation == "eager"


def test_nsa_modules_and_init():
    model = tiny_model(randomize=False, nsa_gate_init_bias=[-4.0, 0.5, -0.25])
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert {"nsa_cmp_k", "nsa_cmp_v", "nsa_gate"} <= names
    for layer in model.model.layers:
        attn = layer.self_attn
        assert isinstance(attn.nsa_gate, torch.nn.Linear)
        assert attn.nsa_gate.out_features == 4 * 3
        assert torch.count_nonzero(attn.nsa_gate.weight) == 0
        assert torch.equal(attn.nsa_gate.bias, torch.tensor([-4.0, 0.5, -0.25]).repeat(4))
        for cmp in (attn.nsa_cmp_k, attn.nsa_cmp_v):
            assert cmp.up.in_features == 8 * 16 and cmp.up.out_features == 16  # hidden defaults to head_dim
            assert torch.count_nonzero(cmp.down.weight) == 0 and torch.count_nonzero(cmp.pos_embed) == 0
            assert 0.5 < cmp.up.weight.std().item() * (8 * 16) ** 0.5 < 1.5
    assert tiny_model(nsa_cmp_mlp_hidden=24).model.layers[0].self_attn.nsa_cmp_k.up.out_features == 24


def test_peft_module_names_do_not_clash_with_llama():
    llama_suffixes = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for name in ("nsa_cmp_k", "nsa_cmp_v", "nsa_gate"):
        assert not any(name.endswith(s) or s.endswith(name) for s in llama_suffixes)


# -- forward / backward --------------------------------------------------------------------------------


@pytest.mark.parametrize("heads, kv_heads", GQA)
def test_forward_backward_nsa_and_sdpa(heads, kv_heads):
    model = tiny_model(heads, kv_heads).train()
    ids = torch.randint(3, 100, (2, 61))
    out = model(ids, labels=ids, use_cache=False)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    attn = model.model.layers[0].self_attn
    for param in (attn.q_proj.weight, attn.k_proj.weight, attn.nsa_gate.weight, attn.nsa_gate.bias,
                  attn.nsa_cmp_k.down.weight, attn.nsa_cmp_v.down.weight, attn.nsa_cmp_k.up.weight,
                  model.model.embed_tokens.weight):
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0
    # The same weights run dense with sdpa (the NSA modules are then unused) and differ at this length.
    nsa_logits = logits_with(model.eval(), "nsa", ids)
    sdpa_logits = logits_with(model, "sdpa", ids)
    assert torch.isfinite(sdpa_logits).all()
    assert (nsa_logits - sdpa_logits).abs().max() > 1e-2


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 1)])
def test_converted_init_is_dense_up_to_the_window(heads, kv_heads):
    # g_cmp = sigmoid(-30) ~ 0 and g_slc = g_win = 0.5: exactly dense while every key is in the window
    # and in the selected blocks (T <= 24 here).
    model = tiny_model(heads, kv_heads, randomize=False, nsa_gate_init_bias=[-30.0, 0.0, 0.0])
    short = torch.randint(3, 100, (2, 23))
    torch.testing.assert_close(logits_with(model, "nsa", short), logits_with(model, "sdpa", short),
                               atol=2e-5, rtol=1e-5)
    long = torch.randint(3, 100, (2, 97))
    assert (logits_with(model, "nsa", long) - logits_with(model, "sdpa", long)).abs().max() > 1e-3
    # The default bias -4 adds a small compressed term: close to dense, not equal.
    model = tiny_model(heads, kv_heads, randomize=False)
    gap = (logits_with(model, "nsa", short) - logits_with(model, "sdpa", short)).abs().max()
    assert 1e-6 < gap < 0.1


def test_dropout_in_training_raises():
    model = tiny_model(attention_dropout=0.1)
    ids = torch.randint(3, 100, (1, 20))
    model.eval()(ids, use_cache=False)  # no dropout at inference
    with pytest.raises(ValueError, match="dropout=0.1"):
        model.train()(ids, use_cache=False)


def test_four_d_mask_is_rejected():
    model = tiny_model()
    ids = torch.randint(3, 100, (1, 10))
    mask = torch.ones(1, 1, 10, 10, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="2D padding mask"):
        model(ids, attention_mask=mask, use_cache=False)


# -- the stock-Llama fallback ----------------------------------------------------------------------------


def test_stock_llama_with_nsa_matches_sdpa_short_and_warns_once(monkeypatch):
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, **SMALL_NSA)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="nsa").eval()
    monkeypatch.setattr(nsa_attention, "_fallback_warned", False)
    ids = torch.randint(3, 100, (2, 24))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nsa_short = logits_with(model, "nsa", ids)
        logits_with(model, "nsa", ids)
    fallback = [w for w in caught if "nsa-hf convert" in str(w.message)]
    assert len(fallback) == 1
    torch.testing.assert_close(nsa_short, logits_with(model, "sdpa", ids), atol=2e-5, rtol=1e-5)
    long = torch.randint(3, 100, (2, 90))
    assert (logits_with(model, "nsa", long) - logits_with(model, "sdpa", long)).abs().max() > 1e-3


# -- save / load ---------------------------------------------------------------------------------------------


def test_save_load_bit_identical_and_auto_class(tmp_path):
    model = tiny_model()
    ids = torch.randint(3, 100, (2, 45))
    before = logits_with(model, "nsa", ids)
    model.save_pretrained(tmp_path)
    reloaded = NSALlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config._attn_implementation == "nsa"
    with torch.no_grad():
        assert torch.equal(reloaded(ids, use_cache=False).logits, before)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="nsa").eval()
    assert type(auto) is NSALlamaForCausalLM and auto.config._attn_implementation == "nsa"
    with torch.no_grad():
        assert torch.equal(auto(ids, use_cache=False).logits, before)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert dense.config._attn_implementation == "sdpa"


def test_set_attn_implementation_switches_back_and_forth():
    model = tiny_model()
    ids = torch.randint(3, 100, (1, 70))
    a = logits_with(model, "nsa", ids)
    logits_with(model, "eager", ids)
    torch.testing.assert_close(logits_with(model, "nsa", ids), a, atol=0, rtol=0)


# -- padding and packing -------------------------------------------------------------------------------------


def _pad(seqs, side):
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        ids[i, span], mask[i, span] = s, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions, length


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4)])
def test_padded_batch_equals_separate_runs(side, heads, kv_heads):
    model = tiny_model(heads, kv_heads)
    seqs = [torch.randint(3, 100, (n,)) for n in (77, 41, 9)]
    ids, mask, positions, length = _pad(seqs, side)
    model.set_attn_implementation("nsa")
    weights = torch.randn(len(seqs), length, 100)

    def loss_of(logits, keep):
        return (logits * weights[: logits.shape[0]] * keep[..., None]).sum()

    out = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    loss_of(out, mask).backward()
    batch_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for i, s in enumerate(seqs):
        single = model(s[None], use_cache=False).logits
        span = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        torch.testing.assert_close(out[i, span], single[0], atol=2e-5, rtol=1e-5)
        w = weights[i, span][None]
        (single * w).sum().backward()
    for name, param in model.named_parameters():
        if name in batch_grads:
            torch.testing.assert_close(batch_grads[name], param.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_outputs_at_padded_queries_are_zero():
    cfg = tiny_config()
    attn = tiny_model().model.layers[0].self_attn
    q = torch.randn(2, 4, 30, 16)
    k, v = torch.randn(2, 2, 30, 16), torch.randn(2, 2, 30, 16)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, :7] = False  # left padding
    mask[1, 25:] = False  # right padding
    gates = torch.rand(2, 30, 4, 3)
    out, weights = nsa_hf.nsa_attention_forward(attn, q, k, v, mask, scaling=0.25, nsa_gates=gates,
                                                nsa_compressors=(attn.nsa_cmp_k, attn.nsa_cmp_v),
                                                nsa_params=cfg.nsa_params())
    assert weights is None and out.shape == (2, 30, 4, 16)
    assert torch.count_nonzero(out[0, :7]) == 0 and torch.count_nonzero(out[1, 25:]) == 0
    assert torch.count_nonzero(out[0, 7:]) > 0


def _packed_inputs(lengths):
    docs = [torch.randint(3, 100, (n,)) for n in lengths]
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return docs, ids, positions, cu


@pytest.mark.parametrize("how", ["cu_seq_lens", "position_ids"])
def test_packed_sequences_equal_separate_runs(how):
    model = tiny_model()
    model.set_attn_implementation("nsa")
    lengths = [37, 1, 58, 13]
    docs, ids, positions, cu = _packed_inputs(lengths)
    kwargs = dict(position_ids=positions, use_cache=False)
    if how == "cu_seq_lens":
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    packed = model(ids, **kwargs).logits
    packed.sum().backward()
    packed_grad = model.model.layers[1].self_attn.nsa_gate.weight.grad.clone()
    model.zero_grad()
    for doc, start, end in zip(docs, cu[:-1].tolist(), cu[1:].tolist()):
        single = model(doc[None], use_cache=False).logits
        torch.testing.assert_close(packed[0, start:end], single[0], atol=2e-5, rtol=1e-5)
        single.sum().backward()
    torch.testing.assert_close(packed_grad, model.model.layers[1].self_attn.nsa_gate.weight.grad,
                               atol=1e-4, rtol=1e-4)


def test_packed_rows_with_a_batch_dimension():
    model = tiny_model()
    model.set_attn_implementation("nsa")
    docs, ids, positions, _ = _packed_inputs([30, 20])
    docs2, ids2, positions2, _ = _packed_inputs([45, 5])
    out = logits_with(model, "nsa", torch.cat([ids, ids2]), position_ids=torch.cat([positions, positions2]))
    for row, row_docs in enumerate((docs, docs2)):
        start = 0
        for doc in row_docs:
            single = logits_with(model, "nsa", doc[None])
            torch.testing.assert_close(out[row, start:start + len(doc)], single[0], atol=2e-5, rtol=1e-5)
            start += len(doc)


def test_bad_cu_seq_lens_raise():
    model = tiny_model()
    ids = torch.randint(3, 100, (1, 20))
    with pytest.raises(ValueError, match="cu_seq_lens"):
        model(ids, cu_seq_lens_q=torch.tensor([0, 5, 19], dtype=torch.int32), use_cache=False)
    with pytest.raises(ValueError, match="batch of one"):
        model(torch.randint(3, 100, (2, 20)), cu_seq_lens_q=torch.tensor([0, 20], dtype=torch.int32), use_cache=False)


# -- wiring: the backend computes exactly nsa_kernels.nsa_attention_varlen -------------------------------


@pytest.mark.parametrize("heads, kv_heads", GQA)
def test_backend_equals_direct_varlen_call(heads, kv_heads):
    model = tiny_model(heads, kv_heads)
    params = model.config.nsa_params()
    captured = []
    original = nsa_attention.nsa_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        out = original(module, query, key, value, attention_mask, **kwargs)
        captured.append((module, query, key, value, attention_mask, kwargs, out[0]))
        return out

    nsa_hf.attention.AttentionInterface.register("nsa_spy", spy)
    nsa_hf.attention.AttentionMaskInterface.register("nsa_spy", nsa_attention.nsa_padding_mask)
    seqs = [torch.randint(3, 100, (n,)) for n in (83, 50)]
    ids, mask, positions, length = _pad(seqs, "left")
    model.set_attn_implementation("nsa_spy")
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions, use_cache=False)
    assert len(captured) == model.config.num_hidden_layers
    for module, query, key, value, attention_mask, kwargs, out in captured:
        gates = kwargs["nsa_gates"]
        for row, seq in enumerate(seqs):
            span = slice(length - len(seq), length)
            q = query[row, :, span].transpose(0, 1)
            k = key[row, :, span].transpose(0, 1)
            v = value[row, :, span].transpose(0, 1)
            cu = torch.tensor([0, len(seq)], dtype=torch.int32)
            with torch.no_grad():
                ck, cu_cmp = compress_varlen(k, cu, module.nsa_cmp_k, params.cmp_block, params.cmp_stride)
                cv, _ = compress_varlen(v, cu, module.nsa_cmp_v, params.cmp_block, params.cmp_stride)
            expect = nsa_attention_varlen(q, k, v, ck, cv, gates[row, span], cu, cu, cu_cmp, params,
                                          module.scaling)
            torch.testing.assert_close(out[row, span], expect, atol=1e-5, rtol=1e-5)
    # The gates are the sigmoid of the gate projection, ordered (cmp, slc, win) per head.
    assert gates.shape == (2, length, heads, 3) and 0 < gates.min() and gates.max() < 1


def test_nsa_params_from_stock_config_fields():
    cfg = LlamaConfig(nsa_window=100, nsa_slc_count=8)
    assert nsa_hf.nsa_params_from_config(cfg) == NSAParams(window=100, slc_count=8)
    assert nsa_hf.nsa_params_from_config(LlamaConfig()) == NSAParams()
    assert nsa_hf.nsa_params_from_config(tiny_config()) == tiny_config().nsa_params()


def test_model_forward_builds_an_nsa_cache():
    model = tiny_model()
    out = model(torch.randint(3, 100, (1, 30)), use_cache=True)
    assert isinstance(out.past_key_values, NSACache)
    assert out.past_key_values.layers[0].compressed_length() == [(30 - 8) // 4 + 1]


def test_gradient_checkpointing_matches_plain_backward():
    model = tiny_model().train()
    ids = torch.randint(3, 100, (2, 50))
    model(ids, labels=ids, use_cache=False).loss.backward()
    plain = model.model.layers[0].self_attn.nsa_gate.weight.grad.clone()
    model.zero_grad()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(ids, labels=ids, use_cache=False).loss.backward()
    torch.testing.assert_close(model.model.layers[0].self_attn.nsa_gate.weight.grad, plain, atol=1e-5, rtol=1e-4)


def test_remote_code_files_import_only_torch_transformers_nsa_kernels_and_siblings(tmp_path):
    """configuration/modeling and the backend's modules ship as Hub remote code: no nsa_hf imports there,
    and nsa_kernels only as `from nsa_kernels[.x] import name` (the exporter bundles the reference for those)."""
    import ast
    import json
    import sys

    allowed = {"torch", "transformers", "__future__"} | set(sys.stdlib_module_names)
    tiny_model().save_pretrained(tmp_path)
    saved = {p.name for p in tmp_path.glob("*.py")}
    assert {"configuration_nsa_llama.py", "configuration_nsa.py", "modeling_nsa_llama.py", "modeling_nsa.py",
            "families.py", "attention.py", "backends.py", "cache.py", "decoding.py", "packing.py"} <= saved
    for name in saved:  # as saved: our modules with the bundle fallback, and the bundled reference
        for node in ast.walk(ast.parse((tmp_path / name).read_text())):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
                assert roots <= allowed, (name, roots)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in allowed | {"nsa_kernels"}, (name, node.module)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_nsa_llama.NSALlamaForCausalLM"
    assert auto_map["AutoConfig"] == "configuration_nsa_llama.NSALlamaConfig"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("packed", [False, True])
def test_every_parameter_gets_a_gradient_on_batches_too_short_to_compress(packed, device):
    """FSDP/DDP reduce every parameter's gradient on every rank: a rank whose batch holds no complete
    compression block must still give the compressors a (zero) gradient, or the collective hangs
    (an FSDP run on 2 GPUs stalled at step 16, where one rank got a 12-token piece, cmp_block 16)."""
    model = tiny_model().train().to(device)
    short = 7  # < nsa_cmp_block = 8: no compressed token anywhere
    ids = torch.randint(3, 100, (1, short), device=device)
    kwargs = {}
    if packed:  # two documents of 4 and 3 tokens in one row, as DataCollatorWithFlattening packs them
        cu = torch.tensor([0, 4, short], dtype=torch.int32, device=device)
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4, max_length_k=4,
                      position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device))
    model(ids, labels=ids, use_cache=False, **kwargs).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    cmp_grads = [p.grad for name, p in model.named_parameters() if ".nsa_cmp_" in name]
    assert cmp_grads and all(float(g.abs().max()) == 0.0 for g in cmp_grads)


# -- every family ------------------------------------------------------------------------------------------


def converted_family(family):
    """A tiny stock model of ``family`` converted to NSA, its NSA modules moved off their init."""
    from tests.hf.test_convert import SMALL, tiny_dense

    from nsa_hf.convert import convert_to_nsa

    dense = tiny_dense(family, vocab_size=100)
    model, _ = convert_to_nsa(dense, None, NSAParams(**SMALL), evaluate=False, progress=False)
    torch.manual_seed(1)
    return dense, randomize_nsa(model.eval())


FAMILY_NAMES = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])  # Llama: tests/hf/test_hf_generate.py
def test_family_generate_cached_equals_uncached_and_left_padding_equals_single_runs(family):
    """Greedy decoding with the NSA cache crosses compression (8) and selection (16) block boundaries and
    gives the tokens of uncached decoding; a left-padded batch gives each row's own tokens."""
    _, model = converted_family(family)
    gen = dict(max_new_tokens=14, do_sample=False, pad_token_id=0)
    prompts = [torch.randint(3, 100, (n,)) for n in (21, 10)]  # the first decodes positions 21..34
    singles = []
    for p in prompts:
        cached = model.generate(p[None], use_cache=True, **gen)
        assert torch.equal(cached, model.generate(p[None], use_cache=False, **gen))
        singles.append(cached[0, len(p):])
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    batch = model.generate(ids, attention_mask=mask, **gen)
    for i, want in enumerate(singles):
        assert torch.equal(batch[i, width:], want), i


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_save_reload_bit_identical_with_auto_classes(family, tmp_path):
    from transformers import AutoConfig

    _, model = converted_family(family)
    ids = torch.randint(3, 100, (2, 45))
    before = logits_with(model, "nsa", ids)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == f"nsa_{family}"
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(auto) is type(model) and auto.config._attn_implementation == "nsa"
    with torch.no_grad():
        assert torch.equal(auto(ids, use_cache=False).logits, before)
    for key, value in model.state_dict().items():
        assert torch.equal(auto.state_dict()[key], value), key
    dense = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert dense.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits_with(dense.eval(), "sdpa", ids), logits_with(model, "sdpa", ids), atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_stock_family_with_nsa_falls_back_and_warns_once(family, monkeypatch):
    from tests.hf.test_convert import tiny_dense

    model = tiny_dense(family, vocab_size=100)
    model.set_attn_implementation("nsa")
    ids = torch.randint(3, 100, (2, 20))  # shorter than the default window: the fallback is dense here
    monkeypatch.setattr(nsa_attention, "_fallback_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        short = logits_with(model, "nsa", ids)
        logits_with(model, "nsa", ids)
    fallback = [w for w in caught if "without NSA weights" in str(w.message)]
    assert len(fallback) == 1 and "Convert the checkpoint with `nsa-hf convert`" in str(fallback[0].message)
    torch.testing.assert_close(short, logits_with(model, "sdpa", ids), atol=2e-5, rtol=1e-5)


def test_fallback_on_an_unsupported_model_type_does_not_advise_converting(monkeypatch):
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = Phi3ForCausalLM._from_config(cfg, attn_implementation="nsa").eval()
    monkeypatch.setattr(nsa_attention, "_fallback_warned", False)
    with pytest.warns(UserWarning, match="does not support model_type 'phi3'") as caught:
        logits_with(model, "nsa", torch.randint(3, 100, (1, 12)))
    assert not any("Convert the checkpoint" in str(w.message) for w in caught)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_lora_trains_nsa_modules_fully_and_merges(family):
    peft = pytest.importorskip("peft")
    from nsa_hf.lora import nsa_lora_config

    _, model = converted_family(family)
    peft_model = peft.get_peft_model(model, nsa_lora_config(r=4))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("q_proj.lora_A" in n for n in trainable) and any("down_proj.lora_B" in n for n in trainable)
    assert any(".nsa_gate." in n for n in trainable) and any(".nsa_cmp_k." in n for n in trainable)
    assert not any("embed_tokens" in n or n.endswith("q_proj.base_layer.weight") for n in trainable)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    ids = torch.randint(3, 100, (1, 40))
    peft_model.train()
    peft_model(ids, labels=ids, use_cache=False).loss.backward()
    peft_model.eval()
    with torch.no_grad():
        want = peft_model(ids, use_cache=False).logits
    merged = peft_model.merge_and_unload()
    assert type(merged).__name__ == f"NSA{ {'llama': 'Llama', 'mistral': 'Mistral', 'qwen2': 'Qwen2', 'qwen3': 'Qwen3'}[family]}ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, use_cache=False).logits, want, atol=1e-4, rtol=1e-4)
