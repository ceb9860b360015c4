"""A LLaMA-family causal LM whose decoder layers each have their own shape.

This file is copied verbatim into every slim checkpoint next to
`configuration_slimgpt.py`; it imports only torch and transformers.

It subclasses transformers' Llama implementation rather than forking it: each
decoder layer is transformers' `LlamaDecoderLayer` built from a per-layer view
of the config (its own query heads, KV heads and FFN width); the model's
forward, masks, rotary embeddings, KV cache and generation are inherited.
"""

from __future__ import annotations

from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .configuration_slimgpt import SlimGPTConfig


class LayerConfigView:
    """The model config seen by one decoder layer: per-layer sizes, all else shared.

    A view, not a copy, so run-time settings such as `_attn_implementation`
    follow the model's config.
    """

    def __init__(self, config: SlimGPTConfig, layer_idx: int):
        q, kv, ffn = config.layer_shape(layer_idx)
        self._base = config
        self._overrides = {"num_attention_heads": q, "num_key_value_heads": kv, "intermediate_size": ffn}

    def __getattr__(self, name):
        overrides = self.__dict__.get("_overrides", {})
        if name in overrides:
            return overrides[name]
        return getattr(self.__dict__["_base"], name)


class SlimGPTAttention(LlamaAttention):
    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        if config.o_proj_bias != config.attention_bias:
            self.o_proj = nn.Linear(
                config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.o_proj_bias
            )


class SlimGPTDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config, layer_idx: int):
        nn.Module.__init__(self)
        self.gradient_checkpointing = False
        self.hidden_size = config.hidden_size
        self.self_attn = SlimGPTAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class SlimGPTPreTrainedModel(LlamaPreTrainedModel):
    config_class = SlimGPTConfig
    config: SlimGPTConfig
    _no_split_modules = ["SlimGPTDecoderLayer"]
    _can_record_outputs = {"hidden_states": SlimGPTDecoderLayer, "attentions": SlimGPTAttention}


class SlimGPTModel(SlimGPTPreTrainedModel, LlamaModel):
    def __init__(self, config: SlimGPTConfig):
        SlimGPTPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [SlimGPTDecoderLayer(LayerConfigView(config, i), i) for i in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class SlimGPTForCausalLM(SlimGPTPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: SlimGPTConfig):
        SlimGPTPreTrainedModel.__init__(self, config)
        self.model = SlimGPTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["SlimGPTForCausalLM", "SlimGPTModel", "SlimGPTPreTrainedModel", "SlimGPTDecoderLayer"]
