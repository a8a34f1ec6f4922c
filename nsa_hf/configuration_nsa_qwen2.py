"""NSA-Qwen2 model configuration: a Qwen2 configuration plus the Native Sparse Attention sizes."""
from __future__ import annotations

from transformers.models.qwen2.configuration_qwen2 import Qwen2Config

from .configuration_nsa import NSAConfigMixin


class NSAQwen2Config(NSAConfigMixin, Qwen2Config):
    r"""
    Configuration of an NSA-Qwen2 model: a Qwen2 decoder whose attention layers use Native Sparse
    Attention. Every [`Qwen2Config`] argument applies; the `nsa_*` ones are [`NSAConfigMixin`]'s.
    """

    model_type = "nsa_qwen2"


__all__ = ["NSAQwen2Config"]
