"""The family adapter: layouts name every part, and a family laid out otherwise is pruned through its layout alone."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from slimgpt_deploy import families
from slimgpt_deploy.config import PruneConfig
from slimgpt_deploy.families import FAMILIES, Family, layer_shapes, layout_of
from slimgpt_deploy.layout import LLAMA, PROJECTIONS, SLIM, Layout
from slimgpt_deploy.modeling.shapes import layer_weight_shapes
from slimgpt_deploy.prune.engine import LayerwisePruner

GQA = dict(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, intermediate_size=128)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)


def _calib(n=8, s=32, seed=0):
    return torch.randint(3, 128, (n, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_family_layout_names_every_tensor(tiny_model_dir_factory, model_type):
    """The layout's paths resolve on the family's model; its tensor shapes are the model's state dict."""
    model = _load(tiny_model_dir_factory(model_type))
    layout = layout_of(model.config)
    for name in ("layers", "embed", "norm", "rotary", "head"):
        assert isinstance(layout.part(model, name), nn.Module)
    for i, (layer, shape) in enumerate(zip(layout.part(model, "layers"), layer_shapes(model.config))):
        assert all(isinstance(layout.proj(layer, role), nn.Linear) for role in PROJECTIONS)
        got = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
        expected = layout.tensor_shapes(shape)
        if model_type == "qwen2":
            assert layout.tensor("q", "bias") in expected and layout.tensor("o", "bias") not in expected
        assert got == expected, f"layer {i}"


def test_slim_layout_is_the_slim_model(tiny_model_dir_factory):
    slim = LayerwisePruner(_load(tiny_model_dir_factory("llama", **GQA)), PruneConfig(ratio=0.3, nsamples=8)).run(
        _calib()
    )
    model = slim.model
    assert layout_of(model.config) is SLIM is LLAMA
    for i, layer in enumerate(SLIM.part(model, "layers")):
        assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == layer_weight_shapes(model.config, i)
    names = set(model.state_dict())
    assert SLIM.layer_prefix(1) + SLIM.tensor("down") in names and f"{SLIM.embed}.weight" in names


def test_layout_must_name_every_projection():
    with pytest.raises(AssertionError, match="every projection"):
        Layout(projections={"q": "attn.wq"})


# A family laid out as Meta's original Llama code names it (attention.wq ... feed_forward.w1/w2/w3), built in the
# test from a transformers Llama's weights: the engine, shrink and assemble must find every part through its Layout.
META = Layout(
    layers="layers",
    embed="tok_embeddings",
    norm="norm",
    rotary="rope",
    head="output",
    attention="attention",
    mlp="feed_forward",
    attention_norm="attention_norm",
    mlp_norm="ffn_norm",
    projections={
        "q": "attention.wq",
        "k": "attention.wk",
        "v": "attention.wv",
        "o": "attention.wo",
        "gate": "feed_forward.w1",
        "up": "feed_forward.w3",
        "down": "feed_forward.w2",
    },
)


class MetaAttention(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.head_dim = attn.head_dim

    def forward(self, hidden_states, position_embeddings, attention_mask):
        B, S, _ = hidden_states.shape
        D = self.head_dim
        q = self.wq(hidden_states).view(B, S, -1, D).transpose(1, 2)  # [B, H, S, D]
        k = self.wk(hidden_states).view(B, S, -1, D).transpose(1, 2)  # [B, kv, S, D]
        v = self.wv(hidden_states).view(B, S, -1, D).transpose(1, 2)  # [B, kv, S, D]
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        g = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), attn_mask=attention_mask)
        return self.wo(out.transpose(1, 2).reshape(B, S, -1)), None  # [B, S, H*D]


class MetaFeedForward(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.w1, self.w2, self.w3 = mlp.gate_proj, mlp.down_proj, mlp.up_proj

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MetaBlock(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.attention_norm, self.ffn_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.attention, self.feed_forward = MetaAttention(layer.self_attn), MetaFeedForward(layer.mlp)


class MetaLlama(nn.Module):
    def __init__(self, hf, config):
        super().__init__()
        self.config, self.generation_config = config, None
        self.tok_embeddings, self.norm, self.rope = hf.model.embed_tokens, hf.model.norm, hf.model.rotary_emb
        self.layers = nn.ModuleList(MetaBlock(layer) for layer in hf.model.layers)
        self.output = hf.lm_head

    def get_input_embeddings(self):
        return self.tok_embeddings

    def get_output_embeddings(self):
        return self.output


def test_a_family_with_another_layout_is_its_layout(tiny_model_dir_factory, monkeypatch):
    """Pruning the Meta-named copy through its family's Layout gives what pruning the transformers model gives."""
    path = tiny_model_dir_factory("llama", **GQA)
    reference = _load(path)
    reference.config._attn_implementation = "sdpa"
    hf = _load(path)
    config = type(hf.config).from_dict(hf.config.to_dict())
    config.model_type = "meta-llama"
    config._attn_implementation = "sdpa"
    monkeypatch.setitem(FAMILIES, "meta-llama", Family("Meta Llama", families._llama, META))
    meta = MetaLlama(hf, config)
    assert not hasattr(meta, "model") and not hasattr(meta.layers[0], "self_attn")

    prune = PruneConfig(ratio=0.4, nsamples=8, seqlen=32, batch_size=4, head_share=1.0)
    want = LayerwisePruner(reference, prune).run(_calib())
    got = LayerwisePruner(meta, prune).run(_calib())

    for a, b in zip(want.record["layers"], got.record["layers"]):
        assert (a["kept_q_heads"], a["kept_kv_heads"]) == (b["kept_q_heads"], b["kept_kv_heads"])
    assert got.model.config.intermediate_size_per_layer == want.model.config.intermediate_size_per_layer
    assert got.model.config.source_model_type == "meta-llama"
    w, g = want.model.state_dict(), got.model.state_dict()
    assert set(w) == set(g)
    worst = max((w[k] - g[k]).abs().max().item() for k in w)
    assert worst <= 1e-5, worst
    x = _calib(2, 16, seed=3)
    assert (want.model(x).logits - got.model(x).logits).abs().max() <= 1e-4
