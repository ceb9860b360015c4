"""The loss's curvature in each pruned projection's output space: which output directions matter downstream.

SlimGPT's layer objective, ||(W' - W) X||^2, weighs every output dimension of o_proj / down_proj alike,
so removing input column j costs ||W[:, j]||^2 / [H^-1]_jj (obs.py). What the model's loss sees of that
error depends on the layers above: with g = dLoss / d(projection output) and the Kronecker-factored
(K-FAC, Martens & Grosse 2015) curvature E[x x^T] (x) G, G = E[g g^T], the second-order loss increase is
tr((W' - W) H (W' - W)^T G), and removing column j costs W[:, j]^T G W[:, j] / [H^-1]_jj. The optimal
compensation of the other columns does not depend on G (it acts on every output row alike), so OBS run on
R W, with G = R^T R, selects under G and compensates exactly; R^-1 maps the result back
(`OutputWeight.apply` / `.restore`). The same idea for quantization: GuidedQuant (Kim et al. 2025).

G is measured once, before pruning, on the dense model: the next-token cross-entropy of the first
`samples` calibration sequences, back-propagated layer by layer with one decoder layer on the compute
device at a time (every layer's input kept on the host from one forward pass, then each layer's forward
recomputed under autograd from the top down). On calibration text sampled from the model itself (`self`),
the labels are draws from the model's own distribution, so this empirical Fisher is the model's Fisher.
G is normalised to mean diagonal 1 and damped by FISHER_DAMP (its scale changes no decision).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layout import Layout
from .distributed import reduce_hessian

# Of G's mean diagonal: 0.01 and 0.1 measured on SmolLM2 at 20% (benchmarks/results/self_calibration.md rows (19)).
FISHER_DAMP = 0.01
LOSS_ROWS = 1024  # positions whose vocabulary-wide logits are formed at once (128k vocabularies: 0.5 GB in float32)


@dataclass(frozen=True)
class OutputWeight:
    """R with R^T R = G (damped), for one projection: OBS on R W weighs the output dimensions by G."""

    R: torch.Tensor  # [out, out] upper triangular

    @classmethod
    def of(cls, G: torch.Tensor, device: torch.device) -> OutputWeight:
        G = G.to(device, torch.float64)  # factorised on the compute device
        G = G / G.diagonal().mean().clamp_min(torch.finfo(G.dtype).tiny)
        G.diagonal().add_(FISHER_DAMP)
        return cls(R=torch.linalg.cholesky(G).mT.contiguous())

    def apply(self, W: torch.Tensor) -> torch.Tensor:
        return (self.R @ W.to(self.R.dtype)).to(W.dtype)

    def restore(self, W: torch.Tensor) -> torch.Tensor:
        """R^-1 W: a zero column stays exactly zero."""
        return torch.linalg.solve_triangular(self.R, W.to(self.R.dtype), upper=True).to(W.dtype)


def output_fisher(
    model: nn.Module,
    layout: Layout,
    input_ids: torch.Tensor,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    roles: list[tuple[str, ...]],
    *,
    device: torch.device,
    batch_size: int,
) -> tuple[list[dict[str, torch.Tensor]], float]:
    """Per decoder layer, {role: G [hidden, hidden]} (float32, on the host) for that layer's `roles`; and the seconds.

    `forward(layer, x)` is a dense decoder layer's output on inputs x (the engine's own block functions,
    so G is measured on exactly the computation that is pruned). `roles[i]`: the projections whose units
    layer i's plan removes (none for a layer left dense): G costs hidden^2 x 4 bytes of host memory each.
    G is the mean of g g^T over the positions that have a next token, summed over the ranks of a
    distributed prune (every rank passes its share).
    """
    t0 = time.perf_counter()
    layers = layout.part(model, "layers")
    embed = layout.part(model, "embed")
    batches = list(input_ids.split(batch_size))
    with torch.no_grad():
        xs = [embed(ids.to(embed.weight.device)).to(device) for ids in batches]
        inputs: list[list[torch.Tensor] | None] = []
        for layer in layers:
            layer.to(device)
            inputs.append([x.to("cpu") for x in xs])
            xs = [forward(layer, x) for x in xs]
            layer.to("cpu")
    grads = _loss_gradients(model, layout, xs, batches, device)
    xs = None
    width = model.config.hidden_size
    fishers: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    n = sum(ids[:, 1:].numel() for ids in batches)
    for i in reversed(range(len(layers))):
        layer = layers[i].to(device)
        sums = {role: torch.zeros(width, width, dtype=torch.float32, device=device) for role in roles[i]}
        try:
            for j, (x, g) in enumerate(zip(inputs[i], grads)):
                grads[j], outputs = _layer_backward(forward, layout, layer, x.to(device), g, roles[i])
                for role, g_out in outputs.items():
                    g_out = g_out.reshape(-1, width).float()
                    sums[role].addmm_(g_out.T, g_out)
        finally:
            layer.to("cpu")
        inputs[i] = None
        fishers[i] = {role: reduce_hessian(G / n, n)[0].cpu() for role, G in sums.items()}
    return fishers, time.perf_counter() - t0


def _loss_gradients(model, layout: Layout, xs: list[torch.Tensor], batches: list[torch.Tensor], device):
    """dLoss/dx for each batch of the last layer's outputs x [b, s, hidden]: the summed next-token cross-entropy,
    in chunks of positions; the final norm and the head are on the device once for all batches."""
    norm, head = layout.part(model, "norm"), layout.part(model, "head")
    homes = [next(m.parameters()).device for m in (norm, head)]
    norm.to(device), head.to(device)
    grads = []
    try:
        for x, ids in zip(xs, batches):
            ids, grad = ids.to(device), torch.zeros_like(x)
            rows = max(1, LOSS_ROWS // x.shape[0])
            for a in range(0, x.shape[1] - 1, rows):  # the last position has no next token
                b = min(a + rows, x.shape[1] - 1)
                part = x[:, a:b].detach().requires_grad_(True)
                with torch.enable_grad():
                    logits = head(norm(part)).float()
                    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, a + 1 : b + 1].flatten(), reduction="sum")
                    (grad[:, a:b],) = torch.autograd.grad(loss, part)
            grads.append(grad)
    finally:
        norm.to(homes[0]), head.to(homes[1])
    return grads


def _layer_backward(forward, layout: Layout, layer, x: torch.Tensor, g: torch.Tensor, roles: tuple[str, ...]):
    """The layer's forward recomputed under autograd: (dLoss/dx, {role: dLoss/d(projection output)})."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        layout.proj(layer, role).register_forward_hook(lambda _m, _a, out, role=role: outputs.__setitem__(role, out))
        for role in roles
    ]
    x = x.detach().requires_grad_(True)
    try:
        with torch.enable_grad():
            y = forward(layer, x)
    finally:
        for hook in hooks:
            hook.remove()
    gx, *g_out = torch.autograd.grad(y, [x, *(outputs[r] for r in roles)], grad_outputs=g)
    return gx, dict(zip(roles, g_out))
