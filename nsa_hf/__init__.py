"""nsa-hf: Native Sparse Attention for HuggingFace Transformers.

Importing the package registers

* the ``"nsa"`` attention implementation (usable by any Llama-style model, see :mod:`.attention`);
* the NSA models of every supported family (``model_type`` ``nsa_llama``, ``nsa_mistral``, ``nsa_qwen2``,
  ``nsa_qwen3``; see :mod:`.families`) with ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM``,
  and for Hub remote code (``save_pretrained`` copies the modeling files and writes ``auto_map``).
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ._version import __version__

from .attention import nsa_attention_forward, nsa_padding_mask, nsa_params_from_config
from .backends import nsa_backend
from .cache import NSACache, NSACacheLayer, NSAStaticCache, NSAStaticCacheLayer
from .configuration_nsa_llama import NSALlamaConfig
from .configuration_nsa_mistral import NSAMistralConfig
from .configuration_nsa_qwen2 import NSAQwen2Config
from .configuration_nsa_qwen3 import NSAQwen3Config
from .generation import static_greedy_generate
from .modeling_nsa_llama import NSALlamaForCausalLM, NSALlamaModel, NSALlamaPreTrainedModel
from .modeling_nsa_mistral import NSAMistralForCausalLM, NSAMistralModel, NSAMistralPreTrainedModel
from .modeling_nsa_qwen2 import NSAQwen2ForCausalLM, NSAQwen2Model, NSAQwen2PreTrainedModel
from .modeling_nsa_qwen3 import NSAQwen3ForCausalLM, NSAQwen3Model, NSAQwen3PreTrainedModel

for _config, _model, _lm in (
    (NSALlamaConfig, NSALlamaModel, NSALlamaForCausalLM),
    (NSAMistralConfig, NSAMistralModel, NSAMistralForCausalLM),
    (NSAQwen2Config, NSAQwen2Model, NSAQwen2ForCausalLM),
    (NSAQwen3Config, NSAQwen3Model, NSAQwen3ForCausalLM),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForCausalLM.register(_config, _lm, exist_ok=True)
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModel")
    _lm.register_for_auto_class("AutoModelForCausalLM")
del _config, _model, _lm

__all__ = [
    "__version__",
    "NSACache",
    "NSACacheLayer",
    "NSALlamaConfig",
    "NSALlamaForCausalLM",
    "NSALlamaModel",
    "NSALlamaPreTrainedModel",
    "NSAMistralConfig",
    "NSAMistralForCausalLM",
    "NSAMistralModel",
    "NSAMistralPreTrainedModel",
    "NSAQwen2Config",
    "NSAQwen2ForCausalLM",
    "NSAQwen2Model",
    "NSAQwen2PreTrainedModel",
    "NSAQwen3Config",
    "NSAQwen3ForCausalLM",
    "NSAQwen3Model",
    "NSAQwen3PreTrainedModel",
    "NSAStaticCache",
    "NSAStaticCacheLayer",
    "nsa_attention_forward",
    "nsa_backend",
    "nsa_padding_mask",
    "nsa_params_from_config",
    "static_greedy_generate",
]
