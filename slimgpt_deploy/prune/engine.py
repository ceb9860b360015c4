"""The layer-wise pruning loop (SlimGPT Sec. 3, true-sequential).

With `--fisher-samples N`, first the loss's output-space Fisher of every pruned projection, on the
dense model (fisher.py); it then weighs the OBS choices below. Per decoder layer, with the inputs
produced by the already-pruned layers:
  1. run the attention block over the calibration batches, accumulating H of
     o_proj's inputs; prune heads (method + plan); shrink the attention;
  2. run the *pruned* attention, keep the residual stream h, accumulate H of
     down_proj's inputs under it; prune FFN channels; shrink the MLP;
  3. the pruned layer's outputs h + mlp(h) are the next layer's inputs.
Only one decoder layer is on the compute device at a time. Calibration
activations stay on the compute device between layers when they fit in its free
memory beside one layer's pruning peak (guards.layer_device_peak), else in pinned
host memory (on a GPU) or host memory (on the CPU), or on disk (`offload=True`).
While pruning, float32 matmuls run in full precision (no TF32), restored after.
With a `ResumeState`, every finished layer is committed to disk and a later
run continues after the last one, giving the same weights bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import PruneConfig
from ..errors import NumericalError
from ..families import layer_shapes, layout_of
from ..guards import ACTIVATION_COPIES, free_memory, layer_device_peak
from ..layout import HESSIAN_OF, SLIM, LayerShape, Layout
from ..modeling import LayerConfigView, SlimGPTDecoderLayer
from ..resume import FISHER_DIR, Batches, Home, ResumeState
from ..shrink import LayerCut, assemble, check_shapes, make_slim_config, shrink_layer
from .distributed import from_rank0, reduce_hessian, shard
from .fisher import Curvatures, OutputWeight, output_fisher
from .methods import METHODS, HeadUnits, LayerStats
from .obs import accumulate_hessian
from .schedule import PER_GROUP, LayerPlan, achieved_share, layer_ratios, plan_layers

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    model: nn.Module  # the slim model (SlimGPTForCausalLM)
    record: dict  # what was done: plans, achieved ratios, per-layer errors, times
    tokenizer: object = None


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`: aminmax propagates NaN and keeps Inf, in one pass without the full boolean
    copy that isfinite(t).all() makes (a prune checks every weight and every layer's Hessians)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _check_finite(tensors, what: str, layer_idx: int) -> None:
    for name, t in tensors:
        if not all_finite(t):
            raise NumericalError(
                f"NaN/Inf in {what} of layer {layer_idx} ({name}); check the model weights and dtype "
                "(float16 overflows: try --dtype float32)"
            )


def check_weights(model: nn.Module) -> None:
    """NaN/Inf anywhere in the weights -> NumericalError naming the layer; run before any compute."""
    for name, p in model.named_parameters():
        if not all_finite(p):
            m = re.search(r"layers\.(\d+)\.(.+)$", name)
            where = f"layer {m.group(1)} ({m.group(2)})" if m else name
            raise NumericalError(
                f"NaN/Inf in the weights of {where}; check or re-download the model files "
                "(or the dtype: float16 overflows, try --dtype float32)"
            )


def restore_layer(weights: dict[str, torch.Tensor], slim_config, layer_idx: int) -> nn.Module:
    """A finished slim decoder layer rebuilt from its saved weights (resume)."""
    with torch.device("meta"):
        new = SlimGPTDecoderLayer(LayerConfigView(slim_config, layer_idx), layer_idx)
    new.load_state_dict(weights, strict=True, assign=True)
    return new.eval().requires_grad_(False)


@contextlib.contextmanager
def full_precision_matmul():
    """float32 matmuls in IEEE precision (TF32 off on GPUs) inside; the caller's setting restored after."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def activation_home(device: torch.device, activation_bytes: int, layer_peak: int) -> Home:
    """Where calibration activations live between layers.

    On a GPU: on the device when ACTIVATION_COPIES copies fit in its free memory beside one
    layer's pruning peak, else pinned host memory. On the CPU: host memory.
    """
    if device.type != "cuda":
        return Home(torch.device("cpu"))
    free = free_memory(device)
    if ACTIVATION_COPIES * activation_bytes + layer_peak <= free:
        return Home(device)
    log.info(
        "calibration activations (%.2f GiB x %d) do not fit beside the layer's peak in %.2f GiB free on %s; "
        "keeping them in pinned host memory",
        activation_bytes / 2**30,
        ACTIVATION_COPIES,
        free / 2**30,
        device,
    )
    return Home(torch.device("cpu"), pin=True)


def _causal_mask(seqlen: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive causal mask [1, 1, S, S]: works for eager and SDPA attention alike."""
    mask = torch.full((seqlen, seqlen), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.triu(mask, diagonal=1)[None, None]


def _attention(layout: Layout, layer, x, pos, mask):
    """Attention block of a decoder layer: attention(attention_norm(x)) (no residual)."""
    attn, norm = layout.part(layer, "attention"), layout.part(layer, "attention_norm")
    return attn(hidden_states=norm(x), position_embeddings=pos, attention_mask=mask)[0]


def _mlp(layout: Layout, layer, h):
    """MLP block of a decoder layer: mlp(mlp_norm(h)) (no residual)."""
    return layout.part(layer, "mlp")(layout.part(layer, "mlp_norm")(h))


def _pruned_roles(shape: LayerShape, plan: LayerPlan) -> tuple[str, ...]:
    """The projections whose units the plan removes from a layer: the decisions an output Fisher weighs."""
    heads = (plan.q_heads, plan.kv_heads) != (shape.q_heads, shape.kv_heads)
    return tuple(HESSIAN_OF[unit] for unit, cut in (("heads", heads), ("ffn", plan.ffn != shape.ffn)) if cut)


def _dense_layer(layout: Layout, layer, x, pos, mask):
    """A whole decoder layer: h = x + attention block, h + MLP block."""
    h = x + _attention(layout, layer, x, pos, mask)
    return h + _mlp(layout, layer, h)


class _Captured(Exception):
    """Raised by InputHessian's hook once it has its inputs: the rest of the block (output unused) is skipped."""


class InputHessian:
    """The Hessian of one projection's inputs (obs.accumulate_hessian), gathered while a block runs.

    `gather(block)` runs `block()` with a forward pre-hook on the projection that accumulates its input
    and stops the block there: only the activations are wanted, not the block's output.
    """

    def __init__(self, projection: nn.Module, width: int, dtype: torch.dtype, device: torch.device):
        self.projection = projection
        self.H, self.n = torch.zeros(width, width, dtype=dtype, device=device), 0

    def gather(self, block: Callable[[], object]) -> None:
        hook = self.projection.register_forward_pre_hook(self._grab)
        try:
            block()
        except _Captured:
            pass
        finally:
            hook.remove()

    def reduced(self) -> torch.Tensor:
        """H over every rank's samples (this process's alone without distributed pruning)."""
        self.H, self.n = reduce_hessian(self.H, self.n)
        return self.H

    def _grab(self, _module, args):
        self.H, self.n = accumulate_hessian(self.H, self.n, args[0])
        raise _Captured


def _reconstruction(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
    """(tr(dW H dW^T), that / tr(W H W^T)): the layer-output error on the calibration data."""
    dW = W_new - W
    err = float(((dW @ H) * dW).sum())
    ref = float(((W @ H) * W).sum())
    return err, err / ref if ref > 0 else 0.0


def _head_column_norms(layout: Layout, layer, units: HeadUnits) -> torch.Tensor:
    """Squared norm of q (and, for kv-group units, k/v) weights tied to each o column."""
    s = units.shape
    norm = lambda role: layout.proj(layer, role).weight.float().pow(2).sum(dim=1)  # noqa: E731
    q = norm("q")  # [q_heads * d]
    if units.mode == PER_GROUP:
        return q
    kv = (norm("k") + norm("v")).reshape(s.kv_heads, 1, s.head_dim)  # [kv, 1, d]
    return q + kv.expand(s.kv_heads, s.q_per_kv, s.head_dim).reshape(-1) / s.q_per_kv


class LayerwisePruner:
    """Owns the calibration activations and walks the decoder layers once."""

    def __init__(self, model: nn.Module, config: PruneConfig):
        self.model = model
        self.cfg = config
        self.device = torch.device(config.device)
        self.hdtype = config.torch_hessian_dtype
        self.method = METHODS[config.method]
        self.layout = layout_of(model.config)
        self.fisher: Curvatures | None = None  # per layer {role: G}, measured by run(), dropped at its end

    def plans(self) -> tuple[list[LayerShape], list[LayerPlan]]:
        shapes = layer_shapes(self.model.config)
        weights = [s.params() for s in shapes]
        ratios = layer_ratios(self.cfg.schedule, self.cfg.ratio, weights, self.cfg.layer_ratios, self.cfg.dense_last)
        return shapes, plan_layers(
            shapes,
            ratios,
            self.cfg.gqa_mode,
            self.cfg.head_multiple,
            self.cfg.ffn_multiple,
            head_share=self.cfg.head_share,
        )

    @torch.no_grad()
    @full_precision_matmul()
    def run(
        self,
        input_ids: torch.Tensor,
        on_layer: Callable[[int, int, dict], None] | None = None,
        *,
        state: ResumeState | None = None,
        offload: bool = False,
    ) -> PruneResult:
        """Prune every decoder layer in order; returns the slim model and the record.

        `state`: commit each finished layer there and start after the layers it
        already holds. `offload`: keep the calibration activations on disk (in
        `state`'s directory, else a temporary one), one batch in memory at a time.
        """
        t0 = time.perf_counter()
        model, cfg = self.model, self.cfg
        # the Fisher's samples: the same as in one process, split over the ranks
        fisher_ids = shard(input_ids[: cfg.fisher_samples], "--fisher-samples") if cfg.fisher_samples else None
        input_ids = shard(input_ids)  # this rank's samples (all of them in one process)
        shapes, plans = self.plans()
        slim_config = make_slim_config(model.config, plans)
        slim_config._attn_implementation = model.config._attn_implementation
        layout = self.layout
        start = state.finished if state is not None else 0
        work = tempfile.TemporaryDirectory(prefix="slimgpt-activations-") if offload and state is None else None
        root = state.directory if state is not None else Path(work.name) if work is not None else None

        home = self._home(input_ids)

        def batches(name: str) -> Batches:
            if root is None:
                return Batches(home=home)
            path = root / name
            if path.exists():
                shutil.rmtree(path)
            path.mkdir()
            return Batches(path)

        try:
            new_layers = [restore_layer(state.layer_weights(j), slim_config, j) for j in range(start)]
            records = list(state.records[:start]) if state is not None else []
            dtype = model.get_input_embeddings().weight.dtype
            seqlen = input_ids.shape[1]
            position_ids = torch.arange(seqlen, device=self.device)[None]
            pos = layout.part(model, "rotary")(torch.empty(0, dtype=dtype, device=self.device), position_ids)
            mask = _causal_mask(seqlen, dtype, self.device)
            fisher_s = 0.0
            if cfg.fisher_samples and start < len(plans):
                # G beside the activations: in the resume state (read back on resume; a fresh state starts
                # empty), or on disk under --max-memory
                fisher_dir = root / FISHER_DIR if root is not None else None
                saved = Curvatures.saved(fisher_dir, len(plans)) if fisher_dir is not None else None
                self.fisher, fisher_s = saved or output_fisher(
                    model,
                    layout,
                    fisher_ids,
                    lambda layer, x: _dense_layer(layout, layer, x, pos, mask),
                    [_pruned_roles(shape, plan) for shape, plan in zip(shapes, plans)],
                    device=self.device,
                    batch_size=cfg.batch_size,
                    directory=fisher_dir,
                    inputs_on_disk=offload,
                )
            if start == len(plans):
                xs = None
            elif start > 0:
                xs = state.inputs(in_memory=not offload, home=home)
            else:
                xs = self._embed(input_ids, batches(f"xs-{0:05d}"))
            for i in range(start, len(plans)):
                layer, shape, plan = layout.part(model, "layers")[i], shapes[i], plans[i]
                ts = time.perf_counter()
                layer.to(self.device)
                _check_finite(layer.named_parameters(), "weights", i)
                new_layer, out, rec = self._prune_layer(i, layer, shape, plan, slim_config, xs, pos, mask, batches)
                layer.to("cpu")
                new_layers.append(new_layer.to("cpu"))
                rec["seconds"] = round(time.perf_counter() - ts, 3)
                records.append(rec)
                last = i == len(plans) - 1
                if state is not None:
                    state.commit_layer(i, new_layer.state_dict(), rec, None if last else out)
                xs.drop()
                xs = out
                if on_layer is not None:
                    on_layer(i, len(plans), rec)
            if xs is not None:
                xs.drop()
            if self.fisher is not None:
                self.fisher.drop()  # kept on an interruption: a resumed prune reads it back
        finally:
            if work is not None:
                work.cleanup()
        slim = assemble(model, new_layers, slim_config, layout)
        check_shapes(slim)
        share = achieved_share(shapes, plans)
        record = {
            "ratio_target": cfg.ratio if cfg.layer_ratios is None else sum(cfg.layer_ratios) / len(cfg.layer_ratios),
            "ratio_achieved_decoder": share,
            "layer_ratios": [p.ratio for p in plans],
            "prune_seconds": round(time.perf_counter() - t0, 3),
            "fisher_seconds": round(fisher_s, 3),
            "layers": records,
        }
        return PruneResult(model=slim, record=record)

    def _home(self, input_ids: torch.Tensor) -> Home:
        c = self.model.config
        dtype_bytes = self.model.get_input_embeddings().weight.element_size()
        shapes = layer_shapes(c)
        peak = max(
            layer_device_peak(
                c.hidden_size,
                s.q_heads * s.head_dim,
                s.kv_heads * s.head_dim,
                s.ffn,
                dtype_bytes,
                self.hdtype.itemsize,
                min(self.cfg.batch_size, len(input_ids)) * input_ids.shape[1],
            )
            for s in shapes
        )
        return activation_home(self.device, input_ids.numel() * c.hidden_size * dtype_bytes, peak)

    def _embed(self, input_ids: torch.Tensor, xs: Batches) -> Batches:
        """Layer-0 inputs: the token embeddings of the calibration batches (kept where `xs` keeps batches)."""
        embed, bs = self.model.get_input_embeddings(), self.cfg.batch_size
        for i in range(0, len(input_ids), bs):
            xs.append(embed(input_ids[i : i + bs].to(embed.weight.device)))
        return xs

    def _stats(self, i: int, role: str, W: torch.Tensor, H: torch.Tensor, tied: torch.Tensor) -> LayerStats:
        G = None if self.fisher is None else self.fisher[i].get(role)  # none where the plan removes nothing
        weight = None if G is None else OutputWeight.of(G, self.device)
        return LayerStats(
            W=W.to(self.hdtype), H=H, percdamp=self.cfg.percdamp, unit_norms=tied.to(self.hdtype), output_weight=weight
        )

    def _prune_layer(self, i, layer, shape: LayerShape, plan: LayerPlan, slim_config, xs: Batches, pos, mask, batches):
        dev, L = self.device, self.layout
        o_proj, down_proj = L.proj(layer, HESSIAN_OF["heads"]), L.proj(layer, HESSIAN_OF["ffn"])
        # 1. attention: H of o's inputs under the (already pruned) previous layers.
        hessian = InputHessian(o_proj, shape.q_heads * shape.head_dim, self.hdtype, dev)
        for x in xs:
            hessian.gather(lambda: _attention(L, layer, x.to(dev), pos, mask))
        H_o = hessian.reduced()
        _check_finite([("o_proj inputs", H_o)], "activations", i)
        units = HeadUnits.of(shape, self.cfg.gqa_mode)
        W_o = o_proj.weight.to(self.hdtype)
        with _naming_layer(i, "attention heads"):
            heads = from_rank0(
                lambda: self.method.heads(  # decided once, the same on every rank
                    self._stats(i, HESSIAN_OF["heads"], W_o, H_o, _head_column_norms(L, layer, units)),
                    units,
                    units.steps(plan.q_heads, plan.kv_heads),
                ),
                dev,
            )
        q_keep, kv_keep = units.kept_heads(heads.removed)
        assert (len(q_keep), len(kv_keep)) == (plan.q_heads, plan.kv_heads), "head plan not met"
        attn_err, attn_rel = _reconstruction(W_o, heads.W, H_o)
        H_o = hessian = None  # free the [d, d] Hessian before the MLP's is built

        # 2. MLP: H of down's inputs under the pruned attention (the dense MLP run on the new residual stream).
        partial = LayerCut(
            q_heads=q_keep, kv_heads=kv_keep, ffn=list(range(shape.ffn)), o_proj=heads.W, down_proj=down_proj.weight
        )
        half = shrink_layer(layer, partial, _with_ffn(slim_config, i, shape.ffn), i, L).to(dev)
        hessian, hs = InputHessian(down_proj, shape.ffn, self.hdtype, dev), batches("h-scratch")
        for x in xs:
            x = x.to(dev)
            h = x + _attention(SLIM, half, x, pos, mask)
            hessian.gather(lambda: _mlp(L, layer, h))
            hs.append(h)
        H_d = hessian.reduced()
        _check_finite([("down_proj inputs", H_d)], "activations", i)
        W_d = down_proj.weight.to(self.hdtype)
        tied = sum(L.proj(layer, role).weight.float().pow(2).sum(dim=1) for role in ("gate", "up"))
        with _naming_layer(i, "FFN channels"):
            ffn = from_rank0(
                lambda: self.method.ffn(
                    self._stats(i, HESSIAN_OF["ffn"], W_d, H_d, tied), shape.ffn - plan.ffn, self.cfg.ffn_group_fraction
                ),
                dev,
            )
        gone = set(ffn.removed)
        ffn_keep = [c for c in range(shape.ffn) if c not in gone]
        mlp_err, mlp_rel = _reconstruction(W_d, ffn.W, H_d)
        H_d = hessian = None  # free it before the next layer

        # 3. the pruned layer, and its outputs as the next layer's inputs.
        cut = LayerCut(q_heads=q_keep, kv_heads=kv_keep, ffn=ffn_keep, o_proj=heads.W, down_proj=ffn.W)
        new = shrink_layer(layer, cut, slim_config, i, L).to(dev)
        out, peaks = batches(f"xs-{i + 1:05d}.partial"), []
        for h in hs:
            h = h.to(dev)
            y = h + _mlp(SLIM, new, h)
            peaks.append(y.abs().amax())
            out.append(y)
        hs.drop()
        _check_finite([("layer outputs", torch.stack(peaks))], "activations", i)
        rec = {
            "layer": i,
            "ratio_target": round(plan.ratio, 6),
            "q_heads": plan.q_heads,
            "kv_heads": plan.kv_heads,
            "ffn": plan.ffn,
            "kept_q_heads": q_keep,
            "kept_kv_heads": kv_keep,
            "attn_error": attn_err,
            "attn_rel_error": attn_rel,
            "mlp_error": mlp_err,
            "mlp_rel_error": mlp_rel,
            "damping": max(heads.damping, ffn.damping),
        }
        return new, out, rec


@contextlib.contextmanager
def _naming_layer(layer_idx: int, what: str):
    """A factorization that fails even after the damping retries ends as a NumericalError naming the layer."""
    try:
        yield
    except torch.linalg.LinAlgError as e:
        raise NumericalError(
            f"layer {layer_idx} ({what}): {e}; give more calibration samples (--nsamples/--seqlen) "
            "or --hessian-dtype float64"
        ) from e


def _with_ffn(config, layer_idx: int, width: int):
    """The slim config with one layer's FFN width overridden (the half-pruned layer of step 2)."""
    c = copy.copy(config)
    sizes = list(config.intermediate_size_per_layer)
    sizes[layer_idx] = width
    c.intermediate_size_per_layer = sizes
    return c
