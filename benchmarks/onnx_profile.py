"""Where a decode step goes in ONNX Runtime: per-op-type kernel time, dense vs pruned, fp32 and int8.

    .venv/bin/python benchmarks/onnx_profile.py              # writes benchmarks/results/onnx_profile.{json,md}
    .venv/bin/python benchmarks/onnx_profile.py --markdown   # rewrite the .md from the .json

Why: pruned decode falls short of the weight-bytes ideal most for int8 at 50% (onnx_interleaved.md), and a
cost that does not shrink with the weights would explain it. Same exports as onnx_bench (build/bench/onnx,
made there when missing). Each export runs in the runner (OnnxDecoder, in-place cache where the export has
one) under ONNX Runtime's profiler: a 128-token random prompt, then STEPS greedy decode steps at batch 1;
from the profile, per decode step, the session run time (`model_run`), the kernels' time summed by op type
and their node counts. Profiling adds time to every node, so absolute times are above onnx_bench's; the
split between what shrinks with pruning (the MatMuls) and what does not (the rest, and the framework time
between kernels) is the point.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("dense", "slim-50")
WEIGHTS = ("fp32", "int8")
PROMPT, STEPS, THREADS = 128, 32, 2
MATMULS = ("MatMul", "MatMulNBits")


def profile(directory: Path) -> dict:
    """Per decode step: model_run ms, kernel ms by op type, node counts."""
    import onnxruntime as ort

    from slimgpt_deploy.serving.onnx_runner import OnnxDecoder

    decoder = OnnxDecoder(directory, threads=THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        decoder.session = ort.InferenceSession(
            str(directory / decoder.spec.model_file), options, providers=["CPUExecutionProvider"]
        )
        prompt = np.random.default_rng(0).integers(100, 30000, PROMPT).tolist()
        decoder.generate_ids([prompt], max_new_tokens=4, eos_token_ids=())  # warm-up: allocations, pre-packing
        stamps: list[float] = []
        stamp = lambda row, token: stamps.append(time.perf_counter())  # noqa: E731
        decoder.generate_ids([prompt], max_new_tokens=1 + STEPS, eos_token_ids=(), on_token=stamp)
        events = json.loads(Path(decoder.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-STEPS:]
    start = runs[0]["ts"]
    kernel_us, nodes = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            kernel_us[e["args"].get("op_name", "?")] += e["dur"]
            nodes[e["args"].get("op_name", "?")] += 1
    return {
        "step_ms": round(1e3 * float(np.mean(np.diff(stamps))), 3),
        "model_run_ms": round(sum(r["dur"] for r in runs) / STEPS / 1e3, 3),
        "kernel_ms": {op: round(us / STEPS / 1e3, 4) for op, us in kernel_us.most_common()},
        "nodes": {op: n // STEPS for op, n in nodes.items()},
        "in_place_cache": decoder.in_place,
    }


def run() -> dict:
    import onnx_bench as ob

    from slimgpt_deploy.bench.environment import machine
    from slimgpt_deploy.checkpoint import weight_bytes_per_token

    rows, t0, load = [], time.perf_counter(), os.getloadavg()[0]
    for name in MODELS:
        checkpoint = ob.dense_dir() if name == "dense" else ob.ensure_pruned(int(name.split("-")[1]) / 100)
        fp32 = ob.ensure_export(checkpoint, name)
        exports = {"fp32": fp32, "int8": ob.ensure_quantized(fp32, name, "int8")}
        for weights in WEIGHTS:
            row = {"model": name, "weights": weights, "weight_bytes_per_token": weight_bytes_per_token(checkpoint)}
            rows.append(row | profile(exports[weights]))
            print(json.dumps(rows[-1]), flush=True)
    return {
        "machine": {**machine(), "threads": THREADS, "onnxruntime": __import__("onnxruntime").__version__},
        "date": time.strftime("%Y-%m-%d"),
        "load_average_start": load,
        "seconds": round(time.perf_counter() - t0, 1),
        "protocol": {"prompt": PROMPT, "steps": STEPS},
        "rows": rows,
    }


def split(row: dict) -> dict:
    """ms per step: matmuls, other kernels, framework time outside kernels."""
    matmul = sum(ms for op, ms in row["kernel_ms"].items() if op in MATMULS)
    other = sum(ms for op, ms in row["kernel_ms"].items() if op not in MATMULS)
    return {"matmul": matmul, "other": other, "framework": row["model_run_ms"] - matmul - other}


def markdown(r: dict) -> str:
    m = r["machine"]
    by = {(x["model"], x["weights"]): x for x in r["rows"]}
    lines = [
        "# Where a decode step goes in ONNX Runtime (SmolLM2-135M, dense vs 50% pruned)",
        "",
        f"{r['date']}, {m['cpu']}, {m['threads']} threads of {m['cores']} cores, onnxruntime {m['onnxruntime']}, "
        f"load average {r['load_average_start']:.2f} at the start; {r['seconds']:.0f} s. "
        "`.venv/bin/python benchmarks/onnx_profile.py`.",
        "",
        f"Protocol: the runner (in-place cache), batch 1, a {PROMPT}-token random prompt, then {STEPS} greedy decode "
        "steps under ONNX Runtime's profiler; per step, kernel time by op type and the session run time. The "
        "profiler adds time to every node: read the split, not the absolute times.",
        "",
        "| model | weights | step ms | session run ms | MatMul kernels ms | other kernels ms | between kernels ms "
        "| MatMul share | MatMul nodes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        s = split(x)
        n = sum(c for op, c in x["nodes"].items() if op in MATMULS)
        lines.append(
            f"| {x['model']} | {x['weights']} | {x['step_ms']:.2f} | {x['model_run_ms']:.2f} | {s['matmul']:.2f} | "
            f"{s['other']:.2f} | {s['framework']:.2f} | {s['matmul'] / x['model_run_ms']:.0%} | {n} |"
        )
    lines += ["", "Pruned / dense, per part (the weight-bytes ideal is the bytes ratio):", ""]
    lines += ["| weights | ideal | session run | MatMul kernels | other kernels | between kernels |"]
    lines += ["|---|---|---|---|---|---|"]
    for weights in WEIGHTS:
        d, p = by[("dense", weights)], by[("slim-50", weights)]
        sd, sp = split(d), split(p)
        ideal = d["weight_bytes_per_token"] / p["weight_bytes_per_token"]
        lines.append(
            f"| {weights} | {ideal:.2f}x | {d['model_run_ms'] / p['model_run_ms']:.2f}x | "
            f"{sd['matmul'] / sp['matmul']:.2f}x | {sd['other'] / sp['other']:.2f}x | "
            f"{sd['framework'] / sp['framework']:.2f}x |"
        )
    lines += ["", "Kernel time by op type (ms per step, nodes per step):", ""]
    total = collections.Counter()
    for x in r["rows"]:
        total.update(x["kernel_ms"])
    ops = [op for op, _ in total.most_common(9)]
    lines += ["| model | weights | " + " | ".join(ops) + " |", "|---|---|" + "---|" * len(ops)]
    for x in r["rows"]:
        cells = [f"{x['kernel_ms'].get(op, 0):.2f} ({x['nodes'].get(op, 0)})" for op in ops]
        lines.append(f"| {x['model']} | {x['weights']} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", *r.get("notes", [])]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args()
    path = RESULTS / "onnx_profile.json"
    if not args.markdown:
        path.write_text(json.dumps(run(), indent=2) + "\n")
    (RESULTS / "onnx_profile.md").write_text(markdown(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
