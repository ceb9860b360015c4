"""Where a decode step goes in ONNX Runtime: per-op-type kernel time, dense vs pruned, fp32 and int8.

    .venv/bin/python benchmarks/onnx_profile.py              # writes benchmarks/results/onnx_profile.{json,md}
    .venv/bin/python benchmarks/onnx_profile.py --markdown   # rewrite the .md from the .json
    .venv/bin/python benchmarks/onnx_profile.py --shape smollm2-360m   # onnx_profile-smollm2-360m.{json,md}

Why: pruned decode falls short of the weight-bytes ideal most for int8 at 50% (onnx_interleaved.md), and a
cost that does not shrink with the weights would explain it. Same exports as onnx_bench (build/bench/onnx,
made there when missing). Each export runs in the runner (OnnxDecoder, in-place cache where the export has
one) under ONNX Runtime's profiler: a 128-token random prompt, then STEPS greedy decode steps at batch 1;
from the profile, per decode step, the session run time (`model_run`), the kernels' time summed by op type
and their node counts. Profiling adds time to every node, so absolute times are above onnx_bench's; the
split between what shrinks with pruning (the MatMuls) and what does not (the rest, and the framework time
between kernels) is the point. Since 2026-12-08 each MatMul node's median kernel time is kept too and fitted
against its weight's parameter count (time = fixed + parameters / rate, the output head apart): how much of a
step is a per-node cost that pruning cannot shrink. `--shape NAME` profiles random-weight checkpoints of a
benchmarks/scale.py shape (benchmarks/shaped_models.py) instead of SmolLM2-135M.
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
from onnx_interleaved import SHAPED, SMOLLM2

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
    matmul_us = collections.defaultdict(list)  # per MatMul node: its kernel us in each step
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            op = e["args"].get("op_name", "?")
            kernel_us[op] += e["dur"]
            nodes[op] += 1
            if op in MATMULS:
                matmul_us[e["name"].removesuffix("_kernel_time")].append(e["dur"])
    return {
        "step_ms": round(1e3 * float(np.mean(np.diff(stamps))), 3),
        "model_run_ms": round(sum(r["dur"] for r in runs) / STEPS / 1e3, 3),
        "kernel_ms": {op: round(us / STEPS / 1e3, 4) for op, us in kernel_us.most_common()},
        "nodes": {op: n // STEPS for op, n in nodes.items()},
        "in_place_cache": decoder.in_place,
        # every MatMul node: [name, median us over the steps] (a thread's occasional stall is not the node's
        # cost), slowest first; run() adds the weight's parameter count
        "matmul_nodes": sorted(
            ([name, round(float(np.median(us)), 2)] for name, us in matmul_us.items()), key=lambda n: -n[1]
        ),
    }


def node_parameters(checkpoint: Path, nodes: list[list]) -> list[list]:
    """[name, us, parameters of its weight]: the node `X/MatMul...` multiplies by the checkpoint's `X.weight`
    (`lm_head` by the embedding where they are tied); a packed `...self_attn.qkv_proj` by q_proj, k_proj and v_proj
    stacked, `...mlp.gate_up` by gate_proj and up_proj (exports since 2026-12-08)."""
    from slimgpt_deploy.checkpoint import read_config, read_safetensors_header, safetensors_files

    numel = {}
    for file in safetensors_files(checkpoint):
        for name, info in read_safetensors_header(file).items():
            if name != "__metadata__":
                numel[name] = int(np.prod(info["shape"]))
    if read_config(checkpoint).get("tie_word_embeddings"):
        numel.setdefault("lm_head.weight", numel["model.embed_tokens.weight"])
    packed = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}

    def parameters(name: str) -> int:
        parent, _, last = name.split("/")[0].rpartition(".")
        parts = [f"{parent}.{part}" if parent else part for part in packed.get(last, (last,))]
        return sum(numel[f"{part}.weight"] for part in parts)

    return [[name, us, parameters(name)] for name, us in nodes]


def run(shape: str | None = None) -> dict:
    import onnx_bench as ob

    from slimgpt_deploy.bench.environment import machine
    from slimgpt_deploy.checkpoint import weight_bytes_per_token

    rows, t0, load = [], time.perf_counter(), os.getloadavg()[0]
    for name in MODELS:
        checkpoint = ob.checkpoint_of(name, shape)
        label = name if shape is None else f"{shape}-{name}"
        fp32 = ob.ensure_export(checkpoint, label)
        exports = {"fp32": fp32, "int8": ob.ensure_quantized(fp32, label, "int8")}
        for weights in WEIGHTS:
            row = {"model": name, "weights": weights, "weight_bytes_per_token": weight_bytes_per_token(checkpoint)}
            rows.append(row | profile(exports[weights]))
            rows[-1]["matmul_nodes"] = node_parameters(checkpoint, rows[-1]["matmul_nodes"])
            print(json.dumps(rows[-1]), flush=True)
    return {
        "machine": {**machine(), "threads": THREADS, "onnxruntime": __import__("onnxruntime").__version__},
        "date": time.strftime("%Y-%m-%d"),
        "load_average_start": load,
        "seconds": round(time.perf_counter() - t0, 1),
        "protocol": {"prompt": PROMPT, "steps": STEPS},
        "model": SMOLLM2 if shape is None else f"{shape}: {SHAPED}",
        "command": "benchmarks/onnx_profile.py" + ("" if shape is None else f" --shape {shape}"),
        "rows": rows,
    }


def split(row: dict) -> dict:
    """ms per step: matmuls, other kernels, framework time outside kernels."""
    matmul = sum(ms for op, ms in row["kernel_ms"].items() if op in MATMULS)
    other = sum(ms for op, ms in row["kernel_ms"].items() if op not in MATMULS)
    return {"matmul": matmul, "other": other, "framework": row["model_run_ms"] - matmul - other}


def matmul_fit(row: dict) -> dict:
    """Per decode step, from each MatMul node's kernel time and weight's parameter count: the decoder's MatMuls
    fitted as us = fixed + parameters / rate (least squares), and the output head (the largest weight) apart."""
    nodes = row["matmul_nodes"]
    head = max(nodes, key=lambda n: n[2])
    rest = [n for n in nodes if n is not head]
    x, y = np.array([n[2] for n in rest], dtype=float), np.array([n[1] for n in rest])
    (fixed, per_parameter), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], axis=1), y, rcond=None)
    residual = y - fixed - per_parameter * x
    return {
        "nodes": len(rest),
        "decoder_ms": float(y.sum()) / 1e3,
        "decoder_m": float(x.sum()) / 1e6,
        "fixed_us": float(fixed),
        "gp_s": 1e-3 / float(per_parameter),  # us per parameter -> G parameters / s
        "r2": 1.0 - float(residual @ residual) / float(((y - y.mean()) @ (y - y.mean()))),
        "fixed_ms": float(fixed) * len(rest) / 1e3,
        "head_ms": head[1] / 1e3,
        "head_m": head[2] / 1e6,
        "head_gp_s": head[2] / head[1] / 1e3,
    }


def markdown(r: dict) -> str:
    m = r["machine"]
    by = {(x["model"], x["weights"]): x for x in r["rows"]}
    lines = [
        "# Where a decode step goes in ONNX Runtime (dense vs 50% pruned)",
        "",
        f"Model: {r.get('model', SMOLLM2)}.",
        "",
        f"{r['date']}, {m['cpu']}, {m['threads']} threads of {m['cores']} cores, onnxruntime {m['onnxruntime']}, "
        f"load average {r['load_average_start']:.2f} at the start; {r['seconds']:.0f} s. "
        f"`.venv/bin/python {r.get('command', 'benchmarks/onnx_profile.py')}`.",
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
    if all("matmul_nodes" in x for x in r["rows"]):
        lines += [
            "",
            "Each MatMul node's kernel time against its weight's parameter count, per step: the decoder's MatMuls "
            "fitted as time = fixed + parameters / rate, the output head apart (rates in G parameters/s: x 4 for "
            "GB/s in fp32, x ~1.13 in int8 with its block scales):",
            "",
            "| model | weights | decoder MatMuls | their M params | their ms | fixed us / node | rate G/s | fit R^2 | "
            "fixed part ms | head M params | head ms | head G/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for x in r["rows"]:
            f = matmul_fit(x)
            lines.append(
                f"| {x['model']} | {x['weights']} | {f['nodes']} | {f['decoder_m']:.1f} | {f['decoder_ms']:.2f} | "
                f"{f['fixed_us']:.1f} | {f['gp_s']:.2f} | {f['r2']:.3f} | {f['fixed_ms']:.2f} | {f['head_m']:.1f} | "
                f"{f['head_ms']:.2f} | {f['head_gp_s']:.2f} |"
            )
    return "\n".join(lines + ["", *r.get("notes", [])]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="only rewrite the .md from the .json")
    parser.add_argument("--shape", help="a shape of benchmarks/scale.py (random weights) instead of SmolLM2-135M")
    args = parser.parse_args()
    stem = "onnx_profile" if args.shape is None else f"onnx_profile-{args.shape}"
    path = RESULTS / f"{stem}.json"
    if not args.markdown:
        path.write_text(json.dumps(run(args.shape), indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
