"""Configuration of a SlimGPT-pruned LLaMA-family model.

This file is copied verbatim into every slim checkpoint, so it imports only
transformers: the checkpoint loads with `trust_remote_code=True` where
slimgpt-deploy is not installed.

Head size and hidden size are those of the dense model; every decoder layer
has its own query heads, KV heads and FFN width, recorded as lists of length
`num_hidden_layers`. The scalar `num_attention_heads`, `num_key_value_heads`
and `intermediate_size` keep the dense model's values (rotary embeddings and
tools that read them still see a consistent dense reference).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@strict
class SlimGPTConfig(LlamaConfig):
    model_type = "slimgpt"

    # Per-layer shapes: lists of length num_hidden_layers.
    num_attention_heads_per_layer: list[int] | None = None
    num_key_value_heads_per_layer: list[int] | None = None
    intermediate_size_per_layer: list[int] | None = None
    # `attention_bias` covers q/k/v; o_proj has its own flag (Qwen2: q/k/v
    # biased, o_proj not). None means "same as attention_bias".
    o_proj_bias: bool | None = None
    # The family the dense model came from (llama, mistral, qwen2).
    source_model_type: str = "llama"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n = self.num_hidden_layers
        if self.num_attention_heads_per_layer is None:
            self.num_attention_heads_per_layer = [self.num_attention_heads] * n
        if self.num_key_value_heads_per_layer is None:
            self.num_key_value_heads_per_layer = [self.num_key_value_heads] * n
        if self.intermediate_size_per_layer is None:
            self.intermediate_size_per_layer = [self.intermediate_size] * n
        if self.o_proj_bias is None:
            self.o_proj_bias = self.attention_bias

    def validate_architecture(self):
        super().validate_architecture()
        n = self.num_hidden_layers
        for name in ("num_attention_heads_per_layer", "num_key_value_heads_per_layer", "intermediate_size_per_layer"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries but num_hidden_layers is {n}")
        if self.num_attention_heads_per_layer is None or self.num_key_value_heads_per_layer is None:
            return
        for i, (q, kv) in enumerate(zip(self.num_attention_heads_per_layer, self.num_key_value_heads_per_layer)):
            if q < 1 or kv < 1 or q % kv != 0:
                raise ValueError(f"layer {i}: {q} query heads and {kv} KV heads; need q >= 1, kv >= 1 and q % kv == 0")
        for i, f in enumerate(self.intermediate_size_per_layer or []):
            if f < 1:
                raise ValueError(f"layer {i}: FFN width {f}; every layer keeps at least one channel")

    def layer_shape(self, layer_idx: int) -> tuple[int, int, int]:
        """(query heads, KV heads, FFN width) of one decoder layer."""
        return (
            self.num_attention_heads_per_layer[layer_idx],
            self.num_key_value_heads_per_layer[layer_idx],
            self.intermediate_size_per_layer[layer_idx],
        )


__all__ = ["SlimGPTConfig"]
