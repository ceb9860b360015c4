"""Grouped-query attention without copying the KV cache, for token-by-token sampling on CPU.

transformers' eager attention expands each KV head to its group of query heads (``repeat_kv``)
before the two matmuls, which copies the whole cache at every decode step; its ``sdpa`` path on
CPU is slow in bfloat16 for one query token (below). Here each KV head's group of query heads is one batch of
``group x q_len`` rows against that head's keys and values, so the cache is read where it lies:

    scores[b, kv, g, i, j] = scaling * q[b, kv * G + g, i] . k[b, kv, j]  (+ the additive mask)
    out[b, kv * G + g, i]  = softmax_j(scores[b, kv, g, i]) @ v[b, kv]

the same operations in the same order as eager attention: a full forward's logits equal eager's
bit for bit (tiny Llama and Mistral, SmolLM2, float32); one token a step they differ by float32
rounding where the matmul shapes do (tests/test_grouped_attention.py).

Measured with calibration's sampler on SmolLM2-135M, 2-core AMD EPYC (benchmarks/results/self_sampling.md):
128 x 256 tokens in bfloat16 (recover's sampling) 81.5 s against 134.6 s with ``sdpa`` (1.65x) and
129.0 s eager; 32 x 512 in float32 (the prune's calibration) 112.8 s against 104.8 s with ``sdpa``
(0.93x: its float32 kernel is the faster there) and 158.2 s eager. So :func:`grouped_attention`
switches a model to it for a block, and back, where it measured faster: on CPU, from ``eager``
always, from ``sdpa`` when the model computes in bfloat16 (bfloat16 weights, or CPU autocast to
bfloat16). Elsewhere (float32 ``sdpa``, CUDA's fused kernels, a model that cannot switch) the
block runs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

NAME = "slimgpt_grouped"


def grouped_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **_kwargs,
) -> tuple[torch.Tensor, None]:
    """query ``[b, H, q, d]``, key/value ``[b, KV, L, d]``, mask ``[b, 1, q, L]`` (additive) -> ``[b, q, H, d]``."""
    b, heads, q, d = query.shape
    kv, length = key.shape[1], key.shape[2]
    group = heads // kv  # query heads per KV head
    rows = group * q  # one KV head's query heads x positions
    scores = torch.bmm(query.reshape(b * kv, rows, d), key.flatten(0, 1).transpose(1, 2))  # [b*KV, G*q, L]
    scores = scores.view(b, kv, group, q, length) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None, :, :length]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.bmm(probs.view(b * kv, rows, length), value.flatten(0, 1))  # [b*KV, G*q, d]
    return out.view(b, heads, q, -1).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, grouped_attention_forward)
AttentionMaskInterface.register(NAME, eager_mask)  # the additive float mask eager attention takes


@contextmanager
def grouped_attention(model) -> Iterator[None]:
    """Run ``model`` with :func:`grouped_attention_forward` inside the block where it measured faster (module doc)."""
    before = getattr(model.config, "_attn_implementation", None)
    if not faster_here(model, before) or not model._can_set_attn_implementation():
        yield
        return
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def faster_here(model, implementation: str | None) -> bool:
    """On CPU: from ``eager`` always, from ``sdpa`` under bfloat16 (weights or autocast); nowhere else."""
    weight = next(model.parameters())
    if weight.device.type != "cpu":
        return False
    bf16 = weight.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )
    return implementation == "eager" or (implementation == "sdpa" and bf16)
