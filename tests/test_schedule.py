"""Ratio schedules and integer layer plans."""

import pytest

from slimgpt_deploy.errors import BadInputError
from slimgpt_deploy.prune.schedule import LayerShape, achieved_share, layer_ratios, plan_layers

SMOLLM2 = [LayerShape(q_heads=9, kv_heads=3, ffn=1536, head_dim=64, hidden=576)] * 30
LLAMA7B = [LayerShape(q_heads=32, kv_heads=32, ffn=11008, head_dim=128, hidden=4096)] * 32


def test_log_schedule_is_incremental_and_hits_the_mean():
    r = layer_ratios("log", 0.2, [s.params() for s in LLAMA7B])
    assert r == sorted(r)
    assert r[0] == pytest.approx(r[-1] / 4)
    assert sum(r) / len(r) == pytest.approx(0.2)
    # LLaMA-7B's 32 layers average 20% at r_min ~ 6.25%, r_max ~ 25%
    # (docs/DESIGN.md, "Incremental Pruning Ratio and the layer plan")
    assert r[-1] == pytest.approx(0.25, abs=0.003)


@pytest.mark.parametrize("schedule", ["uniform", "log", "linear"])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.2, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("mode", ["kv-group", "per-group"])
def test_plans_land_within_one_point(schedule, ratio, mode):
    for shapes in (SMOLLM2, LLAMA7B):
        plans = plan_layers(shapes, layer_ratios(schedule, ratio, [s.params() for s in shapes]), mode)
        assert abs(achieved_share(shapes, plans) - ratio) < 0.01
        for s, p in zip(shapes, plans):
            assert p.q_heads >= 1 and p.kv_heads >= 1 and p.ffn >= 1
            assert p.q_heads % p.kv_heads == 0
            if mode == "per-group" and s.q_per_kv > 1:
                assert p.kv_heads == s.kv_heads


def test_kv_group_mode_removes_whole_groups():
    plans = plan_layers(SMOLLM2, [0.5] * 30, "kv-group")
    assert all(p.q_heads == 3 * p.kv_heads for p in plans)


def test_explicit_list_must_match_depth():
    with pytest.raises(BadInputError, match="3 values but the model has 30 layers"):
        layer_ratios("list", 0.2, [1] * 30, (0.1, 0.2, 0.3))
    assert layer_ratios("list", 0.0, [1] * 3, (0.1, 0.2, 0.3)) == [0.1, 0.2, 0.3]


def test_ratio_zero_keeps_everything():
    plans = plan_layers(SMOLLM2, layer_ratios("log", 0.0, [1] * 30), "per-group")
    assert all((p.q_heads, p.kv_heads, p.ffn) == (9, 3, 1536) for p in plans)


LLAMA3_8B = [LayerShape(q_heads=32, kv_heads=8, ffn=14336, head_dim=128, hidden=4096)] * 32


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.5])
@pytest.mark.parametrize(
    "shapes, mode, heads, ffn",
    [
        (LLAMA7B, "kv-group", 8, 128),  # TP 8 on GPUs, FFN in 128-channel tiles
        (LLAMA3_8B, "per-group", 4, 64),  # GQA: query heads in every group, 8 KV heads kept
        (LLAMA3_8B, "kv-group", 2, 2),  # whole KV groups, TP 2
        (SMOLLM2, "per-group", 3, 64),
        (SMOLLM2, "kv-group", 2, 2),  # 3 KV heads: TP 2 needs 2 (or 1) KV heads
    ],
)
def test_aligned_plans_divide_and_still_land_on_target(ratio, shapes, mode, heads, ffn):
    plans = plan_layers(shapes, layer_ratios("log", ratio, [s.params() for s in shapes]), mode, heads, ffn)
    for p in plans:
        assert p.q_heads % heads == 0, p
        assert p.kv_heads % heads == 0 or heads % p.kv_heads == 0, p
        assert p.ffn % ffn == 0 and p.ffn >= ffn, p
        assert p.q_heads % p.kv_heads == 0
    assert abs(achieved_share(shapes, plans) - ratio) < 0.01


def test_alignment_that_no_head_count_meets_is_refused():
    with pytest.raises(BadInputError, match="no head count that is a multiple of 2.*--gqa-mode kv-group"):
        plan_layers(SMOLLM2, [0.2] * 30, "per-group", head_multiple=2)
    with pytest.raises(BadInputError, match="less than --ffn-multiple 2048"):
        plan_layers(SMOLLM2, [0.2] * 30, "per-group", ffn_multiple=2048)
    # A width the dense FFN is not a multiple of is fine: the plan keeps a multiple of it.
    assert all(p.ffn % 100 == 0 for p in plan_layers(SMOLLM2, [0.2] * 30, "per-group", ffn_multiple=100))


def test_no_layer_ends_with_zero_heads_or_channels_even_at_the_extremes():
    """vLLM cannot build a layer with 0 heads or 0 FFN channels, so no plan ever asks for one."""
    for shapes in (SMOLLM2, LLAMA7B, LLAMA3_8B):
        for mode in ("kv-group", "per-group"):
            for multiple in (1, 2):
                try:
                    plans = plan_layers(shapes, [0.95] * len(shapes), mode, multiple, multiple)
                except BadInputError:
                    continue
                assert all(p.q_heads >= 1 and p.kv_heads >= 1 and p.ffn >= multiple for p in plans)


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_head_share_moves_the_budget_from_heads_to_the_ffn(ratio):
    """head_share scales the ratio the heads are cut at; the FFN takes the rest, and the model still lands on target."""
    ratios = layer_ratios("log", ratio, [s.params() for s in LLAMA7B])
    full, half, none = (plan_layers(LLAMA7B, ratios, "kv-group", head_share=h) for h in (1.0, 0.5, 0.0))
    assert all(p.q_heads == 32 and p.kv_heads == 32 for p in none)
    for a, b in zip(full, half):
        assert a.q_heads <= b.q_heads and a.ffn >= b.ffn
    # heads nearest to head_share * r_i * units (32 units: fine enough to see the halving)
    assert [32 - p.q_heads for p in half] == [min(range(32), key=lambda d: (abs(d - 0.5 * r * 32), d)) for r in ratios]
    for plans in (full, half, none):
        assert abs(achieved_share(LLAMA7B, plans) - ratio) < 0.01
    assert plan_layers(LLAMA7B, ratios, "kv-group") == half  # the default, the same one PruneConfig uses


def test_head_share_outside_zero_one_is_refused():
    from slimgpt_deploy.config import PruneConfig

    with pytest.raises(BadInputError, match="head share 1.5 must be in \\[0, 1\\]"):
        PruneConfig(head_share=1.5)


def test_head_share_reaches_the_prune_config_from_the_build_file_and_flags():
    from slimgpt_deploy.build import build_options
    from slimgpt_deploy.prune.schedule import DEFAULT_HEAD_SHARE

    assert build_options({}, {}).prune.head_share == DEFAULT_HEAD_SHARE == 0.5  # one default for config and plans
    assert build_options({"prune.head_share": 1.0}, {}).prune.head_share == 1.0
    assert build_options({"prune.head_share": 1.0}, {"prune.head_share": 0.0}).prune.head_share == 0.0  # flags win
    with pytest.raises(BadInputError, match="prune.head_share"):
        build_options({}, {"prune.head_share": "half"})  # a YAML value is checked the same way when the file is read


@pytest.mark.parametrize("schedule", ["uniform", "log", "linear"])
def test_dense_last_layers_keep_everything_and_the_others_take_the_share(schedule):
    weights = [s.params() for s in SMOLLM2]
    r = layer_ratios(schedule, 0.2, weights, dense_last=2)
    assert r[-2:] == [0.0, 0.0] and min(r[:-2]) > 0
    assert r[:-2] == pytest.approx(layer_ratios(schedule, 0.2 * 30 / 28, weights[:28]))  # the schedule over 28 layers
    plans = plan_layers(SMOLLM2, r, "per-group", head_share=0.0)
    assert abs(achieved_share(SMOLLM2, plans) - 0.2) < 0.01  # the same parameters removed
    assert [(p.q_heads, p.ffn) for p in plans[-2:]] == [(9, 1536)] * 2


def test_dense_last_is_checked():
    from slimgpt_deploy.config import PruneConfig

    with pytest.raises(BadInputError, match="--dense-last 3 leaves no layer to prune in a model of 3 layers"):
        layer_ratios("log", 0.2, [1] * 3, dense_last=3)
    with pytest.raises(BadInputError, match="would take 180% of each of the other 1 layers"):
        layer_ratios("uniform", 0.9, [1] * 2, dense_last=1)
    with pytest.raises(BadInputError, match="--dense-last and --layer-ratios both decide"):
        PruneConfig(dense_last=1, layer_ratios=(0.1, 0.2))
    with pytest.raises(BadInputError, match="--dense-last -1 must be 0 or more"):
        PruneConfig(dense_last=-1)
    assert PruneConfig().dense_last == 0  # SlimGPT's plan over every layer unless asked
    assert layer_ratios("log", 0.2, [1] * 3) == layer_ratios("log", 0.2, [1] * 3, dense_last=0)


def test_dense_last_reaches_the_prune_config_from_the_build_file_and_flags():
    from slimgpt_deploy.build import build_options

    assert build_options({}, {}).prune.dense_last == 0
    assert build_options({"prune.dense_last": 2}, {}).prune.dense_last == 2
    assert build_options({"prune.dense_last": 2}, {"prune.dense_last": 1}).prune.dense_last == 1  # flags win
    with pytest.raises(BadInputError, match="prune.dense_last"):
        build_options({}, {"prune.dense_last": "two"})
