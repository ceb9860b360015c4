"""ONNX Runtime GenAI back end (runs in the bench child): an fp32 GenAI export through serving/genai_runner.

GenAI's own generator on the CPU provider, as an edge app drives it: fp32 weights and cache
(every back end here runs float32), GroupQueryAttention with its cache buffer shared between
steps. prefill_ms[n]: append_tokens of n random prompt tokens at batch 1 (the logits of the
last position) on a new generator. decode_ms_per_token[b]: b prompts of the decode context
appended untimed, then `decode_tokens` greedy generate_next_token steps of the whole batch.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .measure import latency, random_prompt_ids, seconds


def measure(model: Path, options) -> dict:
    from ..serving.genai_runner import GenAIModel

    runtime = GenAIModel(Path(model), threads=options.threads)
    vocab = runtime.info.vocab_size

    def prefill(prompts: list[list[int]]) -> None:
        gen = runtime.generator(1, len(prompts[0]) + 1, do_sample=False)
        gen.append_tokens(np.asarray(prompts, dtype=np.int32))
        gen.get_logits()

    def decode_sample(batch: int) -> float:
        total = options.decode_context + options.decode_tokens
        gen = runtime.generator(batch, total, do_sample=False, min_length=total)
        gen.append_tokens(np.asarray(random_prompt_ids(batch, options.decode_context, vocab), dtype=np.int32))
        t0 = time.perf_counter()
        for _ in range(options.decode_tokens):
            gen.generate_next_token()
        return time.perf_counter() - t0

    return latency(options, vocab, lambda prompts: seconds(lambda: prefill(prompts)), decode_sample)
