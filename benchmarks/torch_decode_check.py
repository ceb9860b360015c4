"""PyTorch eager decode, dense vs pruned, timed in ONE process, alternating the two models.

    .venv/bin/python benchmarks/torch_decode_check.py [PRUNED_DIR]   # default: the demo's slimgpt-build/slim

`bench` times each model in its own process (clean memory figures). For a 2-thread eager loop on a
small model the process-to-process spread can exceed the difference between the models; this
check removes it: both models live in one process and are timed in turns (batch 1, a 128-token
prompt, then 32 cached greedy steps), ROUNDS times, with 2 threads and then 1.
Writes benchmarks/results/torch_decode_check.{json,md}.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from slimgpt_deploy.sources import load_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROMPT, STEPS, ROUNDS = 128, 32, 4


def ms_per_step(model, ids: torch.Tensor) -> float:
    cache = DynamicCache(config=model.config)
    token = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
    t0 = time.perf_counter()
    for _ in range(STEPS):
        token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    return 1000.0 * (time.perf_counter() - t0) / STEPS


def main() -> None:
    pruned = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "slimgpt-build" / "slim")
    models = {"dense": load_model("smollm2-135m").model, "pruned": load_model(pruned).model}
    ids = torch.randint(100, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(0))  # [1, S]
    runs = {}
    with torch.inference_mode():
        for threads in (2, 1):
            torch.set_num_threads(threads)
            for m in models.values():  # warm-up
                ms_per_step(m, ids)
            runs[threads] = {name: [] for name in models}
            for _ in range(ROUNDS):
                for name, m in models.items():
                    runs[threads][name].append(round(ms_per_step(m, ids), 2))
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "pruned": pruned,
        "prompt": PROMPT,
        "steps": STEPS,
        "ms_per_step": runs,
    }
    lines = [
        "# PyTorch eager decode, dense vs pruned in one process (alternating)",
        "",
        f"{result['platform']}, torch {result['torch']}, {result['date']}. Command: "
        "`.venv/bin/python benchmarks/torch_decode_check.py`. Pruned: the demo's 20% SmolLM2-135M.",
        f"Batch 1, {PROMPT}-token prompt, {STEPS} cached greedy steps; {ROUNDS} rounds after a warm-up.",
        "",
        "| threads | dense ms/step (each round) | pruned ms/step (each round) | median speed-up |",
        "|---|---|---|---|",
    ]
    for threads, r in runs.items():
        med = sorted(r["dense"])[ROUNDS // 2] / sorted(r["pruned"])[ROUNDS // 2]
        lines.append(
            f"| {threads} | {', '.join(map(str, r['dense']))} | {', '.join(map(str, r['pruned']))} | {med:.2f}x |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "torch_decode_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "torch_decode_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
