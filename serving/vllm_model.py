"""SlimGPTForCausalLM for vLLM: vLLM's own Llama with one config per decoder layer.

vLLM's `LlamaDecoderLayer` takes an optional per-layer `config`, so the slim
model is vLLM's `LlamaForCausalLM` built with a decoder layer that hands its
parent a view of the model config carrying that layer's query heads, KV heads
and FFN width. Attention, the fused QKV / gate-up projections, the paged KV
cache (one spec per layer; vLLM groups layers whose KV-head counts differ), RoPE,
tensor parallelism and the weight loader are vLLM's.

Imported only by vLLM's model registry (lazily, through the plugin).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from slimgpt_deploy.modeling.shapes import shape_mismatch, tp_problem


class LayerConfig:
    """The config one decoder layer sees: its own sizes, everything else the model's.

    vLLM reads biases as `attention_bias` (q/k/v *and* o_proj) overridden for
    q/k/v by `qkv_bias`; the slim config keeps q/k/v bias (`attention_bias`)
    and o_proj bias (`o_proj_bias`) apart, as Qwen2 needs.
    """

    def __init__(self, config, layer_idx: int):
        q, kv, ffn = config.layer_shape(layer_idx)
        self._base = config
        self._overrides = {
            "num_attention_heads": q,
            "num_key_value_heads": kv,
            "intermediate_size": ffn,
            "qkv_bias": bool(config.attention_bias),
            "attention_bias": bool(config.o_proj_bias),
        }

    def __getattr__(self, name):
        overrides = self.__dict__["_overrides"]
        if name in overrides:
            return overrides[name]
        return getattr(self.__dict__["_base"], name)


class SlimGPTDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None, **kwargs):
        base = config or vllm_config.model_config.hf_config
        super().__init__(vllm_config, prefix, config=LayerConfig(base, extract_layer_index(prefix)), **kwargs)


class SlimGPTForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        problem = tp_problem(vllm_config.model_config.hf_config, vllm_config.parallel_config.tensor_parallel_size)
        if problem:
            raise ValueError(problem)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=SlimGPTDecoderLayer)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's loader, after checking each tensor against the per-layer lists (names the layer)."""
        config = self.config

        def checked():
            for name, tensor in weights:
                problem = shape_mismatch(config, name, tuple(tensor.shape))
                if problem:
                    raise ValueError(f"slim checkpoint disagrees with its config.json: {problem}")
                yield name, tensor

        return super().load_weights(checked())
