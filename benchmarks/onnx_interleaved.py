"""Pruned vs dense decode in ONNX Runtime, measured in interleaved rounds: is the weight-bytes ideal reached?

    .venv/bin/python benchmarks/onnx_interleaved.py              # writes benchmarks/results/onnx_interleaved.{json,md}
    .venv/bin/python benchmarks/onnx_interleaved.py --markdown   # rewrite the .md from the .json
    .venv/bin/python benchmarks/onnx_interleaved.py --shape smollm2-360m   # a larger shape, random weights

`--shape NAME` (a shape of benchmarks/scale.py with SmolLM2's vocabulary) times random-weight checkpoints of
that shape instead, dense and pruned to SlimGPT's per-layer shapes (benchmarks/shaped_models.py): the same
question on a larger model (only the in-place cache is timed there: the sessions of both bindings would not fit).

benchmarks/onnx_bench.py measures each (model, runtime) once, one after another, in its own subprocess
(for its peak RSS); a 2-core machine shared with other tenants drifts by more than the effect over such a
run, so its pruned/dense ratios move by 10-20% between runs. Here every session stays open in one process
and each round times every (model, weights) once, in an order rotated by one each round, so a drift falls
on all of them alike; the figure is the median over rounds. Same exports as onnx_bench (build/bench/onnx,
made there), the bench's ONNX back end's decode timing (bench/onnx_backend.py): batch 1, a 128-token random prompt, one
generate_ids of 17 tokens through the runner's bound cache, first generated token to last / 16 (the mean step);
the median step is recorded beside it (the mean carries the occasional slow step, the median does not).
Ideal speed-up = dense weight bytes read per token / pruned (decoder + final norm + lm_head).
Since 2026-12-06 the fused export's attention is GroupQueryAttention and the runner writes its cache in place;
every export that allows it is also timed with the cache passed as a graph that concatenates needs it (a fresh
past/present pair per step, `OnnxDecoder(..., in_place=False)`), in the same rounds: the effect of the in-place
cache alone.
Runs before that timed the opset-23 Attention graph, whose cache is always concatenated.
Since 2026-12-08 the same rounds also time each checkpoint's `export --format genai` folder through ONNX Runtime
GenAI's own generator (cache `GenAI generator`; benchmarks/onnx_bench.py's protocol, made there when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RATIOS = (0.2, 0.3, 0.5)
WEIGHTS = ("fp32", "int8")
PROMPT, STEPS, ROUNDS = 128, 16, 7
TARGET = 0.95
IN_PLACE, CONCATENATED = "in place", "concatenated"
GENAI = "GenAI generator"  # `export --format genai` through ONNX Runtime GenAI's own generator (since 2026-12-08)
OLD_CACHE = "concatenated (opset-23 Attention graph)"  # rows of runs before 2026-12-06


SMOLLM2 = "SmolLM2-135M, pruned by SlimGPT on WikiText-2 valid (benchmarks/onnx_bench.py)"  # runs without "model"


def models(shape: str | None = None) -> list[tuple[str, Path, dict[str, Path], dict[str, Path]]]:
    """(name, checkpoint, {weights: ONNX export dir}, {weights: GenAI export dir}) for dense and each ratio, made
    by onnx_bench when missing; `shape`: random-weight checkpoints of that shape (shaped_models), not SmolLM2."""
    import onnx_bench as ob

    out = []
    for name in ["dense", *(f"slim-{int(r * 100)}" for r in RATIOS)]:
        checkpoint = ob.checkpoint_of(name, shape)
        label = name if shape is None else f"{shape}-{name}"
        fp32 = ob.ensure_export(checkpoint, label)
        onnx = {"fp32": fp32, "int8": ob.ensure_quantized(fp32, label, "int8")}
        out.append((name, Path(checkpoint), onnx, {w: ob.ensure_genai(checkpoint, label, w) for w in WEIGHTS}))
    return out


def decode_ms(decoder, prompt: list[int]) -> tuple[float, float]:
    """(mean, median) ms per decode step at batch 1 after `prompt`. The mean is the bench's ONNX back end's figure
    (slimgpt_deploy/bench/onnx_backend.py: one generate_ids of 1 + STEPS tokens, first token to last / STEPS);
    the median step leaves out the occasional slow step that the mean carries."""
    stamps: list[float] = []
    decoder.generate_ids(
        [prompt], max_new_tokens=1 + STEPS, eos_token_ids=(), on_token=lambda r, t: stamps.append(time.perf_counter())
    )
    return 1e3 * (stamps[-1] - stamps[0]) / STEPS, 1e3 * statistics.median(np.diff(stamps))


def genai_decode_ms(runtime, prompt: list[int]) -> tuple[float, float]:
    """`decode_ms` through ONNX Runtime GenAI's generator (as benchmarks/onnx_bench.py drives it): a new generator,
    the prompt appended, then 1 + STEPS greedy generate_next_token steps; first token to last / STEPS."""
    gen = runtime.generator(1, PROMPT + 1 + STEPS, do_sample=False, min_length=PROMPT + 1 + STEPS)
    gen.append_tokens(np.asarray([prompt], dtype=np.int32))
    stamps: list[float] = []
    for _ in range(1 + STEPS):
        gen.generate_next_token()
        stamps.append(time.perf_counter())
    return 1e3 * (stamps[-1] - stamps[0]) / STEPS, 1e3 * statistics.median(np.diff(stamps))


SHAPED = "random weights, dense and pruned to SlimGPT's per-layer shapes (benchmarks/shaped_models.py)"


def run(threads: int, shape: str | None = None) -> dict:
    from slimgpt_deploy.bench.measure import random_prompt_ids
    from slimgpt_deploy.checkpoint import weight_bytes_per_token
    from slimgpt_deploy.serving.genai_runner import GenAIModel
    from slimgpt_deploy.serving.onnx_runner import OnnxDecoder

    timers, wbytes, vocab = {}, {}, 0  # (model, weights, cache) -> prompt -> (mean, median) ms
    for name, checkpoint, exports, genai in models(shape):
        wbytes[name] = weight_bytes_per_token(checkpoint)
        for weights, directory in exports.items():
            decoder = OnnxDecoder(directory, threads=threads)
            vocab = decoder.spec.vocab_size
            timers[(name, weights, IN_PLACE if decoder.in_place else CONCATENATED)] = partial(decode_ms, decoder)
            if decoder.in_place and shape is None:  # the in-place question, answered on SmolLM2 (memory)
                concatenated = OnnxDecoder(directory, threads=threads, in_place=False)
                timers[(name, weights, CONCATENATED)] = partial(decode_ms, concatenated)
        for weights, directory in genai.items():
            timers[(name, weights, GENAI)] = partial(genai_decode_ms, GenAIModel(directory, threads=threads))
    keys, samples = list(timers), {k: [] for k in timers}
    prompts = random_prompt_ids(2 + ROUNDS, PROMPT, vocab)
    load_start, t_start = os.getloadavg()[0], time.perf_counter()
    for r in range(2 + ROUNDS):  # two warm-up rounds first (allocations, pre-packing); each round a new prompt
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            ms = timers[k](prompts[r])
            if r >= 2:
                samples[k].append(ms)
    rows = []
    for (name, weights, cache), ms in samples.items():
        ideal = wbytes["dense"] / wbytes[name]
        row = {"model": name, "weights": weights, "cache": cache, "ideal": round(ideal, 4)}
        for i, stat in enumerate(("mean", "median_step")):
            dense = statistics.median(m[i] for m in samples[("dense", weights, cache)])
            med = statistics.median(m[i] for m in ms)
            row[stat] = {
                "decode_ms": round(med, 3),
                "rounds_ms": [round(m[i], 3) for m in ms],
                "speedup": round(dense / med, 4),
                "of_ideal": round(dense / med / ideal, 4),
            }
        rows.append(row)
    return {
        "machine": ort_machine(threads, load_start),
        "date": time.strftime("%Y-%m-%d"),
        "model": SMOLLM2 if shape is None else f"{shape}: {SHAPED}",
        "command": "benchmarks/onnx_interleaved.py" + ("" if shape is None else f" --shape {shape}"),
        "seconds": round(time.perf_counter() - t_start, 1),
        "protocol": {"prompt": PROMPT, "steps": STEPS, "rounds": ROUNDS, "warmup_rounds": 2},
        "rows": rows,
    }


def ort_machine(threads: int, load_start: float) -> dict:
    """The machine record of a timing run in ONNX Runtime (load average at its start, and now at its end)."""
    from slimgpt_deploy.bench.environment import machine

    return {
        **machine(),
        "threads": threads,
        "onnxruntime": __import__("onnxruntime").__version__,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg()[0],
    }


def markdown(r: dict, number: int = 1) -> str:
    m = r["machine"]
    lines = [
        *(["# Pruned vs dense decode in ONNX Runtime, interleaved rounds", ""] if number == 1 else []),
        f"## Run {number}",
        "",
        f"{r['date']}, {m['cpu']}, {m['threads']} threads of {m['cores']} cores, onnxruntime {m['onnxruntime']}, "
        f"load average {m['load_average_start']:.2f} at the start and {m['load_average_end']:.2f} at the end; "
        f"{r['seconds']:.0f} s. `.venv/bin/python {r.get('command', 'benchmarks/onnx_interleaved.py')}`.",
        "",
        f"Model: {r.get('model', SMOLLM2)}.",
        "",
        f"Protocol: batch 1, a {PROMPT}-token random prompt (a new one each round), one generate_ids of "
        f"{1 + STEPS} tokens; per round the mean ms per step from the first generated token to the last (as the "
        f"bench's ONNX back end times it) and the median step; {ROUNDS} rounds (after 2 warm-up rounds), each timing "
        "every cell once in an order rotated by one per round; the figure is the median over rounds. Ideal: dense "
        "weight bytes per token / pruned."
        + (
            f" Cache `{GENAI}`: the `export --format genai` folder of the same checkpoint through ONNX Runtime "
            "GenAI's generator (a new generator per round, the prompt appended, then the same steps)."
            if any(row.get("cache") == GENAI for row in r["rows"])
            else ""
        ),
        "",
        "| model | weights | cache | ideal | mean: ms/token | speed-up | of ideal | median step: ms | speed-up | "
        "of ideal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        cells = [
            f"{x['decode_ms']:.2f} | {x['speedup']:.2f}x | {x['of_ideal']:.2f}"
            for x in (row["mean"], row["median_step"])
        ]
        cache = row.get("cache", OLD_CACHE)
        lines.append(f"| {row['model']} | {row['weights']} | {cache} | {row['ideal']:.2f}x | {cells[0]} | {cells[1]} |")
    by = {(x["model"], x["weights"], x.get("cache", OLD_CACHE)): x for x in r["rows"]}
    pairs = [(k, by[k[:2] + (CONCATENATED,)]) for k in by if k[2] == IN_PLACE and k[:2] + (CONCATENATED,) in by]
    if pairs:
        lines.append(
            "\nIn place / concatenated decode time (mean), same graph, same rounds: "
            + ", ".join(f"{k[0]} {k[1]} {by[k]['mean']['decode_ms'] / c['mean']['decode_ms']:.2f}" for k, c in pairs)
            + "."
        )
    for runtime, label in (("runner", "the runner's own cache binding"), (GENAI, "ONNX Runtime GenAI")):
        pruned = [
            row
            for row in r["rows"]
            if row["model"] != "dense"
            and (row.get("cache") == GENAI) == (runtime == GENAI)
            and row.get("cache", OLD_CACHE) != CONCATENATED
        ]
        if not pruned:
            continue
        for stat in ("mean", "median_step"):
            missed = [
                f"{x['model']} {x['weights']} ({x[stat]['of_ideal']:.2f})"
                for x in pruned
                if x[stat]["of_ideal"] < TARGET
            ]
            lines.append(
                f"\nTarget (issue 13), pruned speed-up >= {TARGET} x the ideal, by the {stat.replace('_', ' ')} "
                f"({label}): " + (f"missed by {', '.join(missed)}." if missed else "met in every cell.")
            )
    if r.get("note"):  # a reading added after the run (the JSON's "note")
        lines.append(f"\n{r['note']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--markdown", action="store_true", help="only rewrite the .md from the .json")
    parser.add_argument("--shape", help="a shape of benchmarks/scale.py, random weights (default: SmolLM2-135M)")
    args = parser.parse_args()
    path = RESULTS / "onnx_interleaved.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    if not args.markdown:
        runs.append(run(args.threads, args.shape))  # every run is kept: run-to-run spread is part of the answer
        path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    (RESULTS / "onnx_interleaved.md").write_text("\n".join(markdown(r, i + 1) for i, r in enumerate(runs)))


if __name__ == "__main__":
    main()
