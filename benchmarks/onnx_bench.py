"""ONNX Runtime (our runner and ONNX Runtime GenAI) vs PyTorch eager on this CPU: dense vs SlimGPT-pruned SmolLM2-135M.

    .venv/bin/python benchmarks/onnx_bench.py             # prune/export what is missing, measure all
    .venv/bin/python benchmarks/onnx_bench.py --markdown  # rewrite onnx.md from onnx.json

Models: dense SmolLM2-135M and SlimGPT pruned at 20/30/50% (log schedule, WikiText-2
valid calibration 32 x 256; pruned into build/bench/slim-R when missing), each exported
to ONNX fp32 (verified), then int8 (weight-only MatMulNBits) quantized from that export.
The dense and 20% exports are also quantized with dynamic int8 (weights + activations)
to compare the two int8 variants on drift (KL, top-1 to the fp32 export over WikiText-2
test windows) and speed. Each model is also exported as an ONNX Runtime GenAI folder (fp32 and
int8, verified in GenAI) and measured through GenAI's own generator with the same protocol.

Per (model, runtime), in its own subprocess (so peak RSS is its own), threads = cores:
  prefill   latency of one forward over 128 and 512 tokens, batch 1 (median of 3 after a warm-up)
  decode    ms per token at batch 1 and 8 after a 128-token prompt (median of 16 steps after 2 warm-ups)
  rss       peak resident memory of the subprocess (MiB); since 2026-12-05 the ONNX Runtime and GenAI
            subprocesses import neither torch nor transformers (child_process.python_command), which
            took ~0.5 GiB of every earlier figure
Ideal decode speed-up = dense weight bytes read per token / pruned ones (decoder + final norm +
lm_head; decode is memory-bound). Results: benchmarks/results/onnx.json and onnx.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from slimgpt_deploy.child_process import python_command

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "build" / "bench"
CLI = [sys.executable, "-m", "slimgpt_deploy.cli"]
RATIOS = (0.2, 0.3, 0.5)
PREFILL = (128, 512)
DECODE_BATCHES = (1, 8)
DECODE_CONTEXT = 128
DECODE_STEPS = 16
DRIFT_WINDOWS, DRIFT_SEQLEN = 4, 256


# --- measurement, in a subprocess --------------------------------------------------------------


def _timed(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _prompt_ids(length: int, batch: int, vocab: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.integers(100, min(vocab, 30000), size=(batch, length), dtype=np.int64)  # [B, S]


def measure_ort(model_dir: str, threads: int) -> dict:
    import numpy as np

    from slimgpt_deploy.serving.onnx_runner import OnnxDecoder

    decoder = OnnxDecoder(Path(model_dir), providers=["CPUExecutionProvider"], threads=threads)
    V = decoder.spec.vocab_size
    row = {}
    for n in PREFILL:
        ids = _prompt_ids(n, 1, V)
        mask = np.ones_like(ids)
        pos = np.arange(n)[None]
        past = decoder.empty_past(1)
        row[f"prefill_{n}_ms"] = 1e3 * _timed(lambda: decoder.forward(ids, mask, pos, past), repeats=3)
    for b in DECODE_BATCHES:
        ids = _prompt_ids(DECODE_CONTEXT, b, V)
        mask = np.ones_like(ids)
        cache = decoder.bound_cache(b, DECODE_CONTEXT + DECODE_STEPS + 2)  # as generate_ids: in place when it can
        cache.step(ids, mask, np.broadcast_to(np.arange(DECODE_CONTEXT), ids.shape).copy())
        times = []
        for step in range(DECODE_STEPS + 2):
            total = DECODE_CONTEXT + step + 1
            tok = ids[:, :1]
            t = time.perf_counter()
            cache.step(tok, np.ones((b, total), np.int64), np.full((b, 1), total - 1, np.int64))
            times.append(time.perf_counter() - t)
        row[f"decode_b{b}_ms"] = 1e3 * statistics.median(times[2:])
    return row


def measure_genai(model_dir: str, threads: int) -> dict:
    """The same protocol through ONNX Runtime GenAI's own generator (its fused GroupQueryAttention graph)."""
    import numpy as np

    from slimgpt_deploy.serving.genai_runner import GenAIModel

    runtime = GenAIModel(Path(model_dir), threads=threads)
    V = runtime.info.vocab_size
    row = {}
    for n in PREFILL:
        ids = _prompt_ids(n, 1, V).astype(np.int32)

        def prefill():
            gen = runtime.generator(1, n + 1, do_sample=False)
            gen.append_tokens(ids)
            gen.get_logits()

        row[f"prefill_{n}_ms"] = 1e3 * _timed(prefill, repeats=3)
    for b in DECODE_BATCHES:
        total = DECODE_CONTEXT + DECODE_STEPS + 2
        gen = runtime.generator(b, total, do_sample=False, min_length=total)
        gen.append_tokens(_prompt_ids(DECODE_CONTEXT, b, V).astype(np.int32))
        times = []
        for _ in range(DECODE_STEPS + 2):
            t = time.perf_counter()
            gen.generate_next_token()
            times.append(time.perf_counter() - t)
        row[f"decode_b{b}_ms"] = 1e3 * statistics.median(times[2:])
    return row


def measure_torch(model_dir: str, threads: int) -> dict:
    import torch
    from transformers import DynamicCache

    from slimgpt_deploy.sources import load_model

    torch.set_num_threads(threads)
    model = load_model(model_dir, dtype=torch.float32).model
    V = model.config.vocab_size
    row = {}
    with torch.inference_mode():
        for n in PREFILL:
            ids = torch.from_numpy(_prompt_ids(n, 1, V))
            row[f"prefill_{n}_ms"] = 1e3 * _timed(lambda: model(input_ids=ids, use_cache=False), repeats=3)
        for b in DECODE_BATCHES:
            ids = torch.from_numpy(_prompt_ids(DECODE_CONTEXT, b, V))
            cache = DynamicCache(config=model.config)
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            times = []
            for _ in range(DECODE_STEPS + 2):
                t = time.perf_counter()
                model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
                times.append(time.perf_counter() - t)
            row[f"decode_b{b}_ms"] = 1e3 * statistics.median(times[2:])
    return row


def measure_drift(model_dir: str, reference_dir: str, threads: int) -> dict:
    """KL(P_fp32 || P_model) and top-1 agreement over WikiText-2 test windows, both in ONNX Runtime."""
    import numpy as np

    from slimgpt_deploy.evaluate import load_text, text_to_ids
    from slimgpt_deploy.exporters.onnx import _kl_top1
    from slimgpt_deploy.serving.onnx_runner import OnnxDecoder, load_tokenizer

    ref = OnnxDecoder(Path(reference_dir), providers=["CPUExecutionProvider"], threads=threads)
    got = OnnxDecoder(Path(model_dir), providers=["CPUExecutionProvider"], threads=threads)
    ids = text_to_ids(load_tokenizer(Path(reference_dir)), load_text(DATA / "test.txt")).numpy()
    kls, top1s = [], []
    for w in range(DRIFT_WINDOWS):
        window = ids[None, w * DRIFT_SEQLEN : (w + 1) * DRIFT_SEQLEN]  # [1, S]
        mask, pos = np.ones_like(window), np.arange(DRIFT_SEQLEN)[None]
        a, _ = ref.forward(window, mask, pos, ref.empty_past(1))
        b, _ = got.forward(window, mask, pos, got.empty_past(1))
        kl, top1 = _kl_top1(a[0], b[0])
        kls.append(kl)
        top1s.append(top1)
    return {"kl": float(np.mean(kls)), "top1": float(np.mean(top1s)), "positions": DRIFT_WINDOWS * DRIFT_SEQLEN}


MEASURES = {"ort": measure_ort, "torch": measure_torch, "genai": measure_genai}


def peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM (ru_maxrss would carry the forking parent's over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: list[str]) -> None:
    kind, payload = args[0], json.loads(args[1])
    if kind == "drift":
        row = measure_drift(payload["model"], payload["reference"], payload["threads"])
    else:
        row = MEASURES[kind](payload["model"], payload["threads"])
    row["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(row), flush=True)


def in_subprocess(kind: str, **payload) -> dict:
    proc = subprocess.run(
        python_command(__file__, "_child", kind, json.dumps(payload)),  # the package without its __init__
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} {payload} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# --- preparing the models ------------------------------------------------------------------------


def dense_dir() -> Path:
    from slimgpt_deploy.sources import embedded_model_dir

    return embedded_model_dir("smollm2-135m")


def ensure_pruned(ratio: float) -> Path:
    out = WORK / f"slim-{ratio}"
    if not (out / "config.json").is_file():
        subprocess.run(
            CLI
            + [
                "prune",
                "smollm2-135m",
                "--ratio",
                str(ratio),
                "--calib",
                str(DATA / "valid.txt"),
                "--nsamples",
                "32",
                "--seqlen",
                "256",
                "--out",
                str(out),
            ],
            check=True,
        )
    return out


def checkpoint_of(name: str, shape: str | None = None) -> Path:
    """ "dense" or "slim-NN" (NN% pruned): SmolLM2-135M's (dense_dir, ensure_pruned), or with `shape` the
    random-weight checkpoints of that benchmarks/scale.py shape (benchmarks/shaped_models.py)."""
    ratio = None if name == "dense" else int(name.split("-")[1]) / 100
    if shape is None:
        return dense_dir() if ratio is None else ensure_pruned(ratio)
    import shaped_models

    return shaped_models.dense(shape) if ratio is None else shaped_models.pruned(shape, ratio)


def ensure_export(checkpoint: Path, name: str, fuse: bool = True) -> Path:
    """The fp32 ONNX export (verified); `fuse=False`: the graph without ONNX Runtime's norm fusions."""
    out = WORK / "onnx" / (f"{name}-fp32" if fuse else f"{name}-fp32-nofuse")
    if not (out / "export.json").is_file():
        extra = [] if fuse else ["--no-fuse"]
        subprocess.run(CLI + ["export", str(checkpoint), "--format", "onnx", "--out", str(out), *extra], check=True)
    return out


def ensure_quantized(fp32: Path, name: str, method: str) -> Path:
    from slimgpt_deploy.exporters.onnx import quantize_dir

    out = WORK / "onnx" / f"{name}-{method}"
    if not (out / "export.json").is_file():
        quantize_dir(fp32, out, method=method, force=True)
    return out


def ensure_genai(checkpoint: Path, name: str, weights: str) -> Path:
    """An ONNX Runtime GenAI folder (verified in GenAI against transformers when made)."""
    out = WORK / "genai" / f"{name}-{weights}"
    if not (out / "export.json").is_file():
        extra = ["--quantize", "int8"] if weights == "int8" else []
        subprocess.run(CLI + ["export", str(checkpoint), "--format", "genai", "--out", str(out), *extra], check=True)
    return out


def machine(threads: int) -> dict:
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_genai": __import__("onnxruntime_genai").__version__,
        "platform": platform.platform(),
        "load_average_start": os.getloadavg()[0],
    }


def run(threads: int, ratios: tuple[float, ...]) -> dict:
    from slimgpt_deploy.checkpoint import weight_bytes_per_token

    results = {
        "machine": machine(threads),
        "date": time.strftime("%Y-%m-%d"),
        "rows": [],
        "drift": [],
        "protocol": {
            "prefill": PREFILL,
            "decode_batches": DECODE_BATCHES,
            "decode_context": DECODE_CONTEXT,
            "decode_steps": DECODE_STEPS,
            "drift": f"{DRIFT_WINDOWS} x {DRIFT_SEQLEN} WikiText-2 test tokens",
        },
    }
    models = [("dense", dense_dir(), 0.0)] + [(f"slim-{int(r * 100)}", ensure_pruned(r), r) for r in ratios]
    start = time.perf_counter()
    for name, checkpoint, ratio in models:
        fp32 = ensure_export(checkpoint, name)
        variants = {"ort-fp32": fp32, "ort-int8": ensure_quantized(fp32, name, "int8")}
        if name in ("dense", "slim-20"):
            variants["ort-int8-dynamic"] = ensure_quantized(fp32, name, "int8-dynamic")
            variants["ort-fp32-nofuse"] = ensure_export(checkpoint, name, fuse=False)  # is the norm fusion worth it?
        base = {"model": name, "ratio": ratio, "weight_bytes_per_token": weight_bytes_per_token(checkpoint)}
        for runtime, directory in variants.items():
            row = (
                base
                | {"runtime": runtime, "file_mb": _dir_mb(directory)}
                | in_subprocess("ort", model=str(directory), threads=threads)
            )
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            if runtime != "ort-fp32":
                drift = {"model": name, "runtime": runtime} | in_subprocess(
                    "drift", model=str(directory), reference=str(fp32), threads=threads
                )
                results["drift"].append(drift)
                print(json.dumps(drift), flush=True)
        for weights in ("fp32", "int8"):
            directory = ensure_genai(checkpoint, name, weights)
            check = json.loads((directory / "export.json").read_text())["verification"]["checks"]
            row = (
                base
                | {"runtime": f"genai-{weights}", "file_mb": _dir_mb(directory)}
                | {"verify_kl": check["kl"], "verify_top1": check["top1"], "verify_max_abs_diff": check["max_abs_diff"]}
                | {"verify_greedy_equal": all(g["tokens_equal"] for g in check["greedy"] + check["greedy_batch2"])}
                | in_subprocess("genai", model=str(directory), threads=threads)
            )
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
        row = (
            base
            | {"runtime": "torch-eager", "file_mb": _dir_mb(checkpoint, "*.safetensors")}
            | in_subprocess("torch", model=str(checkpoint), threads=threads)
        )
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    results["machine"]["load_average_end"] = os.getloadavg()[0]
    results["seconds"] = round(time.perf_counter() - start)
    return results


def _dir_mb(directory: Path, pattern: str = "model.onnx*") -> float:
    return sum(p.stat().st_size for p in Path(directory).glob(pattern)) / 2**20


# --- report --------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    rows = results["rows"]
    by = {(r["model"], r["runtime"]): r for r in rows}
    m = results["machine"]
    lines = [
        "# ONNX Runtime vs PyTorch eager: dense vs SlimGPT-pruned SmolLM2-135M",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads; onnxruntime {m['onnxruntime']}, "
        + (f"onnxruntime-genai {m['onnxruntime_genai']}, " if "onnxruntime_genai" in m else "")
        + f"torch {m['torch']}, Python {m['python']}; {m['platform']}. Date: {results['date']}. "
        f"Load average at start/end: {m['load_average_start']:.1f}/{m.get('load_average_end', float('nan')):.1f} "
        + (
            "(another job shared these cores: absolute times are noisy; models ran one after another)."
            if m["load_average_start"] > 1.0
            else "(no other job on the machine; models ran one after another)."
        ),
        f"Command: `.venv/bin/python benchmarks/onnx_bench.py --threads {m['threads']}` "
        f"(prunes and exports what is missing under build/bench; {results.get('seconds', '?')} s).",
        f"Protocol: prefill = one forward over N tokens, batch 1, median of 3; decode = ms per token after a "
        f"{DECODE_CONTEXT}-token prompt, median of {DECODE_STEPS} steps; peak RSS of the measuring subprocess. "
        "Pruned models: `slimgpt-deploy prune smollm2-135m --ratio R --calib wikitext-2/valid.txt "
        "--nsamples 32 --seqlen 256`.",
        "",
        "| model | runtime | file MB | prefill 128 ms | prefill 512 ms | decode b1 ms/tok | decode b8 ms/tok "
        "| peak RSS MiB | decode b1 speed-up vs dense | ideal (weight bytes) | of ideal | ORT vs eager (b1) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dense = by.get(("dense", r["runtime"]))
        eager = by.get((r["model"], "torch-eager"))
        speedup = dense["decode_b1_ms"] / r["decode_b1_ms"] if dense else float("nan")
        ideal = dense["weight_bytes_per_token"] / r["weight_bytes_per_token"] if dense else float("nan")
        vs_eager = (
            eager["decode_b1_ms"] / r["decode_b1_ms"] if eager and r["runtime"] != "torch-eager" else float("nan")
        )
        lines.append(
            f"| {r['model']} | {r['runtime']} | {r['file_mb']:.0f} | "
            f"{r['prefill_128_ms']:.1f} | {r['prefill_512_ms']:.1f} | "
            f"{r['decode_b1_ms']:.1f} | {r['decode_b8_ms']:.1f} | {r['peak_rss_mib']:.0f} | "
            f"{speedup:.2f}x | {ideal:.2f}x | "
            f"{speedup / ideal:.2f} | {_fmt(vs_eager)} |"
        )
    lines += [
        "",
        "## int8 variants: drift to the fp32 export and speed",
        "",
        f"KL(P_fp32 || P_int8) in nats per position and top-1 agreement over {results['protocol']['drift']}, "
        "both in ONNX Runtime.",
        "",
        "| model | variant | KL | top-1 | decode b1 ms/tok | file MB |",
        "|---|---|---|---|---|---|",
    ]
    for d in results["drift"]:
        r = by[(d["model"], d["runtime"])]
        lines.append(
            f"| {d['model']} | {d['runtime']} | {d['kl']:.4f} | {d['top1']:.3f} | "
            f"{r['decode_b1_ms']:.1f} | {r['file_mb']:.0f} |"
        )
    genai = [m for m in dict.fromkeys(r["model"] for r in rows) if (m, "genai-fp32") in by]
    if genai:
        lines += [
            "",
            "## ONNX Runtime GenAI beside our runner",
            "",
            "Decode tokens/s at batch 1 and 8 (1000 / ms per token x batch), same models, threads and protocol; "
            "GenAI runs the fused graph of `export --format genai` (GroupQueryAttention, SkipSimplifiedLayerNorm) "
            "through its own generator, our runner the `export --format onnx` graph (RotaryEmbedding, "
            "GroupQueryAttention with the cache written in place since 2026-12-06, norms fused). "
            "genai-int8 top-1 / KL: "
            "its export verification against transformers (96 positions).",
            "",
            "| model | ort-fp32 b1 | genai-fp32 b1 | ort-int8 b1 | genai-int8 b1 | ort-fp32 b8 | genai-fp32 b8 "
            "| genai int8 / fp32 (b1) | genai fp32 vs eager (b1) | genai-int8 top-1 | genai-int8 KL |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        tps = lambda m, rt, b: 1e3 * b / by[(m, rt)][f"decode_b{b}_ms"] if (m, rt) in by else float("nan")  # noqa: E731
        for m in genai:
            g8 = by[(m, "genai-int8")]
            lines.append(
                f"| {m} | {tps(m, 'ort-fp32', 1):.1f} | {tps(m, 'genai-fp32', 1):.1f} | {tps(m, 'ort-int8', 1):.1f} | "
                f"{tps(m, 'genai-int8', 1):.1f} | {tps(m, 'ort-fp32', 8):.1f} | {tps(m, 'genai-fp32', 8):.1f} | "
                f"{tps(m, 'genai-int8', 1) / tps(m, 'genai-fp32', 1):.2f}x | "
                f"{tps(m, 'genai-fp32', 1) / tps(m, 'torch-eager', 1):.2f}x | "
                f"{g8['verify_top1']:.3f} | {g8['verify_kl']:.4f} |"
            )
    lines += ["", *results.get("notes", [])]
    return "\n".join(lines) + "\n"


def _fmt(x: float) -> str:
    return "-" if x != x else f"{x:.2f}x"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="Only rewrite onnx.md from onnx.json.")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "onnx.json"
    if args.markdown:
        results = json.loads(path.read_text())
    else:
        # A new run starts without notes: the old ones read the old numbers (archive them, e.g. as
        # onnx-<cpu>-<date>.json, and write the reading of the new run into "notes", then --markdown).
        results = run(args.threads, tuple(float(r) for r in args.ratios.split(",")))
        path.write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "onnx.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
