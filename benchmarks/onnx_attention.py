"""Fused vs primitive attention in the ONNX export: SmolLM2-135M dense, fp32, alternating in one run.

    .venv/bin/python benchmarks/onnx_attention.py [--rounds 4]

Writes three graphs of the dense model (exporters/onnx.write_onnx): `fused` (the default: RotaryEmbedding +
ONNX Runtime's GroupQueryAttention since 2026-12-06, ONNX's opset-23 Attention in the committed results of
2026-12-02; fused norms), `norms-only` (fused norms, attention in primitive ops, opset 18)
and `nofuse` (standard ops only), then measures each in its own subprocess with onnx_bench.measure_ort
(prefill 128/512, decode after a 128-token prompt at batch 1 and 8, 2 threads), the three in turn, for
`--rounds` rounds; reports per-round values and medians. Alternating the graphs spreads the machine's
drift over all three, which a sequential run (onnx_bench.py) does not.
Results: benchmarks/results/onnx_attention.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "build" / "bench" / "onnx-attention"
VARIANTS = {"fused": (True, True), "norms-only": (True, False), "nofuse": (False, False)}  # (fuse, attention)
THREADS = 2


def write_variants() -> None:
    import torch

    from slimgpt_deploy.exporters.onnx import write_onnx, write_side_files
    from slimgpt_deploy.sources import load_model

    loaded = load_model("smollm2-135m", dtype=torch.float32)
    for name, (fuse, attention) in VARIANTS.items():
        out = WORK / name
        if (out / "model.onnx").exists():
            continue
        out.mkdir(parents=True, exist_ok=True)
        spec, _ = write_onnx(loaded.model, out, dtype=torch.float32, fuse=fuse, attention=attention)
        write_side_files(loaded, spec, out)


def measure(name: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(WORK / name)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(results: dict) -> str:
    keys = list(results["rounds"][0]["fused"])
    lines = [
        "# Fused vs primitive attention in the ONNX export (SmolLM2-135M dense, fp32)",
        "",
        f"Machine: {results['machine']}. Date: {results['date']}. Load average at start: {results['load']:.2f}.",
        f"Command: `.venv/bin/python benchmarks/onnx_attention.py --rounds {len(results['rounds'])}`; "
        f"{THREADS} threads, the three graphs measured in turn, each in its own process, per round.",
        "",
        "Medians over the rounds (ms; decode = per token after a 128-token prompt):",
        "",
        "| measure | " + " | ".join(VARIANTS) + " | fused / norms-only |",
        "|---|" + "---|" * (len(VARIANTS) + 1),
    ]
    for k in keys:
        med = {v: statistics.median(r[v][k] for r in results["rounds"]) for v in VARIANTS}
        lines.append(
            f"| {k} | " + " | ".join(f"{med[v]:.1f}" for v in VARIANTS) + f" | {med['fused'] / med['norms-only']:.2f} |"
        )
    lines += [
        "",
        "Per round (decode_b1_ms): "
        + "; ".join(", ".join(f"{v} {r[v]['decode_b1_ms']:.1f}" for v in VARIANTS) for r in results["rounds"]),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import onnx_bench

        print(json.dumps(onnx_bench.measure_ort(args.child, THREADS)))
        return
    write_variants()
    load = os.getloadavg()[0]
    rounds = []
    for r in range(args.rounds):
        rounds.append({name: measure(name) for name in VARIANTS})
        print(r, {v: round(rounds[-1][v]["decode_b1_ms"], 1) for v in VARIANTS}, flush=True)
    results = {
        "machine": f"{platform.platform()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "load": load,
        "rounds": rounds,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "onnx_attention.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "onnx_attention.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
