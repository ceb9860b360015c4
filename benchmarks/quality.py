"""Quality benchmark: SlimGPT vs baselines on SmolLM2-135M, WikiText-2 perplexity.

    .venv/bin/python benchmarks/quality.py            # all runs (about 90 min on 2 cores)
    .venv/bin/python benchmarks/quality.py --only slimgpt-log-pg-20   # one run
    .venv/bin/python benchmarks/quality.py --resume   # skip runs already in the JSON

Protocol (stated again in the results): perplexity on the first 40,960 tokens of
WikiText-2 test.txt (../shared/data/wikitext-2), non-overlapping windows of 2048
and of 128 tokens; calibration 64 x 512 tokens from WikiText-2 valid.txt (or
`self`), seed 0. Each run is its own subprocess, so its peak RSS is its own.
Results: benchmarks/results/quality.json and quality.md, written after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from slimgpt_deploy.prune.methods import METHODS, SLIMGPT
from slimgpt_deploy.prune.schedule import KV_GROUP, PER_GROUP

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "smollm2-135m"
EVAL_TOKENS = 40960
WINDOWS = (2048, 128)
NSAMPLES, SEQLEN = 64, 512


def _run(
    name, method=SLIMGPT, ratio=0.2, schedule="log", gqa=PER_GROUP, calib="wiki", nsamples=NSAMPLES, seqlen=SEQLEN
):
    return {
        "name": name,
        "method": method,
        "ratio": ratio,
        "schedule": schedule,
        "gqa_mode": gqa,
        "calib": calib,
        "nsamples": nsamples,
        "seqlen": seqlen,
    }


RUNS = [{"name": "dense", "method": "dense", "ratio": 0.0}]
for r in (0.2, 0.3, 0.5):
    pct = int(r * 100)
    RUNS.append(_run(f"slimgpt-log-pg-{pct}", ratio=r) | ({"time_dense": True} if r == 0.2 else {}))
    if r == 0.2:
        RUNS.append(_run("slimgpt-log-kv-20", gqa=KV_GROUP))
        RUNS.append(_run("slimgpt-uniform-pg-20", schedule="uniform"))
    for method in (m for m in METHODS if m != SLIMGPT):  # the ablation and the baselines
        RUNS.append(_run(f"{method}-log-pg-{pct}", method=method, ratio=r))
RUNS.append(_run("slimgpt-log-pg-20-self", calib="self"))
RUNS.append(_run("slimgpt-log-pg-20-128x2048", nsamples=128, seqlen=2048) | {"time_dense": True})


def machine() -> dict:
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def one(spec: dict) -> dict:
    """Run one configuration in this process; returns its result row."""
    import torch

    from slimgpt_deploy.api import prune
    from slimgpt_deploy.calibration import get_calibration
    from slimgpt_deploy.config import PruneConfig
    from slimgpt_deploy.evaluate import load_text, perplexity, text_to_ids
    from slimgpt_deploy.sources import load_model

    torch.manual_seed(0)
    loaded = load_model(MODEL)
    test_ids = text_to_ids(loaded.tokenizer, load_text(DATA / "test.txt"))[:EVAL_TOKENS]
    row = dict(spec)
    t0 = time.perf_counter()
    if spec.get("time_dense"):
        # The data cost, in the same process as the pruning it is compared with.
        calib = get_calibration(
            str(DATA / "valid.txt"),
            loaded.model,
            loaded.tokenizer,
            nsamples=spec["nsamples"],
            seqlen=spec["seqlen"],
            seed=0,
        )
        with torch.inference_mode():
            t = time.perf_counter()
            for _ in range(2):
                for batch in calib.input_ids.split(8):
                    loaded.model(batch)
            row["two_dense_passes_s"] = round(time.perf_counter() - t, 2)
    if spec["method"] == "dense":
        model = loaded.model
        row["params"] = sum(p.numel() for p in model.parameters())
    else:
        calib = "self" if spec["calib"] == "self" else str(DATA / "valid.txt")
        config = PruneConfig(
            ratio=spec["ratio"],
            method=spec["method"],
            schedule=spec["schedule"],
            gqa_mode=spec["gqa_mode"],
            calib=calib,
            nsamples=spec["nsamples"],
            seqlen=spec["seqlen"],
        )
        result = prune(loaded, config)
        model = result.model
        rec = result.record
        row.update(
            ratio_achieved_decoder=round(rec["ratio_achieved_decoder"], 4),
            ratio_achieved_model=round(rec["ratio_achieved_model"], 4),
            params=rec["params_slim"],
            calib_s=rec["seconds"]["calibration"],
            prune_s=rec["seconds"]["prune"],
            heads=result.model.config.num_attention_heads_per_layer,
            kv_heads=result.model.config.num_key_value_heads_per_layer,
            ffn=result.model.config.intermediate_size_per_layer,
        )
    for w in WINDOWS:
        row[f"ppl_{w}"] = round(perplexity(model, test_ids, seqlen=w, batch_size=8 if w <= 512 else 1).ppl, 3)
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def markdown(results: dict) -> str:
    rows = results["runs"]
    by = {r["name"]: r for r in rows}
    dense = by.get("dense", {})
    lines = [
        "# Quality: SmolLM2-135M, WikiText-2 perplexity",
        "",
        f"Machine: {results['machine']['platform']}, {results['machine']['cores']} cores, "
        f"torch {results['machine']['torch']}"
        f" ({results['machine']['torch_threads']} threads). Date: {results['date']}.",
        f"Protocol: first {EVAL_TOKENS:,} tokens of WikiText-2 test, non-overlapping windows of 2048 and 128 tokens; "
        f"calibration {NSAMPLES} x {SEQLEN} tokens of WikiText-2 valid (or `self`), seed 0; "
        "schedule `log` unless named.",
        "Command: `.venv/bin/python benchmarks/quality.py`.",
        "",
        "| run | method | ratio | decoder removed | model removed | PPL@2048 | PPL@128 | prune s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['method']} | {r['ratio']:.2f} | {r.get('ratio_achieved_decoder', 0):.2%} | "
            f"{r.get('ratio_achieved_model', 0):.2%} | {r['ppl_2048']:.2f} | {r['ppl_128']:.2f} | "
            f"{r.get('prune_s', 0):.0f} | {r['peak_rss_mib']:.0f} |"
        )
    missing = [spec["name"] for spec in RUNS if spec["name"] not in by]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)} (run `benchmarks/quality.py --resume`)."]
    if dense and "slimgpt-log-pg-20" in by:
        base = dense["ppl_2048"]
        s = by["slimgpt-log-pg-20"]
        baselines = [by[n] for n in ("wanda-sp-log-pg-20", "magnitude-log-pg-20") if n in by]
        lines += ["", "## Targets at 20%", ""]
        if baselines:
            best = min(baselines, key=lambda r: r["ppl_2048"])
            inc_s, inc_b = s["ppl_2048"] - base, best["ppl_2048"] - base
            lines.append(
                f"- SlimGPT's perplexity increase at 20% (2048 windows): +{inc_s:.2f} vs the best baseline "
                f"({best['method']}) +{inc_b:.2f}: ratio {inc_s / inc_b:.2f} (target <= 0.5)."
            )
        for run in (s, by.get("slimgpt-log-pg-20-128x2048")):
            if run and "two_dense_passes_s" in run:
                lines.append(
                    f"- Pruning cost ({run['nsamples']} x {run['seqlen']}) {run['prune_s']:.0f} s "
                    "vs two dense forward passes "
                    f"over the same calibration set {run['two_dense_passes_s']:.0f} s (same process): ratio "
                    f"{run['prune_s'] / run['two_dense_passes_s']:.2f} (target <= 1.5)."
                )
        if "slimgpt-log-kv-20" in by:
            kv = by["slimgpt-log-kv-20"]
            lines.append(
                "- GQA modes at 20%: same number of query heads in every group "
                f"{s['ppl_2048']:.2f} / {s['ppl_128']:.2f}, "
                f"whole KV groups {kv['ppl_2048']:.2f} / {kv['ppl_128']:.2f} (PPL@2048 / PPL@128)."
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="run only these names (repeatable)")
    parser.add_argument("--resume", action="store_true", help="keep finished runs from the JSON, run the rest")
    parser.add_argument("--markdown", action="store_true", help="only rewrite quality.md from quality.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    if args.markdown:
        (RESULTS / "quality.md").write_text(markdown(json.loads((RESULTS / "quality.json").read_text())))
        return
    if not (DATA / "test.txt").exists():
        sys.exit(f"WikiText-2 not found at {DATA}; this benchmark needs ../shared/data/wikitext-2")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "quality.json"
    done = {}
    if (args.resume or args.only) and path.exists():
        done = {r["name"]: r for r in json.loads(path.read_text())["runs"]}
    for spec in RUNS:
        if (args.only and spec["name"] not in args.only) or (args.resume and spec["name"] in done):
            continue
        print(f"== {spec['name']}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            sys.exit(f"run {spec['name']} failed")
        done[spec["name"]] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(done[spec["name"]]), file=sys.stderr, flush=True)
        results = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "protocol": {
                "eval_tokens": EVAL_TOKENS,
                "windows": WINDOWS,
                "calib": f"{NSAMPLES}x{SEQLEN} wikitext-2 valid",
                "seed": 0,
            },
            "runs": [done[s["name"]] for s in RUNS if s["name"] in done],
        }
        path.write_text(json.dumps(results, indent=2) + "\n")
        (RESULTS / "quality.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
