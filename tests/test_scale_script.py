"""benchmarks/scale.py: the cost model's features, fit and predictions, and its timed engine run on a tiny model."""

import json
import math

import pytest
import torch
from helpers import load_benchmark


@pytest.fixture(scope="module")
def scale():
    return load_benchmark("scale.py", "scale_bench")


def test_shapes_have_the_public_parameter_counts(scale):
    # Parameter counts the checkpoints publish: the shapes in the script are the real ones.
    expected = {
        "smollm2-135m": 134.5e6,
        "smollm2-360m": 361.8e6,
        "qwen2.5-0.5b": 494e6,
        "llama-3.2-1b": 1.236e9,
        "qwen2.5-1.5b": 1.544e9,
        "llama-2-7b": 6.74e9,
        "llama-2-13b": 13.0e9,
        "llama-3-70b": 70.6e9,
    }
    for name, shape in {**scale.SHAPES, **scale.PREDICT_SHAPES}.items():
        assert scale.param_count(shape) == pytest.approx(expected[name], rel=0.01), name


def test_param_count_matches_transformers(scale):
    tiny = dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        tie_word_embeddings=False,
    )
    model = scale.build_model(tiny)
    assert scale.param_count(tiny) == sum(p.numel() for p in model.parameters())


def test_layer_features_by_hand(scale):
    g = scale.LayerGeometry(hidden=8, q_heads=4, kv_heads=2, head_dim=2, ffn=16)
    f = scale.layer_features(g, n_tokens=10, seqlen=5)
    assert f["hessian"] == 10 * (8**2 + 16**2)
    assert f["obs"] == 8**3 + 16**3
    attn = 8 * 8 * 2 + 8 * 4 * 2  # q, o; k, v
    assert f["forward"] == 2 * 10 * (2 * attn + 2 * 2 * 8 * 16 + 8 * 16) + 8 * 10 * 5 * 8


def test_fit_recovers_known_coefficients(scale):
    truth = scale.CostModel(a=2e-11, b=3e-10, c=5e-12)
    points = []
    for hidden, ffn, n in [(64, 256, 1000), (128, 512, 1000), (256, 1024, 4000), (512, 1536, 2000), (128, 512, 16000)]:
        feats = scale.layer_features(scale.LayerGeometry(hidden, hidden // 32, hidden // 64, 32, ffn), n, 256)
        parts = truth.layer_seconds(feats)
        points.append({"features": feats, "seconds": {k: parts[k] for k in ("hessian", "obs", "forward")}})
    fit = scale.fit_cost_model(points)
    assert (fit.a, fit.b, fit.c) == pytest.approx((truth.a, truth.b, truth.c), rel=1e-9)


def test_fit_weighs_relative_errors(scale):
    # One point 1000x larger must not decide the fit alone: times 2x and 0.5x the model fit to 1x.
    k = scale.fit_through_origin([1.0, 1000.0], [2.0, 500.0])
    assert 0.5 < k < 2.0
    with pytest.raises(ValueError):
        scale.fit_through_origin([1.0], [0.0])


def test_dgs_steps_match_the_engine_schedule(scale):
    from slimgpt_deploy.prune.obs import dynamic_group_pruning

    W, H = torch.randn(6, 40, dtype=torch.float64), torch.eye(40, dtype=torch.float64)
    for n in (1, 13, 30):
        assert scale.dgs_steps(n) == len(dynamic_group_pruning(W, H, n).group_sizes)
    assert scale.dgs_steps(0) == 0


def test_predictions_cover_7b_13b_70b_and_grow(scale):
    rows = scale.predictions(scale.CostModel(a=1e-11, b=1e-10, c=1e-11))
    by = {(r["model"], r["nsamples"]): r for r in rows}
    assert {m for m, _ in by} == {"llama-2-7b", "llama-2-13b", "llama-3-70b"}
    t7, t70 = by["llama-2-7b", 128]["h200_s"], by["llama-3-70b", 128]["h200_s"]
    assert 0 < t7["total_activations_on_device"] < t70["total_activations_on_device"]
    assert t70["total_activations_on_host"] > t70["total_activations_on_device"]
    assert by["llama-2-7b", 128]["cpu_here_s"]["total"] > by["llama-2-7b", 64]["cpu_here_s"]["total"]
    removed = scale.removed_per_layer(scale.PREDICT_SHAPES["llama-3-70b"])
    assert len(removed) == 80 and all(q % 8 == 0 for q, _, _ in removed)  # per-group: same number from each of 8 groups


def test_timed_run_on_a_tiny_model(scale, monkeypatch):
    # The measuring child end to end on a tiny shape: every bucket timed, the times add up.
    tiny = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
        tie_word_embeddings=True,
        max_position_embeddings=64,
    )
    monkeypatch.setitem(scale.SHAPES, "tiny", tiny)
    import slimgpt_deploy.prune.engine as engine
    import slimgpt_deploy.prune.methods as methods

    for module, attr, _ in scale.INSTRUMENTED:  # the wrappers are undone after the test
        mod = {"slimgpt_deploy.prune.engine": engine, "slimgpt_deploy.prune.methods": methods}[module]
        monkeypatch.setattr(mod, attr, getattr(mod, attr))
    threads = torch.get_num_threads()
    try:
        row = scale.measure({"model": "tiny", "nsamples": 4, "seqlen": 16, "layers": 2})
    finally:
        torch.set_num_threads(threads)  # measure() runs on one thread; the rest of the session must not
    assert row["not_instrumented"] == []
    assert row["params"] > 0 and len(row["layer_seconds"]) == 2
    assert all(row["timers_s"][b] > 0 for b in ("hessian", "factorize", "obs_heads", "obs_ffn"))
    assert row["buckets_s"]["forward"] >= 0
    assert len(row["layer_cpu_seconds"]) == 2 and row["cpu_buckets_s"]["hessian"] > 0
    assert row["cpu_buckets_s"]["forward"] > -0.01  # the rest of the layers' CPU time (rounding aside)
    assert math.isclose(sum(row["buckets_s"].values()), row["prune_s"], rel_tol=1e-6)
    assert abs(row["ratio_achieved_decoder"] - 0.2) < 0.1
    assert row["peak_rss_bytes"] >= row["rss_after_build_bytes"] > 0
    assert row["engine_estimate_full_model_bytes"] >= row["engine_estimate_bytes"] > 0
    json.dumps(row)  # the parent reads it as JSON
