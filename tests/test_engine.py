"""The layer-wise engine and the physical shrink, end to end on tiny random models."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimgpt_deploy.config import PruneConfig
from slimgpt_deploy.errors import NumericalError
from slimgpt_deploy.prune.engine import LayerwisePruner
from slimgpt_deploy.prune.schedule import LayerPlan
from slimgpt_deploy.shrink import LayerCut, assemble, make_slim_config, shrink_layer

GQA = dict(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, intermediate_size=128)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)


def _calib(n=16, s=32, seed=0):
    return torch.randint(3, 128, (n, s), generator=torch.Generator().manual_seed(seed))


def _prune(model, **options):
    options = {"nsamples": 16, "seqlen": 32, "batch_size": 8, "head_share": 1.0, **options}  # heads cut: BGP exercised
    return LayerwisePruner(model, PruneConfig(**options)).run(_calib(options["nsamples"], options["seqlen"]))


@pytest.fixture(scope="module")
def gqa_model(tiny_model_dir_factory):
    return _load(tiny_model_dir_factory("llama", **GQA))


def test_ratio_zero_reproduces_dense_logits(gqa_model):
    slim = _prune(gqa_model, ratio=0.0).model
    x = _calib(2, 32, seed=1)
    assert (slim(x).logits - gqa_model(x).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("mode", ["kv-group", "per-group"])
@pytest.mark.parametrize("method", ["slimgpt", "slimgpt-nocomp", "magnitude", "wanda-sp"])
def test_per_layer_shapes_match_weights(gqa_model, mode, method):
    result = _prune(gqa_model, ratio=0.4, gqa_mode=mode, method=method)
    c = result.model.config
    for i, layer in enumerate(result.model.model.layers):
        q, kv, f = c.layer_shape(i)
        assert q % kv == 0
        assert layer.self_attn.q_proj.out_features == q * c.head_dim
        assert layer.self_attn.k_proj.out_features == kv * c.head_dim
        assert layer.mlp.down_proj.in_features == f
        if mode == "per-group":
            assert kv == 2
    assert abs(result.record["ratio_achieved_decoder"] - 0.4) < 0.01
    assert c.num_attention_heads_per_layer != [8] * 4  # heads were pruned somewhere


def _random_cut(shape_q, shape_kv, ffn, keep_kv, keep_q_per_kv, keep_ffn, hidden, head_dim, g):
    q_per_kv = shape_q // shape_kv
    kv = sorted(torch.randperm(shape_kv, generator=g)[:keep_kv].tolist())
    q = [k * q_per_kv + j for k in kv for j in sorted(torch.randperm(q_per_kv, generator=g)[:keep_q_per_kv].tolist())]
    f = sorted(torch.randperm(ffn, generator=g)[:keep_ffn].tolist())
    return LayerCut(
        q_heads=q,
        kv_heads=kv,
        ffn=f,
        o_proj=torch.randn(hidden, shape_q * head_dim, generator=g),
        down_proj=torch.randn(hidden, ffn, generator=g),
    )


def test_shrinking_a_masked_model_gives_the_masked_logits(gqa_model):
    """Zeroing pruned units in the dense model (o_proj/down_proj columns) == removing them."""
    g = torch.Generator().manual_seed(0)
    c = gqa_model.config
    d = c.head_dim
    cuts = [
        _random_cut(8, 2, 128, keep_kv=kv, keep_q_per_kv=qk, keep_ffn=f, hidden=64, head_dim=d, g=g)
        for kv, qk, f in [(2, 4, 128), (1, 4, 100), (2, 2, 37), (2, 1, 5)]
    ]
    plans = [LayerPlan(len(cut.q_heads), len(cut.kv_heads), len(cut.ffn), 0.0) for cut in cuts]
    slim_config = make_slim_config(c, plans)
    slim = assemble(
        gqa_model,
        [shrink_layer(layer, cut, slim_config, i) for i, (layer, cut) in enumerate(zip(gqa_model.model.layers, cuts))],
        slim_config,
    )

    masked = _load_copy(gqa_model)
    for layer, cut in zip(masked.model.layers, cuts):
        o = torch.zeros_like(cut.o_proj)
        cols = [h * d + t for h in cut.q_heads for t in range(d)]
        o[:, cols] = cut.o_proj[:, cols]
        # queries that read a removed KV head must be gone too (they are: kept queries use kept KV heads)
        layer.self_attn.o_proj.weight.copy_(o)
        down = torch.zeros_like(cut.down_proj)
        down[:, cut.ffn] = cut.down_proj[:, cut.ffn]
        layer.mlp.down_proj.weight.copy_(down)
    x = _calib(2, 32, seed=2)
    torch.testing.assert_close(slim(x).logits, masked(x).logits, atol=1e-4, rtol=1e-4)


def _load_copy(model):
    import copy

    return copy.deepcopy(model)


def test_slimgpt_reconstructs_better_than_baselines(gqa_model):
    errs = {}
    for method in ("slimgpt", "slimgpt-nocomp", "magnitude", "wanda-sp"):
        rec = _prune(gqa_model, ratio=0.4, method=method, schedule="uniform").record
        errs[method] = sum(
            layer_rec["attn_error"] + layer_rec["mlp_error"] for layer_rec in rec["layers"][:1]
        )  # first layer: same inputs for all
    assert errs["slimgpt"] <= min(errs.values()) + 1e-9
    assert errs["slimgpt"] < errs["slimgpt-nocomp"]


def test_nan_weights_are_named(tiny_model_dir_factory):
    model = _load(tiny_model_dir_factory("llama", **GQA))
    model.model.layers[2].mlp.up_proj.weight[3, 4] = float("nan")
    with pytest.raises(NumericalError, match="layer 2"):
        _prune(model, ratio=0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_finds_every_nan_and_inf(dtype):
    from slimgpt_deploy.prune.engine import all_finite

    t = torch.randn(7, 9).to(dtype)
    assert all_finite(t) and all_finite(torch.empty(0, 9, dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for at in ((0, 0), (3, 4), (6, 8)):
            u = t.clone()
            u[at] = bad
            assert not all_finite(u), (bad, at)
    both = t.clone()
    both[1, 1], both[2, 2] = float("inf"), float("nan")
    assert not all_finite(both)
    assert all_finite(torch.full((3,), torch.finfo(dtype).max, dtype=dtype))  # large is not infinite


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families_prune_and_keep_their_biases(tiny_model_dir_factory, family):
    model = _load(tiny_model_dir_factory(family, **GQA))
    x = _calib(2, 32, seed=3)
    slim0 = _prune(model, ratio=0.0).model
    assert (slim0(x).logits - model(x).logits).abs().max() <= 1e-4
    slim = _prune(model, ratio=0.3).model
    assert torch.isfinite(slim(x).logits).all()
    has_bias = family == "qwen2"
    assert (slim.model.layers[0].self_attn.q_proj.bias is not None) == has_bias
    assert slim.model.layers[0].self_attn.o_proj.bias is None


@pytest.mark.parametrize(
    "overrides",
    [
        dict(GQA, num_key_value_heads=8),  # MHA: every head its own KV group
        dict(GQA, tie_word_embeddings=False),
    ],
    ids=["mha", "untied"],
)
def test_mha_and_untied_models_prune_save_and_reload(tiny_model_dir_factory, tmp_path, overrides):
    from slimgpt_deploy.checkpoint import save_checkpoint

    model = _load(tiny_model_dir_factory("llama", **overrides))
    result = _prune(model, ratio=0.3)
    c = result.model.config
    assert c.tie_word_embeddings == overrides.get("tie_word_embeddings", True)
    if overrides["num_key_value_heads"] == 8:
        assert c.num_attention_heads_per_layer == c.num_key_value_heads_per_layer  # MHA stays MHA
    save_checkpoint(result.model, None, result.record, tmp_path / "slim")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "slim").eval()
    x = _calib(2, 16, seed=4)
    torch.testing.assert_close(loaded(x).logits, result.model(x).logits)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == c.tie_word_embeddings


def test_activations_on_disk_give_the_same_model(gqa_model):
    config = PruneConfig(ratio=0.3, nsamples=16, seqlen=32, batch_size=4, head_share=1.0)
    in_memory = LayerwisePruner(gqa_model, config).run(_calib(16, 32)).model.state_dict()
    on_disk = LayerwisePruner(gqa_model, config).run(_calib(16, 32), offload=True).model.state_dict()
    assert in_memory.keys() == on_disk.keys()
    assert all(torch.equal(in_memory[k], on_disk[k]) for k in in_memory)


def test_nan_weights_are_caught_before_calibration(tiny_model_dir_factory, monkeypatch):
    """The up-front check of every layer: no minutes of calibration before a NaN in the last layer is found."""
    from safetensors.torch import load_file, save_file

    from slimgpt_deploy import api

    path = tiny_model_dir_factory("llama", seed=11, **GQA)
    weights = load_file(path / "model.safetensors")
    weights["model.layers.3.mlp.down_proj.weight"][0, 1] = float("inf")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran before the weights were checked")

    monkeypatch.setattr(api, "get_calibration", no_calibration)
    with pytest.raises(NumericalError, match=r"layer 3 \(mlp.down_proj.weight\)"):
        api.prune(str(path), PruneConfig(nsamples=4, seqlen=16))


def test_engine_weights_equal_the_closed_form_from_independently_captured_inputs(tiny_model_dir_factory):
    """Layer 1's o_proj inputs come from the *pruned* layer 0, the MLP's from the *pruned* attention.

    The inputs are captured here with our own hooks on the dense layers fed by the slim model; the
    engine's new o_proj/down_proj must equal W Hd[:, K] Hd[K, K]^-1 for its kept columns K (Hd the
    dampened H), so a Hessian collected in the wrong place fails.
    """
    model = _load(tiny_model_dir_factory("llama", seed=5, **dict(GQA, num_hidden_layers=2)))
    ids = _calib(16, 32)  # what _prune calibrates on
    result = _prune(model, ratio=0.5, schedule="uniform", hessian_dtype="float64")
    slim, rec = result.model, result.record
    d, S = model.config.head_dim, ids.shape[1]
    mask = torch.full((S, S), float("-inf")).triu(1)[None, None]
    layer_inputs = []
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, a, k: layer_inputs.append(k.get("hidden_states", a[0] if a else None)), with_kwargs=True
        )
        for layer in slim.model.layers
    ]
    slim(ids)
    for h in hooks:
        h.remove()
    pos = model.model.rotary_emb(layer_inputs[0], torch.arange(S)[None])
    for i, (dense, new, x) in enumerate(zip(model.model.layers, slim.model.layers, layer_inputs)):
        captured = {}
        hook = dense.self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("o", a[0]))
        dense.self_attn(hidden_states=dense.input_layernorm(x), position_embeddings=pos, attention_mask=mask)
        hook.remove()
        h = x + new.self_attn(hidden_states=new.input_layernorm(x), position_embeddings=pos, attention_mask=mask)[0]
        y = dense.post_attention_layernorm(h)
        checks = [
            (
                dense.self_attn.o_proj.weight,
                captured["o"],
                [q * d + t for q in rec["layers"][i]["kept_q_heads"] for t in range(d)],
                new.self_attn.o_proj.weight,
            ),
            (
                dense.mlp.down_proj.weight,
                dense.mlp.act_fn(dense.mlp.gate_proj(y)) * dense.mlp.up_proj(y),
                [int((dense.mlp.gate_proj.weight == row).all(dim=1).nonzero()) for row in new.mlp.gate_proj.weight],
                new.mlp.down_proj.weight,
            ),
        ]
        assert (
            len(checks[0][2]) < dense.self_attn.o_proj.in_features
            and len(checks[1][2]) < dense.mlp.down_proj.in_features
        )
        for W, X, K, W_new in checks:
            X = X.reshape(-1, X.shape[-1]).double()
            H = 2 / X.shape[0] * X.T @ X
            Hd = H + 0.01 * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
            expected = W.double() @ Hd[:, K] @ torch.linalg.inv(Hd[K][:, K])
            torch.testing.assert_close(W_new.double(), expected, rtol=1e-4, atol=1e-5)


def test_dead_ffn_channels_are_pruned_first_by_the_engine(tiny_model_dir_factory):
    """A channel whose gate and up rows are zero never fires; however large its down_proj column, it goes first."""
    model = _load(tiny_model_dir_factory("llama", seed=7, **dict(GQA, num_hidden_layers=2)))
    for layer in model.model.layers:
        layer.mlp.gate_proj.weight[5] = 0.0
        layer.mlp.up_proj.weight[5] = 0.0
        layer.mlp.down_proj.weight[:, 5] *= 1000.0  # its OBS score would be the largest without the dead-input rule
    slim = _prune(model, ratio=0.05, schedule="uniform").model
    for dense, new in zip(model.model.layers, slim.model.layers):
        assert new.mlp.down_proj.in_features < dense.mlp.down_proj.in_features  # some channels went
        assert (new.mlp.gate_proj.weight.abs().sum(dim=1) > 0).all()  # ... the dead one among them
