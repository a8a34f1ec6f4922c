"""NSA-Llama: Llama with Native Sparse Attention. Projection biases follow ``attention_bias``.

The decoder is the shared one of :mod:`.modeling_nsa`; this file names the family's classes and says
what sets Llama apart (:data:`LLAMA`). It imports only torch, transformers and its sibling modules, so
that it can be shipped as Hub remote code.
"""
from __future__ import annotations

from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from .configuration_nsa_llama import NSALlamaConfig
from .modeling_nsa import CACHE_NAME  # noqa: F401  (imported from here by code written before the split)
from .modeling_nsa import NSAAttention, NSADecoderLayer, NSAFamily, NSAForCausalLM, NSAModel, NSAPreTrainedModel

LLAMA = NSAFamily(mlp=LlamaMLP, norm=LlamaRMSNorm, rotary=LlamaRotaryEmbedding)
"""What the shared NSA decoder takes from Llama."""


class NSALlamaAttention(NSAAttention):
    """Llama attention with the NSA compressors and gate."""


class NSALlamaDecoderLayer(NSADecoderLayer):
    """Llama decoder layer with :class:`NSALlamaAttention`."""

    attention_class = NSALlamaAttention


class NSALlamaPreTrainedModel(NSAPreTrainedModel):
    """Weight initialisation and flags shared by the NSA-Llama models."""

    config: NSALlamaConfig
    config_class = NSALlamaConfig
    family = LLAMA
    _no_split_modules = ["NSALlamaDecoderLayer"]


class NSALlamaModel(NSAModel, NSALlamaPreTrainedModel):
    """The bare NSA-Llama decoder, returning hidden states."""

    decoder_layer_class = NSALlamaDecoderLayer


class NSALlamaForCausalLM(NSAForCausalLM, NSALlamaPreTrainedModel):
    """NSA-Llama with a language-modelling head; ``generate()`` uses an :class:`~.cache.NSACache`."""

    model_class = NSALlamaModel


__all__ = ["NSALlamaAttention", "NSALlamaDecoderLayer", "NSALlamaForCausalLM", "NSALlamaModel", "NSALlamaPreTrainedModel"]
