"""LLaMA-family architectures: what each one means for the slim model.

A registry from transformers' `model_type` to the slim config fields that
describe it (biases, window); every family shares the decoder layer layout
input_layernorm -> self_attn(q, k, v, o) -> post_attention_layernorm ->
mlp(gate, up, down), which is what the pruner and the slim model rely on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from .errors import UnsupportedArchitectureError
from .prune.schedule import LayerShape

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


FAMILIES: dict[str, Callable[[object], dict]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "slimgpt": _slimgpt,
}


SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "slimgpt": "SlimGPT checkpoint",
}
assert set(SUPPORTED_MODEL_TYPES) == set(FAMILIES)


def check_architecture(config) -> None:
    """Raise UnsupportedArchitectureError unless the model type is a supported family.

    `config` is a transformers config or a config.json dict.
    """
    model_type = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())
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
    fields |= FAMILIES[config.model_type](config)
    return fields


def layer_shapes(config) -> list[LayerShape]:
    """Every decoder layer's current shape (per-layer lists for slim models)."""
    check_architecture(config)
    n = config.num_hidden_layers
    q = getattr(config, "num_attention_heads_per_layer", None) or [config.num_attention_heads] * n
    kv = (
        getattr(config, "num_key_value_heads_per_layer", None)
        or [config.num_key_value_heads or config.num_attention_heads] * n
    )
    ffn = getattr(config, "intermediate_size_per_layer", None) or [config.intermediate_size] * n
    fields = FAMILIES[config.model_type](config)
    return [
        LayerShape(
            q_heads=q[i],
            kv_heads=kv[i],
            ffn=ffn[i],
            head_dim=_head_dim(config),
            hidden=config.hidden_size,
            qkv_bias=fields["attention_bias"],
            mlp_bias=fields["mlp_bias"],
        )
        for i in range(n)
    ]
