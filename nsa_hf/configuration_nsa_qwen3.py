"""NSA-Qwen3 model configuration: a Qwen3 configuration plus the Native Sparse Attention sizes."""
from __future__ import annotations

from transformers.models.qwen3.configuration_qwen3 import Qwen3Config

from .configuration_nsa import NSAConfigMixin


class NSAQwen3Config(NSAConfigMixin, Qwen3Config):
    r"""
    Configuration of an NSA-Qwen3 model: a Qwen3 decoder whose attention layers use Native Sparse
    Attention. Every [`Qwen3Config`] argument applies; the `nsa_*` ones are [`NSAConfigMixin`]'s.
    """

    model_type = "nsa_qwen3"


__all__ = ["NSAQwen3Config"]
