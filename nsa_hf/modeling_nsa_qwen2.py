"""NSA-Qwen2: Qwen2 with Native Sparse Attention. Biases on the q/k/v projections (none on o); sliding-window
layers as in ``layer_types``.

The decoder is the shared one of :mod:`.modeling_nsa`; this file names the family's classes and says
what sets Qwen2 apart (:data:`QWEN2`). It imports only torch, transformers and its sibling modules, so
that it can be shipped as Hub remote code.
"""
from __future__ import annotations

from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm, Qwen2RotaryEmbedding

from .configuration_nsa_qwen2 import NSAQwen2Config
from .modeling_nsa import NSAAttention, NSADecoderLayer, NSAFamily, NSAForCausalLM, NSAModel, NSAPreTrainedModel

QWEN2 = NSAFamily(mlp=Qwen2MLP, norm=Qwen2RMSNorm, rotary=Qwen2RotaryEmbedding, qkv_bias=True, o_bias=False)
"""What the shared NSA decoder takes from Qwen2."""


class NSAQwen2Attention(NSAAttention):
    """Qwen2 attention with the NSA compressors and gate."""


class NSAQwen2DecoderLayer(NSADecoderLayer):
    """Qwen2 decoder layer with :class:`NSAQwen2Attention`."""

    attention_class = NSAQwen2Attention


class NSAQwen2PreTrainedModel(NSAPreTrainedModel):
    """Weight initialisation and flags shared by the NSA-Qwen2 models."""

    config: NSAQwen2Config
    config_class = NSAQwen2Config
    family = QWEN2
    _no_split_modules = ["NSAQwen2DecoderLayer"]


class NSAQwen2Model(NSAModel, NSAQwen2PreTrainedModel):
    """The bare NSA-Qwen2 decoder, returning hidden states."""

    decoder_layer_class = NSAQwen2DecoderLayer


class NSAQwen2ForCausalLM(NSAForCausalLM, NSAQwen2PreTrainedModel):
    """NSA-Qwen2 with a language-modelling head; ``generate()`` uses an :class:`~.cache.NSACache`."""

    model_class = NSAQwen2Model


__all__ = ["NSAQwen2Attention", "NSAQwen2DecoderLayer", "NSAQwen2ForCausalLM", "NSAQwen2Model", "NSAQwen2PreTrainedModel"]
