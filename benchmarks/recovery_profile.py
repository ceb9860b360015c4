"""Where a recovery's time goes on the CPU: torch profiler breakdown of one training step and of sampling.

    .venv/bin/python benchmarks/recovery_profile.py   # writes benchmarks/results/recovery_profile.*

The two phases of the default recovery (recover.RecoverConfig) on SmolLM2-135M at 20%, under bf16 autocast:

- `train`: one optimizer step of the LoRA student (r 8 on every projection) on RecoverConfig's batch (4 x 128
  tokens) with the teacher's top-k targets (recover.TEACHER_TOPK), as recover's loop runs it (forward,
  recover.distill_loss, backward, AdamW);
- `sample`: the bfloat16 teacher sampling recover.SELF_BATCH (128) sequences token by token with calibration's
  sampler (`_sample_batch` with the top-k kept, grouped_attention.py), 64 steps after a 1-token prompt.

Each operator's own CPU time is put in one bucket: matmuls (mm/bmm/addmm), the attention kernels, casts and
copies, the vocabulary-wide top-k / softmax / log-softmax, and the rest (element-wise ops, norms, bookkeeping).
The matmuls' rate (GFLOP/s, from the profiler's FLOP count) says how close a phase is to the machine: what is
left outside the matmuls is what a faster implementation could still take. The starting checkpoint is the one
benchmarks/recovery.py makes (build/recovery/slim-self-20-64x512), made here if it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import results_io
import torch

THREADS = 2
SAMPLE_STEPS = 64  # decode steps profiled per sampling run
# operator -> bucket, by name (the first match wins); everything else is "other"
BUCKETS = (
    ("matmul", ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")),
    ("attention kernel", ("scaled_dot_product", "flash_attention")),
    ("casts and copies", ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat", "aten::index_copy")),
    ("vocabulary top-k / softmax", ("aten::topk", "aten::_softmax", "aten::_log_softmax", "aten::sort")),
)


def _bucket(name: str) -> str:
    return next((b for b, keys in BUCKETS if any(k in name for k in keys)), "other")


def _breakdown(prof, per: int) -> dict:
    """{bucket: seconds per step} (``per`` steps profiled), the matmuls' GFLOP/s, the ten costliest operators."""
    seconds, flops, mm_seconds, ops = {}, 0, 0.0, []
    for e in prof.key_averages():
        s = e.self_cpu_time_total / 1e6
        if s <= 0:
            continue
        b = _bucket(e.key)
        seconds[b] = seconds.get(b, 0.0) + s / per
        ops.append((s / per, e.key, e.count // per))
        if b == "matmul":
            flops += e.flops or 0
            mm_seconds += s
    total = sum(seconds.values())
    return {
        "seconds": {b: round(v, 4) for b, v in sorted(seconds.items(), key=lambda kv: -kv[1])},
        "total_seconds": round(total, 4),
        "matmul_gflops": round(flops / mm_seconds / 1e9, 1) if mm_seconds and flops else None,
        "top_ops": [{"op": k, "seconds": round(s, 4), "calls": c} for s, k, c in sorted(ops, reverse=True)[:10]],
    }


def _profiled(fn, repeats: int, steps: int = 1) -> dict:
    """Profile ``repeats`` calls of ``fn`` (``steps`` steps each) after one warm-up call: per-step figures."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up (allocations, oneDNN primitives)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(repeats):
            fn()
    wall = (time.perf_counter() - start) / (repeats * steps)
    return {"wall_s": round(wall, 4), **_breakdown(prof, repeats * steps)}


def profile_train(student_dir: Path, teacher, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    from slimgpt_deploy.recover import TEACHER_TOPK, RecoverConfig, _trainable, distill_loss, teacher_topk

    config = RecoverConfig(precision="bf16")
    student = AutoModelForCausalLM.from_pretrained(student_dir, trust_remote_code=True, dtype=torch.float32)
    model, params = _trainable(student, config)
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.learning_rate)
    batch, seqlen = config.batch_size, config.seqlen
    ids = torch.randint(0, student.config.vocab_size, (batch, seqlen), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), config.autocast():
        target = teacher_topk(teacher(input_ids=ids, use_cache=False).logits, TEACHER_TOPK, 1.0)
    model.train()

    def step():
        with config.autocast():
            logits = model(input_ids=ids, use_cache=False).logits
        loss, _ = distill_loss(logits, target, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return {"phase": "train", "shape": f"{batch} x {seqlen} tokens, one optimizer step", **_profiled(step, repeats)}


def profile_sample(teacher, tokenizer, repeats: int) -> dict:
    from self_sampling import sampler_inputs

    from slimgpt_deploy.calibration import SELF_SAMPLING, _sample_batch
    from slimgpt_deploy.grouped_attention import grouped_attention
    from slimgpt_deploy.recover import SELF_BATCH, TEACHER_TOPK

    batch, vocab = SELF_BATCH["cpu"], teacher.config.vocab_size
    gens, prefix, banned = sampler_inputs(tokenizer, vocab, batch)

    def run():
        _sample_batch(teacher, prefix, SAMPLE_STEPS + 1, vocab, gens, SELF_SAMPLING, banned, topk=TEACHER_TOPK)

    with grouped_attention(teacher), torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        result = _profiled(run, repeats, SAMPLE_STEPS)
    return {"phase": "sample", "shape": f"{batch} sequences, one decode step", **result}


def run(repeats: int) -> dict:
    from recovery import slim_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import slimgpt_deploy  # noqa: F401  (registers the slim model)
    from slimgpt_deploy.bench.environment import machine
    from slimgpt_deploy.sources import embedded_model_dir

    torch.set_num_threads(THREADS)
    directory = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    teacher = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval().to(torch.bfloat16)
    rows = [profile_train(slim_checkpoint(), teacher, repeats), profile_sample(teacher, tokenizer, repeats)]
    for row in rows:
        print(json.dumps(row), flush=True)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "torch": torch.__version__,
        "threads": THREADS,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "repeats": repeats,
        "rows": rows,
    }


def markdown(r: dict) -> str:
    buckets = [b for b, _ in BUCKETS] + ["other"]
    lines = [
        "# Where a recovery's time goes on the CPU (SmolLM2-135M at 20%, bf16 autocast)",
        "",
        f"{r['date']}, {r['machine']['cpu']}, {r['threads']} threads, torch {r['torch']}, OMP_WAIT_POLICY "
        f"{r['omp_wait_policy'] or 'unset'}. `.venv/bin/python benchmarks/recovery_profile.py`: torch profiler, "
        f"operators' own CPU time per step (mean of {r['repeats']} runs after a warm-up), in buckets; `wall` includes "
        "the profiler's overhead (it runs under it). The sampler's grouped attention is bmm, so it counts as matmul.",
        "",
        "| phase | step | wall s | " + " | ".join(buckets) + " | matmul GFLOP/s |",
        "|---|---|---|" + "---|" * len(buckets) + "---|",
    ]
    for row in r["rows"]:
        total = row["total_seconds"]
        cells = [f"{row['seconds'].get(b, 0.0):.3f} ({100 * row['seconds'].get(b, 0.0) / total:.0f}%)" for b in buckets]
        head = f"| {row['phase']} | {row['shape']} | {row['wall_s']} | "
        lines.append(head + " | ".join(cells) + f" | {row['matmul_gflops']} |")
    for row in r["rows"]:
        lines += ["", f"Costliest operators, `{row['phase']}` (s per step, calls per step):", ""]
        lines += [f"- `{o['op']}`: {o['seconds']} s, {o['calls']} calls" for o in row["top_ops"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the committed .json")
    args = parser.parse_args()
    result = results_io.load_or_run("recovery_profile", args.markdown_only, lambda: run(args.repeats))
    results_io.publish("recovery_profile", result, markdown)


if __name__ == "__main__":
    main()
