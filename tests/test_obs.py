"""The OBS math against closed forms, on small random tensors (float64)."""

import pytest
import torch

from slimgpt_deploy.prune.obs import (
    accumulate_hessian,
    batched_greedy_pruning,
    dampen,
    dynamic_group_pruning,
    group_errors,
    inverse_hessian,
    obs_remove,
)


@pytest.fixture(autouse=True)
def float64():
    """The closed forms are checked in float64; restore the default afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _problem(out=6, inp=12, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, inp, generator=g) @ torch.randn(inp, inp, generator=g)  # correlated inputs
    W = torch.randn(out, inp, generator=g)
    H, _ = accumulate_hessian(torch.zeros(inp, inp), 0, X)
    return W, H, X


def _least_squares(W, H, K):
    """argmin over W' supported on K of tr((W' - W) H (W' - W)^T): W' = W H[:, K] H[K, K]^-1."""
    return W @ H[:, K] @ torch.linalg.inv(H[K][:, K])


def test_accumulated_hessian_is_2_over_n_xxt():
    W, H, X = _problem()
    H2, n = torch.zeros_like(H), 0
    for chunk in X.split(37):
        H2, n = accumulate_hessian(H2, n, chunk)
    assert n == X.shape[0]
    torch.testing.assert_close(H2, 2 / X.shape[0] * X.T @ X)


def test_head_groups_update_equals_least_squares():
    W, H, _ = _problem(inp=12)
    Hd, _ = dampen(H, 0.01)
    Hinv, _, _ = inverse_hessian(H, 0.01)
    units = torch.arange(12).reshape(4, 3)  # 4 heads of head_dim 3
    out = batched_greedy_pruning(W, Hinv, units, [list(range(4))], steps=2)
    K = [c for c in range(12) if c not in set(units[out.removed].flatten().tolist())]
    torch.testing.assert_close(out.W[:, K], _least_squares(W, Hd, K))
    assert out.W[:, units[out.removed].flatten()].abs().max() == 0


def test_single_columns_update_equals_least_squares():
    W, H, _ = _problem(inp=16, seed=1)
    Hd, _ = dampen(H, 0.01)
    Hinv, _, _ = inverse_hessian(H, 0.01)
    out = dynamic_group_pruning(W, Hinv, 7, group_fraction=0.5)
    assert len(set(out.removed)) == 7
    K = [c for c in range(16) if c not in set(out.removed)]
    torch.testing.assert_close(out.W[:, K], _least_squares(W, Hd, K))


def test_grouped_cholesky_errors_equal_brute_force():
    W, H, _ = _problem(inp=12, seed=2)
    Hd, _ = dampen(H, 0.01)
    Hinv = torch.linalg.inv(Hd)
    units = torch.arange(12).reshape(4, 3)
    errs = group_errors(W, Hinv, units)
    for g in range(4):
        S = units[g]
        K = [c for c in range(12) if c not in set(S.tolist())]
        # closed form: tr(W_S ([Hinv]_SS)^-1 W_S^T)
        closed = torch.trace(W[:, S] @ torch.linalg.inv(Hinv[S][:, S]) @ W[:, S].T)
        # brute force: the least-squares residual of removing S
        Wp = torch.zeros_like(W)
        Wp[:, K] = _least_squares(W, Hd, K)
        dW = Wp - W
        brute = torch.trace(dW @ Hd @ dW.T)
        torch.testing.assert_close(errs[g], closed)
        torch.testing.assert_close(errs[g], brute)


def test_greedy_picks_lowest_error_head_first():
    W, H, _ = _problem(inp=12, seed=3)
    W[:, 6:9] *= 1e-3  # head 2 is nearly free to remove
    Hinv, _, _ = inverse_hessian(H, 0.01)
    out = batched_greedy_pruning(W, Hinv, torch.arange(12).reshape(4, 3), [list(range(4))], steps=1)
    assert out.removed == [2]


def test_per_bucket_greedy_removes_one_unit_from_every_bucket():
    W, H, _ = _problem(inp=12, seed=4)
    Hinv, _, _ = inverse_hessian(H, 0.01)
    units = torch.arange(12).reshape(6, 2)  # 6 query heads of dim 2, 2 KV groups of 3
    out = batched_greedy_pruning(W, Hinv, units, [[0, 1, 2], [3, 4, 5]], steps=2)
    assert sum(u < 3 for u in out.removed) == 2 and sum(u >= 3 for u in out.removed) == 2


def test_no_compensation_keeps_original_weights():
    W, H, _ = _problem(inp=12, seed=5)
    Hinv, _, _ = inverse_hessian(H, 0.01)
    comp = dynamic_group_pruning(W, Hinv, 4)
    plain = dynamic_group_pruning(W, Hinv, 4, compensate=False)
    assert comp.removed == plain.removed
    K = [c for c in range(12) if c not in set(plain.removed)]
    torch.testing.assert_close(plain.W[:, K], W[:, K])
    assert not torch.allclose(comp.W[:, K], W[:, K])


def test_dead_inputs_are_pruned_first():
    W, H, _ = _problem(inp=10, seed=6)
    H[3, :] = 0
    H[:, 3] = 0
    Hinv, dead, _ = inverse_hessian(H, 0.01)
    assert dead.tolist() == [i == 3 for i in range(10)]
    W = W.clone()
    W[:, dead] = 0
    out = dynamic_group_pruning(W, Hinv, 1)
    assert out.removed == [3]


def test_damping_retries_on_indefinite_hessian():
    _, H, _ = _problem(inp=8, n=3, seed=7)  # rank 3 of 8
    H = H - 0.05 * torch.diag(H).mean() * torch.eye(8)  # slightly indefinite, as rounding can make it
    Hinv, _, damp = inverse_hessian(H, 0.01)
    assert damp > 0.01
    assert torch.isfinite(Hinv).all()


def test_removal_order_does_not_change_the_result():
    W, H, _ = _problem(inp=12, seed=8)
    Hinv, _, _ = inverse_hessian(H, 0.01)
    a, Ha, _ = obs_remove(W, Hinv, torch.tensor([1, 5]))
    a, _, _ = obs_remove(a, Ha, torch.tensor([9]))
    b, _, _ = obs_remove(W, Hinv, torch.tensor([9, 1, 5]))
    torch.testing.assert_close(a, b)


def _loss(W, H, K):
    """Least-squares reconstruction loss of keeping only the columns K: tr(W H W^T) - tr(W H_:K H_KK^-1 H_K: W^T)."""
    return float(torch.trace(W @ H @ W.T) - torch.trace(W @ H[:, K] @ torch.linalg.inv(H[K][:, K]) @ H[K, :] @ W.T))


def test_every_greedy_head_step_is_the_exhaustive_best_and_errors_add_up():
    """4 heads of 3 columns, 2 steps: each step's choice minimises the true joint loss over the alive heads."""
    W, H, _ = _problem(inp=12, seed=9)
    Hd, _ = dampen(H, 0.01)
    Hinv, _, _ = inverse_hessian(H, 0.01)
    units = torch.arange(12).reshape(4, 3)
    out = batched_greedy_pruning(W, Hinv, units, [list(range(4))], steps=2)
    gone: list[int] = []
    for chosen in out.removed:
        alive = [u for u in range(4) if u not in gone]
        losses = {u: _loss(W, Hd, [c for v in alive if v != u for c in units[v].tolist()]) for u in alive}
        assert chosen == min(losses, key=losses.get)
        gone.append(chosen)
    K = [c for v in range(4) if v not in gone for c in units[v].tolist()]
    assert out.error == pytest.approx(_loss(W, Hd, K), rel=1e-8)  # sum of OBS errors == loss of the final kept set


@pytest.mark.parametrize("n_remove", [1, 2, 5, 9, 11])
def test_dynamic_group_sizes_never_grow_and_end_at_one(n_remove):
    W, H, _ = _problem(inp=12, seed=10)
    Hinv, _, _ = inverse_hessian(H, 0.01)
    sizes = dynamic_group_pruning(W, Hinv, n_remove).group_sizes
    assert sum(sizes) == n_remove
    assert all(a >= b for a, b in zip(sizes, sizes[1:]))
    assert sizes[-1] == 1
