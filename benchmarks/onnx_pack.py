"""Packed projections in the ONNX export: q/k/v and gate/up as one MatMul each, against seven MatMuls a layer.

    .venv/bin/python benchmarks/onnx_pack.py                        # writes benchmarks/results/onnx_pack.{json,md}
    .venv/bin/python benchmarks/onnx_pack.py --shape smollm2-360m   # onnx_pack-smollm2-360m.{json,md}
    .venv/bin/python benchmarks/onnx_pack.py --markdown             # rewrite the .md from the .json

Why: benchmarks/onnx_profile.py fits each MatMul node's kernel time as a fixed part plus a part proportional to its
weight; the fixed part (8-14 us a node under the profiler, 211-225 nodes a step) does not shrink with pruning and
holds int8 decode under the weight-bytes ideal. Since 2026-12-08 the export writes q/k/v and gate/up as one
MatMul each, split after (`exporters/onnx_graph.Graph.packed_linear`): 4 weight MatMuls a layer instead of 7.

Protocol: each checkpoint (SmolLM2-135M dense and pruned as benchmarks/onnx_bench.py makes them, or with --shape
the random-weight checkpoints of benchmarks/shaped_models.py) is exported once with the shipped writer (packed,
verified against transformers); the separate form is the same graph with every packed MatMul + Split replaced by
one MatMul per output over the matching columns of the weight (`unpack`: the weights and every other node are the
same). Both forms are quantized to int8 by the shipped quantizer, and all of them are timed in one process in
interleaved rounds with benchmarks/onnx_interleaved.py's protocol (runner, in-place cache, batch 1, a 128-token
random prompt, 16 decode steps; the median over rounds of each round's mean step).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from functools import partial
from pathlib import Path

import numpy as np
import results_io

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "bench" / "onnx_pack"
MODELS = ("dense", "slim-20", "slim-50")
WEIGHTS = ("fp32", "int8")
FORMS = ("separate", "packed")
ROUNDS = 7


def unpack(src: Path, dst: Path) -> Path:
    """`src` (a packed export) with each `MatMul(x, W) -> Split` replaced by one MatMul per Split output over
    W's matching columns (bias Adds between them split alike): the graph before packing, the same weights."""
    import shutil

    import onnx
    from onnx import helper, numpy_helper

    if (dst / "model.onnx").is_file():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    model = onnx.load(src / "model.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    replaced, extra_inits, separate = set(), [], {}  # separate: id(packed MatMul) -> the nodes replacing it
    for node in model.graph.node:
        if node.op_type != "Split":
            continue
        sizes = numpy_helper.to_array(inits[node.input[1]]).tolist()
        chain = [producer[node.input[0]]]  # the MatMul, or MatMul -> Add (bias)
        if chain[0].op_type == "Add":
            chain.insert(0, producer[chain[0].input[0]])
        weight = numpy_helper.to_array(inits[chain[0].input[1]])
        bias = numpy_helper.to_array(inits[chain[1].input[1]]) if len(chain) == 2 else None
        edges = np.cumsum([0, *sizes])
        base = chain[0].name.removesuffix("/MatMul")
        nodes = separate.setdefault(id(chain[0]), [])
        for k, out in enumerate(node.output):
            name = f"{base}.part{k}"
            extra_inits.append(numpy_helper.from_array(np.ascontiguousarray(weight[:, edges[k] : edges[k + 1]]), name))
            y = out if bias is None else f"{name}/y"
            nodes.append(helper.make_node("MatMul", [chain[0].input[0], name], [y], name=f"{name}/MatMul"))
            if bias is not None:
                extra_inits.append(numpy_helper.from_array(bias[edges[k] : edges[k + 1]].copy(), f"{name}.bias"))
                nodes.append(helper.make_node("Add", [y, f"{name}.bias"], [out], name=f"{name}/Add"))
        replaced.update(id(n) for n in (*chain, node))
    new = []
    for node in model.graph.node:
        new += separate.get(id(node), [])  # the separate MatMuls where the packed one was
        if id(node) not in replaced:
            new.append(node)
    model.graph.initializer.extend(extra_inits)
    used = {name for node in new for name in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.node[:]
    model.graph.node.extend(new)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save(model, dst / "model.onnx", save_as_external_data=model.ByteSize() > 1.8e9, location="model.onnx.data")
    return dst


def exports(shape: str | None) -> list[tuple[str, Path, dict]]:
    """(name, checkpoint, {(weights, form): export dir}) for each model."""
    import subprocess

    from onnx_bench import CLI, checkpoint_of

    from slimgpt_deploy.exporters.onnx import quantize_dir

    out = []
    for name in MODELS:
        checkpoint = checkpoint_of(name, shape)
        label = name if shape is None else f"{shape}-{name}"
        packed = WORK / f"{label}-packed-fp32"
        if not (packed / "export.json").is_file():
            subprocess.run(CLI + ["export", str(checkpoint), "--format", "onnx", "--out", str(packed)], check=True)
        dirs = {("fp32", "packed"): packed, ("fp32", "separate"): unpack(packed, WORK / f"{label}-separate-fp32")}
        for form in FORMS:
            int8 = WORK / f"{label}-{form}-int8"
            if not (int8 / "export.json").is_file():
                quantize_dir(dirs[("fp32", form)], int8, method="int8", force=True)
            dirs[("int8", form)] = int8
        out.append((name, checkpoint, dirs))
    return out


def run(threads: int, shape: str | None, rounds: int = ROUNDS) -> dict:
    from onnx_interleaved import PROMPT, SHAPED, SMOLLM2, STEPS, decode_ms, ort_machine

    from slimgpt_deploy.bench.measure import random_prompt_ids
    from slimgpt_deploy.checkpoint import weight_bytes_per_token
    from slimgpt_deploy.serving.onnx_runner import OnnxDecoder

    logging.disable(logging.INFO)  # the quantizer logs every node
    timers, wbytes, nodes, vocab = {}, {}, {}, 0
    for name, checkpoint, dirs in exports(shape):
        wbytes[name] = weight_bytes_per_token(checkpoint)
        for (weights, form), directory in dirs.items():
            decoder = OnnxDecoder(directory, threads=threads)
            vocab = decoder.spec.vocab_size
            timers[(name, weights, form)] = partial(decode_ms, decoder)
            nodes[(name, weights, form)] = matmul_nodes(directory)
    keys, samples = list(timers), {k: [] for k in timers}
    prompts = random_prompt_ids(2 + rounds, PROMPT, vocab)
    load_start, t_start = os.getloadavg()[0], time.perf_counter()
    for r in range(2 + rounds):  # two warm-up rounds; each round a new prompt, the order rotated by one
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            ms = timers[k](prompts[r])[0]
            if r >= 2:
                samples[k].append(ms)
    rows = []
    for (name, weights, form), ms in samples.items():
        dense = statistics.median(samples[("dense", weights, form)])
        separate = statistics.median(samples[(name, weights, "separate")])
        med, ideal = statistics.median(ms), wbytes["dense"] / wbytes[name]
        rows.append(
            {
                "model": name,
                "weights": weights,
                "form": form,
                "matmul_nodes": nodes[(name, weights, form)],
                "decode_ms": round(med, 3),
                "rounds_ms": [round(m, 3) for m in ms],
                "vs_separate": round(separate / med, 4),
                "ideal": round(ideal, 4),
                "speedup": round(dense / med, 4),
                "of_ideal": round(dense / med / ideal, 4),
            }
        )
    return {
        "machine": ort_machine(threads, load_start),
        "date": time.strftime("%Y-%m-%d"),
        "model": SMOLLM2 if shape is None else f"{shape}: {SHAPED}",
        "command": "benchmarks/onnx_pack.py"
        + ("" if shape is None else f" --shape {shape}")
        + ("" if rounds == ROUNDS else f" --rounds {rounds}"),
        "seconds": round(time.perf_counter() - t_start, 1),
        "protocol": {"prompt": PROMPT, "steps": STEPS, "rounds": rounds, "warmup_rounds": 2},
        "rows": rows,
    }


def matmul_nodes(directory: Path) -> int:
    import onnx

    graph = onnx.load(directory / "model.onnx", load_external_data=False).graph
    return sum(n.op_type in ("MatMul", "MatMulNBits") for n in graph.node)


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Packed q/k/v and gate/up MatMuls in the ONNX export",
        "",
        f"{r['date']}, {m['cpu']}, {m['threads']} threads of {m['cores']} cores, onnxruntime {m['onnxruntime']}, "
        f"load average {m['load_average_start']:.2f} at the start and {m['load_average_end']:.2f} at the end; "
        f"{r['seconds']:.0f} s of timing. `.venv/bin/python {r['command']}`.",
        "",
        f"Model: {r['model']}.",
        "",
        "Protocol: the shipped export (packed) and the same graph unpacked into one MatMul per projection (separate), "
        "fp32 and int8 (MatMulNBits, block 32), timed in one process: batch 1, a "
        f"{r['protocol']['prompt']}-token random prompt, {r['protocol']['steps']} decode steps through the runner "
        f"(in-place cache), {r['protocol']['rounds']} interleaved rounds after 2 warm-up rounds; the median over "
        "rounds of each round's mean step. Ideal: dense weight bytes per token / pruned.",
        "",
        "| model | weights | form | MatMul nodes | ms/token | packed vs separate | pruned speed-up | ideal | "
        "of ideal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        lines.append(
            f"| {x['model']} | {x['weights']} | {x['form']} | {x['matmul_nodes']} | {x['decode_ms']:.2f} | "
            f"{x['vs_separate']:.3f}x | {x['speedup']:.2f}x | {x['ideal']:.2f}x | {x['of_ideal']:.2f} |"
        )
    return "\n".join(lines + ["", *r.get("notes", [])]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", help="a shape of benchmarks/scale.py (random weights) instead of SmolLM2-135M")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="timed rounds (after 2 warm-up rounds)")
    parser.add_argument("--markdown", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args()
    stem = "onnx_pack" if args.shape is None else f"onnx_pack-{args.shape}"
    result = results_io.load_or_run(stem, args.markdown, lambda: run(args.threads, args.shape, args.rounds))
    result["notes"] = NOTES.get(stem, result.get("notes", []))
    results_io.publish(stem, result, markdown)


NOTES: dict[str, list[str]] = {
    "onnx_pack": [
        "Reading it (2026-12-08, an Intel Xeon with AMX, the machine of every run this day):",
        "",
        "- **int8 decode is 1.05-1.12x faster packed** (dense 1.064x, 20% 1.050x, 50% 1.119x in this 15-round run; "
        "1.097 / 1.036 / 1.095x and 1.054 / 1.053 / 1.110x in two 7-round runs before it on the same exports, whose "
        "JSON this run overwrote: not committed): each "
        "MatMulNBits node carries a fixed cost (benchmarks/results/onnx_profile.md: ~10 us a node under the "
        "profiler, against ~5 us of weight time for a v_proj of SmolLM2), and packing removes 90 of 211 nodes.",
        "- **fp32 does not change** beyond the noise: 0.983 / 1.003 / 1.002x here, 0.996 / 0.965 / 1.030x and "
        "0.947 / 1.003 / 1.019x in the uncommitted 7-round runs (a 2-core machine shared with other tenants moves a "
        "cell by ~5% between runs). The fp32 MatMul's fixed cost is smaller and its weight time larger.",
        "- **The pruned speed-up of int8 moves closer to the ideal at 50%** (0.89 -> 0.93 of it here) because the "
        "pruned model's smaller matrices gain more from losing a node's fixed cost than the dense ones; at 20% the "
        "two forms are within noise (0.97 / 0.95). The 0.95-of-ideal target (issue 13) is met by fp32 and by int8 "
        "at 20% in this run, not by int8 at 50%: the rest of a step (attention, norms, rotary, the time between "
        "kernels) does not shrink with pruning either (onnx_profile.md).",
        "- The exports are the shipped writer's (packed, verified against transformers); the separate form is "
        "`unpack` of the same file, so the weights and every other node are identical. GenAI exports pack gate/up "
        "since the same change (q/k/v were packed there already); not timed here.",
        "- On the AMD EPYC of 2026-12-06 an ad hoc packing (5 rounds) gave dense int8 1.05x and 50% 0.98x "
        "(benchmarks/results/onnx_profile-amd-2026-12-06.md); this benchmark was not run there.",
    ],
    "onnx_pack-smollm2-360m": [
        "Reading it (2026-12-08, the Intel Xeon with AMX of onnx_pack.md, the same hour): on SmolLM2-360M's shape "
        "(random weights, dense and pruned to SlimGPT's per-layer plans) **int8 is 1.03-1.07x faster packed** "
        "(dense 1.057x, 20% 1.027x, 50% 1.071x) and **fp32 1.01-1.04x** (1.015 / 1.012 / 1.044x): a larger matrix "
        "dilutes a node's fixed cost, so the gain is smaller than on the 135M model, and no cell is slower. The "
        "pruned int8 speed-up stays under the ideal (0.90 at 20%, 0.88 at 50%): packing removes 96 of 225 nodes' "
        "fixed cost, not the rest of the step's.",
    ],
}


if __name__ == "__main__":
    main()
