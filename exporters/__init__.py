"""Exporters (installed as `slimgpt_deploy.exporters`): slim checkpoint -> deployable artifacts.

Each format is a lazy "module:function" string, so `import slimgpt_deploy` never
imports vLLM or ONNX. Every exporter has the same contract:

    export(checkpoint: Path, out: Path, *, dtype: str | None, quantize: str | None,
           force: bool, verify: bool, log: Callable[[str], None]) -> dict

It writes into a temporary sibling of `out`, verifies the artifact there against
PyTorch (collecting every mismatch), and renames it to `out` only when the
verification passed; otherwise it raises VerificationError and nothing appears
at `out`. The returned summary is also written to `out/export.json`.

Each format also verifies an existing export on its own (what `build` runs as a stage):

    verify(export_dir: Path, checkpoint: Path, *, log: Callable[[str], None]) -> dict

comparing the artifact on disk with the checkpoint in PyTorch. It does not raise
on a mismatch: the result holds `passed` and `failures` (every one, in words).
"""

from __future__ import annotations

from typing import Callable

EXPORTERS: dict[str, str] = {
    "vllm": "slimgpt_deploy.exporters.vllm:export",
    "onnx": "slimgpt_deploy.exporters.onnx:export",
    "gguf": "slimgpt_deploy.exporters.gguf:export",
    "genai": "slimgpt_deploy.exporters.genai:export",
}

VERIFIERS: dict[str, str] = {
    "vllm": "slimgpt_deploy.exporters.vllm:verify",
    "onnx": "slimgpt_deploy.exporters.onnx:verify",
    "gguf": "slimgpt_deploy.exporters.gguf:verify",
    "genai": "slimgpt_deploy.exporters.genai:verify",
}

# What `--quantize` takes per format (kept here, import-light, for the CLI's choices); each
# exporter refuses the others. GGUF: the file type (exporters/gguf.TYPES, checked by a test).
QUANTIZE: dict[str, tuple[str, ...]] = {
    "vllm": (),
    "onnx": ("int8",),
    "gguf": ("f32", "f16", "q8_0", "q4_k_m"),
    "genai": ("int8",),
}


# What `--dtype` takes per format (the weights' float type; import-light, for the CLI and the build
# options); each exporter's own table is checked against it by a test.
DTYPES: dict[str, tuple[str, ...]] = {
    "vllm": ("float32", "bfloat16", "float16"),
    "onnx": ("fp32", "fp16"),
    "gguf": ("f32", "f16"),
    "genai": ("fp32", "fp16"),
}


def genai_export_args(weights: str) -> dict:
    """The GenAI exporter's arguments for a weights choice (fp32, fp16, int8): int8 is quantized from the fp32 graph."""
    if weights in QUANTIZE["genai"]:
        return {"dtype": "fp32", "quantize": weights}
    return {"dtype": weights, "quantize": None}


def get_verifier(fmt: str) -> Callable[..., dict]:
    from ..extras import resolve

    return resolve(VERIFIERS, fmt, "export format")


def get_exporter(fmt: str) -> Callable[..., dict]:
    from ..extras import resolve

    return resolve(EXPORTERS, fmt, "export format")
