"""Which implementation runs NSA: a choice scoped to a ``with`` block or to a model, never a global switch.

Two calls can be chosen:

* ``varlen``, every non-decoding NSA call (training, prefill, packed documents): ``"auto"`` (the Triton
  kernels on CUDA, the PyTorch reference on CPU), ``"triton"`` (on a CPU only under ``TRITON_INTERPRET=1``)
  or ``"reference"`` (the specification, also on CUDA: slow, O(T^2) memory per sequence, to check a run);
* ``decode``, decoding steps from an NSA cache: ``"auto"``, ``"triton"`` (the Triton decode kernels always;
  on a CPU only under ``TRITON_INTERPRET=1``) or ``"off"`` (decoding steps take the varlen path). ``"auto"``
  means the Triton decode kernels on CUDA; elsewhere, steps on a dynamic :class:`~.cache.NSACache` take the
  varlen path, and steps on an :class:`~.cache.NSAStaticCache` the batched PyTorch reference decode
  (:func:`nsa_kernels.reference.nsa_decode_reference`). Either way a static-cache step is one
  ``nsa_kernels::decode`` op with no host synchronisation, so ``torch.compile(fullgraph=True)`` /
  ``torch.export`` trace it, and it can be captured in a CUDA graph (:func:`static_decode_impl`).

The choice in force for a model is, per field, the innermost :func:`nsa_backend` block that sets it, else
the model config's ``nsa_varlen_backend`` / ``nsa_decode_backend`` attribute, else ``"auto"``::

    with nsa_hf.nsa_backend(varlen="reference"):
        loss = model(ids, labels=ids).loss            # the reference, also on CUDA

    model.config.nsa_decode_backend = "off"           # this model only, until changed

A config attribute is a constant to ``torch.compile`` (the compiled graph guards on it); a
:func:`nsa_backend` block is read from Python state, also guarded. Blocks are not thread-local: do not
enter them from several threads at once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib

import torch

__all__ = ["DECODE_CHOICES", "VARLEN_CHOICES", "NSABackend", "decode_backend", "decode_enabled", "decode_module",
           "decode_ops", "nsa_backend", "static_decode_impl", "varlen_backend"]

VARLEN_CHOICES = ("auto", "triton", "reference")
DECODE_CHOICES = ("auto", "triton", "off")


@dataclasses.dataclass(frozen=True)
class NSABackend:
    """A choice of implementations (see the module docstring); ``None`` fields defer to the next level."""

    varlen: str | None = None
    decode: str | None = None

    def __post_init__(self):
        if self.varlen is not None and self.varlen not in VARLEN_CHOICES:
            raise ValueError(f"NSA varlen backend {self.varlen!r} is not one of {VARLEN_CHOICES} "
                             "(nsa_backend(varlen=...) / config.nsa_varlen_backend)")
        if self.decode is not None and self.decode not in DECODE_CHOICES:
            raise ValueError(f"NSA decode backend {self.decode!r} is not one of {DECODE_CHOICES} "
                             "(nsa_backend(decode=...) / config.nsa_decode_backend)")


_blocks: list[NSABackend] = []  # the nsa_backend blocks being executed, innermost last


@contextlib.contextmanager
def nsa_backend(varlen: str | None = None, decode: str | None = None):
    """Run the body with the given implementations (``None``: unchanged); see the module docstring."""
    choice = NSABackend(varlen, decode)
    _blocks.append(choice)
    try:
        yield choice
    finally:
        _blocks.remove(choice)


def _chosen(config, field: str, choices: tuple[str, ...]) -> str:
    for block in reversed(_blocks):
        value = getattr(block, field)
        if value is not None:
            return value
    value = getattr(config, f"nsa_{field}_backend", None)
    if value is None:
        return "auto"
    if value not in choices:
        raise ValueError(f"config.nsa_{field}_backend={value!r} is not one of {choices}")
    return value


def varlen_backend(config) -> str:
    """The implementation of non-decoding NSA calls for a model with ``config`` (see the module docstring)."""
    return _chosen(config, "varlen", VARLEN_CHOICES)


def decode_backend(config) -> str:
    """Whether and how decoding steps of a model with ``config`` use the decode kernels."""
    return _chosen(config, "decode", DECODE_CHOICES)


def _import_or_none(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# Imported once, here, rather than on first use: a decoding step traced by torch.compile reads it as a constant.
_DECODE_OPS = _import_or_none("nsa_kernels.ops")


def decode_ops():
    """``nsa_kernels.ops`` (the ``nsa_kernels::decode`` op; needs triton), or ``None`` when it cannot be
    imported (Hub remote code without nsa-hf: imported by name so that the exporter does not bundle it)."""
    return _DECODE_OPS


@functools.cache
def decode_module():
    """``nsa_kernels.decode`` (needs triton), or ``None`` when it cannot be imported (e.g. Hub remote code
    without nsa-hf: imported by name so that the exporter does not try to bundle it)."""
    return _import_or_none("nsa_kernels.decode")


def decode_enabled(config, device: torch.device) -> bool:
    """Whether decoding steps of a model with ``config`` on ``device`` use the Triton decode kernels."""
    mode = decode_backend(config)
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return False
    return decode_module() is not None  # "triton", or "auto" on CUDA (what resolve_backend picks there)


def static_decode_impl(config, device: torch.device) -> str | None:
    """How decoding steps on an :class:`~.cache.NSAStaticCache` of a model with ``config`` on ``device`` run:
    ``"triton"`` (the decode kernels: ``"triton"``, or ``"auto"`` on CUDA), ``"reference"`` (the batched
    PyTorch reference: ``"auto"`` elsewhere, or on CUDA without the kernels), or ``None`` (``"off"``, or
    ``"triton"`` without the kernels: the varlen path)."""
    mode = decode_backend(config)
    if mode == "off":
        return None
    if mode == "triton" or device.type == "cuda":
        if _DECODE_OPS is not None:
            return "triton"
        return "reference" if mode == "auto" else None
    return "reference"
