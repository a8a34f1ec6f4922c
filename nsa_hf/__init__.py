"""nsa-hf: Native Sparse Attention for HuggingFace Transformers.

Importing the package registers

* the ``"nsa"`` attention implementation (usable by any Llama-style model, see :mod:`.attention`);
* NSA-Llama (``model_type="nsa_llama"``) with ``AutoConfig``, ``AutoModel`` and
  ``AutoModelForCausalLM``, and for Hub remote code (``save_pretrained`` copies the modeling files and
  writes ``auto_map``).
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .attention import nsa_attention_forward, nsa_padding_mask, nsa_params_from_config
from .backends import nsa_backend
from .cache import NSACache, NSACacheLayer, NSAStaticCache, NSAStaticCacheLayer
from .configuration_nsa_llama import NSALlamaConfig
from .generation import static_greedy_generate
from .modeling_nsa_llama import NSALlamaForCausalLM, NSALlamaModel, NSALlamaPreTrainedModel

AutoConfig.register(NSALlamaConfig.model_type, NSALlamaConfig, exist_ok=True)
AutoModel.register(NSALlamaConfig, NSALlamaModel, exist_ok=True)
AutoModelForCausalLM.register(NSALlamaConfig, NSALlamaForCausalLM, exist_ok=True)
NSALlamaConfig.register_for_auto_class()
NSALlamaModel.register_for_auto_class("AutoModel")
NSALlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "NSACache",
    "NSACacheLayer",
    "NSALlamaConfig",
    "NSALlamaForCausalLM",
    "NSALlamaModel",
    "NSALlamaPreTrainedModel",
    "NSAStaticCache",
    "NSAStaticCacheLayer",
    "nsa_attention_forward",
    "nsa_backend",
    "nsa_padding_mask",
    "nsa_params_from_config",
    "static_greedy_generate",
]
