"""Generation with transformers in this process: the reference back end for `generate`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch


def generate(
    model: Path,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    on_text: Callable[[int, str], None] | None = None,
) -> list[str]:
    """The `generate --backend torch` contract (serving/__init__.py); streams with on_text."""
    from slimgpt_deploy.sources import load_model

    loaded = load_model(str(model))
    lm, tok = loaded.model.eval(), loaded.tokenizer
    texts = []
    for i, prompt in enumerate(prompts):
        ids = tok(prompt, return_tensors="pt").input_ids
        streamer = None
        if on_text is not None:
            streamer = _Streamer(tok, lambda delta, i=i: on_text(i, delta))
        torch.manual_seed(seed)
        sampling = (
            dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        )
        with torch.inference_mode():
            out = lm.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.eos_token_id,
                streamer=streamer,
                **sampling,
            )
        texts.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


class _Streamer:
    """A transformers streamer that hands each new piece of text to a callback."""

    def __init__(self, tokenizer, emit: Callable[[str], None]):
        from transformers import TextStreamer

        self._inner = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._inner.on_finalized_text = lambda text, stream_end=False: emit(text) if text else None

    def put(self, value):
        self._inner.put(value)

    def end(self):
        self._inner.end()
