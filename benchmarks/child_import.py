"""What a bench child pays before it measures anything: start-up time and peak RSS of its imports.

    .venv/bin/python benchmarks/child_import.py     # writes benchmarks/results/child_import.{json,md}

Three ways to start a child that will run ONNX Runtime (each a fresh process, median of 5 runs):
  runtime only   python importing numpy and onnxruntime (the floor);
  python -m      the package imported as `python -m slimgpt_deploy.bench.child` does (its __init__, plus
                 the ONNX runner);
  bootstrap      child_process.python_command: the package without its __init__, plus the ONNX runner.
and the CLI's own start, which every command pays before it does anything:
  cli --help     `slimgpt-deploy --help`;
  cli import     `import slimgpt_deploy.cli`, with its peak RSS and heavy imports.
and what other processes of the tool and its tests pay to start (where `make test` spends most of its CPU:
results/test_cpu.md):
  torch          `import torch`;
  transformers   torch and transformers' Llama model class (a bench torch child, a prune rank, the reference);
  scikit-learn   `import sklearn.metrics`, which transformers' generation utilities import when scikit-learn
                 is installed (lm-eval installs it);
  prune API      `import slimgpt_deploy.api` (every prune process, `--nproc` rank or launcher);
  vllm           `from vllm import LLM` (every vLLM child, before its engine starts).
Peak RSS is the child's VmHWM. Run it on an otherwise idle machine.

    PYTHONPATH=CHECKOUT .venv/bin/python benchmarks/child_import.py --out NAME

measures another checkout of the package (e.g. a git worktree of an older commit) into results/NAME.{json,md}.
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

import click

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
        "cli --help": [str(Path(sys.executable).with_name("slimgpt-deploy")), "--help"],
        "cli import": [sys.executable, "-c", "import slimgpt_deploy.cli\n" + REPORT],
        "torch": [sys.executable, "-c", "import torch\n" + REPORT],
        "transformers": [sys.executable, "-c", "import torch\nfrom transformers import LlamaForCausalLM\n" + REPORT],
        "scikit-learn": [sys.executable, "-c", "import sklearn.metrics\n" + REPORT],
        "prune API": [sys.executable, "-c", "import slimgpt_deploy.api\n" + REPORT],
        "vllm": [sys.executable, "-c", "from vllm import LLM\n" + REPORT],
    }


def measure(cmd: list[str], cwd: Path) -> dict:
    walls, rows = [], []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=cwd)
        walls.append(time.perf_counter() - t0)
        last = out.stdout.strip().splitlines()[-1]
        rows.append(json.loads(last) if last.startswith("{") else None)  # --help reports nothing
    return {
        "start_s": round(statistics.median(walls), 2),
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rows) if rows[-1] else None,
        "imports_torch_or_transformers": rows[-1]["heavy"] if rows[-1] else None,
    }


def markdown(r: dict) -> str:
    lines = [
        "# Process start-up: what a bench child, the CLI and the other processes import before any work",
        "",
        f"{r['date']}, {r['machine']['cpu']}, {r['machine']['cores']} cores, load average {r['load_average']}. "
        f"`{r['command']}`; median of {RUNS} fresh processes each. Package: {r['package']}.",
        "",
        "| start | wall s | peak RSS MiB | torch / transformers imported |",
        "|---|---|---|---|",
    ]
    for name, m in r["rows"].items():
        heavy = m["imports_torch_or_transformers"]
        heavy = "-" if heavy is None else ", ".join(heavy) or "neither"
        rss = "-" if m["peak_rss_mib"] is None else f"{m['peak_rss_mib']:.0f}"
        lines.append(f"| {name} | {m['start_s']:.2f} | {rss} | {heavy} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--out", "name", default="child_import", show_default=True, help="results/NAME.{json,md}")
def main(name: str) -> None:
    import slimgpt_deploy

    probe = ROOT / "build" / "child_import_probe.py"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text(IMPORTS + REPORT)
    checkout = Path(slimgpt_deploy.__file__).parents[1]  # `python -c` imports from its working directory first
    rows = {name: measure(cmd, checkout) for name, cmd in commands(probe).items()}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine() | {"python": platform.python_version()},
        "load_average": round(os.getloadavg()[0], 2),
        "command": "python benchmarks/child_import.py" + ("" if name == "child_import" else f" --out {name}"),
        "package": str(Path(slimgpt_deploy.__file__).parent),
        "rows": rows,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
