"""The slim model: per-layer shapes on top of transformers' Llama.

Importing this package registers the `slimgpt` model type with transformers'
Auto classes, so slim checkpoints load without `trust_remote_code`.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_slimgpt import SlimGPTConfig
from .modeling_slimgpt import LayerConfigView, SlimGPTDecoderLayer, SlimGPTForCausalLM

# Files copied into every checkpoint (loaded there with trust_remote_code=True).
REMOTE_CODE_FILES = (
    Path(__file__).with_name("configuration_slimgpt.py"),
    Path(__file__).with_name("modeling_slimgpt.py"),
)
AUTO_MAP = {
    "AutoConfig": "configuration_slimgpt.SlimGPTConfig",
    "AutoModelForCausalLM": "modeling_slimgpt.SlimGPTForCausalLM",
}


def register() -> None:
    """Register the slim model with transformers' Auto classes; safe to call twice."""
    AutoConfig.register(SlimGPTConfig.model_type, SlimGPTConfig, exist_ok=True)
    AutoModelForCausalLM.register(SlimGPTConfig, SlimGPTForCausalLM, exist_ok=True)


register()

__all__ = [
    "AUTO_MAP",
    "REMOTE_CODE_FILES",
    "LayerConfigView",
    "SlimGPTConfig",
    "SlimGPTDecoderLayer",
    "SlimGPTForCausalLM",
    "register",
]
