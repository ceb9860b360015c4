"""What a bench child pays before it measures anything: start-up time and peak RSS of its imports.

    .venv/bin/python benchmarks/child_import.py     # writes benchmarks/results/child_import.{json,md}

Three ways to start a child that will run ONNX Runtime (each a fresh process, median of 5 runs):
  runtime only   python importing numpy and onnxruntime (the floor);
  python -m      the package imported as `python -m slimgpt_deploy.bench.child` does (its __init__ imports
                 transformers to register the slim model type), plus the ONNX runner;
  bootstrap      child_process.python_command: the package without its __init__, plus the ONNX runner.
Peak RSS is the child's VmHWM. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from slimgpt_deploy.bench.environment import machine
from slimgpt_deploy.child_process import python_command

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = 5
REPORT = (
    "import json, sys\n"
    "hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
    "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'})\n"
    "print(json.dumps({'peak_rss_mib': round(hwm / 1024, 1), 'heavy': heavy}))\n"
)
IMPORTS = "import slimgpt_deploy.bench.child, slimgpt_deploy.serving.onnx_runner, onnxruntime\n"


def commands(probe: Path) -> dict[str, list[str]]:
    return {
        "runtime only": [sys.executable, "-c", "import numpy, onnxruntime\n" + REPORT],
        "python -m": [sys.executable, "-c", IMPORTS + REPORT],
        "bootstrap": python_command(str(probe)),
    }


def measure(cmd: list[str]) -> dict:
    walls, rows = [], []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        walls.append(time.perf_counter() - t0)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        "start_s": round(statistics.median(walls), 2),
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rows),
        "imports_torch_or_transformers": rows[-1]["heavy"],
    }


def markdown(r: dict) -> str:
    lines = [
        "# A bench child's start-up: imports before it measures",
        "",
        f"{r['date']}, {r['machine']['cpu']}, {r['machine']['cores']} cores, load average {r['load_average']}. "
        f"`python benchmarks/child_import.py`; median of {RUNS} fresh processes each.",
        "",
        "| start | wall s | peak RSS MiB | torch / transformers imported |",
        "|---|---|---|---|",
    ]
    for name, m in r["rows"].items():
        heavy = ", ".join(m["imports_torch_or_transformers"]) or "neither"
        lines.append(f"| {name} | {m['start_s']:.2f} | {m['peak_rss_mib']:.0f} | {heavy} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    probe = ROOT / "build" / "child_import_probe.py"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text(IMPORTS + REPORT)
    rows = {name: measure(cmd) for name, cmd in commands(probe).items()}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine() | {"python": platform.python_version()},
        "load_average": round(os.getloadavg()[0], 2),
        "rows": rows,
    }
    (RESULTS / "child_import.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "child_import.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
