"""End-to-end build time: `slimgpt-deploy build` on the embedded default model, stage by stage.

    .venv/bin/python benchmarks/build_time.py            # writes benchmarks/results/build.{json,md}
    .venv/bin/python benchmarks/build_time.py --fresh-cache   # as on a new machine: the model converted first
    .venv/bin/python benchmarks/build_time.py -- --ratio 0.3   # other flags for `build`

Runs the same command as `make demo` (the Makefile's DEMO_FLAGS, read from it; a fresh build directory,
so no stage is skipped), measures the wall time of the whole process, and takes each stage's time from
the build's own build.json. With --fresh-cache the embedded model's converted copy is made again in an
empty cache (SLIMGPT_DEPLOY_CACHE), inside the prune stage, as on a machine that never ran the tool.
The headline numbers of the report (verification, decode speed-ups, perplexity) are copied beside the
times. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "build" / "bench" / "build-time"
TARGET_S = 600


def demo_flags() -> list[str]:
    """The Makefile's DEMO_FLAGS (what `make demo` passes to `build`), continuation lines joined."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(r"^DEMO_FLAGS\s*:?=\s*(.*)$", text, flags=re.MULTILINE)
    if match is None:
        sys.exit("no DEMO_FLAGS line in the Makefile")
    return match.group(1).split()


def machine() -> dict:
    import psutil
    import torch

    return {
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def run(extra: list[str], fresh_cache: bool) -> dict:
    shutil.rmtree(OUT, ignore_errors=True)
    flags = extra or demo_flags()
    cmd = [str(ROOT / ".venv" / "bin" / "slimgpt-deploy"), "build", "--out", str(OUT), "--json", *flags]
    with tempfile.TemporaryDirectory(prefix="slimgpt-cache-") as cache:
        env = {**os.environ, "SLIMGPT_DEPLOY_CACHE": cache} if fresh_cache else None
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
        wall = time.perf_counter() - t0
    summary = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    state = json.loads((OUT / "build.json").read_text())
    report = (
        json.loads((OUT / "report" / "report.json").read_text()) if (OUT / "report" / "report.json").exists() else {}
    )
    bench = report.get("bench") or {}
    return {
        "command": " ".join(["slimgpt-deploy", *cmd[1:]]),
        "fresh_cache": fresh_cache,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "exit_code": proc.returncode,
        "wall_seconds": round(wall, 1),
        "target_seconds": TARGET_S,
        "stages": {name: rec.get("seconds") for name, rec in state["stages"].items()},
        "prune_seconds": (report.get("model") or {}).get("prune_seconds"),
        "verification": summary.get("verification"),
        "decode_speedup_b1": {
            name: b["ratios"]["decode_speedup"].get("1")
            for name, b in bench.get("backends", {}).items()
            if b.get("status") == "ok"
        },
        "ideal_decode_speedup": next(
            (
                b["ratios"]["ideal_decode_speedup"]
                for b in bench.get("backends", {}).values()
                if b.get("status") == "ok"
            ),
            None,
        ),
        "peak_rss_mib": {  # each back end's child process, dense and pruned
            name: {role: round(b[role]["peak_rss_bytes"] / 2**20) for role in ("dense", "pruned")}
            for name, b in bench.get("backends", {}).items()
            if b.get("status") == "ok"
        },
        "quality": bench.get("quality"),
    }


def markdown(r: dict) -> str:
    m = r["machine"]
    met = "met" if r["wall_seconds"] <= r["target_seconds"] and r["exit_code"] == 0 else "MISSED"
    lines = [
        "# End-to-end build time: `slimgpt-deploy build` on SmolLM2-135M (the `make demo` job)",
        "",
        f"Machine: {m['platform']}, {m['cores']} cores, {m['ram_gib']} GiB, torch {m['torch']} "
        f"({m['torch_threads']} threads). Date: {r['date']}.",
        f"Command: `.venv/bin/python benchmarks/build_time.py{' --fresh-cache' if r.get('fresh_cache') else ''}` "
        f"(runs `{r['command']}` in a fresh directory"
        + ("; the embedded model converted again into an empty cache, inside prune" if r.get("fresh_cache") else "")
        + ").",
        "",
        f"Whole build: **{r['wall_seconds']:.0f} s** (exit code {r['exit_code']}); "
        f"target {r['target_seconds']} s: {met}.",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {name} | {s:.1f} |" for name, s in r["stages"].items() if s is not None]
    if r.get("prune_seconds"):
        lines += ["", f"Inside prune: {', '.join(f'{k} {v:.0f} s' for k, v in r['prune_seconds'].items())}."]
    if r.get("decode_speedup_b1"):
        lines += [
            "",
            "Decode speed-up at batch 1 (pruned vs dense, same run): "
            + ", ".join(f"{k} {v:.2f}x" for k, v in r["decode_speedup_b1"].items())
            + f"; weight-bytes ideal {r['ideal_decode_speedup']:.2f}x.",
        ]
    if r.get("peak_rss_mib"):
        lines += [
            "Peak RSS of each back end's child, dense -> pruned MiB (ONNX Runtime and GenAI children import "
            "neither torch nor transformers since 2026-12-05, llama.cpp children since 2026-12-06): "
            + ", ".join(
                f"{k} {v['dense']} -> {v['pruned']} ({v['pruned'] / v['dense']:.2f})"
                for k, v in r["peak_rss_mib"].items()
            )
            + ".",
        ]
    q = r.get("quality")
    if q:
        lines += [
            f"Perplexity ({q['text']}, {q['tokens']} tokens): dense {q['dense']['perplexity']:.2f}, "
            f"pruned {q['pruned']['perplexity']:.2f}; "
            f"KL {q['kl']:.3f}, top-1 agreement {q['top1']:.1%}."
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extra", nargs="*", help="extra flags for `slimgpt-deploy build` (after --)")
    parser.add_argument("--fresh-cache", action="store_true", help="convert the embedded model again (empty cache)")
    args = parser.parse_args()
    result = run(args.extra, args.fresh_cache)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "build.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "build.md").write_text(markdown(result))
    print(markdown(result))
    sys.exit(result["exit_code"])


if __name__ == "__main__":
    main()
