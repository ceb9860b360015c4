"""bfloat16 against float32 matmuls on this CPU, at SmolLM2-135M's shapes (what `recover --precision` trades).

    .venv/bin/python benchmarks/bf16_matmul.py     # writes benchmarks/results/bf16_matmul.{json,md}

Each shape: 3 warm-up products, then the median of 7 timed ones, on 2 threads; and one nn.Linear forward +
backward of a recovery batch (4 x 256 tokens) with and without bfloat16 autocast. Says whether the CPU has AMX
tiles or AVX512-BF16 (torch's probes). A whole recovery is more than its matmuls: benchmarks/recovery.py times that.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from onnx_bench import _timed  # a sibling script (benchmarks/ is on sys.path when run as a file)

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
SHAPES = ((1024, 576, 1536), (1024, 1536, 576), (1024, 576, 49152))  # [tokens, in] x [in, out]: up, down, lm_head
THREADS, WARMUP, REPEATS = 2, 3, 7


def _median_s(fn) -> float:
    return _timed(fn, REPEATS, WARMUP)  # onnx_bench's: median of `REPEATS` after `WARMUP`


def run() -> dict:
    from slimgpt_deploy.bench.environment import machine

    torch.set_num_threads(THREADS)
    rows = []
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        fp32 = _median_s(lambda: a @ b)
        a16, b16 = a.bfloat16(), b.bfloat16()
        bf16 = _median_s(lambda: a16 @ b16)
        rows.append({"shape": [m, k, n], "fp32_ms": round(fp32 * 1e3, 2), "bf16_ms": round(bf16 * 1e3, 2)})
    linear, x = torch.nn.Linear(576, 1536), torch.randn(4, 256, 576, requires_grad=True)

    def step(bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = linear(x).float().sum()
        y.backward()

    probes = {
        name: bool(getattr(torch.cpu, name, lambda: False)())
        for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    }
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "torch": torch.__version__,
        "threads": THREADS,
        "probes": probes,
        "matmuls": rows,
        "linear_fwd_bwd_ms": {
            "fp32": round(_median_s(lambda: step(False)) * 1e3, 2),
            "bf16": round(_median_s(lambda: step(True)) * 1e3, 2),
        },
    }


def markdown(r: dict) -> str:
    lines = [
        "# bfloat16 vs float32 matmuls on the CPU, SmolLM2-135M's shapes",
        "",
        f"{r['date']}, {r['machine']['cpu']}, {r['threads']} threads, torch {r['torch']}; torch's probes: "
        + ", ".join(f"{k} {v}" for k, v in r["probes"].items())
        + ". `.venv/bin/python benchmarks/bf16_matmul.py` (median of 7 after 3 warm-ups).",
        "",
        "| [tokens, in] x [in, out] | fp32 ms | bf16 ms | bf16 speed-up |",
        "|---|---|---|---|",
    ]
    for row in r["matmuls"]:
        lines.append(
            f"| {row['shape']} | {row['fp32_ms']} | {row['bf16_ms']} | {row['fp32_ms'] / row['bf16_ms']:.2f}x |"
        )
    lin = r["linear_fwd_bwd_ms"]
    lines += [
        "",
        f"nn.Linear(576, 1536) forward + backward on 4 x 256 tokens: fp32 {lin['fp32']} ms, "
        f"bf16 autocast {lin['bf16']} ms ({lin['fp32'] / lin['bf16']:.2f}x).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    result = run()
    (RESULTS / "bf16_matmul.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "bf16_matmul.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
