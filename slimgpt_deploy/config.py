"""The pruning job's options: one frozen dataclass, validated once, built by the CLI or the API."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .errors import BadInputError
from .prune.methods import METHODS as PRUNE_METHODS
from .prune.methods import SLIMGPT
from .prune.schedule import DEFAULT_HEAD_SHARE, GQA_MODES, PER_GROUP, SCHEDULES

METHODS = tuple(PRUNE_METHODS)  # the registry that implements them
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}
MAX_RATIO = 0.9


def _choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise BadInputError(f"unknown {name} {value!r}; choose one of: {', '.join(allowed)}")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when CUDA is available, else 'cpu'; other names are checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or device.startswith("cuda")):
        raise BadInputError(f"unknown device {device!r}; use auto, cpu or cuda[:N]")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"device {device} requested but CUDA is not available; use --device cpu")
    return device


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides a pruning result (and so its fingerprint)."""

    ratio: float = 0.2
    method: str = SLIMGPT
    schedule: str = "log"
    layer_ratios: tuple[float, ...] | None = None
    # The last N decoder layers are left dense; the schedule spreads the same parameter share over the others
    # (SmolLM2 at 20%: better with 2, at 30% mixed, at 50% worse; docs/DESIGN.md "Incremental Pruning Ratio and the
    # layer plan").
    dense_last: int = 0
    # Measured on SmolLM2-135M at 20% (benchmarks/results/quality.md): see README.
    gqa_mode: str = PER_GROUP
    # Every layer's query/KV head counts (tensor-parallel rule) and FFN width are multiples of these.
    head_multiple: int = 1
    ffn_multiple: int = 1
    # Heads are cut at head_share x the layer's ratio (nearest whole units); the FFN takes the rest (prune/schedule.py).
    head_share: float = DEFAULT_HEAD_SHARE
    calib: str = "self"
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0
    percdamp: float = 0.01
    hessian_dtype: str = "float32"
    ffn_group_fraction: float = 0.25
    # > 0: weigh each OBS decision by the loss's output-space Fisher measured on the first N calibration samples
    # (prune/fisher.py; SmolLM2 at 20%: benchmarks/results/self_calibration.md rows (19)); 0: SlimGPT's objective.
    fisher_samples: int = 0
    batch_size: int = 8
    # "auto": the GPU when CUDA is available, else the CPU (resolved when the config is built).
    device: str = "auto"
    dtype: str = "float32"

    def __post_init__(self):
        if self.layer_ratios is not None:
            object.__setattr__(self, "layer_ratios", tuple(float(r) for r in self.layer_ratios))
            if self.schedule != "list":
                object.__setattr__(self, "schedule", "list")
            bad = [r for r in self.layer_ratios if not 0.0 <= r <= MAX_RATIO]
            if bad:
                raise BadInputError(f"per-layer ratio {bad[0]} is outside [0, {MAX_RATIO}]; give values in that range")
        elif not 0.0 <= self.ratio <= MAX_RATIO:
            raise BadInputError(
                f"ratio {self.ratio} is outside [0, {MAX_RATIO}]; give the share of decoder parameters "
                "to remove as a fraction, e.g. --ratio 0.2"
            )
        elif self.schedule == "list":
            raise BadInputError("--schedule list needs --layer-ratios with one ratio per layer")
        if self.dense_last < 0:
            raise BadInputError(f"--dense-last {self.dense_last} must be 0 or more: the number of last layers kept")
        if self.dense_last and self.layer_ratios is not None:
            raise BadInputError("--dense-last and --layer-ratios both decide the layer plan; give one of them")
        _choice("method", self.method, METHODS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("GQA mode", self.gqa_mode, GQA_MODES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("Hessian dtype", self.hessian_dtype, HESSIAN_DTYPES)
        if self.head_multiple < 1 or self.ffn_multiple < 1:
            raise BadInputError(
                f"--head-multiple {self.head_multiple} and --ffn-multiple {self.ffn_multiple} must be at least 1"
            )
        if not 0.0 <= self.head_share <= 1.0:
            raise BadInputError(
                f"head share {self.head_share} must be in [0, 1]: the share of a layer's ratio taken from its heads"
            )
        if self.nsamples < 1:
            raise BadInputError(f"--nsamples {self.nsamples} must be at least 1")
        if self.seqlen < 8:
            raise BadInputError(f"--seqlen {self.seqlen} must be at least 8")
        if not 0.0 < self.percdamp < 1.0:
            raise BadInputError(f"damping {self.percdamp} must be in (0, 1), e.g. 0.01")
        if not 0.0 < self.ffn_group_fraction <= 1.0:
            raise BadInputError(f"FFN group fraction {self.ffn_group_fraction} must be in (0, 1]")
        if not 0 <= self.fisher_samples <= self.nsamples:
            raise BadInputError(
                f"--fisher-samples {self.fisher_samples} must be 0 (off) or at most --nsamples {self.nsamples}: "
                "the Fisher is measured on the first of the calibration samples"
            )
        if self.fisher_samples and not PRUNE_METHODS[self.method].weighs_outputs:
            weighing = " or ".join(name for name, m in PRUNE_METHODS.items() if m.weighs_outputs)
            raise BadInputError(
                f"--fisher-samples weighs the OBS objective, which --method {self.method} does not use; "
                f"give --method {weighing}, or --fisher-samples 0"
            )
        if self.batch_size < 1:
            raise BadInputError(f"batch size {self.batch_size} must be at least 1")
        object.__setattr__(self, "device", resolve_device(self.device))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_hessian_dtype(self) -> torch.dtype:
        return HESSIAN_DTYPES[self.hessian_dtype]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layer_ratios"] = list(self.layer_ratios) if self.layer_ratios else None
        return d
