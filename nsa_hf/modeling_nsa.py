"""The decoder shared by every NSA model family: a Llama-style decoder with Native Sparse Attention
(Yuan et al., 2025).

A family (Llama, Mistral, Qwen2, Qwen3, ...) is described by an :class:`NSAFamily`: its own MLP, RMSNorm
and rotary-embedding classes (taken from transformers, so rope scalings and activations are exactly the
dense model's), which q/k/v/o projections carry a bias, and whether queries and keys are RMS-normalised
per head (Qwen3). ``modeling_nsa_<family>.py`` holds the family's small part. The model is the dense
family's (embeddings, norms, rotary embeddings, MLP, decoder layers, LM head) except the attention
layer, which adds per layer

* ``nsa_cmp_k`` / ``nsa_cmp_v``: :class:`MLPCompressor` modules turning each compression block of
  keys / values into one token (shared across KV heads);
* ``nsa_gate``: a linear map of the layer input to ``num_heads * 3`` gate logits, passed through a
  sigmoid, ordered (cmp, slc, win) per head;

and dispatches through ``ALL_ATTENTION_FUNCTIONS`` like Llama. The default implementation is ``"nsa"``
(:mod:`.attention`); ``attn_implementation="sdpa"`` or ``"eager"`` run the same weights as dense
attention (the NSA modules are then unused), a baseline for comparisons.

Layers whose dense model uses a sliding window (``config.layer_types``, or Mistral's ``sliding_window``)
get the sliding-window mask and ``sliding_window`` argument, so that ``"sdpa"``/``"eager"`` run exactly
the dense model. The ``"nsa"`` backend does not apply the dense sliding window: NSA's own window branch
(``nsa_window``) plus selection and compression replace it.

This file imports only torch, transformers, ``nsa_kernels`` and its sibling modules, so that it can be
shipped as Hub remote code.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import warnings
from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.generation import GenerationMixin, GenerationMode
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from nsa_kernels import MLPCompressor

from .alignment import SelectionAlignment, alignment_settings
from .attention import nsa_attention_forward  # noqa: F401  (registers attn_implementation "nsa", also as remote code)
from .backends import decode_backend, decode_enabled
from .cache import NSACache, NSAStaticCache, nsa_cache_layer, static_cache_length
from .configuration_nsa import NSAConfigMixin
from .remote_code import bundle_if_remote_code


@dataclasses.dataclass(frozen=True)
class NSAFamily:
    """What sets one dense model family apart inside the shared NSA decoder.

    Attributes:
        mlp: the family's MLP class (``cls(config)``), e.g. ``LlamaMLP``.
        norm: the family's RMSNorm class (``cls(size, eps=...)``).
        rotary: the family's rotary-embedding class (``cls(config=config)``); it implements the rope
            scalings (``rope_parameters``: default, linear, dynamic, yarn, llama3, ...) as the dense model does.
        qkv_bias: whether q/k/v projections have a bias; ``None``: ``config.attention_bias``.
        o_bias: whether the output projection has a bias; ``None``: ``config.attention_bias``.
        qk_norm: RMS-normalise queries and keys per head before RoPE (``q_norm``/``k_norm``, Qwen3).
    """

    mlp: type[nn.Module]
    norm: type[nn.Module]
    rotary: type[nn.Module]
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    qk_norm: bool = False


def uses_sliding_window(config, layer_idx: int) -> bool:
    """Whether the dense model attends through a sliding window in layer ``layer_idx``: per
    ``config.layer_types`` where the config has them (Qwen2/Qwen3), else whenever ``config.sliding_window``
    is set (Mistral)."""
    if getattr(config, "sliding_window", None) is None:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[layer_idx] == "sliding_attention"
    return True


# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache` (5.17-5.23 use
# `past_key_values`). Our forwards accept both names; what we pass to transformers (output fields, the
# decoder-layer argument that gradient checkpointing clears, `create_causal_mask`) uses the installed
# version's name, read off the library itself rather than its version number.
CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"
_MASK_CACHE_NAME = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def _one_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """The cache given as ``past_key_values`` (transformers < 5.24) or ``cache`` (>= 5.24)."""
    if cache is None:
        return past_key_values
    if past_key_values is not None and past_key_values is not cache:
        raise ValueError("Pass the cache as `cache` or `past_key_values`, not both.")
    return cache


def _uses_nsa(config) -> bool:
    """Whether ``config`` selects the ``"nsa"`` attention implementation."""
    return (getattr(config, "_attn_implementation", None) or "").split("|")[-1] == "nsa"


def _is_dense(implementation: str) -> bool:
    """Whether ``implementation`` is one of transformers' dense attention functions (eager, sdpa, flash,
    flex, a kernel from the Hub), which ignore the NSA compressors and gates. Names registered by users
    (a wrapper around ``"nsa"``, say) are not judged."""
    name = implementation.split("|")[-1]
    return name in ("eager", "sdpa", "flex_attention") or name.startswith("flash_attention") or "/" in name


def _output_cache(outputs) -> Cache | None:
    """The cache field of a model output under either name."""
    return getattr(outputs, CACHE_NAME, None)


class NSAGate(nn.Linear):
    """Gate logits of the three NSA branches: ``hidden_size -> num_heads * 3``, ordered (cmp, slc, win)
    per head. A distinct class so that ``_init_weights`` can give it its own initialisation."""


class NSAAttention(nn.Module):
    """The family's attention (projections, optional per-head q/k norms, RoPE) with the NSA compressors
    and gate; the attention itself goes through ``ALL_ATTENTION_FUNCTIONS`` (``"nsa"`` by default)."""

    def __init__(self, config: NSAConfigMixin, layer_idx: int, family: NSAFamily):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        # The dense model's sliding window (sdpa/eager/flash apply it; the nsa backend ignores it).
        self.sliding_window = config.sliding_window if uses_sliding_window(config, layer_idx) else None

        attention_bias = getattr(config, "attention_bias", False)
        qkv_bias = attention_bias if family.qkv_bias is None else family.qkv_bias
        o_bias = attention_bias if family.o_bias is None else family.o_bias
        kv_size = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=o_bias)
        if family.qk_norm:
            self.q_norm = family.norm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = family.norm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

        self.nsa_params = config.nsa_params()
        cmp_hidden = config.nsa_cmp_mlp_hidden or self.head_dim
        self.nsa_cmp_k = MLPCompressor(self.head_dim, config.nsa_cmp_block, cmp_hidden)
        self.nsa_cmp_v = MLPCompressor(self.head_dim, config.nsa_cmp_block, cmp_hidden)
        self.nsa_gate = NSAGate(config.hidden_size, self.num_heads * 3)

    def extra_repr(self) -> str:
        p = self.nsa_params
        return (f"heads={self.num_heads}, kv_heads={self.config.num_key_value_heads}, head_dim={self.head_dim}, "
                f"cmp_block={p.cmp_block}, cmp_stride={p.cmp_stride}, slc_block={p.slc_block}, "
                f"slc_count={p.slc_count}, init_blocks={p.init_blocks}, local_blocks={p.local_blocks}, window={p.window}")

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # `cache` is a named parameter so that it never reaches the attention backend's kwargs.
        past_key_values = _one_cache(past_key_values, cache)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        if self.q_norm is not None:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states = query_states.transpose(1, 2)
        key_states = key_states.transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        # Per-token, per-head gates of the (cmp, slc, win) branches.
        gates = torch.sigmoid(self.nsa_gate(hidden_states)).view(*input_shape, self.num_heads, 3)

        # A SelectionAlignment (.alignment) in force sets this attribute for the duration of its `with` block.
        alignment = getattr(self, "nsa_alignment", None)
        if alignment is not None:
            alignment.observe(self, query_states, key_states, attention_mask, kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        if self.sliding_window is not None:
            kwargs["sliding_window"] = self.sliding_window

        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            nsa_gates=gates,
            nsa_compressors=(self.nsa_cmp_k, self.nsa_cmp_v),
            nsa_params=self.nsa_params,
            nsa_cache_layer=nsa_cache_layer(past_key_values, self.layer_idx),
            **kwargs,
        )
        if attn_weights is None and _uses_nsa(self.config) and (
            kwargs.get("output_attentions") or getattr(self.config, "output_attentions", False)
        ):
            warnings.warn(
                "output_attentions=True: attn_implementation='nsa' computes no attention matrix, so `attentions` "
                "stays empty; for dense attention weights load with attn_implementation='eager' (dense, not NSA)",
                UserWarning, stacklevel=2,
            )

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class NSADecoderLayer(GradientCheckpointingLayer):
    """Decoder layer of the family (pre-norm attention and MLP blocks) with NSA attention. Families subclass
    it under their own name (FSDP wrap and ``_no_split_modules`` go by class name)."""

    attention_class: type[NSAAttention] = NSAAttention

    def __init__(self, config: NSAConfigMixin, layer_idx: int, family: NSAFamily):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = self.attention_class(config=config, layer_idx=layer_idx, family=family)
        self.mlp = family.mlp(config)
        self.input_layernorm = family.norm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = family.norm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        past_key_values = _one_cache(past_key_values, cache)
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


def class_before_fsdp(cls: type) -> type:
    """The class that FSDP2's ``fully_shard`` wrapped, for the ``FSDP<Name>(FSDPModule, <Name>)`` subclass it
    generates (defined in torch's own modules); ``cls`` itself for any other class."""
    if cls.__name__.startswith("FSDP") and any(base.__name__ == "FSDPModule" for base in cls.__bases__):
        return next(base for base in cls.__bases__ if base.__name__ != "FSDPModule")
    return cls


class NSAPreTrainedModel(PreTrainedModel):
    """Weight initialisation and flags shared by the NSA models of every family. A family's
    ``NSA<Family>PreTrainedModel`` sets ``config_class``, ``family`` and ``_no_split_modules``.

    The attention implementation defaults to ``"nsa"``; an explicit ``attn_implementation`` wins.
    """

    family: NSAFamily
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    # torch.compile(fullgraph=True) traces forwards with no cached past and decoding steps on an NSAStaticCache
    # (what generate() compiles); serving engines that replace the attention function would drop the NSA branches.
    _can_compile_fullgraph = True
    _supports_attention_backend = False
    _can_record_outputs = {
        "hidden_states": NSADecoderLayer,
        "attentions": NSAAttention,
    }

    def save_pretrained(self, save_directory, *args, remote_code: bool = True, **kwargs):
        """``PreTrainedModel.save_pretrained``, plus:

        * the checkpoint loads with ``trust_remote_code=True`` where nsa-hf is not installed: the modeling
          files that transformers copies (NSA models are registered for auto classes) get the NSA reference
          bundled (:mod:`.remote_code`), also under ``push_to_hub``;
        * ``remote_code=False`` writes no modeling code and no ``auto_map`` (loading then needs nsa-hf);
        * a model sharded by FSDP2 (``fully_shard``, e.g. by the Trainer under ``accelerate launch``) is saved
          as its own class: FSDP2 gives the model a generated class defined in torch, whose sources would
          otherwise become the remote code."""
        sharded_cls = type(self)
        saved_cls = class_before_fsdp(sharded_cls)
        hidden = {}
        if not remote_code:
            saved_cls = type(saved_cls.__name__, (saved_cls,), {"_auto_class": None, "__module__": saved_cls.__module__})
            hidden = {k: self.config.__dict__.pop(k) for k in ("_auto_class", "auto_map") if k in self.config.__dict__}
            self.config._auto_class = None
        self.__class__ = saved_cls
        try:
            result = super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = sharded_cls
            if not remote_code:
                del self.config._auto_class
                self.config.__dict__.update(hidden)
        if kwargs.get("is_main_process", True) and os.path.isdir(save_directory):
            bundle_if_remote_code(save_directory)
        return result

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        # `save_pretrained(push_to_hub=True)` uploads before it returns: bundle the remote code first.
        bundle_if_remote_code(working_dir)
        return super()._upload_modified_files(working_dir, *args, **kwargs)

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        implementation = super().get_correct_attn_implementation(requested_attention or "nsa", is_init_check)
        if _is_dense(implementation):
            warnings.warn(
                f"attn_implementation={implementation!r} computes dense attention: the NSA compressors and gates "
                "of this model are unused; keep attn_implementation='nsa' (the default) for NSA",
                UserWarning, stacklevel=3,
            )
        return implementation

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MLPCompressor):
            # Mean pooling plus a zero-initialised MLP correction. Runs after the generic init of its
            # Linear children; torch.nn.init is guarded during init, so loaded weights are kept.
            module.reset_parameters()
        elif isinstance(module, NSAGate):
            # Constant gates sigmoid(bias) at the start: (cmp, slc, win) biases repeated for each head.
            init.zeros_(module.weight)
            bias = torch.tensor(self.config.nsa_gate_init_bias, dtype=module.bias.dtype, device=module.bias.device)
            init.copy_(module.bias, bias.repeat(module.out_features // 3))


class NSAModel(NSAPreTrainedModel):
    """The bare NSA decoder, returning hidden states. A family's ``NSA<Family>Model`` sets
    ``decoder_layer_class``."""

    decoder_layer_class: type[NSADecoderLayer] = NSADecoderLayer

    def __init__(self, config: NSAConfigMixin):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        family = self.family

        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [self.decoder_layer_class(config, layer_idx, family) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = family.norm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = family.rotary(config=config)
        self.gradient_checkpointing = False
        self._sliding = [uses_sliding_window(config, i) for i in range(config.num_hidden_layers)]

        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Token ids.
            attention_mask (`torch.Tensor` of shape `(batch_size, past + sequence_length)`, *optional*):
                1 for real tokens, 0 for padding. NSA treats each row's real tokens as one sequence.
            position_ids (`torch.LongTensor`, *optional*):
                Positions for the rotary embeddings; without a mask or cache, restarts mark packed documents.
            past_key_values (`Cache`, *optional*):
                An [`NSACache`] (created when `use_cache` and none is given) or any other cache.
            inputs_embeds (`torch.Tensor`, *optional*):
                Embeddings to use instead of `input_ids`.
            use_cache (`bool`, *optional*):
                Whether to return a cache for further decoding.
            cache (`Cache`, *optional*):
                The same as `past_key_values`, under the name transformers >= 5.24 uses; give one or the other.
                The output field is named as in the installed transformers (`cache` from 5.24 on).
        """
        past_key_values = _one_cache(past_key_values, cache)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        if use_cache and past_key_values is None:
            past_key_values = NSACache(config=self.config)

        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        mask_kwargs = dict(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{_MASK_CACHE_NAME: past_key_values},
        )
        masks = {False: create_causal_mask(**mask_kwargs)}
        if any(self._sliding):  # the dense model's sliding-window layers (the nsa backend gets the padding mask)
            masks[True] = create_sliding_window_causal_mask(**mask_kwargs)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        for decoder_layer, sliding in zip(self.layers[: self.config.num_hidden_layers], self._sliding):
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=masks[sliding],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=use_cache,
                # Under the installed version's name: GradientCheckpointingLayer drops it when training.
                **{CACHE_NAME: past_key_values},
                **kwargs,
            )

        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_NAME: past_key_values})


class NSAForCausalLM(NSAPreTrainedModel, GenerationMixin):
    """The NSA decoder with a language-modelling head. ``generate()`` decodes on an NSA cache: on CUDA by
    default a static one with compiled decoding steps, else an :class:`NSACache` (see
    :meth:`_prepare_cache_for_generation` and ``docs/generation.md``). A family's ``NSA<Family>ForCausalLM``
    sets ``model_class``."""

    model_class: type[NSAModel] = NSAModel

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: NSAConfigMixin):
        super().__init__(config)
        self.model = self.model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        """Build ``generate()``'s cache as an NSA cache, which keeps the compressed keys/values between steps:

        * no cache and no ``cache_implementation`` given, on CUDA with the decode kernels enabled
          (:meth:`_static_generation_by_default`): an :class:`NSAStaticCache` of
          :func:`~.cache.static_cache_length` positions, so that transformers compiles the decoding steps (its
          automatic compilation on a static cache: ``compile_config``, ``disable_compile``) and a new prompt
          length within the same bucket reuses the compiled steps;
        * ``cache_implementation="static"``: an :class:`NSAStaticCache` of the length transformers chose;
        * otherwise (CPU, ``cache_implementation="dynamic"``, an assistant model, prompts that are not
          left-padded): an :class:`NSACache`, decoded eagerly.

        Steps of assisted decoding (candidates of varying length) and chunked prefill are not compiled
        on a static NSA cache: they run eagerly on it.
        """
        out = super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
                                                    max_cache_length)
        # The cache is under `model_kwargs["cache"]` from transformers 5.24 on, `["past_key_values"]` before.
        key = "cache" if isinstance(model_kwargs.get("cache"), Cache) else "past_key_values"
        cache = model_kwargs.get(key)
        if cache is None or getattr(cache, "_is_user_defined", False):
            return out
        offloading = getattr(cache, "offloading", False)
        if type(cache) is DynamicCache and self._static_generation_by_default(generation_config, model_kwargs):
            cache = NSAStaticCache(config=self.config, max_cache_len=static_cache_length(max_cache_length))
        elif type(cache) is DynamicCache:
            cache = NSACache(config=self.config, offloading=offloading)
            if getattr(generation_config, "is_assistant", False):
                cache.activate_past_recording()
        elif type(cache) is StaticCache:
            cache = NSAStaticCache(config=self.config, max_cache_len=cache.layers[0].max_cache_len,
                                   offloading=offloading)
        else:
            return out
        if isinstance(cache, NSAStaticCache) and (
            generation_mode == GenerationMode.ASSISTED_GENERATION or generation_config.prefill_chunk_size is not None
        ):
            generation_config.disable_compile = True  # (this call's copy of the generation config)
        model_kwargs[key] = cache
        return out

    def _static_generation_by_default(self, generation_config, model_kwargs) -> bool:
        """Whether ``generate()`` decodes on a static NSA cache when the user chose no cache: on CUDA with the
        decode kernels enabled (:func:`~.backends.decode_enabled`), or on any device where the user asks
        transformers to compile decoding steps (``compile_config._compile_all_devices``) unless the decode
        backend is ``"off"``; for the model itself (not as an assistant) and prompts that are left-padded or
        unpadded (what the static decode path reads)."""
        compile_elsewhere = bool(getattr(generation_config.compile_config, "_compile_all_devices", False))
        device_ok = (decode_enabled(self.config, self.device) if self.device.type == "cuda"
                     else compile_elsewhere and decode_backend(self.config) != "off")
        mask = model_kwargs.get("attention_mask")
        left_padded = mask is None or (mask.dim() == 2 and bool((mask[:, 1:] >= mask[:, :-1]).all()))
        return (
            device_ok
            and generation_config.cache_implementation is None
            and not getattr(generation_config, "is_assistant", False)
            and left_padded
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Targets for the language-modelling loss (shifted inside; -100 is ignored).
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0):
                Compute logits only for the last `logits_to_keep` positions (0 = all), or for these indices.
            cache (`Cache`, *optional*):
                The same as `past_key_values` (the name transformers >= 5.24 uses); give one or the other.

        Other arguments as in [`NSAModel.forward`].
        """
        align_weight, align_rows = alignment_settings(self.config)
        align = SelectionAlignment(self, rows=align_rows) if (
            align_weight > 0 and labels is not None and self.training) else contextlib.nullcontext()
        with align:
            outputs: BaseModelOutputWithPast = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=_one_cache(past_key_values, cache),
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **kwargs,
            )

        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if isinstance(align, SelectionAlignment):
                # config.nsa_align_weight > 0: the selection alignment term (.alignment), training only. When the
                # language-model loss is a sum over this micro-batch divided by the tokens of the whole batch
                # (`num_items_in_batch`, Trainer with gradient accumulation), the term gets the same share.
                term = align_weight * align.loss().to(loss.device)
                num_items = kwargs.get("num_items_in_batch")
                if num_items is not None:
                    term = term * (labels[..., 1:] != -100).sum().to(loss.device) / num_items
                loss = loss + term

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: _output_cache(outputs)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "CACHE_NAME",
    "NSAAttention",
    "NSADecoderLayer",
    "NSAFamily",
    "NSAForCausalLM",
    "NSAModel",
    "NSAPreTrainedModel",
    "class_before_fsdp",
    "uses_sliding_window",
]
