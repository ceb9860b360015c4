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

Every function here is a function of its tensor arguments, with no module state. The greedy
loops (`obs_remove_`, and the loops with `inplace=True`) overwrite the W and Hinv they are
handed, to keep the device peak at about 4 H (guards.obs_step_peak); the other entry points
return new tensors. All work stays on W's device.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

HESSIAN_DTYPE = torch.float32
MAX_DAMP_RETRIES = 6
# In-loop factorizations (blocks of Hinv, which is positive definite up to rounding) that fail
# are retried with this much damping (relative to the mean diagonal), x10 per retry.
LOOP_DAMP = 1e-6


def accumulate_hessian(H: torch.Tensor, n: int, X: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold a batch of inputs into the running H = 2/n * sum x x^T.

    X: [..., in] (any leading dims are samples), on H's device. Returns the new
    (H, n); H keeps its dtype (the Hessian precision), X is cast to it.
    """
    X = X.reshape(-1, X.shape[-1]).to(H.dtype)  # X: [m, in]
    m = X.shape[0]
    H = H * (n / (n + m))
    n = n + m
    X = X * math.sqrt(2.0 / n)
    return H.addmm_(X.T, X), n


def dampen(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (H + damp*I with dead inputs fixed, dead mask), both on H's device.

    Dead inputs (zero diagonal: the column never sees a non-zero input) get
    H_ii = 1 so H stays invertible; the caller zeroes their weights, which makes
    their OBS error 0, so they are pruned first.
    """
    H = H.clone()
    diag = H.diagonal()  # a view: writes go into H
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    diag.add_(percdamp * diag.abs().mean())
    return H, dead


def inverse_hessian(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Hinv of the dampened H, retrying with 10x more damping when H is not positive definite.

    Returns (Hinv, dead mask, damping used). Device memory: H, its dampened copy and
    the factor at once (the copy is freed before the inverse is formed).
    """
    damp = percdamp
    for _ in range(MAX_DAMP_RETRIES):
        Hd, dead = dampen(H, damp)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if int(info) == 0:
            return torch.cholesky_inverse(L), dead, damp
        log.warning("Hessian not positive definite at damping %.3g; retrying with %.3g", damp, damp * 10)
        damp *= 10
    raise torch.linalg.LinAlgError(f"Hessian not positive definite even at damping {damp / 10:.3g}")


def cholesky_retry(A: torch.Tensor, what: str) -> torch.Tensor:
    """Lower Cholesky factor of A [..., c, c], damping only the matrices whose factorization fails.

    A failed matrix gets LOOP_DAMP * mean|diag| added to its diagonal, x10 per retry,
    up to MAX_DAMP_RETRIES times; then LinAlgError naming `what`.
    """
    L, info = torch.linalg.cholesky_ex(A)
    damp = LOOP_DAMP
    for _ in range(MAX_DAMP_RETRIES):
        bad = info != 0  # [...]
        if not bool(bad.any()):
            return L
        log.warning("%s: Cholesky failed; retrying with relative damping %.3g", what, damp)
        diag = A.diagonal(dim1=-2, dim2=-1)  # [..., c]
        shift = damp * diag.abs().mean(dim=-1, keepdim=True) * bad.unsqueeze(-1)  # [..., 1]; 0 where it worked
        L, info = torch.linalg.cholesky_ex(A + torch.diag_embed(shift.expand_as(diag)))
        damp *= 10
    if bool((info != 0).any()):
        raise torch.linalg.LinAlgError(f"{what} is not positive definite even at relative damping {damp / 10:.3g}")
    return L


def obs_remove_(W: torch.Tensor, Hinv: torch.Tensor, S: torch.Tensor) -> float:
    """Remove the columns S jointly, in place: returns E_S.

    W [out, in] and Hinv [in, in] are overwritten (no full-size temporaries):
      Hinv_SS = L L^T,  A = L^-1 W_S^T [s, out],  B = L^-1 Hinv_S: [s, in]
      E_S   = ||A||^2                       = sum_rows w_S^T Hinv_SS^-1 w_S
      W    -= A^T B                         = W_S Hinv_SS^-1 Hinv_S:      (zeroes W[:, S])
      Hinv -= B^T B                         = Hinv_:S Hinv_SS^-1 Hinv_S:  (Schur complement)
    Rows/columns S of both are then set to exact zeros. S is on W's device (or the CPU).
    """
    L = cholesky_retry(Hinv[S][:, S], f"the inverse Hessian block of {S.numel()} pruned columns")  # [s, s]
    A = torch.linalg.solve_triangular(L, W[:, S].T, upper=False)  # [s, out]
    B = torch.linalg.solve_triangular(L, Hinv[S, :], upper=False)  # [s, in]
    err = float(A.pow(2).sum())
    W.addmm_(A.T, B, alpha=-1.0)
    Hinv.addmm_(B.T, B, alpha=-1.0)
    W[:, S] = 0.0
    Hinv[S, :] = 0.0
    Hinv[:, S] = 0.0
    return err


def obs_remove(W: torch.Tensor, Hinv: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Remove the columns S jointly: returns (W', Hinv', E_S) as new tensors (see `obs_remove_`).

    W' has W'[:, S] = 0 and the OBS update of every other column; Hinv' is the
    Schur complement (rows/columns S become 0).
    """
    W, Hinv = W.clone(), Hinv.clone()
    err = obs_remove_(W, Hinv, S)
    return W, Hinv, err


def group_errors(W: torch.Tensor, Hinv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """OBS error of removing each column group alone, all groups at once.

    groups: [G, c] column indices. Grouped Cholesky (Sec. 3.2): one batched
    Cholesky of the diagonal blocks [Hinv]_gg = L_g L_g^T, then
    E_g = ||L_g^-1 W_g^T||_F^2 = tr(W_g [Hinv]_gg^-1 W_g^T). Returns [G] on W's device.
    """
    blocks = Hinv[groups[:, :, None], groups[:, None, :]]  # [G, c, c]
    L = cholesky_retry(blocks, f"the inverse Hessian blocks of {groups.shape[0]} heads")
    Wg = W[:, groups].permute(1, 2, 0)  # [G, c, out]
    Y = torch.linalg.solve_triangular(L, Wg, upper=False)  # L^-1 W_g^T: [G, c, out]
    return Y.pow(2).sum(dim=(1, 2))


@dataclass(frozen=True)
class PruneOutcome:
    """What one pruning call decided: new weight, removed units/columns, OBS errors."""

    W: torch.Tensor  # [out, in]; removed columns are zero
    removed: list[int]  # removed unit (head/group) or column indices, in pruning order
    error: float  # sum of the OBS errors of every step
    group_sizes: tuple[int, ...] = ()  # units or columns removed at each step


def batched_greedy_pruning(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    units: torch.Tensor,
    buckets: list[list[int]],
    steps: int,
    *,
    compensate: bool = True,
    inplace: bool = False,
) -> PruneOutcome:
    """Batched Greedy Pruning of attention heads (SlimGPT Sec. 3.2).

    units: [U, c] column indices of each prunable unit (a head, or a KV group's
    heads). Each step scores every alive unit at once (`group_errors`), takes
    the lowest-error alive unit of every bucket, removes them jointly with the
    OBS update and repeats; `steps` steps remove `steps * len(buckets)` units.
    One bucket holding all units is plain greedy; one bucket per KV group
    removes the same number of query heads from every group.
    Ties go to the lower index, so results are deterministic.

    Devices: W, Hinv and the work stay on W's device; the unit errors come to the
    host once per step (a [U] vector) for the per-bucket choice. `inplace=True`
    overwrites W and Hinv instead of copying them (the memory-lean path).
    """
    dev = W.device
    W_in = W
    if not inplace:
        W, Hinv = W.clone(), Hinv.clone()
    elif not compensate:
        W_in = W.clone()
    units = units.to(dev)  # [U, c]
    alive = [True] * units.shape[0]
    removed: list[int] = []
    total = 0.0
    for _ in range(steps):
        idx = [u for u, a in enumerate(alive) if a]
        err = dict(zip(idx, group_errors(W, Hinv, units[idx]).cpu().tolist()))  # one transfer per step
        chosen = [min((u for u in bucket if alive[u]), key=lambda u: (err[u], u)) for bucket in buckets]
        total += obs_remove_(W, Hinv, units[chosen].flatten())
        for u in chosen:
            alive[u] = False
        removed.extend(chosen)
    W = W if compensate else W_in.clone()
    W[:, units[removed].flatten()] = 0.0  # exact zeros (later updates leave rounding residue)
    return PruneOutcome(W=W, removed=removed, error=total, group_sizes=(len(buckets),) * steps)


def dgs_group_size(remaining: int, group_fraction: float) -> int:
    """Dynamic Group Size: ceil(group_fraction * columns still to remove), at least 1."""
    return max(1, min(remaining, math.ceil(group_fraction * remaining)))


def dynamic_group_pruning(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    n_remove: int,
    *,
    group_fraction: float = 0.25,
    compensate: bool = True,
    inplace: bool = False,
) -> PruneOutcome:
    """OBS column pruning of FFN channels with Dynamic Group Size (SlimGPT Sec. 3.3).

    Scores every alive column q by E_q = sum_rows w_q^2 / [Hinv]_qq, removes
    the g lowest jointly with the OBS update, rescores. The group size g is
    ceil(group_fraction * columns still to remove): large groups while much
    remains (speed), single columns at the end (precision).

    Devices: everything stays on W's device; the chosen indices come to the host
    once per step. `inplace=True` overwrites W and Hinv (the memory-lean path).
    """
    W_in = W
    if not inplace:
        W, Hinv = W.clone(), Hinv.clone()
    elif not compensate:
        W_in = W.clone()
    alive = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)  # [in]
    tiny = torch.finfo(W.dtype).tiny
    removed: list[int] = []
    sizes: list[int] = []
    total = 0.0
    remaining = n_remove
    while remaining > 0:
        g = dgs_group_size(remaining, group_fraction)
        score = torch.linalg.vector_norm(W, dim=0).square_() / Hinv.diagonal().clamp_min(tiny)  # [in]
        score.masked_fill_(~alive, math.inf)
        S = torch.sort(score, stable=True).indices[:g]  # stable: ties go to the lower index
        total += obs_remove_(W, Hinv, S)
        alive[S] = False
        removed.extend(S.tolist())  # one transfer per step
        sizes.append(g)
        remaining -= g
    W = W if compensate else W_in.clone()
    W[:, removed] = 0.0  # exact zeros (later updates leave rounding residue)
    return PruneOutcome(W=W, removed=removed, error=total, group_sizes=tuple(sizes))


def select_lowest(scores: torch.Tensor, buckets: list[list[int]], per_bucket: int) -> list[int]:
    """One-shot selection for score-based baselines: the `per_bucket` lowest units of each bucket."""
    chosen: list[int] = []
    for bucket in buckets:
        ranked = sorted(bucket, key=lambda u: (float(scores[u]), u))
        chosen.extend(ranked[:per_bucket])
    return chosen
