"""Timing and memory helpers shared by every back end (pure functions, no heavy imports).

Protocol (docs/DESIGN.md, "Benchmark method"): `warmups` untimed runs, then `repeats`
timed ones; a measurement is reported as its median, min and max (`stats`).
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


def stats(xs: Sequence[float]) -> dict:
    """S = {"median", "min", "max", "n"} of a non-empty list of samples."""
    assert xs, "stats of no samples"
    return {"median": float(statistics.median(xs)), "min": float(min(xs)), "max": float(max(xs)), "n": len(xs)}


def repeat(fn: Callable[[], float], repeats: int, warmups: int) -> list[float]:
    """Call `fn` (which returns one sample, e.g. seconds) `warmups` times untimed, then `repeats` times."""
    for _ in range(warmups):
        fn()
    return [fn() for _ in range(repeats)]


def seconds(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> float:
    """Wall time of one call of `fn`; `sync` waits for queued device work (e.g. torch.cuda.synchronize)."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def decode_samples(decode_s: Sequence[float], batch: int, tokens: int) -> tuple[list[float], list[float]]:
    """(ms per decode step, tokens per second) from decode times of `tokens` steps at batch `batch`.

    One step produces one token for each of the `batch` sequences.
    """
    ms = [1000.0 * s / tokens for s in decode_s]
    rate = [batch * tokens / s for s in decode_s]
    return ms, rate


def latency(
    options, vocab: int, prefill_s: Callable[[list[list[int]]], float], decode_s: Callable[[int], float]
) -> dict:
    """The latency part of M, the same protocol on every back end.

    prefill_s(prompts) -> seconds to the first token for one batch-1 prompt of each length in
    `options.prompt_lens`; decode_s(batch) -> seconds of `options.decode_tokens` decode steps.
    """
    result = {"prefill_ms": {}, "decode_ms_per_token": {}, "decode_tokens_per_s": {}}
    for n in options.prompt_lens:
        prompts = random_prompt_ids(1, n, vocab)  # [1, n]
        s = repeat(lambda: prefill_s(prompts), options.repeats, options.warmups)
        result["prefill_ms"][str(n)] = stats([1000.0 * x for x in s])
    for b in options.batch_sizes:
        s = repeat(lambda: decode_s(b), options.repeats, options.warmups)
        ms, rate = decode_samples(s, b, options.decode_tokens)
        result["decode_ms_per_token"][str(b)] = stats(ms)
        result["decode_tokens_per_s"][str(b)] = stats(rate)
    return result


def random_prompt_ids(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """`batch` prompts of `length` random token ids (seeded), avoiding the lowest ids (special tokens)."""
    import numpy as np

    low = min(100, vocab // 4)
    rng = np.random.default_rng(seed)
    return rng.integers(low, vocab, size=(batch, length)).tolist()  # [B, S]


def peak_rss_bytes() -> int:
    """This process's peak resident memory.

    /proc's VmHWM where there is one: ru_maxrss would carry the spawning parent's
    peak over exec (Linux folds the old address space's high-water mark into it).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def ratios(dense: Mapping, pruned: Mapping) -> dict:
    """R: pruned-vs-dense ratios of two back-end measurements M (see slimgpt_deploy.bench)."""
    ideal = dense["weight_bytes"] / pruned["weight_bytes"]

    def speedup(key: str) -> dict:
        return {k: dense[key][k]["median"] / pruned[key][k]["median"] for k in dense[key] if k in pruned[key]}

    decode = speedup("decode_ms_per_token")
    return {
        "ideal_decode_speedup": ideal,
        "decode_speedup": decode,
        "of_ideal": {k: v / ideal for k, v in decode.items()},
        "prefill_speedup": speedup("prefill_ms"),
        "weight_bytes": pruned["weight_bytes"] / dense["weight_bytes"],
        "peak_rss": pruned["peak_rss_bytes"] / dense["peak_rss_bytes"],
        "kv_bytes_per_token": pruned["kv_bytes_per_token"] / dense["kv_bytes_per_token"],
    }
