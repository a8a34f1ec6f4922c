"""nsa_hf.nsa_backend(varlen=...) / config.nsa_varlen_backend: forcing the implementation of the
(non-decoding) NSA calls of a model, e.g. the reference on CUDA to check a training run, or the Triton
kernels (interpreter) on CPU; the choice is scoped to the block or the model."""
import os

import pytest
import torch

from nsa_hf import nsa_backend
import nsa_kernels.parallel as nsa_parallel

from tests.hf.test_hf_generate import tiny_model

cpu_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                                     reason="needs TRITON_INTERPRET=1 on a CPU-only machine")


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@cpu_interpreter
def test_forced_triton_backend_runs_the_kernels_and_matches_the_reference(monkeypatch):
    calls = []
    original = nsa_parallel.parallel_nsa

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(nsa_parallel, "parallel_nsa", counted)
    model = tiny_model(heads=6, kv_heads=2, layers=1).train()
    ids = torch.randint(3, 100, (2, 53))  # odd length, partial blocks; 4 selection blocks of 16: one chosen by score

    model.config.nsa_varlen_backend = "triton"  # the model's own choice; the block below overrides it
    with nsa_backend(varlen="reference"):
        ref_loss, ref_grads = _loss_and_grads(model, ids)
    assert calls == []
    loss, grads = _loss_and_grads(model, ids)
    assert len(calls) == 1  # one call per layer
    del model.config.nsa_varlen_backend
    _loss_and_grads(model, ids)  # "auto" on CPU: the reference
    assert len(calls) == 1
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and any(".nsa_" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_bad_backend_value_names_the_setting_and_the_choices():
    with pytest.raises(ValueError, match=r"'cuda'.*\('auto', 'triton', 'reference'\).*nsa_backend\(varlen"):
        nsa_backend(varlen="cuda").__enter__()
    with pytest.raises(ValueError, match=r"'on'.*\('auto', 'triton', 'off'\).*nsa_backend\(decode"):
        nsa_backend(decode="on").__enter__()
    model = tiny_model(layers=1)
    model.config.nsa_varlen_backend = "cuda"
    with pytest.raises(ValueError, match=r"config.nsa_varlen_backend='cuda'.*\('auto', 'triton', 'reference'\)"):
        model(torch.randint(3, 100, (1, 20)), use_cache=False)


def test_backend_blocks_nest_and_restore():
    from nsa_hf.backends import decode_backend, varlen_backend

    config = tiny_model(layers=1).config
    config.nsa_decode_backend = "off"
    assert (varlen_backend(config), decode_backend(config)) == ("auto", "off")
    with nsa_backend(varlen="reference"):
        with nsa_backend(decode="triton"):
            assert (varlen_backend(config), decode_backend(config)) == ("reference", "triton")
        assert (varlen_backend(config), decode_backend(config)) == ("reference", "off")
        with pytest.raises(RuntimeError):
            with nsa_backend(varlen="triton"):
                raise RuntimeError
        assert varlen_backend(config) == "reference"
    assert (varlen_backend(config), decode_backend(config)) == ("auto", "off")


def test_reference_stands_in_for_the_dispatcher_and_refuses_triton():
    """Hub remote code bundles only the reference under the dispatcher's name: same keywords accepted."""
    from nsa_kernels import NSAParams, reference

    params = NSAParams(cmp_block=8, cmp_stride=4, slc_block=16, slc_count=2, init_blocks=1, local_blocks=1, window=8)
    n = 20
    q, k, v = torch.randn(n, 2, 8), torch.randn(n, 1, 8), torch.randn(n, 1, 8)
    cmp_k, cmp_v = torch.randn(4, 1, 8), torch.randn(4, 1, 8)  # blocks at 0, 4, 8, 12 of 20 tokens
    gates = torch.rand(n, 2, 3)
    cu = torch.tensor([0, n], dtype=torch.int32)
    cu_c = torch.tensor([0, 4], dtype=torch.int32)
    args = (q, k, v, cmp_k, cmp_v, gates, cu, cu, cu_c, params)
    out = reference.nsa_attention_varlen(*args, backend="auto", max_seqlen_q=n, max_seqlen_k=n)
    torch.testing.assert_close(out, reference.nsa_attention_varlen(*args))
    with pytest.raises(ValueError, match=r"backend='triton'.*allowed: 'reference', 'auto'"):
        reference.nsa_attention_varlen(*args, backend="triton")
