"""LLaMA-family architectures: the family adapter.

A registry from transformers' `model_type` to a `Family`: its name, the slim
config fields that describe it (biases, window) and its `Layout` (layout.py:
where the embeddings, decoder layers, norms and q/k/v/o, gate/up/down
projections live). The pruning engine, shrink, the checkpoint validator and the
exporters read a model's parts through its family's layout, so a family with
the Llama layout is one entry here; one named otherwise gives its own Layout
(docs/CONTRIBUTING.md, "A model family").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .errors import UnsupportedArchitectureError
from .layout import LLAMA, LayerShape, Layout

log = logging.getLogger(__name__)

# Fields copied as they are from the dense config into the slim config.
SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _capped_window(config, window: int | None) -> dict:
    """A sliding window wider than every sequence is no window; otherwise cap the context at it."""
    if window is None or window >= config.max_position_embeddings:
        return {}
    log.warning(
        "%s uses a sliding window of %d tokens; the slim model caps its context at %d (exact up to that length)",
        config.model_type,
        window,
        window,
    )
    return {"max_position_embeddings": window}


def _llama(config) -> dict:
    bias = bool(getattr(config, "attention_bias", False))
    return {"attention_bias": bias, "o_proj_bias": bias, "mlp_bias": bool(getattr(config, "mlp_bias", False))}


def _mistral(config) -> dict:
    return {"attention_bias": False, "o_proj_bias": False, "mlp_bias": False} | _capped_window(
        config, getattr(config, "sliding_window", None)
    )


def _qwen2(config) -> dict:
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", False) else None
    return {"attention_bias": True, "o_proj_bias": False, "mlp_bias": False} | _capped_window(config, window)


def _slimgpt(config) -> dict:
    return {
        "attention_bias": config.attention_bias,
        "o_proj_bias": config.o_proj_bias,
        "mlp_bias": config.mlp_bias,
        "source_model_type": config.source_model_type,
    }


@dataclass(frozen=True)
class Family:
    """One supported `model_type`."""

    name: str  # as the error messages and the README say it
    slim_fields: Callable[[object], dict]  # config -> {"attention_bias", "o_proj_bias", "mlp_bias", ...}
    layout: Layout = LLAMA


# The model_type of a slim checkpoint; modeling/configuration_slimgpt.py spells it too (that file is copied into
# every checkpoint and imports only transformers).
SLIM_MODEL_TYPE = "slimgpt"
FAMILIES: dict[str, Family] = {
    "llama": Family("Llama", _llama),
    "mistral": Family("Mistral", _mistral),
    "qwen2": Family("Qwen2", _qwen2),
    SLIM_MODEL_TYPE: Family("SlimGPT checkpoint", _slimgpt),
}
SUPPORTED_MODEL_TYPES: dict[str, str] = {model_type: family.name for model_type, family in FAMILIES.items()}


def _model_type(config) -> str | None:
    return config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)


def check_architecture(config) -> None:
    """Raise UnsupportedArchitectureError unless the model type is a supported family.

    `config` is a transformers config or a config.json dict.
    """
    model_type = _model_type(config)
    if model_type not in FAMILIES:
        supported = ", ".join(f"{k} ({family.name})" for k, family in FAMILIES.items())
        raise UnsupportedArchitectureError(
            f"unsupported architecture: model_type {model_type!r}; "
            f"slimgpt-deploy supports {supported}: pass a model of one of these families"
        )


def slim_config_fields(config) -> dict:
    """Keyword arguments for SlimGPTConfig describing a dense (or slim) model, without per-layer lists."""
    check_architecture(config)
    fields = {name: getattr(config, name) for name in SHARED_FIELDS if hasattr(config, name)}
    fields["head_dim"] = _head_dim(config)
    fields["source_model_type"] = config.model_type
    fields |= FAMILIES[config.model_type].slim_fields(config)
    return fields


def layout_of(config) -> Layout:
    """Where a model of this config (a transformers config or a config.json dict) keeps its parts."""
    check_architecture(config)
    return FAMILIES[_model_type(config)].layout


def layer_shape(config, i: int) -> LayerShape:
    """Decoder layer i's current shape (the per-layer lists of a slim config, the uniform sizes of a dense one)."""
    check_architecture(config)
    n = config.num_hidden_layers
    q = getattr(config, "num_attention_heads_per_layer", None) or [config.num_attention_heads] * n
    kv = (
        getattr(config, "num_key_value_heads_per_layer", None)
        or [config.num_key_value_heads or config.num_attention_heads] * n
    )
    ffn = getattr(config, "intermediate_size_per_layer", None) or [config.intermediate_size] * n
    fields = FAMILIES[config.model_type].slim_fields(config)
    return LayerShape(
        q_heads=q[i],
        kv_heads=kv[i],
        ffn=ffn[i],
        head_dim=_head_dim(config),
        hidden=config.hidden_size,
        qkv_bias=bool(fields["attention_bias"]),
        mlp_bias=bool(fields["mlp_bias"]),
        o_bias=bool(fields["o_proj_bias"]),
    )


def layer_shapes(config) -> list[LayerShape]:
    """Every decoder layer's current shape."""
    return [layer_shape(config, i) for i in range(config.num_hidden_layers)]
