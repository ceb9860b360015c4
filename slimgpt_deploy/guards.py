"""Resource guards: estimate a prune's peak memory and disk before starting, refuse if it cannot fit.

The estimate is one pure function (`estimate_prune`) of the job's sizes; the
check compares it with what the machine has (psutil's available memory,
shutil.disk_usage of the output's directory) and raises ResourceError with
the numbers and what to lower.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import BadInputError, ResourceError

GiB = 2**30
# Activation copies alive at once in a layer (engine._prune_layer): the inputs xs, the
# post-attention residual h, and the outputs being built.
ACTIVATION_COPIES = 3
# Each Hessian is held with its dampened copy and inverse / Cholesky factor.
HESSIAN_COPIES = 3
# One batch's MLP intermediates (gate, up, act(gate) * up) in float32.
MLP_TEMPORARIES = 3
# Device memory of one OBS step (prune/obs.py, methods._hinv), in units of the step's H
# [w, w] (w = o_proj's or down_proj's input width): the caller's H, its dampened copy and the
# Cholesky factor while factoring; H, the factor and Hinv while inverting (the copy is freed);
# H and Hinv (updated in place) in the greedy loop. One more for cholesky_inverse's workspace.
OBS_HESSIAN_COPIES = 4
# ... and in units of the projection W [hidden, w] in the Hessian dtype: the method's working
# copy, the original (kept for the reconstruction error), dW and dW @ H.
OBS_WEIGHT_COPIES = 4
# The output-space Fisher (`--fisher-samples`, prune/fisher.py): one G [hidden, hidden] in float32 per pruned
# projection (o_proj and down_proj), at most two per layer.
FISHER_ROLES = 2
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """Bytes from "8GiB", "512MB", "1.5G", "1000000"; BadInputError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise BadInputError(f"--max-memory {text!r} is not a size; give e.g. 8GiB, 512MB or 2G")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise BadInputError(f"--max-memory {text!r} must be more than 0 bytes")
    return size


@dataclass(frozen=True)
class JobSize:
    """The sizes that decide a prune's memory and disk."""

    params: int  # all parameters of the dense model (tied embeddings once)
    decoder_params: int  # the decoder layers' share
    dtype_bytes: int  # model dtype (activations have it too)
    hessian_bytes: int
    nsamples: int
    seqlen: int
    batch_size: int
    hidden: int
    max_attn_width: int  # largest q_heads * head_dim over the layers (o_proj's inputs)
    max_ffn: int
    ratio: float  # share of decoder parameters removed
    layers: int = 0  # decoder layers
    fisher_samples: int = 0  # --fisher-samples (0: no Fisher pass)


@dataclass(frozen=True)
class Estimate:
    ram_bytes: int  # peak resident memory of the job (model, activations, slim copy, Hessians)
    disk_bytes: int  # slim checkpoint + resume state at its largest
    activation_bytes: int  # one copy of the calibration activations
    activations_on_disk: bool  # --max-memory moved the activation cache to disk
    parts: dict  # the RAM terms, for the message

    def to_dict(self) -> dict:
        return asdict(self)


def estimate_prune(
    job: JobSize, *, weights_loaded: bool = False, max_memory: int | None = None, resumable: bool = False
) -> Estimate:
    """Peak RAM and disk of a layer-wise prune (pure).

    RAM = dense weights (unless already loaded) + slim decoder copy
        + ACTIVATION_COPIES x activations (nsamples * seqlen * hidden * dtype bytes)
          -- or two batches' worth when they live on disk
        + HESSIAN_COPIES x (H of o_proj + H of down_proj)
        + MLP_TEMPORARIES x one batch's FFN activations (float32)
        + with --fisher-samples F: the curvatures G (FISHER_ROLES x layers x hidden^2 x 4, kept through
          the prune), and the Fisher pass's inputs (layers x F x seqlen x hidden x dtype bytes) beyond the
          prune's own activations, Hessians and slim copy (the pass ends before the prune starts).
    The activations (and the Fisher's inputs and G) move to disk when they exceed `max_memory`; then
    two batches and one layer's G stay in memory. A `resumable` prune (one with resume state) keeps G
    in its state on disk in any case, so that a resumed prune need not measure it again.
    Disk = slim checkpoint (dense minus the removed decoder share)
         + resume state: slim decoder layers + two activation copies (the old and new
           boundary, at a commit) + calibration ids, + one more copy (h) when on disk,
           + the Fisher's G when on disk or resumable, and its inputs when on disk.
    """
    weights = job.params * job.dtype_bytes
    slim_decoder = int(job.decoder_params * (1 - job.ratio)) * job.dtype_bytes
    acts = job.nsamples * job.seqlen * job.hidden * job.dtype_bytes
    layer_G = FISHER_ROLES * job.hidden**2 * 4 if job.fisher_samples else 0
    fisher_inputs = job.layers * job.fisher_samples * job.seqlen * job.hidden * job.dtype_bytes
    on_disk = max_memory is not None and ACTIVATION_COPIES * acts + job.layers * layer_G + fisher_inputs > max_memory
    G_on_disk = on_disk or resumable
    batch_tokens = min(job.batch_size, job.nsamples) * job.seqlen
    batch_acts = batch_tokens * job.hidden * job.dtype_bytes
    parts = {
        "weights": 0 if weights_loaded else weights,
        "slim copy": slim_decoder,
        "activations": ACTIVATION_COPIES * (2 * batch_acts if on_disk else acts),
        "Hessians": HESSIAN_COPIES * (job.max_attn_width**2 + job.max_ffn**2) * job.hessian_bytes,
        "MLP temporaries": MLP_TEMPORARIES * batch_tokens * job.max_ffn * 4,
    }
    if job.fisher_samples:
        prune_phase = sum(parts.values()) - parts["weights"]
        fisher_batch = min(job.batch_size, job.fisher_samples) * job.seqlen * job.hidden * job.dtype_bytes
        parts["Fisher curvatures"] = layer_G if G_on_disk else job.layers * layer_G
        parts["Fisher inputs"] = max(0, (2 * fisher_batch if on_disk else fisher_inputs) - prune_phase)
    checkpoint = weights - int(job.decoder_params * job.ratio) * job.dtype_bytes
    state = slim_decoder + (3 if on_disk else 2) * acts + job.nsamples * job.seqlen * 8
    state += (job.layers * layer_G if G_on_disk else 0) + (fisher_inputs if on_disk else 0)
    return Estimate(
        ram_bytes=sum(parts.values()),
        disk_bytes=checkpoint + state,
        activation_bytes=acts,
        activations_on_disk=on_disk,
        parts=parts,
    )


def obs_step_peak(hidden: int, width: int, hessian_bytes: int) -> int:
    """Peak device bytes of pruning one projection's `width` input columns (heads or FFN channels).

    = OBS_HESSIAN_COPIES * width^2 * hessian_bytes + OBS_WEIGHT_COPIES * hidden * width * hessian_bytes
    (the per-step temporaries, [s, width] and [s, hidden] for s columns removed at once, are
    smaller than one W). E.g. the FFN step of a 70B model (hidden 8192, FFN 28672, float32):
    4 * 3.29 GB + 4 * 0.94 GB = 16.9 GB (before in-place updates: about 6 H + 4 W = 23.5 GB).
    """
    return (OBS_HESSIAN_COPIES * width * width + OBS_WEIGHT_COPIES * hidden * width) * hessian_bytes


def layer_device_peak(
    hidden: int, q_width: int, kv_width: int, ffn: int, dtype_bytes: int, hessian_bytes: int, batch_tokens: int
) -> int:
    """Peak device bytes of pruning one decoder layer, activations between layers not counted.

    The dense layer, the half-pruned and the new layer (at most 3 layers' weights), the larger
    of the attention and FFN OBS steps (`obs_step_peak`), and one batch's MLP temporaries.
    """
    layer = (2 * hidden * q_width + 2 * hidden * kv_width + 3 * hidden * ffn) * dtype_bytes
    obs = max(obs_step_peak(hidden, q_width, hessian_bytes), obs_step_peak(hidden, ffn, hessian_bytes))
    return 3 * layer + obs + MLP_TEMPORARIES * batch_tokens * ffn * 4


def job_size(model_config, prune_config) -> JobSize:
    """The JobSize of pruning a model of `model_config` with `prune_config` (nothing loaded)."""
    from .families import layer_shapes

    shapes = layer_shapes(model_config)
    decoder = sum(s.params() for s in shapes)
    h, vocab = model_config.hidden_size, model_config.vocab_size
    embeddings = vocab * h * (1 if getattr(model_config, "tie_word_embeddings", False) else 2)
    ratio = (
        (sum(prune_config.layer_ratios) / len(prune_config.layer_ratios))
        if prune_config.layer_ratios
        else prune_config.ratio
    )
    return JobSize(
        params=decoder + embeddings + h,
        decoder_params=decoder,
        dtype_bytes=prune_config.torch_dtype.itemsize,
        hessian_bytes=prune_config.torch_hessian_dtype.itemsize,
        nsamples=prune_config.nsamples,
        seqlen=prune_config.seqlen,
        batch_size=prune_config.batch_size,
        hidden=h,
        max_attn_width=max(s.q_heads * s.head_dim for s in shapes),
        max_ffn=max(s.ffn for s in shapes),
        ratio=ratio,
        layers=len(shapes),
        fisher_samples=prune_config.fisher_samples,
    )


def human(n: int) -> str:
    """Bytes as a short size: 1.50 GiB, 12.0 MiB, 3.0 KiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit in ("TiB", "GiB") else f"{n / size:.1f} {unit}"
    return f"{n} B"


def check_fits(estimate: Estimate, *, available_ram: int, free_disk: int | None, where: Path | None = None) -> None:
    """Raise ResourceError (with the estimate, the available amount and what to lower) unless it fits."""
    if estimate.ram_bytes > available_ram:
        parts = ", ".join(f"{k} {human(v)}" for k, v in estimate.parts.items())
        hint = "lower --nsamples/--seqlen, choose a smaller --dtype"
        if not estimate.activations_on_disk:
            hint += ", or pass --max-memory to keep the calibration activations on disk"
        raise ResourceError(
            f"this prune needs about {human(estimate.ram_bytes)} of memory ({parts}) but "
            f"{human(available_ram)} is available; {hint}"
        )
    if free_disk is not None and estimate.disk_bytes > free_disk:
        raise ResourceError(
            f"this prune needs about {human(estimate.disk_bytes)} of disk in {where} (checkpoint and resume state) but "
            f"{human(free_disk)} is free; free some space, choose another --out, or lower --nsamples/--seqlen"
        )


def _free_cuda(device) -> int:
    import torch

    return int(torch.cuda.mem_get_info(device)[0])


def _free_cpu(_device) -> int:
    return available_ram()


# free memory of a device, by its type
FREE_MEMORY: dict = {"cuda": _free_cuda, "cpu": _free_cpu}


def free_memory(device) -> int:
    """Bytes free on `device` now (CUDA: mem_get_info; CPU: available RAM)."""
    probe = FREE_MEMORY.get(device.type)
    if probe is None:
        raise BadInputError(f"cannot measure free memory on device {device}; use {' or '.join(FREE_MEMORY)}")
    return probe(device)


def available_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def free_disk(path: Path) -> int:
    return int(shutil.disk_usage(path).free)
