"""PyTorch eager back end (runs in the bench child): float32, no compile, a cached greedy loop.

prefill_ms[n]: one forward over n random prompt tokens at batch 1 into a fresh cache,
plus the greedy pick of the first token (time to first token).
decode_ms_per_token[b]: after a prefill of `decode_context` tokens at batch b (untimed),
`decode_tokens` greedy steps, each one forward of one token per sequence with
past_key_values; the timed loop divided by the steps.
"""

from __future__ import annotations

from pathlib import Path

from .measure import latency, random_prompt_ids, seconds


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

    def prefill_s(ids: list[list[int]]) -> float:
        tokens = torch.tensor(ids, device=device)  # [1, n]
        return seconds(lambda: prefill(tokens), sync)

    with torch.inference_mode():
        return latency(options, vocab, prefill_s, decode_sample)
