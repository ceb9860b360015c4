"""ONNX Runtime back end (runs in the bench child): an fp32 export through OnnxDecoder (I/O binding).

prefill_ms[n]: `generate_ids` of one token from n random prompt tokens at batch 1 (time to
first token, cache buffers included). decode_ms_per_token[b]: one `generate_ids` of
1 + decode_tokens tokens at batch b (EOS ignored); the decode time is from the first
generated token to the last, so the prefill is not in it.
"""

from __future__ import annotations

import time
from pathlib import Path

from .measure import latency, random_prompt_ids, seconds


def measure(model: Path, options) -> dict:
    from ..serving.onnx_runner import OnnxDecoder

    decoder = OnnxDecoder(Path(model), threads=options.threads)
    vocab = decoder.spec.vocab_size

    def prefill(prompts: list[list[int]]) -> None:
        decoder.generate_ids(prompts, max_new_tokens=1, eos_token_ids=())

    def decode_sample(batch: int) -> float:
        stamps: list[float] = []

        def on_token(row: int, token: int) -> None:
            if row == 0:
                stamps.append(time.perf_counter())

        prompts = random_prompt_ids(batch, options.decode_context, vocab)
        decoder.generate_ids(prompts, max_new_tokens=1 + options.decode_tokens, eos_token_ids=(), on_token=on_token)
        assert len(stamps) == 1 + options.decode_tokens, len(stamps)
        return stamps[-1] - stamps[0]

    return latency(options, vocab, lambda prompts: seconds(lambda: prefill(prompts)), decode_sample)
