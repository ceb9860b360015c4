"""llama.cpp on this CPU: dense vs SlimGPT-pruned SmolLM2-135M as GGUF, per file type.

    .venv/bin/python benchmarks/gguf_bench.py             # export what is missing, measure all
    .venv/bin/python benchmarks/gguf_bench.py --markdown  # rewrite gguf.md from gguf.json
    .venv/bin/python benchmarks/gguf_bench.py --shape smollm2-360m --types f32,q8_0  # -> gguf-smollm2-360m.*

Models: dense SmolLM2-135M (the embedded model, converted by transformers and saved as a
checkpoint) and the pruned checkpoints given with --pruned NAME=DIR (default: `pruned`, the
demo build's 20% checkpoint, pruned with the demo's settings into build/bench/gguf/slim-20 when
missing, and `pruned-ffn32`, the same prune with `--ffn-multiple 32` when it is there). Each is
exported with `export --format gguf` per type, verified in llama.cpp against transformers
(the verification's figures are recorded), then timed in llama.cpp as users run it
(flash attention and KV-cache type at llama.cpp's defaults), one model at a time:

  decode   tokens/s at batch 1 after a 128-token prompt: 64 greedy steps, median of 7 runs
           after one warm-up run; the models of one type are timed in interleaved rounds
  prefill  tokens/s of the 128-token prompt (same runs)

Beside them, in the same interleaved rounds as the q8_0 files: ONNX Runtime int8 (our
`export --format onnx --quantize int8`, weight-only MatMulNBits) of the same checkpoints, timed
through our runner on the same prompt ids (`--no-onnx` leaves it out).

Ideal decode speed-up = dense file bytes / pruned file bytes (decode reads every weight once
per token). The pruned files' tensor types are counted: llama.cpp quantizes rows in blocks (32
values for q8_0 and q5_0, 256 for the k-quants) and leaves a row length its block does not divide
in a wider type. The exporter pads each FFN width of a quantized file with zero channels to a
multiple of 32; `NAME-unpadded` rows are the same checkpoints exported without the padding, timed
in the same rounds.
`--shape NAME` (a shape of benchmarks/scale.py with SmolLM2's vocabulary) times random-weight checkpoints of
that shape instead, dense and pruned to SlimGPT's per-layer shapes at 20% (benchmarks/shaped_models.py), in
build/bench/gguf/NAME: the same question on a model whose weights outweigh the per-op cost of a step more.
Results: benchmarks/results/gguf.json and gguf.md (gguf-NAME.json and .md with --shape).
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
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "build" / "bench" / "gguf"
DEMO_SLIM = ROOT / "build" / "bench" / "build-time" / "slim"
TYPES = ("f32", "f16", "q8_0", "q4_k_m")
QUANTIZED = ("q8_0", "q4_k_m")  # made by llama.cpp's quantizer, FFN widths padded to its 32-wide blocks
PROMPT, DECODE, REPEATS = 128, 64, 7


SMOLLM2 = "SmolLM2-135M"  # the model of runs without "model"


def dense_checkpoint() -> Path:
    out = WORK / "dense"
    if not (out / "config.json").is_file():
        from slimgpt_deploy.sources import load_model

        loaded = load_model("smollm2-135m")
        loaded.model.save_pretrained(out)
        loaded.tokenizer.save_pretrained(out)
    return out


def pruned_checkpoints(given: list[str]) -> dict[str, Path]:
    if given:
        return {name: Path(path) for name, _, path in (g.partition("=") for g in given)}
    demo = DEMO_SLIM if (DEMO_SLIM / "config.json").is_file() else WORK / "slim-20"
    if not (demo / "config.json").is_file():
        cmd = [sys.executable, "-m", "slimgpt_deploy.cli", "prune", "smollm2-135m", "--out", str(demo)]
        subprocess.run([*cmd, "--nsamples", "32", "--seqlen", "256"], check=True)
    models = {"pruned": demo}
    if (WORK / "slim-20-ffn32" / "config.json").is_file():
        models["pruned-ffn32"] = WORK / "slim-20-ffn32"
    return models


def shaped_checkpoints(shape: str) -> dict[str, Path]:
    """Dense and 20%-pruned random-weight checkpoints of `shape` (benchmarks/shaped_models.py)."""
    import shaped_models

    return {"dense": shaped_models.dense(shape), "pruned": shaped_models.pruned(shape, 0.2)}


def export(name: str, checkpoint: Path, ftype: str, ffn_padding: bool = True, work: Path = WORK) -> dict:
    from slimgpt_deploy.exporters.gguf import export as export_gguf

    out = work / f"{name}-{ftype}"
    summary_file = out / "export.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    # files written before quantized exports padded the FFN widths (no `ffn_in_file`) are remade
    if summary is None or "ffn_in_file" not in summary["layers"][0]:
        summary = export_gguf(checkpoint, out, quantize=ftype, force=True, ffn_padding=ffn_padding)
    return summary | {"dir": str(out)}


def time_models(
    paths: dict[str, Path], threads: int, onnx: dict[str, Path] | None = None, repeats: int = REPEATS
) -> dict[str, dict]:
    """Prefill and decode tokens/s of each model, timed in interleaved rounds (one run of each per round).

    Interleaving spreads the shared machine's drift over every model alike; the first round warms up.
    `onnx` adds ONNX Runtime exports ({name: dir}) to the same rounds.
    """
    from slimgpt_deploy.serving.llamacpp_runner import LlamaCpp

    prompt = [(i * 7919) % 40000 + 100 for i in range(PROMPT)]  # fixed ids, no tokenizer in the timing
    n_ctx = PROMPT + DECODE + 8
    models = {name: LlamaCpp(path, n_ctx=n_ctx, threads=threads, kv_type="f16") for name, path in paths.items()}
    timers = {name: OnnxTimer(path, threads) for name, path in (onnx or {}).items()}

    def llama_run(llm) -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        logits = llm.decode(prompt, 0)[0]
        t1 = time.perf_counter()
        for step in range(DECODE):
            logits = llm.decode([int(logits.argmax())], PROMPT + step)[0]
        return PROMPT / (t1 - t0), DECODE / (time.perf_counter() - t1)

    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in (*models, *timers)}
    try:
        for r in range(repeats + 1):
            for name in runs:
                sample = llama_run(models[name]) if name in models else timers[name].run(prompt)
                if r:
                    runs[name].append(sample)
    finally:
        for llm in models.values():
            llm.close()
    return {
        name: {
            "prefill_tok_s": round(statistics.median(p for p, _ in rs), 1),
            "decode_tok_s": round(statistics.median(d for _, d in rs), 1),
        }
        for name, rs in runs.items()
    }


def onnx_int8(name: str, checkpoint: Path, work: Path = WORK) -> dict:
    from slimgpt_deploy.exporters.onnx import dir_model_bytes
    from slimgpt_deploy.exporters.onnx import export as export_onnx

    out = work / f"{name}-onnx-int8"
    if not (out / "export.json").is_file():
        export_onnx(checkpoint, out, dtype="fp32", quantize="int8", force=True)
    v = json.loads((out / "export.json").read_text()).get("verification", {})
    return {"dir": out, "bytes": dir_model_bytes(out), "verified": v.get("passed")}


class OnnxTimer:
    """An ONNX export in our runner with the llama.cpp timer's interface (reset / decode of fixed ids)."""

    def __init__(self, directory: Path, threads: int):
        from slimgpt_deploy.serving.onnx_runner import OnnxDecoder

        self.decoder = OnnxDecoder(directory, threads=threads)

    def run(self, prompt: list[int]) -> tuple[float, float]:
        stamps: list[float] = []
        t0 = time.perf_counter()
        self.decoder.generate_ids(
            [prompt],
            max_new_tokens=1 + DECODE,
            eos_token_ids=(),
            on_token=lambda row, t: stamps.append(time.perf_counter()),
        )
        return PROMPT / (stamps[0] - t0), DECODE / (stamps[-1] - stamps[0])


def settings_drift(checkpoint: Path, path: Path) -> list[dict]:
    """Max |log-prob difference| to transformers (float32) over a text, per llama.cpp attention / KV-cache setting."""
    import numpy as np
    import torch

    from slimgpt_deploy.reference import load_reference
    from slimgpt_deploy.serving.llamacpp_runner import LlamaCpp, log_softmax

    model, tokenizer = load_reference(checkpoint, torch.float32)
    ids = tokenizer(
        "The capital of France is Paris. def fibonacci(n): return n if n < 2 else fibonacci(n - 1)"
    ).input_ids
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1).numpy()
    rows = []
    for flash in (None, False):
        for kv in ("f16", "f32"):
            with LlamaCpp(path, n_ctx=256, threads=2, kv_type=kv, flash_attn=flash) as llm:
                diff = float(np.abs(log_softmax(llm.logits(ids)) - ref).max())
            rows.append({"flash_attn": "auto" if flash is None else "off", "kv": kv, "max_logprob_diff": diff})
    return rows


WAIT_CHILD = """
import sys, time
from slimgpt_deploy.serving.llamacpp_runner import LlamaCpp
llm = LlamaCpp(sys.argv[1], n_ctx=256, threads=2, kv_type="f16")
prompt = [(i * 7919) % 40000 + 100 for i in range(128)]
rates = []
for r in range(4):
    llm.reset(); logits = llm.decode(prompt, 0)[0]; t0 = time.perf_counter()
    for s in range(64):
        logits = llm.decode([int(logits.argmax())], 128 + s)[0]
    rates.append(64 / (time.perf_counter() - t0))
print(sorted(rates[1:])[1])
"""


def wait_policy(path: Path) -> dict:
    """Decode tokens/s of one file in a child with OMP_WAIT_POLICY unset and set to PASSIVE (read at process start)."""
    out = {}
    for policy in (None, "PASSIVE"):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | (
            {"OMP_WAIT_POLICY": policy} if policy else {}
        )
        run = subprocess.run(
            [sys.executable, "-c", WAIT_CHILD, str(path)], env=env, capture_output=True, text=True, check=True
        )
        out[policy or "unset"] = round(float(run.stdout.split()[-1]), 1)
    return out


def tensor_types(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(path).tensors))


SIMD_FLAGS = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"}


def _cpu_flags() -> set[str]:
    try:
        return set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def machine(threads: int) -> dict:
    from slimgpt_deploy.serving.llamacpp_runner import LLAMA_CPP_BUILD, cpu_features

    cpu = platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "llama_cpp": LLAMA_CPP_BUILD,
        # the instruction sets the wheel's kernels use (it has no runtime dispatch by CPU; ONNX Runtime does)
        "llama_cpp_cpu_features": cpu_features(),
        "cpu_flags": sorted(_cpu_flags() & SIMD_FLAGS),
        # PASSIVE (what make test sets) makes llama.cpp's OpenMP threads sleep at every op's barrier: 3.6x slower.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "python": platform.python_version(),
        "load_average_start": os.getloadavg()[0],
    }


def run(
    threads: int,
    pruned: list[str],
    with_onnx: bool = True,
    repeats: int = REPEATS,
    shape: str | None = None,
    types: tuple[str, ...] = TYPES,
) -> dict:
    models = {"dense": dense_checkpoint(), **pruned_checkpoints(pruned)} if shape is None else shaped_checkpoints(shape)
    work = WORK if shape is None else WORK / shape
    results = {"machine": machine(threads), "date": time.strftime("%Y-%m-%d"), "repeats": repeats, "rows": []}
    results["models"] = {name: str(path) for name, path in models.items()}
    results["model"] = SMOLLM2 if shape is None else f"{shape} (random weights; benchmarks/shaped_models.py)"
    options = [f"--repeats {repeats}"] + ([f"--shape {shape}"] if shape else [])
    options += [f"--types {','.join(types)}"] if types != TYPES else []
    results["command"] = " ".join(["benchmarks/gguf_bench.py", *options])
    for ftype in types:
        measured, files = {}, {}
        variants = [(name, checkpoint, True) for name, checkpoint in models.items()]
        if ftype in QUANTIZED:  # the same checkpoints without the FFN padding, in the same rounds
            variants += [(f"{name}-unpadded", path, False) for name, path in models.items() if name != "dense"]
        for name, checkpoint, padding in variants:
            summary = export(name, checkpoint, ftype, ffn_padding=padding, work=work)
            files[name] = file = Path(summary["dir"]) / summary["file"]
            v = summary["verification"]
            measured[name] = {
                "bytes": file.stat().st_size,
                "verified": v.get("passed"),
                "kl_mean": v.get("kl_mean"),
                "max_logprob_diff": v.get("max_logprob_diff"),
                "top1": v.get("top1_agreement"),
                "greedy_equal": v.get("greedy_tokens_equal"),
                "tensor_types": tensor_types(file),
            }
        onnx = {}
        if ftype == "q8_0" and with_onnx:
            for name, checkpoint in models.items():
                results.setdefault("onnx_int8", {})[name] = info = onnx_int8(name, checkpoint, work)
                onnx[f"onnx-int8:{name}"] = info["dir"]
        for name, timing in time_models(files, threads, onnx, repeats).items():
            if name.startswith("onnx-int8:"):
                model = name.split(":", 1)[1]
                results["onnx_int8"][model] |= timing
                results["onnx_int8"][model]["dir"] = str(results["onnx_int8"][model]["dir"])
                print("onnx int8", model, results["onnx_int8"][model], flush=True)
                continue
            measured[name] |= timing
            print(ftype, name, measured[name], flush=True)
        dense = measured.pop("dense")
        for name, m in measured.items():
            ideal = dense["bytes"] / m["bytes"]
            speedup = m["decode_tok_s"] / dense["decode_tok_s"]
            results["rows"].append(
                {
                    "type": ftype,
                    "model": name,
                    "dense": dense,
                    "pruned": m,
                    "ideal_speedup": round(ideal, 3),
                    "decode_speedup": round(speedup, 3),
                    "of_ideal": round(speedup / ideal, 3),
                }
            )
    if shape is None and types == TYPES:  # SmolLM2's fidelity and the wait policy: once, on the real model
        results["settings_drift"] = settings_drift(models["pruned"], WORK / "pruned-f32" / "model-f32.gguf")
        results["wait_policy_q8_0_decode_tok_s"] = wait_policy(WORK / "pruned-q8_0" / "model-q8_0.gguf")
    results["machine"]["load_average_end"] = os.getloadavg()[0]
    return results


FIT_TYPES = ("f32", "f16", "q8_0")  # plain block types: dequantizing costs little beside reading the bytes


def decode_floor(results: dict) -> dict | None:
    """Dense decode seconds per token = fixed + bytes / bandwidth, fitted over FIT_TYPES; each row against it."""
    dense = {r["type"]: r["dense"] for r in results["rows"] if r["type"] in FIT_TYPES}
    if len(dense) < 2:
        return None
    xs = [d["bytes"] for d in dense.values()]
    ys = [1 / d["decode_tok_s"] for d in dense.values()]
    slope, fixed = statistics.linear_regression(xs, ys)
    if fixed <= 0 or slope <= 0:
        return None
    rows = []
    for r in results["rows"]:
        if r["type"] not in FIT_TYPES:
            continue
        d, p = r["dense"], r["pruned"]
        ideal_fixed = (fixed + slope * d["bytes"]) / (fixed + slope * p["bytes"])
        speedup = p["decode_tok_s"] / d["decode_tok_s"]
        rows.append(
            {
                "type": r["type"],
                "model": r["model"],
                "dense_ms": 1e3 / d["decode_tok_s"],
                "pruned_ms": 1e3 / p["decode_tok_s"],
                "ideal": r["ideal_speedup"],
                "ideal_fixed": ideal_fixed,
                "speedup": speedup,
                "of_ideal_fixed": speedup / ideal_fixed,
            }
        )
    return {"fixed_ms": fixed * 1e3, "gb_s": 1e-9 / slope, "rows": rows}


def markdown(results: dict) -> str:
    m = results["machine"]
    command = results.get("command", f"benchmarks/gguf_bench.py --repeats {results.get('repeats', REPEATS)}")
    pruned = ", ".join(f"`{k}` = `{v}`" for k, v in results["models"].items() if k != "dense")
    lines = [
        f"# GGUF in llama.cpp: dense vs pruned {results.get('model', SMOLLM2)}",
        "",
        f"{results['date']}, llama.cpp {m['llama_cpp']} (llama-cpp-py-sync wheel), {m['cpu']}, "
        f"{m['threads']} threads of {m['cores']} cores, load average {m['load_average_start']:.2f} at the start "
        f"and {m['load_average_end']:.2f} at the end, OMP_WAIT_POLICY {m.get('omp_wait_policy') or 'unset'}. "
        f"`python {command}`.",
        "",
        *(
            [
                f"llama.cpp's kernels (its system info): `{m['llama_cpp_cpu_features']}`; the CPU's SIMD flags: "
                f"{', '.join(m.get('cpu_flags', [])) or 'not recorded'}.",
                "",
            ]
            if m.get("llama_cpp_cpu_features")
            else []
        ),
        f"Pruned (20%): {pruned}. Decode: batch 1 after a {PROMPT}-token prompt, {DECODE} greedy steps, "
        f"median of {results.get('repeats', REPEATS)} runs in interleaved rounds; "
        "llama.cpp's default attention and f16 KV cache. "
        "Dense is measured once per type; every ratio is against it.",
        "",
        "| type | pruned model | dense MB | pruned MB | dense tok/s | pruned tok/s | speed-up | ideal | of ideal "
        "| pruned KL / top-1 / max top-5 log-prob diff vs transformers | greedy prompts equal | pruned tensor types |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        d, p = r["dense"], r["pruned"]
        types = ", ".join(f"{k} {v}" for k, v in sorted(p["tensor_types"].items()))
        lines.append(
            f"| {r['type']} | {r['model']} | {d['bytes'] / 1e6:.1f} | {p['bytes'] / 1e6:.1f} | {d['decode_tok_s']} "
            f"| {p['decode_tok_s']} | {r['decode_speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {r['of_ideal']:.2f} "
            f"| {p['kl_mean']:.4g} / {p['top1']:.3f} / {p['max_logprob_diff']:.3g} | {p['greedy_equal']}/4 | {types} |"
        )
    if results.get("onnx_int8"):
        q8 = {r["model"]: r for r in results["rows"] if r["type"] == "q8_0"}
        lines += [
            "",
            "Same rounds as the q8_0 files: llama.cpp q8_0 against ONNX Runtime int8 (weight-only MatMulNBits, "
            "our runner) of the same checkpoints.",
            "",
            "| model | ORT int8 MB | ORT int8 decode tok/s | llama.cpp q8_0 MB | llama.cpp q8_0 decode tok/s "
            "| llama.cpp / ORT |",
            "|---|---|---|---|---|---|",
        ]
        for name, o in results["onnx_int8"].items():
            g = q8[name]["pruned"] if name in q8 else next(iter(q8.values()))["dense"]
            lines.append(
                f"| {name} | {o['bytes'] / 1e6:.1f} | {o['decode_tok_s']} | {g['bytes'] / 1e6:.1f} "
                f"| {g['decode_tok_s']} | {g['decode_tok_s'] / o['decode_tok_s']:.2f}x |"
            )
    fit = decode_floor(results)
    if fit:
        lines += [
            "",
            "Decode time per token of the dense files against their size (f32, f16, q8_0: one line by least "
            f"squares): **{fit['fixed_ms']:.2f} ms fixed** + bytes / {fit['gb_s']:.0f} GB/s. The fixed part (every "
            "op's dispatch and thread barrier, norms, RoPE, attention over the cache, the logits' copy and argmax) "
            "is the same for a pruned file, so the speed-up the file sizes allow is "
            "(fixed + dense bytes / bandwidth) / (fixed + pruned bytes / bandwidth):",
            "",
            "| type | pruned model | dense ms/token | pruned ms/token | bytes-only ideal | ideal with the fixed part "
            "| measured | of that ideal |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in fit["rows"]:
            lines.append(
                f"| {r['type']} | {r['model']} | {r['dense_ms']:.2f} | {r['pruned_ms']:.2f} | {r['ideal']:.2f}x "
                f"| {r['ideal_fixed']:.2f}x | {r['speedup']:.2f}x | {r['of_ideal_fixed']:.2f} |"
            )
    if results.get("settings_drift"):
        lines += [
            "",
            "llama.cpp settings on the pruned f32 file, against transformers (float32) on one 30-token text:",
            "",
            "| flash attention | KV cache | max log-prob difference |",
            "|---|---|---|",
            *[f"| {r['flash_attn']} | {r['kv']} | {r['max_logprob_diff']:.3g} |" for r in results["settings_drift"]],
        ]
    if results.get("wait_policy_q8_0_decode_tok_s"):
        w = results["wait_policy_q8_0_decode_tok_s"]
        lines += [
            "",
            f"Pruned q8_0 decode in a child process: {w['unset']} tok/s with OMP_WAIT_POLICY unset, "
            f"{w['PASSIVE']} tok/s with PASSIVE (what make test sets).",
        ]
    lines += ["", READING if results.get("model", SMOLLM2) == SMOLLM2 else results.get("reading", "")]
    return "\n".join(lines) + "\n"


READING = (
    "Reading: llama.cpp's q8_0 and q5_0 blocks are 32 values wide and its k-quants 256; a tensor whose rows "
    "(its input width) the block does not divide keeps a wider type. SmolLM2's hidden size, 576, is not a "
    "multiple of 256, so even the dense q4_k_m file falls back (to q5_0) for most tensors. Pruned FFN widths "
    "are arbitrary: unpadded (`pruned-unpadded`), `ffn_down` stays in f16 in the q8_0 and q4_k_m files, so the "
    "pruned q8_0 file is barely smaller than dense and its q4_k_m file larger. The exporter therefore pads each "
    "FFN width of a quantized file with zero channels to a multiple of 32 (exact: the verification passes with "
    "the same bounds), and `ffn_down` quantizes like every other tensor. For k-quants on models whose hidden "
    "size 256 divides, prune with `--ffn-multiple 256` so that `ffn_down` gets a k-quant too. At 135M "
    "parameters, more than half of a q8_0 decode step is the fixed part, so the smaller the file, the further "
    "the bytes-only ideal is out of reach; against the ideal that keeps the fixed part, every padded pruned file "
    "reaches it. On random weights with SmolLM2-360M's shape (gguf-smollm2-360m.md, 2026-12-08) q8_0 reaches 0.93 "
    "of the bytes-only ideal too, so the fixed part is not the whole reason."
)


def main() -> None:
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        sys.exit("error: OMP_WAIT_POLICY=PASSIVE slows llama.cpp's decode about 3.6x; run without it")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pruned", action="append", default=[], help="NAME=DIR, repeatable")
    parser.add_argument("--markdown", action="store_true", help="only rewrite gguf.md from gguf.json")
    parser.add_argument("--no-onnx", action="store_true", help="leave out the ONNX Runtime int8 comparison")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed rounds (after one warm-up round)")
    parser.add_argument("--shape", help="a shape of benchmarks/scale.py, random weights (default: SmolLM2-135M)")
    parser.add_argument("--types", default=",".join(TYPES), help=f"file types to time (default: {','.join(TYPES)})")
    args = parser.parse_args()
    stem = "gguf" if args.shape is None else f"gguf-{args.shape}"
    out, md = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    if not args.markdown:
        types = tuple(args.types.split(","))
        results = run(args.threads, args.pruned, not args.no_onnx, args.repeats, args.shape, types)
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    md.write_text(markdown(json.loads(out.read_text())))
    print(md.read_text())


if __name__ == "__main__":
    main()
