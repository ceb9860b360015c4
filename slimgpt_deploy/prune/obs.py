"""Optimal Brain Surgeon for structured (column-group) pruning: the math of SlimGPT.

Notation (SlimGPT, Ling et al., NeurIPS 2024, Sec. 3; OBS/OBC before it):
  W     [out, in]   weight of the layer whose *input columns* are pruned
                    (o_proj: columns are heads' dims; down_proj: FFN channels)
  H     [in, in]    2/n * sum x x^T over the layer's calibration inputs
  Hinv  [in, in]    H^-1 (of the dampened H)
  S, K              pruned and kept column sets

Removing the columns S at the least increase of ||W X - W' X||^2 costs
    E_S = sum_rows w_S^T ([Hinv]_SS)^-1 w_S          (Sec. 3.1, eq. 3)
and is reached by the update of the kept columns
    W_K <- W_K - W_S ([Hinv]_SS)^-1 [Hinv]_SK          (eq. 4)
after which the inverse Hessian of the kept columns is the Schur complement
    Hinv_KK <- Hinv_KK - Hinv_KS ([Hinv]_SS)^-1 Hinv_SK,
so greedy steps chain exactly: for any final kept set K the result equals the
least-squares optimum W H[:, K] H[K, K]^-1.

Every function here is pure: tensors in, new tensors out.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

HESSIAN_DTYPE = torch.float32
MAX_DAMP_RETRIES = 6


def accumulate_hessian(H: torch.Tensor, n: int, X: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold a batch of inputs into the running H = 2/n * sum x x^T.

    X: [..., in] (any leading dims are samples). Returns the new (H, n);
    H keeps its dtype (the Hessian precision), X is cast to it.
    """
    X = X.reshape(-1, X.shape[-1]).to(H.dtype)  # X: [m, in]
    m = X.shape[0]
    H = H * (n / (n + m))
    n = n + m
    X = X * math.sqrt(2.0 / n)
    return H + X.T @ X, n


def dampen(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (H + damp*I with dead inputs fixed, dead mask).

    Dead inputs (zero diagonal: the column never sees a non-zero input) get
    H_ii = 1 so H stays invertible; the caller zeroes their weights, which makes
    their OBS error 0, so they are pruned first.
    """
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    diag = torch.arange(H.shape[0], device=H.device)
    H[diag, diag] += percdamp * torch.mean(torch.diag(H).abs())
    return H, dead


def inverse_hessian(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Hinv of the dampened H, retrying with 10x more damping when H is not positive definite.

    Returns (Hinv, dead mask, damping used).
    """
    damp = percdamp
    for _ in range(MAX_DAMP_RETRIES):
        Hd, dead = dampen(H, damp)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            return torch.cholesky_inverse(L), dead, damp
        log.warning("Hessian not positive definite at damping %.3g; retrying with %.3g", damp, damp * 10)
        damp *= 10
    raise torch.linalg.LinAlgError(f"Hessian not positive definite even at damping {damp / 10:.3g}")


def obs_remove(
    W: torch.Tensor, Hinv: torch.Tensor, S: torch.Tensor, *, compensate: bool = True
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Remove the columns S jointly: returns (W', Hinv', E_S).

    W' has W'[:, S] = 0 and, if `compensate`, the OBS update of every other
    column; Hinv' is the Schur complement (rows/columns S become 0).
    """
    Hinv_SS = Hinv[S][:, S]  # [s, s]
    L = torch.linalg.cholesky(Hinv_SS)
    Hinv_SS_inv = torch.cholesky_inverse(L)  # ([Hinv]_SS)^-1
    W_S = W[:, S]  # [out, s]
    coef = W_S @ Hinv_SS_inv  # [out, s]
    err = float((coef * W_S).sum())
    if compensate:
        W = W - coef @ Hinv[S, :]  # W_K -= W_S ([Hinv]_SS)^-1 [Hinv]_SK; zeroes W[:, S]
    else:
        W = W.clone()
    W[:, S] = 0.0
    Hinv = Hinv - Hinv[:, S] @ (Hinv_SS_inv @ Hinv[S, :])
    Hinv = 0.5 * (Hinv + Hinv.T)
    return W, Hinv, err


def group_errors(W: torch.Tensor, Hinv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """OBS error of removing each column group alone, all groups at once.

    groups: [G, c] column indices. Grouped Cholesky (Sec. 3.2): one batched
    Cholesky of the diagonal blocks [Hinv]_gg = L_g L_g^T, then
    E_g = ||L_g^-1 W_g^T||_F^2 = tr(W_g [Hinv]_gg^-1 W_g^T). Returns [G].
    """
    blocks = Hinv[groups[:, :, None], groups[:, None, :]]  # [G, c, c]
    L = torch.linalg.cholesky(blocks)
    Wg = W[:, groups].permute(1, 2, 0)  # [G, c, out]
    Y = torch.linalg.solve_triangular(L, Wg, upper=False)  # L^-1 W_g^T: [G, c, out]
    return Y.pow(2).sum(dim=(1, 2))


@dataclass(frozen=True)
class PruneOutcome:
    """What one pruning call decided: new weight, removed units/columns, OBS errors."""

    W: torch.Tensor  # [out, in]; removed columns are zero
    removed: list[int]  # removed unit (head/group) or column indices, in pruning order
    error: float  # sum of the OBS errors of every step


def batched_greedy_pruning(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    units: torch.Tensor,
    buckets: list[list[int]],
    steps: int,
    *,
    compensate: bool = True,
) -> PruneOutcome:
    """Batched Greedy Pruning of attention heads (SlimGPT Sec. 3.2).

    units: [U, c] column indices of each prunable unit (a head, or a KV group's
    heads). Each step scores every alive unit at once (`group_errors`), takes
    the lowest-error alive unit of every bucket, removes them jointly with the
    OBS update and repeats; `steps` steps remove `steps * len(buckets)` units.
    One bucket holding all units is plain greedy; one bucket per KV group
    removes the same number of query heads from every group.
    Ties go to the lower index, so results are deterministic.
    """
    alive = torch.ones(units.shape[0], dtype=torch.bool)
    removed: list[int] = []
    total = 0.0
    W_out = W
    for _ in range(steps):
        idx = torch.nonzero(alive).flatten()
        err = torch.full((units.shape[0],), math.inf, dtype=W.dtype)
        err[idx] = group_errors(W, Hinv, units[idx])
        chosen = [min((u for u in bucket if alive[u]), key=lambda u: (float(err[u]), u)) for bucket in buckets]
        S = units[chosen].flatten()
        W, Hinv, e = obs_remove(W, Hinv, S, compensate=True)
        total += e
        alive[chosen] = False
        removed.extend(chosen)
    W = W.clone() if compensate else W_out.clone()
    W[:, units[removed].flatten()] = 0.0  # exact zeros (later updates leave rounding residue)
    return PruneOutcome(W=W, removed=removed, error=total)


def dynamic_group_pruning(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    n_remove: int,
    *,
    group_fraction: float = 0.25,
    compensate: bool = True,
) -> PruneOutcome:
    """OBS column pruning of FFN channels with Dynamic Group Size (SlimGPT Sec. 3.3).

    Scores every alive column q by E_q = sum_rows w_q^2 / [Hinv]_qq, removes
    the g lowest jointly with the OBS update, rescores. The group size g is
    ceil(group_fraction * columns still to remove): large groups while much
    remains (speed), single columns at the end (precision).
    """
    alive = torch.ones(W.shape[1], dtype=torch.bool)
    removed: list[int] = []
    total = 0.0
    W_orig = W
    remaining = n_remove
    while remaining > 0:
        g = max(1, min(remaining, math.ceil(group_fraction * remaining)))
        score = W.pow(2).sum(dim=0) / torch.diag(Hinv).clamp_min(torch.finfo(W.dtype).tiny)
        score[~alive] = math.inf
        # stable sort: ties go to the lower index
        S = torch.sort(score, stable=True).indices[:g]
        W, Hinv, e = obs_remove(W, Hinv, S, compensate=True)
        total += e
        alive[S] = False
        removed.extend(S.tolist())
        remaining -= g
    W = W.clone() if compensate else W_orig.clone()
    W[:, removed] = 0.0  # exact zeros (later updates leave rounding residue)
    return PruneOutcome(W=W, removed=removed, error=total)


def select_lowest(scores: torch.Tensor, buckets: list[list[int]], per_bucket: int) -> list[int]:
    """One-shot selection for score-based baselines: the `per_bucket` lowest units of each bucket."""
    chosen: list[int] = []
    for bucket in buckets:
        ranked = sorted(bucket, key=lambda u: (float(scores[u]), u))
        chosen.extend(ranked[:per_bucket])
    return chosen
