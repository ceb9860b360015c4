"""Serving back ends (installed as `slimgpt_deploy.serving`).

- `vllm_plugin`: the vLLM model plugin (the `vllm.general_plugins` entry point).
- One generation back end per runtime, each a lazy "module:function" string with
  the same contract:

      generate(model: Path, prompts: list[str], *, max_new_tokens: int, temperature: float,
               top_p: float, seed: int, on_text: Callable[[int, str], None] | None) -> list[str]

  returning the completion of each prompt (without the prompt); `on_text(i, delta)`
  streams text as it is produced, where the back end can.
"""

from __future__ import annotations

from typing import Callable

BACKENDS: dict[str, str] = {
    "torch": "slimgpt_deploy.serving.torch_backend:generate",
    "vllm": "slimgpt_deploy.serving.vllm_backend:generate",
    "onnx": "slimgpt_deploy.serving.onnx_runner:generate",
    "llamacpp": "slimgpt_deploy.serving.llamacpp_runner:generate",
    "genai": "slimgpt_deploy.serving.genai_runner:generate",
}


def get_backend(name: str) -> Callable[..., list[str]]:
    from ..extras import resolve

    return resolve(BACKENDS, name, "back end")
