"""grouped_attention: eager attention's logits without expanding the KV cache, switched on and off around a block."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import slimgpt_deploy  # noqa: F401  (registers the slim model type)
from slimgpt_deploy.calibration import preallocated_cache
from slimgpt_deploy.grouped_attention import NAME, grouped_attention


def _load(directory, attn: str = "eager"):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation=attn).eval()


def _prefill_then_decode(model, ids: torch.Tensor, mask: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits ``[b, T, V]``: a prefill of ``prefill`` tokens, then one token a step into a preallocated cache."""
    cache = preallocated_cache(model.config, ids.shape[1])
    out = [model(ids[:, :prefill], attention_mask=mask[:, :prefill], past_key_values=cache, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        step = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
        out.append(step.logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("which", ["llama-gqa", "mistral-sliding-window", "uneven-slim"])
def test_logits_equal_eager_with_padding_sliding_window_and_cache(which, tiny_model_dir_factory, uneven_slim_dir):
    directory = {
        "llama-gqa": lambda: tiny_model_dir_factory("llama"),  # 4 query / 2 KV heads
        "mistral-sliding-window": lambda: tiny_model_dir_factory("mistral", sliding_window=5),
        "uneven-slim": lambda: uneven_slim_dir,  # per-layer query / KV heads: 4/2, 2/1, 4/2
    }[which]()
    model = _load(directory)
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    with torch.inference_mode():
        full = model(ids, attention_mask=mask).logits
        stepped = _prefill_then_decode(model, ids, mask, prefill=6)
        with grouped_attention(model):
            assert model.config._attn_implementation == NAME
            grouped_full = model(ids, attention_mask=mask).logits
            grouped_stepped = _prefill_then_decode(model, ids, mask, prefill=6)
    assert model.config._attn_implementation == "eager"  # switched back
    real = mask.bool()  # padded positions' logits are not compared: nothing attends to them
    assert torch.equal(grouped_full[real], full[real])
    # one token a step, the matmuls' shapes differ from eager's (G rows against one KV head): float32 rounding,
    # 2e-7 on the uneven slim model, where eager's own prefill and decode differ by 8e-7
    torch.testing.assert_close(grouped_stepped[real], stepped[real], rtol=0, atol=1e-5)


def test_switches_back_to_sdpa_even_when_the_block_raises(tiny_llama_dir):
    model = _load(tiny_llama_dir, "sdpa").to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="inside"):
        with grouped_attention(model):
            assert model.config._attn_implementation == NAME
            raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"


def test_switches_only_where_it_measured_faster(tiny_llama_dir):
    """CPU: from eager always, from sdpa under bfloat16 (weights or autocast), not from float32 sdpa (its kernel
    was the faster there); off the CPU (here: meta, no data) never."""
    cases = [
        ("sdpa", torch.float32, False, "sdpa"),
        ("sdpa", torch.float32, True, NAME),
        ("eager", torch.float32, False, NAME),
    ]
    for attn, dtype, autocast, during in cases:
        model = _load(tiny_llama_dir, attn).to(dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), grouped_attention(model):
            assert model.config._attn_implementation == during, (attn, dtype, autocast)
        assert model.config._attn_implementation == attn
    model = _load(tiny_llama_dir, "eager").to(torch.bfloat16).to("meta")
    with grouped_attention(model):
        assert model.config._attn_implementation == "eager"
