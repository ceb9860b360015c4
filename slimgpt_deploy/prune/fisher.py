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

Host memory: every layer's dense inputs for the pass (layers x samples x seqlen x hidden x dtype bytes),
then G, hidden^2 x 4 bytes per pruned projection, kept through the prune (70B, 16 x 2048: 43 GB each).
With a `directory` (a prune's resume state, or its `--max-memory` offload) G lives there, one layer's in
memory at a time, and under `--max-memory` the inputs too.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_write, write_json
from ..layout import Layout
from ..resume import Batches, load_tensors, save_tensors
from .distributed import reduce_hessian

# Of G's mean diagonal: 0.01 and 0.1 measured on SmolLM2 at 20% (benchmarks/results/self_calibration.md rows (19)).
FISHER_DAMP = 0.01
COMPLETE = "complete.json"  # in a Curvatures folder: every layer's G is written
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


class Curvatures:
    """Per decoder layer, {role: G}: in memory, or one safetensors file per layer in `directory`.

    On disk, `finish` marks the set complete (with the pass's seconds), so that a resumed prune reads
    it back (`saved`) instead of measuring it again.
    """

    def __init__(self, layers: int, directory: Path | None = None, *, fresh: bool = True):
        self.directory = directory
        self._layers: list[dict[str, torch.Tensor]] = [{} for _ in range(layers)]
        self._last: tuple[int, dict[str, torch.Tensor]] | None = None  # the layer read last, for its other role
        if directory is not None and fresh:
            if directory.exists():  # an unfinished run's
                shutil.rmtree(directory)
            directory.mkdir(parents=True)

    @classmethod
    def of(cls, layers: list[dict[str, torch.Tensor]]) -> Curvatures:
        store = cls(len(layers))
        store._layers = list(layers)
        return store

    @classmethod
    def saved(cls, directory: Path, layers: int) -> tuple[Curvatures, float] | None:
        """The complete set an interrupted prune left in `directory`, and the seconds its pass took; else None."""
        marker = directory / COMPLETE
        if not marker.is_file():
            return None
        done = json.loads(marker.read_text())
        return (cls(layers, directory, fresh=False), done["seconds"]) if done["layers"] == layers else None

    def _file(self, i: int) -> Path:
        return self.directory / f"G-{i:05d}.safetensors"

    def put(self, i: int, fishers: dict[str, torch.Tensor]) -> None:
        if self.directory is None:
            self._layers[i] = fishers
        elif fishers:
            atomic_write(self._file(i), lambda tmp: save_tensors(fishers, tmp))

    def finish(self, seconds: float) -> None:
        if self.directory is not None:
            write_json(self.directory / COMPLETE, {"layers": len(self), "seconds": seconds})

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.directory is None:
            return self._layers[i]
        if self._last is None or self._last[0] != i:
            self._last = (i, load_tensors(self._file(i)) if self._file(i).exists() else {})
        return self._last[1]

    def __len__(self) -> int:
        return len(self._layers)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self[i] for i in range(len(self)))

    def drop(self) -> None:
        self._layers, self._last = [{} for _ in self._layers], None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def output_fisher(
    model: nn.Module,
    layout: Layout,
    input_ids: torch.Tensor,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    roles: list[tuple[str, ...]],
    *,
    device: torch.device,
    batch_size: int,
    directory: Path | None = None,
    inputs_on_disk: bool = False,
) -> tuple[Curvatures, float]:
    """Per decoder layer, {role: G [hidden, hidden]} (float32, on the host) for that layer's `roles`; and the seconds.

    `forward(layer, x)` is a dense decoder layer's output on inputs x (the engine's own block functions,
    so G is measured on exactly the computation that is pruned). `roles[i]`: the projections whose units
    layer i's plan removes (none for a layer left dense): G costs hidden^2 x 4 bytes of host memory each.
    G is the mean of g g^T over the positions that have a next token, summed over the ranks of a
    distributed prune (every rank passes its share). With `directory`, G is kept there (in memory
    otherwise), and with `inputs_on_disk` the layers' inputs too; `Curvatures.drop` deletes them.
    """
    t0 = time.perf_counter()
    layers = layout.part(model, "layers")
    embed = layout.part(model, "embed")
    batches = list(input_ids.split(batch_size))
    fishers = Curvatures(len(layers), directory)
    with torch.no_grad():
        xs = [embed(ids.to(embed.weight.device)).to(device) for ids in batches]
        inputs: list[Batches] = []
        for i, layer in enumerate(layers):
            layer.to(device)
            inputs.append(_store(directory if inputs_on_disk else None, i))
            for x in xs:
                inputs[i].append(x.to("cpu"))
            xs = [forward(layer, x) for x in xs]
            layer.to("cpu")
    grads = _loss_gradients(model, layout, xs, batches, device)
    xs = None
    width = model.config.hidden_size
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
        inputs[i].drop()
        fishers.put(i, {role: reduce_hessian(G / n, n)[0].cpu() for role, G in sums.items()})
    seconds = time.perf_counter() - t0
    fishers.finish(seconds)
    return fishers, seconds


def _store(directory: Path | None, i: int) -> Batches:
    """Where layer i's inputs wait for the backward pass: in memory, or a folder of `directory`."""
    if directory is None:
        return Batches()
    path = directory / f"x-{i:05d}"
    path.mkdir()
    return Batches(path)


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
