"""torch.compile(fullgraph=True) of NSA-Llama: while tracing, the backend takes its static-shape path (rows of
one contiguous run of real tokens, no cached past, no host synchronisation). The path is checked against
the eager varlen path without compiling (fast), then compiled (slow: tracing on a CPU)."""
import os

import pytest
import torch

from nsa_hf import NSACache

from tests.hf.test_hf_generate import tiny_model

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
