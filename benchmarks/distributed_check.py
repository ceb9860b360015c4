"""`prune --nproc 2` (gloo, CPU) against one process on SmolLM2-135M: same plans, kept units, weights.

    .venv/bin/python benchmarks/distributed_check.py

Runs `slimgpt-deploy prune smollm2-135m --ratio 0.2 --nsamples 8 --seqlen 128 --device cpu` once in one
process and once with `--nproc 2`, then compares the two checkpoints: per-layer plans, kept query/KV
heads, kept FFN channels (the kept rows of q/k/v/gate/up are copies of the dense rows, so equal rows
mean equal kept units) and the OBS-compensated o_proj/down_proj weights. Wall times are recorded
but on a shared 2-core CPU they say nothing about GPU scaling.
Writes benchmarks/results/distributed_check.{json,md}.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ARGS = ["--ratio", "0.2", "--nsamples", "8", "--seqlen", "128", "--device", "cpu"]
PLAN_KEYS = ("num_attention_heads_per_layer", "num_key_value_heads_per_layer", "intermediate_size_per_layer")


def prune(out: Path, *extra: str, threads: int | None = None) -> float:
    cmd = [
        str(Path(sys.executable).parent / "slimgpt-deploy"),
        "prune",
        "smollm2-135m",
        "--out",
        str(out),
        *ARGS,
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def weights(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare(a: Path, b: Path) -> dict:
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    ra, rb = (json.loads((d / "slimgpt.json").read_text()) for d in (a, b))
    wa, wb = weights(a), weights(b)
    copied = [k for k in wa if not k.endswith(("o_proj.weight", "down_proj.weight"))]
    compensated = [k for k in wa if k.endswith(("o_proj.weight", "down_proj.weight"))]
    return {
        "same_plans": all(ca[k] == cb[k] for k in PLAN_KEYS),
        "same_kept_heads": all(
            (x["kept_q_heads"], x["kept_kv_heads"]) == (y["kept_q_heads"], y["kept_kv_heads"])
            for x, y in zip(ra["layers"], rb["layers"], strict=True)
        ),
        "same_kept_rows_bitwise": all(torch.equal(wa[k], wb[k]) for k in copied),
        "same_shapes": all(wa[k].shape == wb[k].shape for k in wa),
        "max_abs_diff_compensated": max(float((wa[k] - wb[k]).abs().max()) for k in compensated),
        "max_rel_fro_diff_compensated": max(float((wa[k] - wb[k]).norm() / wa[k].norm()) for k in compensated),
        "max_abs_weight": max(float(wa[k].abs().max()) for k in compensated),
        "max_rel_diff_mlp_error": max(
            abs(x["mlp_error"] - y["mlp_error"]) / max(abs(x["mlp_error"]), 1e-30)
            for x, y in zip(ra["layers"], rb["layers"], strict=True)
        ),
    }


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="slimgpt-dist-") as tmp:
        one, one_t1, two = Path(tmp) / "one", Path(tmp) / "one-1thread", Path(tmp) / "nproc2"
        t_two = prune(two, "--nproc", "2")  # each rank: cores // 2 = 1 torch thread
        t_one_t1 = prune(one_t1, threads=1)
        t_one = prune(one)
        result = {
            "command": "slimgpt-deploy prune smollm2-135m " + " ".join(ARGS) + " [--nproc 2]",
            "comparison": compare(one, two),
            "comparison_1thread": compare(one_t1, two),
            "comparison_threads_1_vs_2_one_process": compare(one, one_t1),
            "wall_seconds": {
                "one_process": round(t_one, 1),
                "one_process_1thread": round(t_one_t1, 1),
                "nproc_2": round(t_two, 1),
            },
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs (timings are noise)",
            "torch": torch.__version__,
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distributed_check.json").write_text(json.dumps(result, indent=2) + "\n")
    write_md(result)


def write_md(result: dict) -> None:
    pairs = [
        ("comparison_1thread", "`--nproc 2` vs one process, 1 thread (the ranks' thread count)"),
        ("comparison", "`--nproc 2` vs one process, 2 threads"),
        ("comparison_threads_1_vs_2_one_process", "one process: 2 threads vs 1 thread (no distribution)"),
    ]
    rows = [
        ("same per-layer plans (heads, KV heads, FFN width)", lambda c: str(c["same_plans"])),
        ("same kept query/KV heads, every layer", lambda c: str(c["same_kept_heads"])),
        (
            "kept rows of q/k/v/gate/up bit-identical (same kept FFN channels)",
            lambda c: str(c["same_kept_rows_bitwise"]),
        ),
        (
            "o_proj/down_proj: max abs difference",
            lambda c: f"{c['max_abs_diff_compensated']:.3g} (largest weight {c['max_abs_weight']:.3g})",
        ),
        ("o_proj/down_proj: max relative (Frobenius) difference", lambda c: f"{c['max_rel_fro_diff_compensated']:.3g}"),
        ("per-layer MLP OBS error: max relative difference", lambda c: f"{c['max_rel_diff_mlp_error']:.3g}"),
    ]
    md = [
        "# `prune --nproc 2` vs one process (SmolLM2-135M, gloo on the CPU)",
        "",
        f"`{result['command']}`; {result['machine']}; torch {result['torch']}.",
        "",
        "| check | " + " | ".join(title for _, title in pairs) + " |",
        "|---|" + "---|" * len(pairs),
    ]
    md += [f"| {name} | " + " | ".join(f(result[key]) for key, _ in pairs) + " |" for name, f in rows]
    w = result["wall_seconds"]
    md += [
        "",
        f"Wall time: `--nproc 2` {w['nproc_2']} s, one process {w['one_process']} s (2 threads) and "
        f"{w['one_process_1thread']} s (1 thread); a shared 2-core CPU, so this says nothing about GPU scaling.",
        "",
        "Reading: with the same per-process thread count the distributed prune keeps exactly the same heads and "
        "FFN channels and its compensated weights differ by float rounding only (the Hessians are summed in "
        "another order; the differences compound over 30 layers). Against the 2-thread single process some FFN "
        "channels differ, by exactly as much as the single process differs from itself at 1 vs 2 "
        "threads: near-ties in the Dynamic Group Size scores flip with the BLAS reduction order, and once one "
        "channel differs the compensation and the later layers differ. Exact equality of kept channels across "
        "thread counts or hardware is not something the engine guarantees, distributed or not.",
    ]
    (RESULTS / "distributed_check.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
