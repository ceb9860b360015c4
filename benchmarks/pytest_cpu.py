"""Where `make test` spends its CPU: a pytest plugin that logs each test's CPU seconds, and a per-file summary.

    PYTHONPATH=$PWD/benchmarks make test PYTEST_ADDOPTS="-p pytest_cpu"   # appends to build/test-cpu.jsonl
    .venv/bin/python benchmarks/pytest_cpu.py [build/test-cpu.jsonl]  # per file, then the 30 costliest tests
    .venv/bin/python benchmarks/pytest_cpu.py build/test-cpu.jsonl --out benchmarks/results/test_cpu.md

A test's CPU is its worker's user + system time over the test (setup, call and teardown) plus that of the
child processes it waited for (CLI runs, bench children, vLLM engines, distributed ranks that exit normally;
ranks that end with os._exit are not counted). On 2 cores with two pytest-xdist workers, each worker keeps
about one core busy, so the suite's wall time is close to its CPU seconds over 2: a test costs what its CPU
says, whatever it waits on.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import sys
import time
from pathlib import Path

LOG_ENV = "TEST_CPU_LOG"
DEFAULT_LOG = Path(__file__).resolve().parents[1] / "build" / "test-cpu.jsonl"


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _log_path() -> Path:
    return Path(os.environ.get(LOG_ENV) or DEFAULT_LOG)


try:
    import pytest
except ImportError:  # the summary needs no pytest
    pytest = None

if pytest is not None:

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        cpu, wall = _cpu_seconds(), time.perf_counter()
        yield
        row = {"id": item.nodeid, "cpu": round(_cpu_seconds() - cpu, 2), "wall": round(time.perf_counter() - wall, 2)}
        path = _log_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:  # one short line per write: workers' lines do not interleave
            f.write(json.dumps(row) + "\n")


def summary(rows: list[dict], top: int = 30) -> str:
    by_file: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for r in rows:
        entry = by_file[r["id"].split("::")[0]]
        entry[0] += r["cpu"]
        entry[1] += r["wall"]
        entry[2] += 1
    cpu, wall = sum(r["cpu"] for r in rows), sum(r["wall"] for r in rows)
    lines = [f"{len(rows)} tests: {cpu:.0f} CPU s, {wall:.0f} s of test wall time summed over the workers", ""]
    lines += ["| file | CPU s | wall s | tests |", "|---|---|---|---|"]
    for name, (c, w, n) in sorted(by_file.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {name} | {c:.1f} | {w:.1f} | {n} |")
    lines += ["", "| test | CPU s | wall s |", "|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["cpu"])[:top]:
        lines.append(f"| {r['id']} | {r['cpu']:.1f} | {r['wall']:.1f} |")
    return "\n".join(lines)


def _header() -> str:
    import subprocess

    from slimgpt_deploy.bench.environment import machine

    m = machine()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return (
        f"# Where make test spends its CPU\n\n{time.strftime('%Y-%m-%d')}, {m['cpu']}, {m['cores']} cores, commit "
        f'{commit}. `PYTHONPATH=$PWD/benchmarks make test PYTEST_ADDOPTS="-p pytest_cpu"`, then '
        "`benchmarks/pytest_cpu.py` (CPU: the worker's and its waited-for children's user + system seconds).\n\n"
    )


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", nargs="?", type=Path, default=_log_path())
    parser.add_argument("--out", type=Path, help="write Markdown with the machine and commit here")
    args = parser.parse_args(argv)
    text = summary([json.loads(line) for line in args.log.read_text().splitlines() if line.strip()])
    if args.out:
        args.out.write_text(_header() + text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
