"""Pruning methods: which heads and FFN channels go, and the new output weights.

A registry from `--method` to a pair of pure decision functions. Every method
removes the same number of units per layer (the plan), so comparisons are honest:
  slimgpt         OBS selection and compensation (Batched Greedy Pruning, Dynamic Group Size)
  slimgpt-nocomp  the same selection, original weights kept (ablation of compensation)
  magnitude       lowest L2 norm of all the unit's weights, no update
  wanda-sp        lowest sum |W| * ||X|| over the unit's output-projection columns (An et al. / FLAP), no update
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..layout import LayerShape
from .fisher import OutputWeight
from .obs import batched_greedy_pruning, dynamic_group_pruning, inverse_hessian, select_lowest
from .schedule import PER_GROUP, effective_gqa_mode


@dataclass(frozen=True)
class HeadUnits:
    """How one layer's attention splits into prunable units (see schedule.head_units)."""

    mode: str  # effective GQA mode: "kv-group" or "per-group"
    columns: torch.Tensor  # [U, c] o_proj input columns of each unit
    buckets: list[list[int]]  # units pruned together: one per step from each bucket
    shape: LayerShape

    @classmethod
    def of(cls, shape: LayerShape, gqa_mode: str) -> "HeadUnits":
        d, g = shape.head_dim, shape.q_per_kv
        mode = effective_gqa_mode(shape, gqa_mode)
        if mode == PER_GROUP:
            columns = torch.arange(shape.q_heads * d).reshape(shape.q_heads, d)  # unit = one query head
            buckets = [list(range(k * g, (k + 1) * g)) for k in range(shape.kv_heads)]
        else:
            columns = torch.arange(shape.q_heads * d).reshape(shape.kv_heads, g * d)  # unit = one KV group
            buckets = [list(range(shape.kv_heads))]
        return cls(mode=mode, columns=columns, buckets=buckets, shape=shape)

    def steps(self, q_keep: int, kv_keep: int) -> int:
        """Greedy steps (units removed per bucket) to reach the planned head counts."""
        if self.mode == PER_GROUP:
            return self.shape.q_per_kv - q_keep // kv_keep
        return self.shape.kv_heads - kv_keep

    def kept_heads(self, removed: list[int]) -> tuple[list[int], list[int]]:
        """(kept query heads, kept KV heads), in order, so query head j uses KV head j // (q/kv)."""
        gone = set(removed)
        if self.mode == PER_GROUP:
            return [h for h in range(self.shape.q_heads) if h not in gone], list(range(self.shape.kv_heads))
        kv = [k for k in range(self.shape.kv_heads) if k not in gone]
        g = self.shape.q_per_kv
        return [k * g + j for k in kv for j in range(g)], kv


@dataclass(frozen=True)
class LayerStats:
    """What a method may look at for one projection: its weight and its input statistics."""

    W: torch.Tensor  # [out, in] output projection (o_proj or down_proj), Hessian dtype
    H: torch.Tensor  # [in, in] 2/n sum x x^T of its inputs
    percdamp: float
    unit_norms: (
        torch.Tensor
    )  # [in] per input column: squared norm of every weight tied to it (q/k/v rows or gate/up rows)
    # The loss's curvature in output space (prune/fisher.py), for the methods that weigh outputs by it; None: every
    # output dimension alike (SlimGPT's layer objective).
    output_weight: OutputWeight | None = None


@dataclass(frozen=True)
class Decision:
    removed: list[int]  # removed units (heads) or columns (FFN channels)
    W: torch.Tensor  # new full-size output weight; removed columns zero
    damping: float  # the damping used (0 where no inverse was needed)


def _hinv(stats: LayerStats) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(W to prune, H^-1, damping): W is R W under an output weight R^T R = G (undone by `_restored`)."""
    Hinv, dead, damp = inverse_hessian(stats.H, stats.percdamp)
    W = stats.W.clone() if stats.output_weight is None else stats.output_weight.apply(stats.W)
    W[:, dead] = 0.0  # dead inputs: zero error, pruned first
    return W, Hinv, damp


def _restored(stats: LayerStats, W: torch.Tensor) -> torch.Tensor:
    return W if stats.output_weight is None else stats.output_weight.restore(W)


def _obs_heads(compensate: bool):
    def heads(stats: LayerStats, units: HeadUnits, steps: int) -> Decision:
        W, Hinv, damp = _hinv(stats)
        out = batched_greedy_pruning(W, Hinv, units.columns, units.buckets, steps, compensate=compensate, inplace=True)
        return Decision(out.removed, _restored(stats, out.W), damp)

    return heads


def _obs_ffn(compensate: bool):
    def ffn(stats: LayerStats, n_remove: int, group_fraction: float) -> Decision:
        W, Hinv, damp = _hinv(stats)
        out = dynamic_group_pruning(
            W, Hinv, n_remove, group_fraction=group_fraction, compensate=compensate, inplace=True
        )
        return Decision(out.removed, _restored(stats, out.W), damp)

    return ffn


def _score_heads(column_score: Callable[[LayerStats], torch.Tensor]):
    def heads(stats: LayerStats, units: HeadUnits, steps: int) -> Decision:
        per_unit = column_score(stats)[units.columns].sum(dim=1)  # [U]
        removed = select_lowest(per_unit, units.buckets, steps)
        W = stats.W.clone()
        W[:, units.columns[removed].flatten()] = 0.0
        return Decision(removed, W, 0.0)

    return heads


def _score_ffn(column_score: Callable[[LayerStats], torch.Tensor]):
    def ffn(stats: LayerStats, n_remove: int, group_fraction: float) -> Decision:
        removed = select_lowest(column_score(stats), [list(range(stats.W.shape[1]))], n_remove)
        W = stats.W.clone()
        W[:, removed] = 0.0
        return Decision(removed, W, 0.0)

    return ffn


def magnitude_score(stats: LayerStats) -> torch.Tensor:
    """Squared L2 norm of every weight belonging to each input column (its output-projection column plus tied rows)."""
    return stats.W.pow(2).sum(dim=0) + stats.unit_norms


def wanda_score(stats: LayerStats) -> torch.Tensor:
    """Wanda-sp: sum over rows of |W_ij| * ||X_j|| (||X_j|| proportional to sqrt(H_jj))."""
    return stats.W.abs().sum(dim=0) * torch.diag(stats.H).clamp_min(0).sqrt()


@dataclass(frozen=True)
class Method:
    heads: Callable[[LayerStats, HeadUnits, int], Decision]
    ffn: Callable[[LayerStats, int, float], Decision]
    weighs_outputs: bool = False  # takes LayerStats.output_weight into account (`--fisher-samples`)


SLIMGPT = "slimgpt"  # the default method (PruneConfig.method)
METHODS: dict[str, Method] = {
    SLIMGPT: Method(_obs_heads(True), _obs_ffn(True), weighs_outputs=True),
    "slimgpt-nocomp": Method(_obs_heads(False), _obs_ffn(False), weighs_outputs=True),
    "magnitude": Method(_score_heads(magnitude_score), _score_ffn(magnitude_score)),
    "wanda-sp": Method(_score_heads(wanda_score), _score_ffn(wanda_score)),
}
