"""llama.cpp back end (runs in the bench child): an f32 GGUF export through serving/llamacpp_runner.

f32 weights and an f32 KV cache, as every back end here runs float32; llama.cpp's default
attention (flash attention where it chooses it). prefill_ms[n]: one llama_decode of n random
prompt tokens at batch 1 (the logits of the last), on a cleared cache. decode_ms_per_token[b]:
b sequences prefilled untimed, then `decode_tokens` steps, each one llama_decode of b tokens
(one per sequence, greedy); a context is made per batch size (`n_seq` sequences).
"""

from __future__ import annotations

import time
from pathlib import Path

from .measure import latency, random_prompt_ids, seconds


def measure(model: Path, options) -> dict:
    from ..serving.llamacpp_runner import LlamaCpp, find_gguf

    path = find_gguf(Path(model))
    n_ctx = max(options.prompt_lens) + options.decode_tokens + 8
    contexts: dict[int, LlamaCpp] = {}

    def context(n_seq: int) -> LlamaCpp:
        if n_seq not in contexts:
            contexts[n_seq] = LlamaCpp(path, n_ctx=n_ctx, threads=options.threads, kv_type="f32", n_seq=n_seq)
        return contexts[n_seq]

    vocab = context(1).n_vocab

    def prefill(prompts: list[list[int]]) -> None:
        llm = context(1)
        llm.reset()
        llm.decode(prompts[0], 0)

    def decode_sample(batch: int) -> float:
        llm = context(batch)
        llm.reset()
        prompts = random_prompt_ids(batch, options.decode_context, vocab)
        for seq, prompt in enumerate(prompts):
            last = len(prompt) - 1
            llm.decode_rows([(t, i, seq, i == last) for i, t in enumerate(prompt)])
        tokens = [0] * batch
        t0 = time.perf_counter()
        for step in range(options.decode_tokens):
            rows = [(tokens[seq], options.decode_context + step, seq, True) for seq in range(batch)]
            tokens = [int(row.argmax()) for row in llm.decode_rows(rows)]
        return time.perf_counter() - t0

    try:
        return latency(options, vocab, lambda prompts: seconds(lambda: prefill(prompts)), decode_sample)
    finally:
        for llm in contexts.values():
            llm.close()
