"""An export-friendly forward of a LLaMA-family decoder with an explicit KV cache.

transformers' forward hides the cache in a `DynamicCache` object and branches in
Python on run-time state. This module re-expresses the same computation with plain
tensors in, plain tensors out: the PyTorch form of the graph that
`exporters/onnx_graph.write_decoder` writes op for op (tests compare this module with
transformers, and the written graph with both), so one ONNX graph covers prefill,
cached decode and chunked prefill:

    inputs   input_ids       [B, S]          int64
             attention_mask  [B, T]          int64, T = P + S (1 = real token, 0 = left padding)
             position_ids    [B, S]          int64
             past_key_values.{i}.key/.value  [B, kv_i, P, D] (P may be 0)
    outputs  logits          [B, S, V]
             present.{i}.key/.value          [B, kv_i, T, D]

Every layer keeps its own head counts as Python ints (`kv_i` differs per layer in a
slim checkpoint). GQA reshapes the queries to [B, kv, q_per_kv, S, D] and broadcasts
against the cache, so K/V are never repeated. Weights are shared with the source
model (no copies) except an untied lm_head when asked for.

The module is built from any loaded llama/mistral/qwen2/slimgpt causal LM by
reading module shapes, so it covers dense and slim checkpoints alike; tests compare
it with transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimgpt_deploy.families import layout_of
from slimgpt_deploy.layout import Layout


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalize in float32, cast back, then scale."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype):
    """cos, sin: [B, 1, S, D] for `position_ids` [B, S] (float32 angles, like transformers)."""
    freqs = position_ids[:, :, None].to(torch.float32) * inv_freq[None, None, :]  # [B, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, D]
    cos = (emb.cos() * scaling).to(dtype)[:, None]  # [B, 1, S, D]
    sin = (emb.sin() * scaling).to(dtype)[:, None]
    return cos, sin


def additive_mask(attention_mask: torch.Tensor, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, 1, S, T] additive mask: causal over the last S of T positions, and padding.

    Query s sits at cache position T - S + s and sees keys k <= that position whose
    attention_mask is 1. Masked entries get the dtype's most negative finite value
    (not -inf), so a fully padded query row stays finite.
    """
    total = attention_mask.shape[1]
    q_pos = torch.arange(seq_len, device=attention_mask.device) + (total - seq_len)  # [S]
    k_pos = torch.arange(total, device=attention_mask.device)  # [T]
    causal = k_pos[None, :] <= q_pos[:, None]  # [S, T]
    allowed = causal[None, :, :] & attention_mask[:, None, :].to(torch.bool)  # [B, S, T]
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, neg)[:, None, None]  # [B, 1, 1, S, T]


class ExportAttention(nn.Module):
    def __init__(self, layer: nn.Module, layout: Layout, head_dim: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (layout.proj(layer, r) for r in ("q", "k", "v", "o"))
        self.head_dim = head_dim
        self.num_heads = self.q_proj.out_features // head_dim
        self.num_kv_heads = self.k_proj.out_features // head_dim
        assert self.num_heads % self.num_kv_heads == 0, (self.num_heads, self.num_kv_heads)
        self.group = self.num_heads // self.num_kv_heads
        self.scale = head_dim**-0.5

    def forward(self, x, cos, sin, mask, past_k, past_v):
        B, S, _ = x.shape
        kv, g, D = self.num_kv_heads, self.group, self.head_dim
        q = self.q_proj(x).view(B, S, kv * g, D).transpose(1, 2)  # [B, H, S, D]
        k = self.k_proj(x).view(B, S, kv, D).transpose(1, 2)  # [B, kv, S, D]
        v = self.v_proj(x).view(B, S, kv, D).transpose(1, 2)  # [B, kv, S, D]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = torch.cat((past_k, k), dim=2)  # [B, kv, T, D]
        v = torch.cat((past_v, v), dim=2)  # [B, kv, T, D]
        q = q.view(B, kv, g, S, D)  # [B, kv, g, S, D]: query heads grouped by their KV head
        scores = torch.matmul(q, k[:, :, None].transpose(-1, -2)) * self.scale  # [B, kv, g, S, T]
        probs = F.softmax((scores + mask).to(torch.float32), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v[:, :, None])  # [B, kv, g, S, D]
        out = out.reshape(B, kv * g, S, D).transpose(1, 2).reshape(B, S, kv * g * D)  # [B, S, H*D]
        return self.o_proj(out), k, v


class ExportMLP(nn.Module):
    def __init__(self, layer: nn.Module, layout: Layout):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (layout.proj(layer, r) for r in ("gate", "up", "down"))

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ExportLayer(nn.Module):
    def __init__(self, layer: nn.Module, layout: Layout, head_dim: int, eps: float):
        super().__init__()
        self.attn = ExportAttention(layer, layout, head_dim)
        self.mlp = ExportMLP(layer, layout)
        self.ln_attn = layout.part(layer, "attention_norm").weight
        self.ln_mlp = layout.part(layer, "mlp_norm").weight
        self.eps = eps

    def forward(self, x, cos, sin, mask, past_k, past_v):
        h, k, v = self.attn(rms_norm(x, self.ln_attn, self.eps), cos, sin, mask, past_k, past_v)
        x = x + h
        x = x + self.mlp(rms_norm(x, self.ln_mlp, self.eps))
        return x, k, v


class ExportDecoder(nn.Module):
    """(input_ids, attention_mask, position_ids, k_0, v_0, ..., k_{L-1}, v_{L-1}) -> (logits, k_0', v_0', ...)."""

    def __init__(self, model: nn.Module, *, untie_lm_head: bool = False):
        super().__init__()
        config = model.config
        layout = layout_of(config)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        eps = float(config.rms_norm_eps)
        self.embed = model.get_input_embeddings()
        self.layers = nn.ModuleList(
            ExportLayer(layer, layout, self.head_dim, eps) for layer in layout.part(model, "layers")
        )
        self.norm = layout.part(model, "norm").weight
        self.eps = eps
        lm_head = model.get_output_embeddings().weight  # [V, H]
        if untie_lm_head and lm_head is self.embed.weight:
            lm_head = nn.Parameter(lm_head.detach().clone(), requires_grad=False)
        self.lm_head = lm_head
        rotary = layout.part(model, "rotary")
        self.register_buffer("inv_freq", rotary.inv_freq.detach().clone().to(torch.float32), persistent=False)
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))

    @property
    def kv_heads(self) -> list[int]:
        return [layer.attn.num_kv_heads for layer in self.layers]

    @property
    def q_heads(self) -> list[int]:
        return [layer.attn.num_heads for layer in self.layers]

    def forward(self, input_ids, attention_mask, position_ids, *past):
        assert len(past) == 2 * len(self.layers), (len(past), len(self.layers))
        x = self.embed(input_ids)  # [B, S, H]
        cos, sin = rope_tables(position_ids, self.inv_freq, self.rope_scaling, x.dtype)
        mask = additive_mask(attention_mask, input_ids.shape[1], x.dtype)  # [B, 1, 1, S, T]
        presents = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, mask, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        x = rms_norm(x, self.norm, self.eps)
        logits = F.linear(x, self.lm_head)  # [B, S, V]
        return (logits, *presents)


def empty_past(decoder: ExportDecoder, batch: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """An empty cache (P = 0) for every layer: [B, kv_i, 0, D] per key and value."""
    return [
        torch.zeros(batch, kv, 0, decoder.head_dim, dtype=dtype) for kv in decoder.kv_heads for _ in ("key", "value")
    ]
