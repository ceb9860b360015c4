"""benchmarks/peer_torch_pruning.py: its ratio arithmetic and its Torch-Pruning run on a tiny random LLaMA."""

import math

import pytest
import torch
from helpers import load_benchmark
from transformers import AutoModelForCausalLM

pytest.importorskip("torch_pruning")


@pytest.fixture(scope="module")
def peer():
    return load_benchmark("peer_torch_pruning.py", "peer_torch_pruning")


@pytest.mark.parametrize("n_total", [128, 1536, 8192])
def test_local_ratio_removes_exactly_n(peer, n_total):
    # Torch-Pruning's local rule: it removes n_total - int(n_total * (1 - ratio)) channels.
    for n in range(0, n_total // 2, 7):
        ratio = peer.tp_local_ratio(n, n_total)
        assert n_total - int(n_total * (1 - ratio)) == n


@pytest.mark.parametrize("q_heads,kv_heads", [(9, 3), (6, 2), (32, 8), (12, 4)])
def test_head_ratio_removes_per_group(peer, q_heads, kv_heads):
    # Its local GQA rule: ceil(ceil(ratio * q_heads) / kv_heads) query heads from every KV group.
    for per_group in range(q_heads // kv_heads):
        ratio = peer.tp_head_ratio(per_group, q_heads, kv_heads)
        assert (math.ceil(math.ceil(ratio * q_heads) / kv_heads) if ratio else 0) == per_group


def test_ffn_channels_to_cut_hits_share(peer):
    # SmolLM2-135M's layer: 3,540,096 parameters, query head 73,728, FFN channel 1,728.
    assert peer.ffn_channels_to_cut(3_540_096, 73_728, 1_728, 0.2, 0) == 410
    assert peer.ffn_channels_to_cut(3_540_096, 73_728, 1_728, 0.2, 3) == 282


@pytest.fixture(scope="module")
def gqa3_dir(tiny_model_dir_factory):
    # 3 query heads per KV group, like SmolLM2 (head_dim 16).
    return tiny_model_dir_factory("llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=2)


@pytest.mark.parametrize("importance,heads", [("taylor", True), ("magnitude", False)])
def test_torch_pruning_run_on_tiny_model(peer, gqa3_dir, importance, heads):
    model = AutoModelForCausalLM.from_pretrained(gqa3_dir, attn_implementation="sdpa").eval().requires_grad_(False)
    dense_decoder, dense_total = peer.decoder_params(model), peer.model_params(model)
    ids = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    record = peer.prune_torch_pruning(model, ids, peer.TPSetting(importance, prune_heads=heads))

    share = 1 - peer.decoder_params(model) / dense_decoder
    assert abs(share - 0.2) < 0.01  # one FFN channel is ~0.3% of this model's decoder
    assert peer.model_params(model) < dense_total
    assert record["uniform"] and record["heads"] == [4 if heads else 6] * 2 and record["kv_heads"] == [2, 2]
    assert model.config.num_attention_heads == record["heads"][0]
    assert model.config.intermediate_size == record["ffn"][0] < 128
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape == (4, 32, model.config.vocab_size) and torch.isfinite(logits).all()
    assert peer.reload_check(model, model.save_pretrained).startswith("ok")
