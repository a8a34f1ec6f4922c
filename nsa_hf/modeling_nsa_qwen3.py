"""NSA-Qwen3: Qwen3 with Native Sparse Attention. Per-head RMSNorm of queries and keys (``q_norm``/``k_norm``);
projection biases follow ``attention_bias``.

The decoder is the shared one of :mod:`.modeling_nsa`; this file names the family's classes and says
what sets Qwen3 apart (:data:`QWEN3`). It imports only torch, transformers and its sibling modules, so
that it can be shipped as Hub remote code.
"""
from __future__ import annotations

from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding

from .configuration_nsa_qwen3 import NSAQwen3Config
from .modeling_nsa import NSAAttention, NSADecoderLayer, NSAFamily, NSAForCausalLM, NSAModel, NSAPreTrainedModel

QWEN3 = NSAFamily(mlp=Qwen3MLP, norm=Qwen3RMSNorm, rotary=Qwen3RotaryEmbedding, qk_norm=True)
"""What the shared NSA decoder takes from Qwen3."""


class NSAQwen3Attention(NSAAttention):
    """Qwen3 attention with the NSA compressors and gate."""


class NSAQwen3DecoderLayer(NSADecoderLayer):
    """Qwen3 decoder layer with :class:`NSAQwen3Attention`."""

    attention_class = NSAQwen3Attention


class NSAQwen3PreTrainedModel(NSAPreTrainedModel):
    """Weight initialisation and flags shared by the NSA-Qwen3 models."""

    config: NSAQwen3Config
    config_class = NSAQwen3Config
    family = QWEN3
    _no_split_modules = ["NSAQwen3DecoderLayer"]


class NSAQwen3Model(NSAModel, NSAQwen3PreTrainedModel):
    """The bare NSA-Qwen3 decoder, returning hidden states."""

    decoder_layer_class = NSAQwen3DecoderLayer


class NSAQwen3ForCausalLM(NSAForCausalLM, NSAQwen3PreTrainedModel):
    """NSA-Qwen3 with a language-modelling head; ``generate()`` uses an :class:`~.cache.NSACache`."""

    model_class = NSAQwen3Model


__all__ = ["NSAQwen3Attention", "NSAQwen3DecoderLayer", "NSAQwen3ForCausalLM", "NSAQwen3Model", "NSAQwen3PreTrainedModel"]
