"""Exporters (installed as `slimgpt_deploy.exporters`): slim checkpoint -> deployable artifacts.

Each format is a lazy "module:function" string, so `import slimgpt_deploy` never
imports vLLM or ONNX. Every exporter has the same contract:

    export(checkpoint: Path, out: Path, *, dtype: str | None, quantize: str | None,
           force: bool, verify: bool, log: Callable[[str], None]) -> dict

It writes into a temporary sibling of `out`, verifies the artifact there against
PyTorch (collecting every mismatch), and renames it to `out` only when the
verification passed; otherwise it raises VerificationError and nothing appears
at `out`. The returned summary is also written to `out/export.json`.
"""
from __future__ import annotations

from typing import Callable

EXPORTERS: dict[str, str] = {
    "vllm": "slimgpt_deploy.exporters.vllm:export",
    "onnx": "slimgpt_deploy.exporters.onnx:export",
}


def get_exporter(fmt: str) -> Callable[..., dict]:
    from ..extras import resolve

    return resolve(EXPORTERS, fmt, "export format")
