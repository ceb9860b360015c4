"""PyTorch (transformers) reference outputs that exported artifacts are compared against."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


# Greedy continuations already computed, while `shared_references()` is open (None: not shared).
_shared: dict[tuple, Greedy] | None = None


@contextlib.contextmanager
def shared_references(store: dict | None = None) -> Iterator[None]:
    """Within this block, a greedy reference is computed once per checkpoint, dtype, prompt and length.

    A build verifies four exports of one checkpoint against the same transformers reference; each
    verifier loads the checkpoint itself, and without this each would decode the same prompts again
    (about 3 s a prompt for SmolLM2-135M on 2 cores). Only models loaded from a local directory are
    shared, keyed by that directory's weight and config files (name, size, modification time), so a
    checkpoint rewritten inside the block (prune, then recover) is decoded again.
    `store`: the dict that holds them, kept by the caller across blocks (the test suite's exports of
    one checkpoint); by default a block joins the enclosing one's, else starts its own.
    """
    global _shared
    outer = _shared
    _shared = store if store is not None else {} if outer is None else outer
    try:
        yield
    finally:
        _shared = outer


def _model_key(model) -> tuple | None:
    """What identifies `model`'s outputs: its source directory's files, dtype, device, attention; None if unknown."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None)
    source = Path(name) if name else None
    if source is None or not source.is_dir():
        return None
    files = sorted(p for p in source.iterdir() if p.suffix in (".safetensors", ".json"))
    stats = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    param = next(model.parameters())
    return (str(source.resolve()), stats, str(param.dtype), str(param.device), config._attn_implementation)


def greedy_reference(model, prompt_ids: list[list[int]], max_tokens: int) -> list[Greedy]:
    """Greedy continuations of each prompt (batch 1) from the raw logits, with their log-probabilities.

    A plain prefill + cached decode loop rather than `generate`: no logits processors
    (generate's `min_new_tokens` would set EOS to -inf), and EOS does not stop it, like
    vLLM's `ignore_eos`. Inside `shared_references()`, a continuation computed before is reused.
    """
    model_key = _model_key(model) if _shared is not None else None
    results = []
    for ids in prompt_ids:
        key = None if model_key is None else (model_key, tuple(ids), max_tokens)
        if key is not None and key in _shared:
            results.append(_shared[key])
            continue
        results.append(_greedy(model, ids, max_tokens))
        if key is not None:
            _shared[key] = results[-1]
    return results


def _greedy(model, ids: list[int], max_tokens: int) -> Greedy:
    with torch.inference_mode():
        out = model(torch.tensor([ids]), use_cache=True)
        tokens, steps = [], []
        for _ in range(max_tokens):
            lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # [vocab]
            token = int(lp.argmax())
            tokens.append(token)
            steps.append(lp)
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return Greedy(tokens, torch.stack(steps))


def load_reference(checkpoint: Path, dtype: torch.dtype):
    """The checkpoint in transformers, eval mode, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import slimgpt_deploy.modeling  # noqa: F401  (registers the slim model type)

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(checkpoint)
