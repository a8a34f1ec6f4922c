"""torch.compile(fullgraph=True) and torch.export of NSA-Llama. Without a cached past, while tracing, the backend
takes its static-shape path (rows of one contiguous run of real tokens, no host synchronisation): checked
against the eager varlen path without compiling (fast), then compiled (slow: tracing on a CPU). Decoding steps
on an NSAStaticCache take the graph-safe static decode path (the nsa_kernels::decode op): compiled steps,
generate()'s automatic compilation and an exported step against eager decoding."""
import os

import pytest
import torch
from transformers import CompileConfig

from nsa_hf import NSACache, NSAStaticCache, nsa_backend
from nsa_hf.cache import cache_kwarg

from tests.hf.test_hf_generate import tiny_model
from tests.hf.test_hf_static_cache import left_padded

interpreter = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()


def _batch(padding):
    ids = torch.randint(3, 100, (3, 45))
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[0, :13], mask[2, :30] = 0, 0
    elif padding == "right":
        mask[1, 40:], mask[2, 20:] = 0, 0
    return ids, mask


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (3, 1)])
def test_static_path_equals_varlen_path(padding, heads, kv_heads, monkeypatch):
    """The static path (forced by pretending to trace) against the eager path, outputs at real tokens;
    with an NSA cache its compressed state is dropped, and the next eager step rebuilds it."""
    model = tiny_model(heads, kv_heads, layers=2)
    ids, mask = _batch(padding)
    real = mask.bool()
    with torch.no_grad():
        eager = model(ids, attention_mask=mask, use_cache=False).logits
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        cache = NSACache(config=model.config)
        static = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
        assert cache.layers[0].compressed_length() == []
        monkeypatch.undo()
        torch.testing.assert_close(static[real], eager[real], atol=2e-5, rtol=1e-5)
        if padding != "right":  # an eager step continues from the cache the static path filled
            nxt = torch.randint(3, 100, (3, 1))
            mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
            step = model(nxt, attention_mask=mask2, past_key_values=cache, use_cache=True).logits
            full = model(torch.cat([ids, nxt], 1), attention_mask=mask2, use_cache=False).logits
            torch.testing.assert_close(step[:, -1], full[:, -1], atol=2e-5, rtol=1e-5)


def test_static_path_refuses_what_it_cannot_compute(monkeypatch):
    model = tiny_model(layers=1)
    ids = torch.randint(3, 100, (1, 20))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        restart = torch.cat([torch.arange(12), torch.arange(8)])[None]
        with pytest.raises(RuntimeError, match="restart"):
            model(ids, position_ids=restart, use_cache=False)
        holes = torch.ones_like(ids)
        holes[0, 5] = 0
        with pytest.raises(RuntimeError, match="contiguous run"):
            model(ids, attention_mask=holes, use_cache=False)
        cu = torch.tensor([0, 12, 20], dtype=torch.int32)
        with pytest.raises(ValueError, match="cu_seq_lens_q/k.*do not compile"):
            model(ids, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=12, max_length_k=12)
        cache = NSACache(config=model.config)
        monkeypatch.undo()
        model(ids, past_key_values=cache, use_cache=True)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        with pytest.raises(ValueError, match="no cached past"):
            model(ids[:, :1], past_key_values=cache, use_cache=True)


@pytest.mark.slow
def test_model_compiles_fullgraph_inference_and_training():
    """fullgraph=True traces without graph breaks: inference with left and right padding (one graph for
    both: same shapes) and no mask, and a training step (forward and backward); outputs, loss and
    gradients equal the eager model's. With TRITON_INTERPRET=1 the Triton path (custom ops) is traced too."""
    model = tiny_model(4, 2, layers=1)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for varlen in ["auto"] + (["triton"] if interpreter else []):
        model.config.nsa_varlen_backend = varlen
        with torch.no_grad():
            for padding in ("left", "right", "none"):
                ids, mask = _batch(padding)
                kwargs = {} if padding == "none" else {"attention_mask": mask}
                out = compiled(ids, use_cache=False, **kwargs).logits
                ref = model(ids, use_cache=False, **kwargs).logits
                torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=1e-5)
    del model.config.nsa_varlen_backend
    model.train()
    ids = torch.randint(3, 100, (2, 40))
    loss = compiled(ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = model(ids, labels=ids, use_cache=False).loss
    ref.backward()
    torch.testing.assert_close(loss, ref)
    assert any(".nsa_" in n for n in grads)
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_model_exports_without_a_cache():
    """torch.export of a forward with use_cache=False (left padding); the exported program equals the
    eager model at real tokens, also on another mask of the same shape."""
    model = tiny_model(4, 2, layers=1)
    ids, mask = _batch("left")
    program = torch.export.export(model, (ids,), kwargs={"attention_mask": mask, "use_cache": False})
    ids2, mask2 = _batch("right")
    for i, m in ((ids, mask), (ids2, mask2)):
        with torch.no_grad():
            out = program.module()(i, attention_mask=m, use_cache=False).logits
            ref = model(i, attention_mask=m, use_cache=False).logits
        torch.testing.assert_close(out[m.bool()], ref[m.bool()], atol=2e-5, rtol=1e-5)


# -- decoding steps on a static cache ------------------------------------------------------------------------


def _recording_backend():
    """A torch.compile backend that runs the captured graphs eagerly and records them."""
    graphs = []

    def backend(gm, example_inputs, **options):  # (CompileConfig passes mode=...)
        graphs.append(gm)
        return gm.forward

    return backend, graphs


def _decode_ops(gm) -> int:
    return sum("nsa_kernels.decode" in str(node.target) for node in gm.graph.nodes)


def _prefill(model, ids, mask, max_cache_len):
    """An eager prefill into a new NSAStaticCache: ``(cache, first new tokens (B, 1))``."""
    cache = NSAStaticCache(config=model.config, max_cache_len=max_cache_len)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=True,
                    **{cache_kwarg(model): cache})
    return cache, out.logits[:, -1:].argmax(-1)


def _compare_decode_steps(model, compiled, ids, mask, tol):
    """Prefill two static caches eagerly, then six greedy decoding steps (crossing compression and selection
    block boundaries) through ``model`` on one and ``compiled`` on the other: the same logits. Returns the
    two caches (eager, compiled)."""
    eager_cache, tok = _prefill(model, ids, mask, ids.shape[1] + 8)
    compiled_cache, _ = _prefill(model, ids, mask, ids.shape[1] + 8)
    for _ in range(6):
        mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
        kwargs = dict(attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1, use_cache=True)
        ref = model(tok, **kwargs, **{cache_kwarg(model): eager_cache}).logits
        out = compiled(tok, **kwargs, **{cache_kwarg(model): compiled_cache}).logits
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
        tok = ref[:, -1:].argmax(-1)
    return eager_cache, compiled_cache


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["auto", pytest.param("triton", marks=pytest.mark.skipif(
    not interpreter, reason="needs TRITON_INTERPRET=1 on a CPU"))])
def test_static_cache_decode_steps_compile_fullgraph(decode):
    """Decoding steps on an NSAStaticCache compile with fullgraph=True (one graph per layer count of decode
    ops, the attention mask growing by one each step) and give the eager steps' logits, on two caches filled
    by the same eager prefill."""
    model = tiny_model(3, 1, layers=2)
    ids, mask = left_padded([21, 9, 14])
    backend, graphs = _recording_backend()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with nsa_backend(decode=decode), torch.no_grad():
        eager_cache, compiled_cache = _compare_decode_steps(model, compiled, ids, mask, tol=1e-5)
    assert graphs and all(_decode_ops(gm) == 2 for gm in graphs)  # the attention of both layers: one op each
    torch.testing.assert_close(compiled_cache.layers[1].cmp_k, eager_cache.layers[1].cmp_k)
    assert torch.equal(compiled_cache.layers[1].cmp_len, eager_cache.layers[1].cmp_len)


@pytest.mark.slow
def test_generate_static_cache_auto_compiles_decoding_steps():
    """generate(cache_implementation="static") compiles the decoding steps (CompileConfig, here on a CPU)
    with fullgraph=True: the greedy tokens and logits of the eager dynamic-cache generate (fp32)."""
    model = tiny_model(4, 2, layers=1)
    ids, mask = left_padded([23, 12, 17])
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    dynamic = model.generate(ids, **kwargs)
    backend, graphs = _recording_backend()
    config = CompileConfig(fullgraph=True, backend=backend)
    config._compile_all_devices = True  # compile on a CPU too (a class attribute in transformers, set after init)
    static = model.generate(ids, cache_implementation="static", compile_config=config, **kwargs)
    assert isinstance(static.past_key_values, NSAStaticCache)
    assert graphs and all(_decode_ops(gm) == 1 for gm in graphs)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits, 1), torch.stack(dynamic.logits, 1), atol=5e-5, rtol=1e-5)


class _DecodeStep(torch.nn.Module):
    """One decoding step of ``model`` on ``cache`` (filled by an eager prefill) as an exportable module: every
    tensor of the cache that a step reads or writes is a registered buffer (dense and compressed keys/values,
    lengths, per-row left padding), so that torch.export sees the updates as buffer mutations. The positions
    of the new tokens come from the cache (``cumulative_length - left_pad``), so the step takes only the
    token ids ``(B, 1)``."""

    STATE = ("keys", "values", "cumulative_length", "cmp_k", "cmp_v", "cmp_len", "left_pad")

    def __init__(self, model, cache):
        super().__init__()
        self.model, self.cache = model, cache
        for i, layer in enumerate(cache.layers):
            for name in self.STATE:
                self.register_buffer(f"{name}_{i}", getattr(layer, name), persistent=False)

    def forward(self, input_ids):
        layer = self.cache.layers[0]
        position_ids = (layer.cumulative_length - layer.left_pad)[:, None].long()
        return self.model(input_ids, position_ids=position_ids, use_cache=True,
                          **{cache_kwarg(self.model): self.cache}).logits


@pytest.mark.slow
def test_static_cache_decode_step_exports():
    """torch.export (strict, as transformers' export recipes) of a decoding step on an NSAStaticCache after an
    eager prefill: the program holds the decode op, and running it step after step (its buffers updated in
    place) gives the eager steps' logits."""
    model = tiny_model(4, 2, layers=2)
    ids, mask = left_padded([21, 13])
    eager_cache, tok = _prefill(model, ids, mask, ids.shape[1] + 6)
    export_cache, _ = _prefill(model, ids, mask, ids.shape[1] + 6)
    with torch.no_grad():
        program = torch.export.export(_DecodeStep(model, export_cache), (tok,), strict=True)
    assert sum("nsa_kernels.decode" in str(node.target) for node in program.graph.nodes) == 2
    step = program.module()
    with torch.no_grad():
        for _ in range(5):
            mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            ref = model(tok, attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1, use_cache=True,
                        **{cache_kwarg(model): eager_cache}).logits
            torch.testing.assert_close(step(tok), ref, atol=1e-5, rtol=1e-5)
            tok = ref[:, -1:].argmax(-1)


def test_static_cache_prefill_under_compile_names_the_fix(monkeypatch):
    """A traced step on an NSAStaticCache that is not a decoding step (a prefill) raises naming the fix."""
    model = tiny_model(4, 2, layers=1)
    ids, mask = left_padded([9, 5])
    cache = NSAStaticCache(config=model.config, max_cache_len=16)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad(), pytest.raises(ValueError, match="eager prefill"):
        model(ids, attention_mask=mask, use_cache=True, **{cache_kwarg(model): cache})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_static_cache_auto_compiles_on_cuda(dtype):
    """On CUDA generate(cache_implementation="static") compiles the decoding steps by itself (default
    CompileConfig: inductor, CUDA graphs) around the Triton decode op: the tokens of the eager static-cache
    generate, and in fp32 of the dynamic-cache generate."""
    model = tiny_model(8, 2, layers=2).to("cuda", dtype)
    ids, mask = left_padded([70, 23, 41], device="cuda")
    kwargs = dict(attention_mask=mask, max_new_tokens=24, do_sample=False)
    eager = model.generate(ids, cache_implementation="static", disable_compile=True, **kwargs)
    compiled = model.generate(ids, cache_implementation="static", **kwargs)
    assert hasattr(model, "_compiled_call")
    assert torch.equal(compiled, eager)
    if dtype == torch.float32:
        assert torch.equal(compiled, model.generate(ids, **kwargs))


@pytest.mark.gpu
def test_static_cache_decode_step_compiles_fullgraph_inductor_cuda():
    """A decoding step on an NSAStaticCache compiled with inductor (fullgraph=True) on CUDA, Triton decode op
    inside: the eager steps' logits."""
    model = tiny_model(8, 2, layers=2).to("cuda")
    ids, mask = left_padded([70, 23, 41], device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        _compare_decode_steps(model, compiled, ids, mask, tol=1e-4)


@pytest.mark.slow
def test_transformers_export_recipe_with_a_plain_static_cache():
    """transformers' export recipe (TorchExportableModuleWithStaticCache: a plain StaticCache registered as
    buffers, no padding mask, one token per call from position 0) exports an NSA model: each step recompresses
    the dense keys (no compressed state) inside the graph, and the program fed a sequence token by token gives
    the uncached forward's logits at every position."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    model = tiny_model(4, 2, layers=2)
    model.generation_config.cache_implementation = "static"
    ids = torch.randint(3, 100, (1, 22))  # crosses compression (stride 4) and selection (16) block boundaries
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        module = TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=30)
        program = torch.export.export(module, (), kwargs={"input_ids": ids[:, :1], "cache_position": torch.tensor([0])},
                                      strict=True)
        assert sum("nsa_kernels.decode" in str(node.target) for node in program.graph.nodes) == 2
        step = program.module()
        for i in range(ids.shape[1]):
            out = step(input_ids=ids[:, i:i + 1], cache_position=torch.tensor([i]))
            torch.testing.assert_close(out[0, -1], full[0, i], atol=1e-5, rtol=1e-5)
