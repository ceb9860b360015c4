"""Work run in a child process: one protocol for bench's measurements and vLLM's engine runs.

Parent side, `run(module, job, stem)`: writes STEM.job.json (the job plus `"out"`:
STEM.result.json), runs MODULE as `__main__` with STEM.job.json as its argument (through BOOTSTRAP,
below) with CHILD_ENV (less the variables in `unset`), its stdout and stderr in STEM.log, and
returns the child's result dict. A typed error
raised in the child comes back as that kind of error (bad input stays bad input, exit code 2);
any other failure as ChildFailed with the child's last error line and where its log is.

Child side, `main(fn)`: reads the job, writes `fn(job)` (a dict) to the job's `out`, or
{"error", "exit_code"} when fn raises a SlimGPTError, and returns the exit code.

Each run is its own process, so its peak memory is its own and a runtime that aborts (vLLM,
llama.cpp) cannot take the parent with it. The child gets the package without running its
`__init__`, which imports torch (PruneConfig's dtypes): ~2 s and ~0.2 GiB of resident memory that
an ONNX Runtime or llama.cpp measurement must not carry (a deployed edge app has neither). A child
module that loads slim checkpoints through transformers imports `slimgpt_deploy.modeling` itself
(sources.py and the vLLM plugin do), which registers the slim model type at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import BadInputError, SlimGPTError, last_error_line

# vLLM in one process (no engine-core child, no spawn of this module's importers); tokenizers' threads off.
CHILD_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}


# `python -c BOOTSTRAP TARGET ARGS...`: the package's module made from its spec (submodules import as
# usual; its __init__ is not executed), then TARGET (a module name, or a .py file) run as __main__
# with argv [TARGET's file, ARGS...].
BOOTSTRAP = (
    "import importlib.util, runpy, sys; "
    "spec = importlib.util.find_spec('slimgpt_deploy'); "
    "sys.modules['slimgpt_deploy'] = importlib.util.module_from_spec(spec); "
    "target = sys.argv[1]; del sys.argv[1]; "
    "runpy.run_path(target, run_name='__main__') if target.endswith('.py') "
    "else runpy.run_module(target, run_name='__main__', alter_sys=True)"
)


def python_command(target: str, *args: str) -> list[str]:
    """The command that runs ``target`` (a module name or a .py file) with ``args`` through BOOTSTRAP."""
    return [sys.executable, "-c", BOOTSTRAP, target, *args]


class ChildFailed(SlimGPTError):
    """The child died, timed out or wrote no result; the message holds its last error line and its log."""


def run(module: str, job: dict, stem: Path, *, timeout: float, unset: Iterable[str] = ()) -> dict:
    """Run `job` in `python -m module`; its result dict (with "seconds", the child's wall time)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    job_file, out, log_file = stem.with_suffix(".job.json"), stem.with_suffix(".result.json"), stem.with_suffix(".log")
    out.unlink(missing_ok=True)
    job_file.write_text(json.dumps({**job, "out": str(out)}, indent=2))
    env = {**os.environ, **CHILD_ENV}
    for name in unset:
        env.pop(name, None)
    t0 = time.perf_counter()
    try:
        with open(log_file, "w") as logf:
            proc = subprocess.run(
                python_command(module, str(job_file)),
                env=env,
                stdout=logf,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
    except subprocess.TimeoutExpired:
        raise ChildFailed(f"timed out after {timeout:.0f} s (log: {log_file})") from None
    seconds = time.perf_counter() - t0
    result = json.loads(out.read_text()) if out.is_file() else None
    if result is not None and "error" in result:
        kind = BadInputError if result.get("exit_code") == BadInputError.exit_code else SlimGPTError
        raise kind(result["error"])
    if proc.returncode != 0 or result is None:
        line = last_error_line(log_file.read_text(errors="replace"))
        raise ChildFailed(f"{line} (exit code {proc.returncode}; log: {log_file})")
    result["seconds"] = round(seconds, 2)
    return result


def main(fn: Callable[[dict], dict], argv: list[str] | None = None) -> int:
    """The child's side: argv[0] (default sys.argv[1]) is the job file; returns the process's exit code."""
    from .atomic import write_json

    job = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    out = Path(job["out"])
    try:
        result = fn(job)
    except SlimGPTError as err:
        write_json(out, {"error": str(err), "exit_code": err.exit_code})
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return err.exit_code
    write_json(out, result)
    return 0
