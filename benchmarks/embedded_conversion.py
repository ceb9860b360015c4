"""First-use conversion of the embedded SmolLM2 (GGUF -> float32 safetensors): this tree against an earlier commit.

    .venv/bin/python benchmarks/embedded_conversion.py --base 76fdc2a [--rounds 2]

Each round converts the model into an empty cache (SLIMGPT_DEPLOY_CACHE) once with the base commit's
`slimgpt_deploy` (a temporary git worktree) and once with this tree's, in fresh processes, alternating, so
both see the same machine load. Timed: `sources.model_config("smollm2-135m")`, which converts on first use
(imports excluded). The converted directories of the last round are compared file by file. Writes
benchmarks/results/embedded_conversion.{json,md}.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PYTHON = ROOT / ".venv" / "bin" / "python"
# Run from the tree's root: `python -c` imports `slimgpt_deploy` from the working directory first.
PROBE = (
    "import time; from slimgpt_deploy import sources; t = time.perf_counter(); "
    "sources.model_config('smollm2-135m'); print(time.perf_counter() - t)"
)


def convert(tree: Path, cache: Path) -> float:
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "SLIMGPT_DEPLOY_CACHE": str(cache)}
    run = subprocess.run([str(PYTHON), "-c", PROBE], cwd=tree, env=env, capture_output=True, text=True, check=True)
    return float(run.stdout.strip().splitlines()[-1])


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the earlier commit to compare with")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    base_sha = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True)
    head_sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    with tempfile.TemporaryDirectory(prefix="slimgpt-conv-") as tmp:
        tmp = Path(tmp)
        subprocess.run(["git", "worktree", "add", "-q", str(tmp / "base"), args.base], cwd=ROOT, check=True)
        try:
            times: dict[str, list[float]] = {"base": [], "this tree": []}
            load = [os.getloadavg()[0]]
            for _ in range(args.rounds):
                times["base"].append(convert(tmp / "base", tmp / "cache-base"))
                times["this tree"].append(convert(ROOT, tmp / "cache-head"))
            load.append(os.getloadavg()[0])
            same = same_files(tmp / "cache-base" / "smollm2-135m", tmp / "cache-head" / "smollm2-135m")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "base")], cwd=ROOT, check=False)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "cpu": platform.processor() or None},
        "base": base_sha.stdout.strip(),
        "head": head_sha.stdout.strip() + (" + uncommitted changes" if _dirty() else ""),
        "seconds": {k: [round(v, 1) for v in vs] for k, vs in times.items()},
        "median_seconds": {k: round(statistics.median(vs), 1) for k, vs in times.items()},
        "same_files": same,
        "load_average": load,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "embedded_conversion.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["median_seconds"]
    md = "\n".join(
        [
            "# First-use conversion of the embedded SmolLM2-135M (GGUF -> float32 safetensors)",
            "",
            f"Machine: {result['machine']['platform']}, {result['machine']['cores']} cores. Date: {result['date']}. "
            f"Load average at start/end: {load[0]:.2f}/{load[1]:.2f}.",
            f"Command: `.venv/bin/python benchmarks/embedded_conversion.py --base {args.base} --rounds {args.rounds}` "
            "(fresh processes, empty caches, base and this tree alternating; imports not timed).",
            "",
            "| code | seconds (each round) | median |",
            "|---|---|---|",
            f"| {result['base']} (before) | {', '.join(map(str, result['seconds']['base']))} | {m['base']} |",
            f"| {result['head']} | {', '.join(map(str, result['seconds']['this tree']))} | {m['this tree']} |",
            "",
            f"Speed-up {m['base'] / m['this tree']:.2f}x; the converted directories are "
            + ("identical, file by file." if same else "**not identical**."),
            "",
        ]
    )
    (RESULTS / "embedded_conversion.md").write_text(md)
    print(md)
    sys.exit(0 if same else 1)


def _dirty() -> bool:
    status = subprocess.run(["git", "status", "--porcelain", "--", "slimgpt_deploy"], cwd=ROOT, capture_output=True)
    return bool(status.stdout.strip())


if __name__ == "__main__":
    main()
