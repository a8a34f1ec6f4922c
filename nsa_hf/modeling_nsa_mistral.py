"""NSA-Mistral: Mistral with Native Sparse Attention. No projection biases; the dense model's
``sliding_window`` is kept for ``"sdpa"``/``"eager"`` (the ``"nsa"`` backend uses NSA's own window instead).

The decoder is the shared one of :mod:`.modeling_nsa`; this file names the family's classes and says
what sets Mistral apart (:data:`MISTRAL`). It imports only torch, transformers and its sibling modules, so
that it can be shipped as Hub remote code.
"""
from __future__ import annotations

from transformers.models.mistral.modeling_mistral import MistralMLP, MistralRMSNorm, MistralRotaryEmbedding

from .configuration_nsa_mistral import NSAMistralConfig
from .modeling_nsa import NSAAttention, NSADecoderLayer, NSAFamily, NSAForCausalLM, NSAModel, NSAPreTrainedModel

MISTRAL = NSAFamily(mlp=MistralMLP, norm=MistralRMSNorm, rotary=MistralRotaryEmbedding, qkv_bias=False, o_bias=False)
"""What the shared NSA decoder takes from Mistral."""


class NSAMistralAttention(NSAAttention):
    """Mistral attention with the NSA compressors and gate."""


class NSAMistralDecoderLayer(NSADecoderLayer):
    """Mistral decoder layer with :class:`NSAMistralAttention`."""

    attention_class = NSAMistralAttention


class NSAMistralPreTrainedModel(NSAPreTrainedModel):
    """Weight initialisation and flags shared by the NSA-Mistral models."""

    config: NSAMistralConfig
    config_class = NSAMistralConfig
    family = MISTRAL
    _no_split_modules = ["NSAMistralDecoderLayer"]


class NSAMistralModel(NSAModel, NSAMistralPreTrainedModel):
    """The bare NSA-Mistral decoder, returning hidden states."""

    decoder_layer_class = NSAMistralDecoderLayer


class NSAMistralForCausalLM(NSAForCausalLM, NSAMistralPreTrainedModel):
    """NSA-Mistral with a language-modelling head; ``generate()`` uses an :class:`~.cache.NSACache`."""

    model_class = NSAMistralModel


__all__ = ["NSAMistralAttention", "NSAMistralDecoderLayer", "NSAMistralForCausalLM", "NSAMistralModel", "NSAMistralPreTrainedModel"]
