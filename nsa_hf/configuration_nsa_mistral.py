"""NSA-Mistral model configuration: a Mistral configuration plus the Native Sparse Attention sizes."""
from __future__ import annotations

from transformers.models.mistral.configuration_mistral import MistralConfig

from .configuration_nsa import NSAConfigMixin


class NSAMistralConfig(NSAConfigMixin, MistralConfig):
    r"""
    Configuration of an NSA-Mistral model: a Mistral decoder whose attention layers use Native Sparse
    Attention. Every [`MistralConfig`] argument applies; the `nsa_*` ones are [`NSAConfigMixin`]'s.
    """

    model_type = "nsa_mistral"


__all__ = ["NSAMistralConfig"]
