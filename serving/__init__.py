"""Serving back ends (installed as `slimgpt_deploy.serving`).

Planned here: the vLLM model plugin (`vllm.general_plugins` entry point) and the
ONNX Runtime generation loop (issues 3 and 4). Until then, slim checkpoints are
served through transformers (`AutoModelForCausalLM.from_pretrained`).
"""
