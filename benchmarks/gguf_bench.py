"""llama.cpp on this CPU: dense vs SlimGPT-pruned SmolLM2-135M as GGUF, per file type.

    .venv/bin/python benchmarks/gguf_bench.py             # export what is missing, measure all
    .venv/bin/python benchmarks/gguf_bench.py --markdown  # rewrite gguf.md from gguf.json

Models: dense SmolLM2-135M (the embedded model, converted by transformers and saved as a
checkpoint) and the pruned checkpoint given with --pruned (default: the demo build's,
20%, pruned with the demo's settings into build/bench/gguf/slim-20 when missing). Each is
exported with `export --format gguf` per type, verified in llama.cpp against transformers
(the verification's figures are recorded), then timed in llama.cpp as users run it
(flash attention and KV-cache type at llama.cpp's defaults), one model at a time:

  decode   tokens/s at batch 1 after a 128-token prompt: 64 greedy steps, median of 3 runs
           after one warm-up run
  prefill  tokens/s of the 128-token prompt (same runs)

Ideal decode speed-up = dense file bytes / pruned file bytes (decode reads every weight once
per token). The pruned q4_k_m file's tensor types are counted: llama.cpp's k-quants need rows
that are a multiple of 256, so pruned FFN widths fall back to another type for ffn_down.
Results: benchmarks/results/gguf.json and gguf.md.
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
TYPES = ("f32", "q8_0", "q4_k_m")
PROMPT, DECODE, REPEATS = 128, 64, 3


def dense_checkpoint() -> Path:
    out = WORK / "dense"
    if not (out / "config.json").is_file():
        from slimgpt_deploy.sources import load_model

        loaded = load_model("smollm2-135m")
        loaded.model.save_pretrained(out)
        loaded.tokenizer.save_pretrained(out)
    return out


def pruned_checkpoint(path: Path | None) -> Path:
    if path is not None:
        return path
    if (DEMO_SLIM / "config.json").is_file():
        return DEMO_SLIM
    out = WORK / "slim-20"
    if not (out / "config.json").is_file():
        cmd = [sys.executable, "-m", "slimgpt_deploy.cli", "prune", "smollm2-135m", "--out", str(out)]
        subprocess.run([*cmd, "--nsamples", "32", "--seqlen", "256"], check=True)
    return out


def export(name: str, checkpoint: Path, ftype: str) -> dict:
    from slimgpt_deploy.exporters.gguf import export as export_gguf

    out = WORK / f"{name}-{ftype}"
    summary_file = out / "export.json"
    if not summary_file.is_file():
        export_gguf(checkpoint, out, quantize=ftype, force=True)
    return json.loads(summary_file.read_text()) | {"dir": str(out)}


def time_decode(path: Path, threads: int) -> dict:
    from slimgpt_deploy.serving.llamacpp_runner import LlamaCpp

    prompt = [(i * 7919) % 40000 + 100 for i in range(PROMPT)]  # fixed ids, no tokenizer in the timing
    runs = []
    with LlamaCpp(path, n_ctx=PROMPT + DECODE + 8, threads=threads, kv_type="f16") as llm:
        for r in range(REPEATS + 1):
            llm.reset()
            t0 = time.perf_counter()
            logits = llm.decode(prompt, 0)[0]
            t1 = time.perf_counter()
            for step in range(DECODE):
                logits = llm.decode([int(logits.argmax())], PROMPT + step)[0]
            t2 = time.perf_counter()
            if r:  # the first run warms caches and threads
                runs.append((PROMPT / (t1 - t0), DECODE / (t2 - t1)))
    return {
        "prefill_tok_s": round(statistics.median(p for p, _ in runs), 1),
        "decode_tok_s": round(statistics.median(d for _, d in runs), 1),
    }


def tensor_types(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(path).tensors))


def machine(threads: int) -> dict:
    from slimgpt_deploy.serving.llamacpp_runner import LLAMA_CPP_BUILD

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
        "python": platform.python_version(),
        "load_average_start": os.getloadavg()[0],
    }


def run(threads: int, pruned: Path | None) -> dict:
    models = {"dense": dense_checkpoint(), "pruned": pruned_checkpoint(pruned)}
    results = {"machine": machine(threads), "date": time.strftime("%Y-%m-%d"), "models": {}, "rows": []}
    results["models"] = {name: str(path) for name, path in models.items()}
    for ftype in TYPES:
        row = {"type": ftype}
        for name, checkpoint in models.items():
            summary = export(name, checkpoint, ftype)
            file = Path(summary["dir"]) / summary["file"]
            v = summary["verification"]
            row[name] = {
                "bytes": file.stat().st_size,
                "verified": v.get("passed"),
                "kl_mean": v.get("kl_mean"),
                "top1": v.get("top1_agreement"),
                "greedy_equal": v.get("greedy_tokens_equal"),
                **time_decode(file, threads),
            }
            if name == "pruned" and ftype == "q4_k_m":
                row["pruned_tensor_types"] = tensor_types(file)
            print(ftype, name, row[name], flush=True)
        d, p = row["dense"], row["pruned"]
        row["ideal_speedup"] = round(d["bytes"] / p["bytes"], 3)
        row["decode_speedup"] = round(p["decode_tok_s"] / d["decode_tok_s"], 3)
        row["of_ideal"] = round(row["decode_speedup"] / row["ideal_speedup"], 3)
        results["rows"].append(row)
    results["machine"]["load_average_end"] = os.getloadavg()[0]
    return results


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# GGUF in llama.cpp: dense vs pruned SmolLM2-135M",
        "",
        f"{results['date']}, llama.cpp {m['llama_cpp']} (llama-cpp-py-sync wheel), {m['cpu']}, "
        f"{m['threads']} threads of {m['cores']} cores, load average {m['load_average_start']:.2f} at the start "
        f"and {m['load_average_end']:.2f} at the end. `python benchmarks/gguf_bench.py`.",
        "",
        f"Pruned: `{results['models']['pruned']}`. Decode: batch 1 after a {PROMPT}-token prompt, "
        f"{DECODE} greedy steps, median of {REPEATS} runs; llama.cpp's default attention and f16 KV cache.",
        "",
        "| type | dense MB | pruned MB | dense decode tok/s | pruned decode tok/s | speed-up | ideal | of ideal "
        "| pruned prefill tok/s | pruned KL / top-1 vs transformers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        d, p = r["dense"], r["pruned"]
        lines.append(
            f"| {r['type']} | {d['bytes'] / 1e6:.1f} | {p['bytes'] / 1e6:.1f} | {d['decode_tok_s']} "
            f"| {p['decode_tok_s']} | {r['decode_speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {r['of_ideal']:.2f} "
            f"| {p['prefill_tok_s']} | {p['kl_mean']:.4g} / {p['top1']:.3f} |"
        )
    q4 = next((r for r in results["rows"] if r["type"] == "q4_k_m"), None)
    if q4:
        types = ", ".join(f"{k} {v}" for k, v in sorted(q4["pruned_tensor_types"].items()))
        lines += [
            "",
            f"Tensor types in the pruned q4_k_m file: {types}. Rows that are not a multiple of 256 (the pruned "
            "FFN widths, read by ffn_down) cannot take k-quants; llama.cpp falls back for them, so the file is "
            "larger than a 256-aligned one. `prune --ffn-multiple 256` keeps every width a multiple of 256.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pruned", type=Path, default=None)
    parser.add_argument("--markdown", action="store_true", help="only rewrite gguf.md from gguf.json")
    args = parser.parse_args()
    out = RESULTS / "gguf.json"
    if not args.markdown:
        out.write_text(json.dumps(run(args.threads, args.pruned), indent=2) + "\n")
    (RESULTS / "gguf.md").write_text(markdown(json.loads(out.read_text())))
    print((RESULTS / "gguf.md").read_text())


if __name__ == "__main__":
    main()
