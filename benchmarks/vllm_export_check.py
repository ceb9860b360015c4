"""How closely vLLM follows transformers on a pruned SmolLM2, per dtype: the numbers behind exporters/vllm.TOLERANCES.

    .venv/bin/python benchmarks/vllm_export_check.py [CHECKPOINT ...]  # writes benchmarks/results/vllm_export.{json,md}

Runs `slimgpt-deploy export CHECKPOINT --format vllm --dtype D --json` for float32, float16 and
bfloat16 (default checkpoints: slimgpt-build/slim from `make demo`, self-calibrated, and
build/bench/slim-0.2 from benchmarks/vllm_bench.py, WikiText-calibrated) and records
each export's verification: per prompt, whether the 32 greedy tokens are equal, where they part and
whether at a tie, and the largest top-5 log-probability difference.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DTYPES = ("float32", "float16", "bfloat16")


def _rel(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main() -> None:
    checkpoints = [Path(a) for a in sys.argv[1:]] or [
        ROOT / "slimgpt-build" / "slim",
        ROOT / "build" / "bench" / "slim-0.2",
    ]
    for checkpoint in checkpoints:
        if not (checkpoint / "config.json").exists():
            sys.exit(f"{checkpoint} is missing; run `make demo` / benchmarks/vllm_bench.py first or pass checkpoints")
    runs = []
    for checkpoint, dtype in ((c, d) for c in checkpoints for d in DTYPES):
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(
                [
                    str(ROOT / ".venv" / "bin" / "slimgpt-deploy"),
                    "export",
                    str(checkpoint),
                    "--format",
                    "vllm",
                    "--dtype",
                    dtype,
                    "--out",
                    f"{tmp}/out",
                    "--json",
                ],
                capture_output=True,
                text=True,
            )
        verification = (
            json.loads(proc.stdout)["verification"]
            if proc.returncode == 0
            else {"passed": False, "error": proc.stderr.strip().splitlines()[-1]}
        )
        runs.append(
            {"checkpoint": _rel(checkpoint), "dtype": dtype, "exit_code": proc.returncode, "verification": verification}
        )
        print(dtype, proc.returncode, verification.get("max_logprob_diff"), flush=True)
    report = {"date": time.strftime("%Y-%m-%d"), "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vllm_export.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# vLLM export verification: vLLM vs transformers, both in the export's dtype",
        "",
        f"{report['date']}; 4 prompts x 32 greedy tokens; 20%-pruned SmolLM2-135M. "
        "Command: `.venv/bin/python benchmarks/vllm_export_check.py`.",
        "",
        "| checkpoint | dtype | passed | tokens equal (prompts) | partings at a tie | max top-5 logprob diff "
        "| tolerance | tie margin |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        v = r["verification"]
        if "prompts" not in v:
            lines.append(
                f"| {r['checkpoint']} | {r['dtype']} | no (exit {r['exit_code']}: {v.get('error', '')}) | | | | | |"
            )
            continue
        equal = sum(p["tokens_equal"] for p in v["prompts"])
        ties = sum(p["parted_at_tie"] for p in v["prompts"])
        lines.append(
            f"| {r['checkpoint']} | {r['dtype']} | {v['passed']} | {equal}/{len(v['prompts'])} | {ties} | "
            f"{v['max_logprob_diff']:.2g} | "
            f"{v['tolerance']['logprob_tol']} | {v['tolerance']['tie_margin']} |"
        )
    (RESULTS / "vllm_export.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
