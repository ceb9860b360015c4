"""Self-sampling speed by attention implementation: transformers' sdpa and eager against grouped_attention.py.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/self_sampling.py   # writes benchmarks/results/self_sampling.*

SmolLM2-135M samples one batch with calibration's own sampler (`_sample_batch`: preallocated KV cache, nucleus
sampling, special tokens banned) in the two settings the tool runs it in:

- `recover`: the bfloat16 working teacher under bf16 autocast, 128 sequences x 256 tokens (recover's SELF_BATCH);
- `prune`: float32, 32 sequences x 512 tokens (the default calibration, 64 x 512, in batches of 32 on CPU).

The implementations run one after another within each setting (the same prefixes and seeds), on 2 threads; the
wall time of the whole batch is reported, with the share of sequences whose ids equal sdpa's (rounding differs
between the implementations and can tip a near-tie).
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import nullcontext

import results_io
import torch

SETTINGS = {  # name: (weights dtype, autocast bf16, batch, seqlen)
    "recover": (torch.bfloat16, True, 128, 256),
    "prune": (torch.float32, False, 32, 512),
}
IMPLEMENTATIONS = ("sdpa", "eager", "grouped")
THREADS = 2


def sampler_inputs(tokenizer, vocab: int, batch: int):
    """(per-sample generators, ``[b, 1]`` one-token prompts, banned special ids): one batch's inputs of
    calibration's ``_sample_batch``, seeded (1000 + i for sample i)."""
    from slimgpt_deploy.calibration import _special_ids

    gens = [torch.Generator().manual_seed(1000 + i) for i in range(batch)]
    prefix = torch.stack([torch.randint(3, vocab, (1,), generator=g) for g in gens])  # [b, 1]
    return gens, prefix, torch.tensor(_special_ids(tokenizer, vocab))


def _sample(model, setting: str, seqlen_override: int | None):
    from slimgpt_deploy.calibration import SELF_SAMPLING, _sample_batch

    _, bf16, batch, seqlen = SETTINGS[setting]
    seqlen = seqlen_override or seqlen
    vocab = model.config.vocab_size
    gens, prefix, banned = sampler_inputs(_sample.tokenizer, vocab, batch)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        ids, _, _ = _sample_batch(model, prefix, seqlen, vocab, gens, SELF_SAMPLING, banned)
    return time.perf_counter() - start, ids, batch, seqlen


def run(seqlen_override: int | None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimgpt_deploy.bench.environment import machine
    from slimgpt_deploy.grouped_attention import grouped_attention
    from slimgpt_deploy.sources import embedded_model_dir

    torch.set_num_threads(THREADS)
    directory = embedded_model_dir()
    _sample.tokenizer = AutoTokenizer.from_pretrained(directory)
    rows = []
    for setting, (dtype, _, _, _) in SETTINGS.items():
        reference = None
        for impl in IMPLEMENTATIONS:
            attn = "eager" if impl == "grouped" else impl
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation=attn)
            model = model.eval().to(dtype)
            with grouped_attention(model) if impl == "grouped" else nullcontext():
                load = os.getloadavg()[0]
                seconds, ids, batch, seqlen = _sample(model, setting, seqlen_override)
            reference = ids if reference is None else reference
            same = (ids == reference).all(dim=1).float().mean().item()
            rows.append(
                {
                    "setting": setting,
                    "attention": impl,
                    "dtype": str(dtype).removeprefix("torch."),
                    "batch": batch,
                    "seqlen": seqlen,
                    "seconds": round(seconds, 1),
                    "ms_per_step": round(1e3 * seconds / (seqlen - 1), 1),
                    "tokens_per_s": round(batch * (seqlen - 1) / seconds, 1),
                    "same_ids_as_sdpa": round(same, 3),
                    "load_avg_1min_before": round(load, 2),
                }
            )
            print(rows[-1], flush=True)
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "torch": torch.__version__, "rows": rows}


def markdown(r: dict) -> str:
    lines = [
        "# Self-sampling speed by attention implementation, SmolLM2-135M",
        "",
        f"{r['date']}, {r['machine']['cpu']}, {THREADS} threads, torch {r['torch']}. "
        "`OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/self_sampling.py`: one batch per row with calibration's "
        "sampler; `grouped` is grouped_attention.py (calibration.sample_self switches to it on CPU from `eager`, "
        "and from `sdpa` under bfloat16: where it measured faster), `sdpa` transformers' default, `eager` its "
        "reference. One run per row, the rows of a setting one after another.",
        "",
        "| setting | attention | weights | batch x tokens | s | ms / step | tokens / s | vs sdpa | ids equal sdpa's "
        "| load avg before |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {row["setting"]: row["seconds"] for row in r["rows"] if row["attention"] == "sdpa"}
    for row in r["rows"]:
        lines.append(
            f"| {row['setting']} | {row['attention']} | {row['dtype']} | {row['batch']} x {row['seqlen']} | "
            f"{row['seconds']} | {row['ms_per_step']} | {row['tokens_per_s']} | "
            f"{base[row['setting']] / row['seconds']:.2f}x | {100 * row['same_ids_as_sdpa']:.0f}% | "
            f"{row['load_avg_1min_before']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=None, help="override both settings' length (a quick probe)")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the committed .json")
    args = parser.parse_args()
    result = results_io.load_or_run("self_sampling", args.markdown_only, lambda: run(args.seqlen))
    results_io.publish("self_sampling", result, markdown, save=args.seqlen is None)  # a --seqlen probe is not kept


if __name__ == "__main__":
    main()
