"""The distillation loss of one recovery step on this CPU: full teacher logits against the cached top-k.

    .venv/bin/python benchmarks/kl_loss.py     # writes benchmarks/results/kl_loss.{json,md}

`recover.kl_and_grad` on one step's logits at SmolLM2-135M's default recipe (4 x 256 tokens, vocabulary 49,152,
bf16 as under `--precision bf16`): the KL and its gradient from the teacher's full logits, and from its top-k
log-probs with the tail as one outcome (`--teacher-topk K`), for a few k. Median of 7 after 3 warm-ups, 2 threads.
The teacher's forward pass that the full logits need is not counted here (benchmarks/recovery.py times a whole run).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from onnx_bench import _timed  # a sibling script (benchmarks/ is on sys.path when run as a file)

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
TOKENS, VOCAB = 4 * 256, 49152
TOPKS = (32, 128, 512)
THREADS, WARMUP, REPEATS = 2, 3, 7


def run() -> dict:
    from slimgpt_deploy.bench.environment import machine
    from slimgpt_deploy.recover import kl_and_grad, teacher_topk

    torch.set_num_threads(THREADS)
    g = torch.Generator().manual_seed(0)
    student = torch.randn(TOKENS, VOCAB, generator=g).bfloat16()
    teacher = (2 * torch.randn(TOKENS, VOCAB, generator=g)).bfloat16()
    rows = [
        {
            "targets": "full logits",
            "ms": round(_timed(lambda: kl_and_grad(student, teacher, 1.0), REPEATS, WARMUP) * 1e3, 1),
        }
    ]
    for k in TOPKS:
        top = teacher_topk(teacher.float(), k, 1.0)
        ms = _timed(lambda top=top: kl_and_grad(student, top, 1.0), REPEATS, WARMUP) * 1e3
        rows.append({"targets": f"top-{k}, the tail as one outcome", "ms": round(ms, 1)})
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "torch": torch.__version__,
        "threads": THREADS,
        "shape": [TOKENS, VOCAB],
        "rows": rows,
    }


def markdown(r: dict) -> str:
    lines = [
        "# The distillation loss of one recovery step: full logits vs the teacher's top-k",
        "",
        f"{r['date']}, {r['machine']['cpu']}, {r['threads']} threads, torch {r['torch']}. "
        f"`recover.kl_and_grad` on bf16 logits {r['shape'][0]} x {r['shape'][1]} (one step of the default recipe), "
        "KL and gradient; median of 7 after 3 warm-ups. `.venv/bin/python benchmarks/kl_loss.py`.",
        "",
        "| teacher targets | ms |",
        "|---|---|",
    ]
    lines += [f"| {row['targets']} | {row['ms']} |" for row in r["rows"]]
    lines += [
        "",
        "The full-logits row leaves out the teacher's forward pass that makes those logits at every step; "
        "the top-k rows need none (cached once, or kept by the sampler for `self` data).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    result = run()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kl_loss.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "kl_loss.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
