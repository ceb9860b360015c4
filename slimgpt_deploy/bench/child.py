"""One benchmark job in its own process: `python -m slimgpt_deploy.bench.child JOB.json`.

JOB: {"task": "backend", "backend": NAME, "entry": "module:function", "model": DIR, "options": {...}, "out": FILE}
  or {"task": "quality", "entry": "module:function", "dense": DIR, "pruned": DIR, "options": {...}, "out": FILE}.
"entry" is the parent's registry entry (BACKENDS[NAME].measure or QUALITY), resolved here.
Writes FILE: the measurement plus this process's peak RSS (and CUDA peak), or
{"error": message, "exit_code": code} for a typed error. Anything else is a crash:
a traceback on stderr and a non-zero exit, which the parent reports by its last line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..extras import resolve
from . import BACKENDS, QUALITY, BenchOptions
from .measure import peak_rss_bytes


def _backend(job: dict, options: BenchOptions) -> dict:
    registry = {job["backend"]: job.get("entry") or BACKENDS[job["backend"]].measure}
    return resolve(registry, job["backend"], "bench back end")(Path(job["model"]), options)


def _quality(job: dict, options: BenchOptions) -> dict:
    registry = {"quality": job.get("entry") or QUALITY}
    return resolve(registry, "quality", "bench task")(Path(job["dense"]), Path(job["pruned"]), options)


TASKS = {"backend": _backend, "quality": _quality}


def peak_gpu_bytes() -> int | None:
    """torch's CUDA peak in this process, when torch used CUDA here; else None (not measured)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated())


def run_job(job: dict) -> dict:
    result = TASKS[job["task"]](job, BenchOptions.from_dict(job["options"]))
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["peak_gpu_bytes"] = peak_gpu_bytes()
    return result


if __name__ == "__main__":
    import logging

    from ..child_process import main

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sys.exit(main(run_job))
