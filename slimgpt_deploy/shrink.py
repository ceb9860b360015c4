"""Physical shrink: pruning decisions -> smaller weights -> a slim model with its config.

Every function returns new modules; the dense model is only read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .families import slim_config_fields
from .modeling import LayerConfigView, SlimGPTConfig, SlimGPTDecoderLayer, SlimGPTForCausalLM
from .prune.schedule import LayerPlan


@dataclass(frozen=True)
class LayerCut:
    """What survives in one decoder layer (indices in the layer's current numbering)."""

    q_heads: list[int]  # kept query heads, grouped by KV head: query j uses KV head j // (q/kv)
    kv_heads: list[int]  # kept KV heads
    ffn: list[int]  # kept FFN channels
    o_proj: torch.Tensor  # [hidden, q_in] new o_proj weight over the *current* columns (pruned ones zero)
    down_proj: torch.Tensor  # [hidden, ffn_in] new down_proj weight over the current columns


def make_slim_config(config, plans: list[LayerPlan]) -> SlimGPTConfig:
    """The slim config of a model (dense or slim) pruned to `plans`."""
    fields = slim_config_fields(config)
    fields.update(
        num_attention_heads_per_layer=[p.q_heads for p in plans],
        num_key_value_heads_per_layer=[p.kv_heads for p in plans],
        intermediate_size_per_layer=[p.ffn for p in plans],
        architectures=["SlimGPTForCausalLM"],
    )
    return SlimGPTConfig(**fields)


def _rows(index: list[int], size: int) -> torch.Tensor:
    """Row indices of the kept heads in a [heads * size, ...] projection."""
    return torch.tensor([h * size + t for h in index for t in range(size)], dtype=torch.long)


def cut_layer_state(layer: nn.Module, cut: LayerCut, head_dim: int) -> dict[str, torch.Tensor]:
    """State dict of the shrunken layer, in the layer's dtype."""
    attn, mlp = layer.self_attn, layer.mlp
    q_rows, kv_rows = _rows(cut.q_heads, head_dim), _rows(cut.kv_heads, head_dim)
    ffn = torch.tensor(cut.ffn, dtype=torch.long)
    dtype = attn.q_proj.weight.dtype
    sd = {
        "input_layernorm.weight": layer.input_layernorm.weight,
        "post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
        "self_attn.q_proj.weight": attn.q_proj.weight[q_rows],
        "self_attn.k_proj.weight": attn.k_proj.weight[kv_rows],
        "self_attn.v_proj.weight": attn.v_proj.weight[kv_rows],
        "self_attn.o_proj.weight": cut.o_proj[:, q_rows].to(dtype),
        "mlp.gate_proj.weight": mlp.gate_proj.weight[ffn],
        "mlp.up_proj.weight": mlp.up_proj.weight[ffn],
        "mlp.down_proj.weight": cut.down_proj[:, ffn].to(dtype),
    }
    for name, proj, rows in (
        ("q_proj", attn.q_proj, q_rows),
        ("k_proj", attn.k_proj, kv_rows),
        ("v_proj", attn.v_proj, kv_rows),
    ):
        if proj.bias is not None:
            sd[f"self_attn.{name}.bias"] = proj.bias[rows]
    if attn.o_proj.bias is not None:
        sd["self_attn.o_proj.bias"] = attn.o_proj.bias
    for name, proj in (("gate_proj", mlp.gate_proj), ("up_proj", mlp.up_proj)):
        if proj.bias is not None:
            sd[f"mlp.{name}.bias"] = proj.bias[ffn]
    if mlp.down_proj.bias is not None:
        sd["mlp.down_proj.bias"] = mlp.down_proj.bias
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def shrink_layer(layer: nn.Module, cut: LayerCut, config: SlimGPTConfig, layer_idx: int) -> SlimGPTDecoderLayer:
    """A new decoder layer of the slim config's shape for `layer_idx`, holding the cut weights."""
    state = cut_layer_state(layer, cut, config.head_dim)
    with torch.device("meta"):
        new = SlimGPTDecoderLayer(LayerConfigView(config, layer_idx), layer_idx)
    new.load_state_dict(state, strict=True, assign=True)
    return new.eval().requires_grad_(False)


def assemble(dense: nn.Module, layers: list[SlimGPTDecoderLayer], config: SlimGPTConfig) -> SlimGPTForCausalLM:
    """The slim causal LM: the dense model's embeddings, final norm and head around the shrunken layers.

    Tied embeddings stay tied (the head *is* the embedding module's weight).
    """
    with torch.device("meta"):
        slim = SlimGPTForCausalLM(config)
    embed = dense.get_input_embeddings()
    slim.model.embed_tokens = embed
    slim.model.norm = dense.model.norm
    slim.model.rotary_emb = dense.model.rotary_emb
    slim.model.layers = nn.ModuleList(layers)
    if config.tie_word_embeddings:
        slim.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device="meta")
        slim.lm_head.weight = embed.weight
    else:
        slim.lm_head = dense.lm_head
    if dense.generation_config is not None:
        slim.generation_config = dense.generation_config
    meta = [n for n, p in list(slim.named_parameters()) + list(slim.named_buffers()) if p.is_meta]
    assert not meta, f"slim model left parameters on the meta device: {meta[:3]}"
    slim.config._attn_implementation = dense.config._attn_implementation
    return slim.eval().requires_grad_(False)


def check_shapes(model: SlimGPTForCausalLM) -> None:
    """Assert the config's per-layer lists agree with every weight (internal invariant)."""
    c = model.config
    for i, layer in enumerate(model.model.layers):
        q, kv, f = c.layer_shape(i)
        d = c.head_dim
        assert layer.self_attn.q_proj.weight.shape == (q * d, c.hidden_size), f"layer {i} q_proj"
        assert layer.self_attn.k_proj.weight.shape == (kv * d, c.hidden_size), f"layer {i} k_proj"
        assert layer.self_attn.o_proj.weight.shape == (c.hidden_size, q * d), f"layer {i} o_proj"
        assert layer.mlp.down_proj.weight.shape == (c.hidden_size, f), f"layer {i} down_proj"
        assert layer.mlp.gate_proj.weight.shape == (f, c.hidden_size), f"layer {i} gate_proj"
