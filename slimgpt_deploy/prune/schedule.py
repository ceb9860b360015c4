"""Per-layer pruning budgets: ratio schedules and integer layer plans.

`--ratio` is the share of decoder-layer parameters (attention + MLP) removed.
A schedule spreads it over depth (SlimGPT Sec. 3.4, Incremental Pruning Ratio:
r_i = r_min + (r_max - r_min) * log(1 + i) / log(L), r_min = r_max / 4, with
r_max solved so the share removed equals the target). A plan turns each
layer's ratio into whole query heads, KV heads and FFN channels; the FFN, the
fine-grained part, absorbs the rounding of the heads so every layer and the
model as a whole land on target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import BadInputError
from ..layout import LayerShape, heads_aligned

MAX_LAYER_RATIO = 0.95
R_MIN_OVER_R_MAX = 0.25
# Heads are cut at this share of a layer's ratio, the FFN takes the rest (SlimGPT: 1.0). Measured on SmolLM2-135M:
# 20%, WikiText-2 PPL@2048 34.2 -> 28.6 (self-calibration), 23.9 -> 22.6 (WikiText calibration); 50%, 86.2 -> 62.1
# (benchmarks/results/self_calibration.md, docs/DESIGN.md "Incremental Pruning Ratio and the layer plan").
DEFAULT_HEAD_SHARE = 0.5


@dataclass(frozen=True)
class LayerPlan:
    """Target shape of one layer after pruning."""

    q_heads: int
    kv_heads: int
    ffn: int
    ratio: float  # the schedule's ratio for this layer


def _log_shape(i: int, L: int) -> float:
    return math.log(1 + i) / math.log(L) if L > 1 else 1.0


def _linear_shape(i: int, L: int) -> float:
    return i / (L - 1) if L > 1 else 1.0


INCREASING_SHAPES = {"log": _log_shape, "linear": _linear_shape}
SCHEDULES = ("uniform", "log", "linear", "list")


def layer_ratios(
    schedule: str,
    ratio: float,
    weights: list[int],
    explicit: tuple[float, ...] | None = None,
    dense_last: int = 0,
) -> list[float]:
    """Each layer's target ratio; `weights` are the layers' dense parameter counts.

    For `log` and `linear`, r_i = r_max * (1/4 + 3/4 * shape(i)) capped at
    MAX_LAYER_RATIO, with r_max found by bisection so the weighted mean is `ratio`.
    `dense_last` layers at the end are left dense: the schedule runs over the
    layers before them, with the ratio that removes the same parameters.
    """
    L = len(weights)
    if schedule == "list":
        if explicit is None or len(explicit) != L:
            got = 0 if explicit is None else len(explicit)
            raise BadInputError(f"--layer-ratios has {got} values but the model has {L} layers; give one per layer")
        return [float(r) for r in explicit]
    if dense_last:
        span = L - dense_last
        if span < 1:
            raise BadInputError(
                f"--dense-last {dense_last} leaves no layer to prune in a model of {L} layers; give at most {L - 1}"
            )
        inner = ratio * sum(weights) / sum(weights[:span])
        if inner > MAX_LAYER_RATIO:
            raise BadInputError(
                f"--ratio {ratio} with --dense-last {dense_last} would take {inner:.0%} of each of the other {span} "
                f"layers (at most {MAX_LAYER_RATIO:.0%}); lower --ratio or --dense-last"
            )
        return layer_ratios(schedule, inner, weights[:span]) + [0.0] * dense_last
    if schedule == "uniform":
        return [ratio] * L
    if schedule not in INCREASING_SHAPES:
        raise BadInputError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    shape = INCREASING_SHAPES[schedule]
    base = [R_MIN_OVER_R_MAX + (1 - R_MIN_OVER_R_MAX) * shape(i, L) for i in range(L)]
    total = sum(weights)

    def mean_at(r_max: float) -> float:
        return sum(min(r_max * b, MAX_LAYER_RATIO) * w for b, w in zip(base, weights)) / total

    if ratio == 0:
        return [0.0] * L
    hi = ratio / min(base)
    if mean_at(hi) < ratio - 1e-9:
        raise BadInputError(f"ratio {ratio} is not reachable with the {schedule} schedule; use --schedule uniform")
    lo = 0.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_at(mid) < ratio else (lo, mid)
    return [min(hi * b, MAX_LAYER_RATIO) for b in base]


KV_GROUP, PER_GROUP = "kv-group", "per-group"  # the GQA modes: head_units says what each prunes
GQA_MODES = (KV_GROUP, PER_GROUP)


def head_units(shape: LayerShape, gqa_mode: str) -> tuple[int, int]:
    """(units, query heads per unit) for a GQA mode.

    kv-group: a unit is a KV head with its query heads (removes K/V too).
    per-group: a unit is one query head *in every KV group* (K/V all kept).
    Without GQA (one query head per KV head) both are whole heads with K/V.
    """
    if gqa_mode == PER_GROUP and shape.q_per_kv > 1:
        return shape.q_per_kv, shape.kv_heads
    return shape.kv_heads, shape.q_per_kv


def effective_gqa_mode(shape: LayerShape, gqa_mode: str) -> str:
    return PER_GROUP if gqa_mode == PER_GROUP and shape.q_per_kv > 1 else KV_GROUP


def _heads_after(shape: LayerShape, gqa_mode: str, removed_units: int) -> tuple[int, int]:
    if effective_gqa_mode(shape, gqa_mode) == PER_GROUP:
        return shape.kv_heads * (shape.q_per_kv - removed_units), shape.kv_heads
    kv = shape.kv_heads - removed_units
    return kv * shape.q_per_kv, kv


def _head_drop(shape: LayerShape, gqa_mode: str, r: float, multiple: int, layer: int) -> int:
    """Units to remove: nearest to r * units among those leaving aligned head counts (one unit kept)."""
    units, _ = head_units(shape, gqa_mode)
    allowed = [d for d in range(units) if heads_aligned(*_heads_after(shape, gqa_mode, d), multiple)]
    if not allowed:
        raise BadInputError(
            f"layer {layer} ({shape.q_heads} query / {shape.kv_heads} KV heads, "
            f"GQA mode {effective_gqa_mode(shape, gqa_mode)}) "
            f"has no head count that is a multiple of {multiple}; lower --head-multiple/--tp-size"
            + (f" or try --gqa-mode {KV_GROUP}" if gqa_mode == PER_GROUP else "")
        )
    return min(allowed, key=lambda d: (abs(d - r * units), d))


def plan_layers(
    shapes: list[LayerShape],
    ratios: list[float],
    gqa_mode: str,
    head_multiple: int = 1,
    ffn_multiple: int = 1,
    *,
    head_share: float = DEFAULT_HEAD_SHARE,
) -> list[LayerPlan]:
    """Whole heads and channels per layer, landing on the ratios in parameter count.

    Heads: the number of units removed nearest to head_share * r_i * units whose query and KV
    head counts are multiples of `head_multiple` (see `heads_aligned`), at least
    one unit kept. FFN: as many channels, in steps of `ffn_multiple`, as bring the
    layer to r_i of its parameters (at least one step kept). Then the leftover of
    the whole model's target, from rounding, is spread over the layers' FFNs one
    step at a time -- alignment is part of the decision, never padding afterwards.
    """
    if gqa_mode not in GQA_MODES:
        raise BadInputError(f"unknown GQA mode {gqa_mode!r}; choose one of {', '.join(GQA_MODES)}")
    if head_multiple < 1 or ffn_multiple < 1:
        raise BadInputError("--head-multiple and --ffn-multiple must be at least 1")
    assert 0.0 <= head_share <= 1.0, head_share
    plans: list[LayerPlan] = []
    for i, (shape, r) in enumerate(zip(shapes, ratios)):
        cap = shape.ffn // ffn_multiple * ffn_multiple  # the widest aligned FFN
        if cap < ffn_multiple:
            raise BadInputError(
                f"layer {i} has FFN width {shape.ffn}, less than --ffn-multiple {ffn_multiple}; lower it"
            )
        q, kv = _heads_after(shape, gqa_mode, _head_drop(shape, gqa_mode, head_share * r, head_multiple, i))
        want_removed = r * shape.params()
        attn_removed = shape.attn_params(shape.q_heads, shape.kv_heads) - shape.attn_params(q, kv)
        keep = shape.ffn - (want_removed - attn_removed) / shape.mlp_params(1)  # exact channels to keep
        f = min(max(round(keep / ffn_multiple) * ffn_multiple, ffn_multiple), cap)
        plans.append(LayerPlan(q_heads=q, kv_heads=kv, ffn=f, ratio=r))
    # Spread the model-wide rounding leftover over the FFNs, one step at a time.
    target = sum(r * s.params() for s, r in zip(shapes, ratios))
    removed = sum(s.params() - s.params(p.q_heads, p.kv_heads, p.ffn) for s, p in zip(shapes, plans))
    per_step = shapes[0].mlp_params(ffn_multiple) if shapes else 1
    leftover = round((target - removed) / per_step)
    step = ffn_multiple if leftover > 0 else -ffn_multiple
    leftover *= ffn_multiple
    order = list(range(len(plans)))[::-1]  # deeper layers first: they tolerate pruning best
    while leftover != 0:
        moved = False
        for i in order:
            if leftover == 0:
                break
            p, s = plans[i], shapes[i]
            f = p.ffn - step
            if ffn_multiple <= f <= s.ffn // ffn_multiple * ffn_multiple and p.ratio > 0:
                plans[i] = LayerPlan(p.q_heads, p.kv_heads, f, p.ratio)
                leftover -= step
                moved = True
        if not moved:
            break
    return plans


def achieved_share(shapes: list[LayerShape], plans: list[LayerPlan]) -> float:
    """Share of decoder-layer parameters the plans remove."""
    dense = sum(s.params() for s in shapes)
    kept = sum(s.params(p.q_heads, p.kv_heads, p.ffn) for s, p in zip(shapes, plans))
    return 1.0 - kept / dense
