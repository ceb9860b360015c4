"""PyTorch (transformers) reference outputs that exported artifacts are compared against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# Prompts for verification runs: plain English and code, so a real tokenizer gives
# several tokens each; a tiny test tokenizer maps unknown words to <unk>, still valid.
VERIFY_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, there was a",
    "The three laws of thermodynamics are",
)


@dataclass
class Greedy:
    """A greedy continuation: the generated ids and the log-softmax of every step's logits."""

    token_ids: list[int]
    logprobs: torch.Tensor  # [steps, vocab] float32


def greedy_reference(model, prompt_ids: list[list[int]], max_tokens: int) -> list[Greedy]:
    """Greedy continuations of each prompt (batch 1) from the raw logits, with their log-probabilities.

    A plain prefill + cached decode loop rather than `generate`: no logits processors
    (generate's `min_new_tokens` would set EOS to -inf), and EOS does not stop it, like
    vLLM's `ignore_eos`.
    """
    results = []
    with torch.inference_mode():
        for ids in prompt_ids:
            out = model(torch.tensor([ids]), use_cache=True)
            tokens, steps = [], []
            for _ in range(max_tokens):
                lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # [vocab]
                token = int(lp.argmax())
                tokens.append(token)
                steps.append(lp)
                out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            results.append(Greedy(tokens, torch.stack(steps)))
    return results


def load_reference(checkpoint: Path, dtype: torch.dtype):
    """The checkpoint in transformers, eval mode, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import slimgpt_deploy.modeling  # noqa: F401  (registers the slim model type)

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(checkpoint)
