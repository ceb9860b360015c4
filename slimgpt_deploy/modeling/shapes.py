"""The weight shapes a slim config promises, tensor by tensor (HF names, unsharded).

One source of truth for everything that checks weights against a config before
computing with them: the checkpoint validator, the vLLM plugin's weight loader,
the exporters.
"""

from __future__ import annotations

import re

from ..families import layer_shape
from ..layout import SLIM, heads_aligned
from .configuration_slimgpt import SlimGPTConfig

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def layer_weight_shapes(config: SlimGPTConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Shapes of decoder layer i's tensors, keyed by the name inside the layer."""
    return SLIM.tensor_shapes(layer_shape(config, i))


def shape_mismatch(config: SlimGPTConfig, name: str, shape: tuple[int, ...]) -> str | None:
    """Why tensor `name` of `shape` disagrees with the config, or None if it fits (or is not a layer tensor).

    Names may carry a prefix (`model.layers.3.mlp.up_proj.weight`).
    """
    m = _LAYER.search(name)
    if m is None:
        return None
    i, local = int(m.group(1)), m.group(2)
    n = config.num_hidden_layers
    if i >= n:
        return f"weight {name} belongs to layer {i} but the config has num_hidden_layers={n}"
    expected = layer_weight_shapes(config, i).get(local)
    if expected is None:
        return f"layer {i}: unexpected weight {name}"
    if tuple(shape) != expected:
        q, kv, f = config.layer_shape(i)
        return (
            f"layer {i}: {name} has shape {list(shape)} but the config's per-layer lists "
            f"(q_heads={q}, kv_heads={kv}, ffn={f}) imply {list(expected)}"
        )
    return None


def tp_problem(config: SlimGPTConfig, tp: int) -> str | None:
    """Why tensor-parallel size `tp` cannot shard this model's per-layer shapes, or None."""
    for i in range(config.num_hidden_layers):
        q, kv, ffn = config.layer_shape(i)
        if not heads_aligned(q, kv, tp) or ffn % tp:
            return (
                f"layer {i} has {q} query heads, {kv} KV heads and FFN width {ffn}, which tensor-parallel size {tp} "
                f"does not divide; prune with `slimgpt-deploy prune --tp-size {tp}` to align the shapes"
            )
    return None
