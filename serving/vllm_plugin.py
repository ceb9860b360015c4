"""vLLM plugin entry point (`vllm.general_plugins` in pyproject.toml).

vLLM calls `register()` in every process it starts (API server, engine core,
workers). It registers the `slimgpt` config with transformers and the
`SlimGPTForCausalLM` architecture with vLLM's model registry as a lazy
"module:Class" string, so nothing from vLLM's model code is imported until a
slim checkpoint is actually loaded, and nothing in the checkpoint is executed.
"""

from __future__ import annotations

ARCHITECTURE = "SlimGPTForCausalLM"
MODEL_CLASS = "slimgpt_deploy.serving.vllm_model:SlimGPTForCausalLM"


def register() -> None:
    """Register the slim model with transformers and vLLM; safe to call any number of times."""
    from vllm import ModelRegistry

    import slimgpt_deploy.modeling  # noqa: F401  (registers the `slimgpt` config with transformers)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
