"""vLLM back end (runs in the bench child, one engine in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0).

float32, enforce_eager, prefix caching off; on CPU a fixed KV-cache budget
(serving.vllm_backend.EngineOptions), and with `threads` set its OpenMP threads bound
to that many cores (VLLM_CPU_OMP_THREADS_BIND, unless already set). vLLM's offline engine does not expose step
times, so (as in benchmarks/vllm_bench.py):
prefill_ms[n]: `generate` of one token from n random prompt tokens at batch 1;
decode time at batch b: t(max_tokens = 1 + decode_tokens) - t(max_tokens = 1) on the
same prompts (prefill subtracted out), divided by the steps.
"""

from __future__ import annotations

import time
from pathlib import Path

from .measure import latency, random_prompt_ids

MAX_LEN_MARGIN = 8  # positions beyond the longest prompt + decode tokens


def measure(model: Path, options) -> dict:
    from ..serving.vllm_backend import EngineOptions, on_cpu

    if options.threads and on_cpu():
        _bind_threads(options.threads)
    from vllm import LLM, SamplingParams

    config_max = _max_positions(Path(model))
    max_len = max(options.prompt_lens) + options.decode_tokens + MAX_LEN_MARGIN
    engine = EngineOptions(dtype="float32", max_model_len=min(max_len, config_max) if config_max else max_len)
    llm = LLM(**engine.llm_kwargs(Path(model)), enable_prefix_caching=False, max_num_seqs=max(options.batch_sizes))
    vocab = llm.llm_engine.model_config.get_vocab_size()

    def timed(prompts: list[list[int]], max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        batch = [{"prompt_token_ids": p} for p in prompts]
        t0 = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        return dt

    def decode_sample(batch: int) -> float:
        prompts = random_prompt_ids(batch, options.decode_context, vocab)
        return timed(prompts, 1 + options.decode_tokens) - timed(prompts, 1)

    return latency(options, vocab, lambda prompts: timed(prompts, 1), decode_sample)


def _bind_threads(threads: int) -> None:
    """vLLM on CPU binds its OpenMP threads itself: give it the first `threads` cores we may use (unless the user
    set it)."""
    import os

    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))


def _max_positions(model: Path) -> int | None:
    import json

    return json.loads((model / "config.json").read_text()).get("max_position_embeddings")
