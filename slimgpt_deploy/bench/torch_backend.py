"""PyTorch eager back end (runs in the bench child): float32, no compile, a cached greedy loop.

prefill_ms[n]: one forward over n random prompt tokens at batch 1 into a fresh cache,
plus the greedy pick of the first token (time to first token).
decode_ms_per_token[b]: after a prefill of `decode_context` tokens at batch b (untimed),
`decode_tokens` greedy steps, each one forward of one token per sequence with
past_key_values; the timed loop divided by the steps.
"""
from __future__ import annotations

from pathlib import Path

from .measure import decode_samples, random_prompt_ids, repeat, seconds, stats


def measure(model: Path, options) -> dict:
    import torch
    from transformers import DynamicCache

    from ..sources import load_model

    if options.threads:
        torch.set_num_threads(options.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = load_model(str(model), dtype=torch.float32, device=device).model
    vocab = lm.config.vocab_size
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def prompt(batch: int, length: int) -> torch.Tensor:
        return torch.tensor(random_prompt_ids(batch, length, vocab), device=device)  # [B, S]

    def prefill(ids: torch.Tensor):
        cache = DynamicCache(config=lm.config)
        logits = lm(input_ids=ids, past_key_values=cache, use_cache=True).logits  # [B, S, V]
        return logits[:, -1].argmax(-1, keepdim=True), cache  # token: [B, 1]

    def decode(token: torch.Tensor, cache, steps: int) -> torch.Tensor:
        for _ in range(steps):
            logits = lm(input_ids=token, past_key_values=cache, use_cache=True).logits  # [B, 1, V]
            token = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        return token

    def decode_sample(batch: int) -> float:
        token, cache = prefill(prompt(batch, options.decode_context))
        return seconds(lambda: decode(token, cache, options.decode_tokens), sync)

    result = {"prefill_ms": {}, "decode_ms_per_token": {}, "decode_tokens_per_s": {}}
    with torch.inference_mode():
        for n in options.prompt_lens:
            ids = prompt(1, n)
            s = repeat(lambda: seconds(lambda: prefill(ids), sync), options.repeats, options.warmups)
            result["prefill_ms"][str(n)] = stats([1000.0 * x for x in s])
        for b in options.batch_sizes:
            s = repeat(lambda: decode_sample(b), options.repeats, options.warmups)
            ms, rate = decode_samples(s, b, options.decode_tokens)
            result["decode_ms_per_token"][str(b)] = stats(ms)
            result["decode_tokens_per_s"][str(b)] = stats(rate)
    return result
