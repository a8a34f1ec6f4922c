"""Compare the gradients of one loss through the NSA Triton kernels and through the PyTorch reference,
on a given (trained) NSA-Llama: the check that tells a kernel error from training dynamics when a
fine-tune misbehaves on the GPU only.

For each loss the model is run three times from the same float32 master weights:

* ``triton``: a working copy in the training dtype (bf16 on CUDA), NSA through the Triton kernels;
* ``reference``: the same working copy, NSA through the PyTorch reference (float32 inside);
* ``reference_fp32``: a float32 copy through the reference: the yardstick.

and the gradients are compared per parameter group (the new NSA modules, attention projections,
MLP, embeddings and norms, everything): cosine similarity and relative error ``|a - b| / |b|``
against ``reference_fp32``. Kernels that are right give ``triton`` about the agreement that
``reference`` (same dtype, exact attention) has; a kernel error shows as a clearly lower cosine.

Used by ``research/quality.py --grad-check``; :func:`compare_backends` works on any NSA-Llama.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch

GROUPS = ("nsa_modules", "attention", "mlp", "embeddings_norms", "all")


def parameter_group(name: str) -> str:
    from nsa_hf.training import is_nsa_parameter

    if is_nsa_parameter(name):
        return "nsa_modules"
    if "self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "embeddings_norms"


def backend_gradients(model, loss_fn: Callable, backend: str) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and float32 gradients of ``model`` (whose parameters must require grad) with every NSA
    call forced to ``backend`` (inside an ``nsa_hf.nsa_backend(varlen=backend)`` block)."""
    from nsa_hf import nsa_backend

    with nsa_backend(varlen=backend):
        model.zero_grad(set_to_none=True)
        model.train()
        loss = loss_fn(model)
        loss.backward()
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return float(loss.item()), grads


def _flat(grads: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([grads[n].reshape(-1) for n in names]) if names else torch.zeros(0)


def agreement(test: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> dict:
    """Per parameter group: cosine similarity and relative error of ``test`` against ``truth``."""
    out = {}
    names = [n for n in truth if n in test]
    missing = sorted(set(truth) ^ set(test))
    for group in GROUPS:
        sel = [n for n in names if group == "all" or parameter_group(n) == group]
        if not sel:
            continue
        a, b = _flat(test, sel), _flat(truth, sel)
        denom = b.norm().item()
        out[group] = {
            "cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item() if denom > 0 else None,
            "rel_error": (a - b).norm().item() / denom if denom > 0 else None,
            "norm": a.norm().item(), "norm_truth": denom,
        }
    if missing:
        out["missing"] = missing
    return out


def compare_backends(master, loss_fns: dict[str, Callable], dtype: torch.dtype) -> dict:
    """For each named loss: the three runs (module docstring) and their agreement with ``reference_fp32``."""
    working = master if dtype == torch.float32 else copy.deepcopy(master).to(dtype)
    exact = copy.deepcopy(master).float()
    results = {}
    for name, loss_fn in loss_fns.items():
        loss_t, g_t = backend_gradients(working, loss_fn, "triton")
        loss_r, g_r = backend_gradients(working, loss_fn, "reference")
        loss_x, g_x = backend_gradients(exact, loss_fn, "reference")
        results[name] = {
            "loss": {"triton": loss_t, "reference": loss_r, "reference_fp32": loss_x},
            "triton_vs_reference_fp32": agreement(g_t, g_x),
            "reference_vs_reference_fp32": agreement(g_r, g_x),
            "triton_vs_reference": agreement(g_t, g_r),
        }
        del g_t, g_r, g_x
    del working, exact
    return results


def summary_lines(results: dict) -> list[str]:
    """One line per loss and comparison: the cosine of every group (for the log)."""
    lines = []
    for name, res in results.items():
        lines.append(f"grad check {name}: loss " + ", ".join(f"{k} {v:.4f}" for k, v in res["loss"].items()))
        for cmp in ("triton_vs_reference_fp32", "reference_vs_reference_fp32", "triton_vs_reference"):
            cells = ", ".join(
                f"{g} cos {v['cosine']:.4f} err {v['rel_error']:.3f}"
                for g, v in res[cmp].items() if g != "missing" and v["cosine"] is not None
            )
            lines.append(f"  {cmp}: {cells}")
    return lines
