"""NSA-Llama model configuration: a Llama configuration plus the Native Sparse Attention sizes."""
from __future__ import annotations

from transformers.models.llama.configuration_llama import LlamaConfig

from .configuration_nsa import NSAConfigMixin


class NSALlamaConfig(NSAConfigMixin, LlamaConfig):
    r"""
    Configuration of an NSA-Llama model: a Llama decoder whose attention layers use Native Sparse
    Attention. Every [`LlamaConfig`] argument applies; the `nsa_*` ones are [`NSAConfigMixin`]'s.

    ```python
    >>> from nsa_hf import NSALlamaConfig, NSALlamaForCausalLM

    >>> config = NSALlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, nsa_window=128)
    >>> model = NSALlamaForCausalLM(config)  # attn_implementation defaults to "nsa"
    ```"""

    model_type = "nsa_llama"


__all__ = ["NSALlamaConfig"]
