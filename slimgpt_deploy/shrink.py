"""Physical shrink: pruning decisions -> smaller weights -> a slim model with its config.

Every function returns new modules; the dense model is only read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .families import slim_config_fields
from .layout import HESSIAN_OF, LLAMA, PROJECTIONS, SLIM, Layout
from .modeling import LayerConfigView, SlimGPTConfig, SlimGPTDecoderLayer, SlimGPTForCausalLM
from .modeling.shapes import layer_weight_shapes
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


def _rows(index: list[int], size: int, device: torch.device) -> torch.Tensor:
    """Row indices of the kept heads in a [heads * size, ...] projection, on `device`."""
    return torch.tensor([h * size + t for h in index for t in range(size)], dtype=torch.long, device=device)


def cut_layer_state(layer: nn.Module, cut: LayerCut, head_dim: int, layout: Layout = LLAMA) -> dict[str, torch.Tensor]:
    """State dict of the shrunken layer (slim names), in the layer's dtype.

    Every projection is cut along its axis by its unit (layout.PROJECTIONS); the two the OBS
    update compensated (o, down) take their new weights from `cut`.
    """
    weight = layout.proj(layer, "q").weight
    dtype, device = weight.dtype, weight.device  # the indices live where the weights they select from do
    kept = {
        "q_heads": _rows(cut.q_heads, head_dim, device),
        "kv_heads": _rows(cut.kv_heads, head_dim, device),
        "ffn": _rows(cut.ffn, 1, device),
    }
    compensated = {HESSIAN_OF["heads"]: cut.o_proj, HESSIAN_OF["ffn"]: cut.down_proj}
    sd = {
        f"{SLIM.attention_norm}.weight": layout.part(layer, "attention_norm").weight,
        f"{SLIM.mlp_norm}.weight": layout.part(layer, "mlp_norm").weight,
    }
    for role, p in PROJECTIONS.items():
        proj = layout.proj(layer, role)
        W, index = compensated.get(role, proj.weight), kept[p.unit]
        sd[SLIM.tensor(role)] = W.index_select(p.axis, index).to(dtype)
        if proj.bias is not None:
            sd[SLIM.tensor(role, "bias")] = proj.bias[index] if p.axis == 0 else proj.bias
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def shrink_layer(
    layer: nn.Module, cut: LayerCut, config: SlimGPTConfig, layer_idx: int, layout: Layout = LLAMA
) -> SlimGPTDecoderLayer:
    """A new decoder layer of the slim config's shape for `layer_idx`, holding the cut weights.

    `layout`: where `layer`'s parts live (its family's; the slim layer is always on SLIM).
    """
    state = cut_layer_state(layer, cut, config.head_dim, layout)
    with torch.device("meta"):
        new = SlimGPTDecoderLayer(LayerConfigView(config, layer_idx), layer_idx)
    new.load_state_dict(state, strict=True, assign=True)
    return new.eval().requires_grad_(False)


def assemble(
    dense: nn.Module, layers: list[SlimGPTDecoderLayer], config: SlimGPTConfig, layout: Layout = LLAMA
) -> SlimGPTForCausalLM:
    """The slim causal LM: the dense model's embeddings, final norm and head around the shrunken layers.

    `layout`: where the dense model keeps them. Tied embeddings stay tied (the head *is* the
    embedding module's weight).
    """
    with torch.device("meta"):
        slim = SlimGPTForCausalLM(config)
    embed = dense.get_input_embeddings()
    slim.model.embed_tokens = embed
    slim.model.norm = layout.part(dense, "norm")
    slim.model.rotary_emb = layout.part(dense, "rotary")
    slim.model.layers = nn.ModuleList(layers)
    if config.tie_word_embeddings:
        slim.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device="meta")
        slim.lm_head.weight = embed.weight
    else:
        slim.lm_head = layout.part(dense, "head")
    if dense.generation_config is not None:
        slim.generation_config = dense.generation_config
    meta = [n for n, p in list(slim.named_parameters()) + list(slim.named_buffers()) if p.is_meta]
    assert not meta, f"slim model left parameters on the meta device: {meta[:3]}"
    slim.config._attn_implementation = dense.config._attn_implementation
    return slim.eval().requires_grad_(False)


def check_shapes(model: SlimGPTForCausalLM) -> None:
    """Assert the config's per-layer lists agree with every weight (internal invariant)."""
    for i, layer in enumerate(model.model.layers):
        got = {name: tuple(t.shape) for name, t in layer.state_dict().items()}
        assert got == layer_weight_shapes(model.config, i), f"layer {i}: weights disagree with the config"
