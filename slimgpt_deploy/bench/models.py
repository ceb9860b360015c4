"""The two models bench compares: a safetensors directory for each source, its size, its KV cache."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from ..errors import BadInputError
from .options import BenchOptions

logger = logging.getLogger(__name__)

RUN_DTYPE_BYTES = 4  # every back end runs float32
MODEL_MARKER = "bench_source.json"


def model_dir(source: str, target: Path, log: Callable[[str], None] = logger.info) -> Path:
    """A safetensors HF directory for `source`: itself, the embedded model's cache, or `target`, saved once."""
    from ..checkpoint import read_config, safetensors_files
    from ..families import check_architecture
    from ..sources import EMBEDDED_MODELS, embedded_model_dir

    path = Path(source).expanduser()
    if path.is_dir():
        check_architecture(read_config(path))
        safetensors_files(path)
        return path.resolve()
    if source in EMBEDDED_MODELS:
        return embedded_model_dir(source)
    marker = target / MODEL_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("source") == source:
        return target
    from ..atomic import atomic_output_dir
    from ..sources import load_model

    log(f"saving {source} as safetensors in {target} (once; vLLM and ONNX need a directory)")
    loaded = load_model(source)
    with atomic_output_dir(target, force=True) as tmp:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / MODEL_MARKER).write_text(json.dumps({"source": source}) + "\n")
    return target


def _read_config(path: Path) -> dict:
    from ..checkpoint import read_config

    return read_config(path)


def _check_lengths(options: BenchOptions, config: dict, role: str) -> None:
    limit = config.get("max_position_embeddings")
    if not limit:
        return
    longest = max(options.prompt_lens) + options.decode_tokens + 1
    if longest > limit:
        raise BadInputError(
            f"the {role} model has {limit} positions, fewer than the longest prompt plus decode tokens ({longest}); "
            "lower --prompt-lens or --decode-tokens"
        )
    if options.quality_seqlen > limit:
        raise BadInputError(
            f"quality_seqlen {options.quality_seqlen} exceeds the {role} model's {limit} positions; lower it"
        )


def kv_bytes_per_token(config: Mapping, dtype_bytes: int = RUN_DTYPE_BYTES) -> int:
    """KV-cache bytes per token: 2 (K and V) x KV heads x head_dim x dtype bytes, summed over layers."""
    layers = config["num_hidden_layers"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv = (
        config.get("num_key_value_heads_per_layer")
        or [config.get("num_key_value_heads") or config["num_attention_heads"]] * layers
    )
    return sum(2 * k * head_dim * dtype_bytes for k in kv)


def param_count(path: Path) -> int:
    """Parameters in the safetensors files (headers only); a tied lm_head written out is not counted twice."""
    from safetensors import safe_open

    from ..checkpoint import read_config, safetensors_files
    from ..families import layout_of

    config = read_config(path)
    head, tied = f"{layout_of(config).head}.weight", config.get("tie_word_embeddings", False)
    total = 0
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if tied and name == head:
                    continue
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                total += n
    return total


def model_info(source: str, path: Path) -> dict:
    from ..checkpoint import weight_bytes_per_token

    return {
        "source": source,
        "params": param_count(path),
        "weight_bytes": weight_bytes_per_token(path),
        "kv_bytes_per_token": kv_bytes_per_token(_read_config(path)),
    }
