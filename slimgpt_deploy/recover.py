"""Recovery: knowledge distillation from the dense model (teacher) into the slim one (student).

Pruning without retraining loses some quality; a short distillation wins much of it back
(LLM-Pruner, Ma et al. 2023, Sec. 3.3; SlimGPT, Ling et al. 2024, Sec. 4.4 use a LoRA
fine-tune). Here the student learns the teacher's next-token distributions:

    loss = T^2 * mean_positions KL(P_teacher^T || P_student^T)  +  lm_weight * CE(student, next token)
           + hidden_weight * mean_layers mean_positions |h_s - h_t|^2 / |h_t|^2

with P^T = softmax(logits / T) (Hinton et al. 2015; T^2 keeps the gradient scale of T = 1).
The last term (off by default) matches every decoder layer's output, the residual stream the
pruning keeps at full width, as SquareHead distillation does for sparse LLMs (Kurtic et al. 2023,
"Sparse Fine-tuning for Inference Acceleration of Large Language Models"); it is normalised per
position here, not per layer, because a layer's squared norm is dominated by a few positions'
massive activations (SmolLM2 pruned 20%, from layer 12 on one position holds 92-98% of it: per-layer
error 0.004 where per-position is 0.06; benchmarks/results/layer_errors.md).
The training text is, by default, sampled from the *dense* model (``self``, data-free, as in
calibration.py), or windows of a local file / Hugging Face dataset (the calibration loaders).
A held-out part of the same data measures fidelity (KL, top-1 vs the teacher) before and
after; perplexity on ``eval_text`` when given.

Trainable weights: LoRA adapters (peft; rank ``rank``, scale ``alpha / rank``) on
q/k/v/o/gate/up/down, merged into the weights before saving (``merge_and_unload``), or the
full decoder weights (``full``: every decoder-layer weight and the final norm; the embedding,
tied to the LM head on SmolLM2, stays frozen). Either way every shape is kept, so the result
is a slim checkpoint like the input and every export and verification applies unchanged.

Precision: ``bf16`` runs every matmul of the teacher and the student (and the sampling of
``self`` data) under bfloat16 autocast, with float32 master weights, optimizer moments and
loss; ``fp32`` runs them in float32. ``auto`` (the default) takes ``bf16`` where the device
multiplies bfloat16 in hardware (a CUDA GPU that supports it; a CPU with AMX tiles, where a
bfloat16 matmul measured 10x a float32 one, or with AVX512-BF16, where the default recovery ran
1.63x faster than in float32, no worse, on a 2-core AMD EPYC: benchmarks/results/recovery.md) and
``fp32`` elsewhere, and the record states which. Before/after evaluations always run in float32.
``device``: where teacher and student train (``auto``: the GPU when CUDA is available); the saved
checkpoint is written from the host.

Deterministic on one machine: the data and its order come from ``seed`` (no global RNG during
training: no dropout). Resumable: every ``save_every`` steps the trainable weights, the
optimizer's moments, the step, the loss history and the training ids are written to a state
directory (``state.json`` replaced last); ``resume`` continues from there and ends with the
same weights as an uninterrupted run. The teacher's top-k log-probabilities are cached
(``teacher_topk``, :data:`TEACHER_TOPK` by default): computed once per training sequence and
stored in the state directory, later epochs (and resumed runs) then skip the teacher's forward
pass. With ``self`` data they come from the sampling pass itself (the logits the teacher drew
each token from, kept by calibration.sample_self), so the teacher never runs again after
sampling; other data needs one teacher pass over the training sequences.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .atomic import atomic_write, check_output_dir, fsync_dir, write_error
from .config import resolve_device
from .errors import BadInputError, CheckpointError, Interrupted
from .families import SLIM_MODEL_TYPE
from .layout import SLIM
from .resume import default_state_dir as resume_state_dir
from .resume import fingerprint

logger = logging.getLogger(__name__)

LORA_TARGETS = SLIM.lora_targets()  # every projection of the slim model
LOSS_DTYPE = torch.float32
STATE_FILE = "state.json"
FORMAT = "slimgpt-deploy-recover/1"
WARMUP_FRACTION = 0.05  # linear warm-up over this share of the steps, then cosine decay to 0
GRAD_CLIP = 1.0
PRECISIONS = ("auto", "bf16", "fp32")
TAIL_EXACT_BELOW = 1e-3  # a student tail mass below this is summed over the tail itself (kl_and_grad)
KL_CHUNK_ROWS = 16  # rows of the vocabulary-wide loss at once (kl_and_grad): 3 MB of float32 each at V = 49k
# Sequences the teacher samples together for `self` data (None: calibration's default). On the 2-core CPU
# (bf16 weights, 256 tokens) 128 at a time sampled 1.35x the tokens/s of 32.
SELF_BATCH = {"cpu": 128}
# The teacher's top-k a recovery trains on unless told (--teacher-topk): with `self` data it comes from the sampling
# pass, so training never runs the teacher. On SmolLM2 at 20% it recovered as much as the full logits on the same
# text (28.63 -> 26.93 both) in 10% less training time, peak RSS 4.1 against 12.3 GiB
# (benchmarks/results/recovery.md).
TEACHER_TOPK = 128


# torch's CPU probes (private: absent in some builds) for bfloat16 matmuls in hardware: AMX tiles (Intel Sapphire
# Rapids on), or AVX512-BF16's dot products (Intel Cooper Lake, AMD Zen 4 on).
BF16_CPU_PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")


def fast_bf16(device: torch.device) -> bool:
    """True where bfloat16 matmuls run in hardware: a CUDA GPU that supports them, a CPU with AMX or AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(bool(probe()) for name in BF16_CPU_PROBES if (probe := getattr(torch.cpu, name, None)) is not None)


@dataclass(frozen=True)
class RecoverConfig:
    """Everything that decides a recovery result (and so the resume fingerprint)."""

    data: str = "self"  # 'self' (sampled from the teacher), a .txt/.jsonl file, or a dataset name
    # 330 x 4 x 128 tokens over 512 sampled sequences: the measured recipe (benchmarks/results/recovery.md): on a
    # 2-core AVX512-BF16 CPU 28.63 -> 27.07 in 715 s, against 27.13 in 1022 s for 220 x 4 x 256 over 384 (the
    # default until 2026-12-08): at a fixed budget more, shorter steps recover more; fewer sequences overfit (128
    # seen 7.5 times: held-out KL stalls; 256 of 256 tokens: 27.55)
    steps: int = 330
    batch_size: int = 4
    seqlen: int = 128
    nsamples: int = 512  # training sequences (the data is cycled when steps * batch_size exceeds it)
    heldout: int = 8  # held-out sequences of the same data, for fidelity before/after
    full: bool = False  # train the full decoder weights instead of LoRA adapters
    rank: int = 8
    alpha: float = 16.0
    lr: float | None = None  # default: 1e-3 for LoRA, 5e-5 for full
    weight_decay: float = 0.0
    temperature: float = 1.0
    lm_weight: float = 0.0
    hidden_weight: float = 0.0  # > 0: also match every decoder layer's output (hidden_loss)
    # > 0: cache the teacher's top-k log-probs instead of rerunning it; 0: its full logits at every step; None:
    # TEACHER_TOPK (at most the vocabulary), or 0 with hidden_weight (the layer outputs need the teacher every step)
    teacher_topk: int | None = None
    seed: int = 0
    save_every: int = 25
    # "auto": bf16 autocast where the device multiplies bfloat16 in hardware (fast_bf16), else fp32
    precision: str = "auto"
    device: str = "auto"  # "auto": the GPU when CUDA is available (resolved when the config is built)

    def __post_init__(self):
        positive = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "nsamples": self.nsamples,
            "rank": self.rank,
            "save_every": self.save_every,
        }
        for name, value in positive.items():
            if value < 1:
                raise BadInputError(f"recover {name}={value} must be at least 1; give --{name.replace('_', '-')} >= 1")
        if self.heldout < 0 or (self.teacher_topk or 0) < 0:
            raise BadInputError("recover --heldout and --teacher-topk must be >= 0")
        if self.seqlen < 8:
            raise BadInputError(f"recover seqlen={self.seqlen} is too short; give --seqlen >= 8")
        if not self.temperature > 0 or self.lm_weight < 0 or self.hidden_weight < 0 or self.alpha <= 0:
            raise BadInputError("recover --temperature and --alpha must be > 0, --lm-weight and --hidden-weight >= 0")
        if self.hidden_weight > 0 and self.teacher_topk:
            raise BadInputError(
                "recover --hidden-weight needs the teacher's hidden states at every step, which the top-k cache "
                "does not keep; give --teacher-topk 0 or --hidden-weight 0"
            )
        if self.lr is not None and not self.lr > 0:
            raise BadInputError(f"recover lr={self.lr} must be > 0")
        if self.precision not in PRECISIONS:
            raise BadInputError(f"unknown recover precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        object.__setattr__(self, "device", resolve_device(self.device))
        if self.precision == "auto":
            object.__setattr__(self, "precision", "bf16" if fast_bf16(torch.device(self.device)) else "fp32")

    def autocast(self):
        """The context the teacher's and the student's forward passes run in."""
        if self.precision == "bf16":
            return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16)
        return nullcontext()

    def for_vocabulary(self, vocab: int) -> RecoverConfig:
        """This config with ``teacher_topk`` decided for a teacher of ``vocab`` tokens (see the field)."""
        if self.teacher_topk is None:
            return replace(self, teacher_topk=0 if self.hidden_weight > 0 else min(TEACHER_TOPK, vocab))
        if self.teacher_topk > vocab:
            raise BadInputError(
                f"recover --teacher-topk {self.teacher_topk} exceeds the teacher's vocabulary of {vocab}; "
                f"give --teacher-topk <= {vocab} ({TEACHER_TOPK} measured, benchmarks/results/recovery.md)"
            )
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (5e-5 if self.full else 1e-3)

    def to_dict(self) -> dict:
        return {**asdict(self), "lr": self.learning_rate}


@dataclass
class RecoverResult:
    model: torch.nn.Module  # the recovered slim model (LoRA merged), eval mode
    tokenizer: object
    record: dict  # the slim record with its "recovery" section


# ---------------------------------------------------------------------------- math


def distill_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    input_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    lm_weight: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """The distillation loss of one batch and its parts (floats, for logging).

    student_logits: ``[B, S, V]``. teacher: its logits ``[B, S, V']`` (V' >= V is cut to V),
    or a cached top-k ``(logprobs [B, S, k], ids [B, S, k])`` at ``temperature``: the KL is then
    that of the two distributions with the tail (every other token) merged into one outcome
    (:func:`kl_and_grad`). input_ids: ``[B, S]`` for the LM loss.

        kl = T^2 * mean_{b,s} sum_v P_t(v) (log P_t(v) - log P_s(v)),   P = softmax(logits / T)
        lm = mean_{b, s < S-1} -log P_s(x_{s+1})   (at T = 1)

    The KL and its gradient G with respect to the logits come from :func:`kl_and_grad`; the loss
    returned has the KL's value and, through ``sum(logits * G)``, its gradient.
    """
    z = student_logits.flatten(0, 1)  # [N, V]
    if isinstance(teacher, tuple):
        teacher = (teacher[0].flatten(0, 1), teacher[1].flatten(0, 1))  # [N, k] each
    else:
        teacher = teacher.flatten(0, 1)  # [N, V']
    kl, grad = kl_and_grad(z.detach(), teacher, temperature)
    surrogate = (z * grad).sum()  # d/dz = grad
    loss = kl + (surrogate - surrogate.detach())
    parts = {"kl": float(kl)}
    if lm_weight > 0:
        lm = F.cross_entropy(student_logits[:, :-1].flatten(0, 1).to(LOSS_DTYPE), input_ids[:, 1:].flatten())
        loss = loss + lm_weight * lm
        parts["lm"] = float(lm.detach())
    parts["loss"] = float(loss.detach())
    return loss, parts


def hidden_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``mean_l mean_{b,s} |h_s^l - h_t^l|^2 / |h_t^l|^2`` over the decoder layers' outputs (float32 scalar).

    student, teacher: ``output_hidden_states`` of the two models, ``L + 1`` tensors ``[B, S, H]``
    each (the embeddings first, the same in both, and skipped). The teacher's are constants.
    """
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student hidden states against {len(teacher)} of the teacher")
    terms = []
    for h_s, h_t in zip(student[1:], teacher[1:], strict=True):
        h_t = h_t.to(LOSS_DTYPE)
        err = (h_s.to(LOSS_DTYPE) - h_t).pow(2).sum(-1)  # [B, S]
        terms.append((err / h_t.pow(2).sum(-1).clamp_min(1e-12)).mean())
    return torch.stack(terms).mean()


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    x = logits.to(LOSS_DTYPE)
    return x if temperature == 1.0 else x / temperature


@torch.no_grad()
def kl_and_grad(
    z: torch.Tensor, teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor], temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``T^2 * mean_rows KL(P_t || P_s)`` of tempered distributions and its gradient with respect to ``z``.

    z: the student's logits ``[N, V]``; teacher: its logits ``[N, V']`` or its top-k
    ``(log-probs [N, k], ids [N, k])``. With the top-k, the KL is that of the two distributions
    coarsened to k + 1 outcomes, the k tokens and the tail (the rest merged into one):

        KL = sum_{i in K} p_i log(p_i / q_i) + r_p log(r_p / r_q),   r = 1 - sum_{i in K} (tail mass)

    an exact KL, zero only when the student matches the k probabilities and the tail's mass.
    (Renormalising P over the k instead, as this did before 2026-12-07, inflates the teacher's
    head by 1 / (1 - r_p) and drives the student's tail to zero: on SmolLM2 with k = 128 that
    recovered nothing, benchmarks/results/recovery.md.) The gradient is ``T / N * (Q - P~)``, Q the
    student's tempered softmax and P~ the teacher's P on the k, the student's own tail shape
    rescaled to the teacher's tail mass (``q_j r_p / r_q``) elsewhere; with full teacher logits
    ``T / N * (Q - P)``. It is formed :data:`KL_CHUNK_ROWS` rows at a time: the float32 ``[N, V]`` temporaries of
    the plain autograd formula (two log-softmaxes, the exp, the product and their backward)
    never exist, and the rows in flight stay in cache. Returns (float32 scalar, gradient in
    z's dtype). On the 2-core CPU, 1024 x 49152 bf16 logits: 0.24 s instead of 0.58 s.
    """
    n, vocab = z.shape
    grad = torch.empty_like(z)
    total = torch.zeros((), dtype=torch.float64, device=z.device)
    for a in range(0, n, KL_CHUNK_ROWS):
        rows = slice(a, a + KL_CHUNK_ROWS)
        log_q = F.log_softmax(_tempered(z[rows], temperature), dim=-1)  # [r, V]
        if isinstance(teacher, tuple):
            log_p, top = teacher[0][rows].to(LOSS_DTYPE), teacher[1][rows].long()  # [r, k] each
            p, log_q_top = log_p.exp(), log_q.gather(-1, top)
            total += (p * (log_p - log_q_top)).sum(dtype=torch.float64)
            if top.shape[-1] < vocab:  # the tail, one outcome: r_p log(r_p / r_q)
                q_top = log_q_top.exp()
                rest_p = (1.0 - p.sum(-1)).clamp_min(0.0)  # [r]
                log_rest_q = _log_tail_mass(log_q, top, q_top)
                log_ratio = torch.where(rest_p > 0, rest_p.clamp_min(1e-30).log() - log_rest_q, 0.0)
                total += (rest_p * log_ratio).sum(dtype=torch.float64)
                q = log_q.exp_().mul_((1.0 - log_ratio.exp() * (rest_p > 0))[:, None])  # tail: q_j (1 - r_p / r_q)
                grad[rows] = q.scatter_(-1, top, q_top - p)  # the k: q_i - p_i
            else:
                grad[rows] = log_q.exp_().scatter_add_(-1, top, -p)
        else:
            log_p = F.log_softmax(_tempered(teacher[rows, :vocab], temperature), dim=-1)  # [r, V]
            p = log_p.exp()
            total += (p * (log_p - log_q)).sum(dtype=torch.float64)
            grad[rows] = log_q.exp_().sub_(p)
    grad.mul_(temperature / n)
    return (total * (temperature**2 / n)).to(LOSS_DTYPE), grad


def _log_tail_mass(log_q: torch.Tensor, top: torch.Tensor, q_top: torch.Tensor) -> torch.Tensor:
    """``log r_q`` per row: the log of the student's mass outside the top-k ids ``top`` ``[r, k]``.

    ``1 - sum(q_top)`` in float64 where that is well above float32's rounding of the k terms
    (:data:`TAIL_EXACT_BELOW`), else a log-sum-exp over the tail itself (no cancellation), for those rows only.
    """
    rest = 1.0 - q_top.sum(-1, dtype=torch.float64)  # [r]
    out = rest.clamp_min(1e-300).log().to(log_q.dtype)
    small = (rest < TAIL_EXACT_BELOW).nonzero()[:, 0]
    if small.numel():
        out[small] = torch.logsumexp(log_q[small].scatter(-1, top[small], float("-inf")), dim=-1)
    return out


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """calibration.topk_logprobs, the targets the sampler keeps too (imported here: calibration loads transformers,
    which the CLI's start does not)."""
    from .calibration import topk_logprobs

    return topk_logprobs(teacher_logits, k, temperature)


def lr_at(step: int, steps: int, lr: float) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then cosine decay to 0."""
    warmup = max(1, int(WARMUP_FRACTION * steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_order(nsamples: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Which training sequences each step uses: ``[steps, batch_size]``, epochs of seeded permutations."""
    g = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    perms = [torch.randperm(nsamples, generator=g) for _ in range(-(-need // nsamples))]
    return torch.cat(perms)[:need].view(steps, batch_size)


# ---------------------------------------------------------------------------- state


class RecoverState:
    """The resume state of one recovery: trainable weights, optimizer moments, step, data ids.

    Layout: ``data.safetensors`` (training and held-out ids; ``teacher.safetensors`` the
    cached top-k when asked), ``weights.safetensors`` and ``optim.safetensors`` (replaced
    together at each save), ``state.json`` (step, losses, fingerprint) replaced last.
    """

    def __init__(self, directory: Path, identity: dict):
        self.directory = Path(directory)
        self.identity = identity
        self.meta: dict | None = None

    @classmethod
    def open(cls, directory: Path, identity: dict, *, resume: bool) -> RecoverState:
        state = cls(directory, identity)
        meta = None
        if resume and (state.directory / STATE_FILE).is_file():
            try:
                meta = json.loads((state.directory / STATE_FILE).read_text())
            except (OSError, ValueError):
                meta = None
        if meta is not None:
            if meta.get("format") != FORMAT or meta.get("fingerprint") != fingerprint(identity):
                old = (meta.get("identity") or {}).get("options") or {}
                new = identity.get("options", {})
                changed = [
                    f"--{k.replace('_', '-')} {old.get(k)!r} there, {new.get(k)!r} now"
                    for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)
                ]
                what = ", ".join(changed) or "the student or teacher changed"
                raise BadInputError(
                    f"recover state in {directory} does not match this run ({what}); "
                    f"drop --resume to start over or delete {directory}"
                )
            state.meta = meta
            logger.info("resuming recovery from %s at step %d", directory, meta["step"])
            return state
        if state.directory.exists():
            if not resume:
                logger.warning("clearing old recover state in %s (pass --resume to continue it)", directory)
            shutil.rmtree(state.directory)
        try:
            state.directory.mkdir(parents=True)
        except OSError as err:
            raise (write_error(err, state.directory) or err) from err
        return state

    @property
    def step(self) -> int:
        return self.meta["step"] if self.meta else 0

    def load(self, name: str) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        path = self.directory / f"{name}.safetensors"
        if not path.is_file():
            return None
        return {k: v.clone() for k, v in load_file(str(path)).items()}

    def save(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        try:
            atomic_write(
                self.directory / f"{name}.safetensors",
                lambda tmp: save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp)),
            )
        except OSError as err:
            raise (write_error(err, self.directory) or err) from err

    def commit(self, step: int, history: list[dict], extra: dict) -> None:
        """state.json, replaced last: the step the saved weights and moments belong to."""
        meta = {
            "format": FORMAT,
            "fingerprint": fingerprint(self.identity),
            "identity": self.identity,
            "step": step,
            "history": history,
            **extra,
        }
        text = json.dumps(meta, indent=1, default=str) + "\n"
        atomic_write(self.directory / STATE_FILE, lambda tmp: tmp.write_text(text))
        fsync_dir(self.directory)
        self.meta = meta

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def default_state_dir(out: Path) -> Path:
    """Where `recover --out OUT` keeps its resume state: the hidden sibling `.OUT.recover`."""
    return resume_state_dir(out, "recover")


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    state = optimizer.state_dict()["state"]
    out = {}
    for i, name in enumerate(names):
        for key, value in state.get(i, {}).items():
            out[f"{name}::{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def _load_optimizer(optimizer: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
    sd = optimizer.state_dict()
    sd["state"] = {}
    for i, name in enumerate(names):
        entry = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.split("::", 1)[0] == name}
        if entry:
            sd["state"][i] = entry
    optimizer.load_state_dict(sd)


# ---------------------------------------------------------------------------- models


def check_pair(student, teacher, student_path: str, teacher_src: str) -> None:
    """Refuse a teacher that cannot teach this student (other vocabulary or hidden size)."""
    s, t = student.config, teacher.config
    if s.model_type != SLIM_MODEL_TYPE:
        raise CheckpointError(
            f"{student_path} is not a slim checkpoint (model type {s.model_type!r}); "
            "give the --out of `slimgpt-deploy prune`"
        )
    if int(t.vocab_size) != int(s.vocab_size):
        raise BadInputError(
            f"teacher {teacher_src} has a vocabulary of {t.vocab_size}, the slim model {s.vocab_size}; "
            "give the dense model the slim checkpoint was pruned from as --teacher"
        )
    if int(t.hidden_size) != int(s.hidden_size):
        raise BadInputError(
            f"teacher {teacher_src} has hidden size {t.hidden_size}, the slim model {s.hidden_size}; "
            "give the dense model the slim checkpoint was pruned from as --teacher"
        )


def _trainable(student, config: RecoverConfig):
    """Wrap the student for training: (model to train, {name: parameter} trained, in a fixed order)."""
    student.requires_grad_(False)
    if config.full:
        model = student
        for name, p in student.named_parameters():
            if name.startswith(f"{SLIM.layers}.") or name == f"{SLIM.norm}.weight":
                p.requires_grad_(True)
    else:
        from .extras import require

        require("peft")
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(config.seed)  # LoRA A's initialisation
        lora = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=0.0,
            bias="none",
            target_modules=list(LORA_TARGETS),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(student, lora)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return model, params


def working_teacher(teacher, config: RecoverConfig):
    """The teacher that samples the data and gives the targets: a bfloat16 copy under bf16, else itself.

    Under autocast a float32 model has every weight cast again at every forward, which on a CPU
    costs as much as a bf16 decode step; the copy is cast once. The float32 teacher stays the
    reference of the before/after fidelity checks. Memory: half the teacher's size more.
    """
    if config.precision != "bf16":
        return teacher
    return copy.deepcopy(teacher).to(torch.bfloat16)


def _merged(model, config: RecoverConfig):
    if config.full:
        return model
    return model.merge_and_unload()


# ---------------------------------------------------------------------------- the loop


def recover(
    student_dir: Path,
    teacher: str,
    config: RecoverConfig | None = None,
    *,
    eval_text: Path | None = None,
    eval_seqlen: int = 2048,
    eval_max_tokens: int | None = None,
    state_dir: Path | None = None,
    resume: bool = False,
    on_step: Callable[[int, int, dict], None] | None = None,
) -> RecoverResult:
    """Distil ``teacher`` (a model source) into the slim checkpoint ``student_dir``; see the module doc.

    ``state_dir``: where to keep resume state (None: no state, nothing resumable).
    ``on_step(step, steps, parts)`` is called after every optimizer step (1-based).
    """
    from .calibration import get_calibration
    from .checkpoint import read_record
    from .evaluate import fidelity, load_text, perplexity, text_to_ids
    from .sources import load_model, source_identity

    config = config or RecoverConfig()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    student_dir = Path(student_dir)
    if not student_dir.is_dir():
        raise BadInputError(f"slim checkpoint {student_dir} does not exist; give the --out of `slimgpt-deploy prune`")
    teacher_m = load_model(teacher, device=config.device)
    student_m = load_model(str(student_dir), device=config.device)
    check_pair(student_m.model, teacher_m.model, str(student_dir), teacher)
    config = config.for_vocabulary(int(teacher_m.model.config.vocab_size))
    ids_eval = text_to_ids(student_m.tokenizer, load_text(eval_text)) if eval_text is not None else None
    record = read_record(student_dir) if (student_dir / "slimgpt.json").is_file() else {}
    for stale in ("verification", "build_report"):  # about the input checkpoint's build, not this one
        record.pop(stale, None)
    identity = {
        "student": source_identity(str(student_dir)),
        "teacher": source_identity(teacher),
        "options": config.to_dict(),
    }
    state = RecoverState.open(state_dir, identity, resume=resume) if state_dir is not None else None
    working = working_teacher(teacher_m.model, config)  # samples the data and gives the targets
    with _removed_if_unused(state):
        # ---- data: training + held-out sequences, from the teacher (self) or a text
        t0, c0 = time.perf_counter(), time.process_time()
        stored = state.load("data") if state is not None and state.meta else None
        sampled_cache = None  # the teacher's top-k from its own sampling pass (`self` data with teacher_topk)
        if stored is not None:
            train_ids, held_ids = stored["train"], stored["heldout"]
            data_record = state.meta["data"]
        else:
            with config.autocast():
                calib = get_calibration(
                    config.data,
                    working,
                    teacher_m.tokenizer,
                    nsamples=config.nsamples + config.heldout,
                    seqlen=config.seqlen,
                    seed=config.seed,
                    device=config.device,
                    self_batch=SELF_BATCH.get(torch.device(config.device).type),
                    # the sampler's log-probs are at temperature 1: another T needs a teacher pass
                    logits_topk=config.teacher_topk if config.temperature == 1.0 else 0,
                )
            train_ids, held_ids = calib.input_ids[: config.nsamples], calib.input_ids[config.nsamples :]
            if calib.next_topk is not None:
                sampled_cache = {
                    "logprobs": calib.next_topk[0][: config.nsamples],
                    "ids": calib.next_topk[1][: config.nsamples],
                }
            data_record = {**calib.describe(), "train_sequences": config.nsamples, "heldout_sequences": config.heldout}
            if state is not None:
                state.save("data", {"train": train_ids, "heldout": held_ids})
        seconds = {"data": round(time.perf_counter() - t0, 3)}
        cpu = {"data": round(time.process_time() - c0, 3)}

        student, teach = student_m.model, teacher_m.model
        teach.eval()
        fid_seqlen = config.seqlen
        t0 = time.perf_counter()
        before = fidelity(student, teach, held_ids.flatten(), seqlen=fid_seqlen) if config.heldout else None
        ppl_before = (
            perplexity(student, ids_eval, seqlen=eval_seqlen, max_tokens=eval_max_tokens)
            if ids_eval is not None
            else None
        )
        seconds["eval_before"] = round(time.perf_counter() - t0, 3)

        # ---- teacher cache (top-k log-probs of every training sequence)
        cache, cache_source = None, None
        if config.teacher_topk:
            t0, c0 = time.perf_counter(), time.process_time()
            cache = state.load("teacher") if state is not None and state.meta else None
            if cache is None:
                cache = sampled_cache if sampled_cache is not None else _teacher_cache(working, train_ids, config)
                cache_source = "the sampling pass" if sampled_cache is not None else "a teacher forward pass"
                if state is not None:
                    state.save("teacher", cache)
            seconds["teacher_cache"] = round(time.perf_counter() - t0, 3)
            cpu["teacher_cache"] = round(time.process_time() - c0, 3)
            working = sampled_cache = None  # training never runs it: its bfloat16 copy (under bf16) is freed

        # ---- the trainable model, optimizer, and (on resume) their saved state
        model, params = _trainable(student, config)
        names = list(params)
        optimizer = torch.optim.AdamW(list(params.values()), lr=config.learning_rate, weight_decay=config.weight_decay)
        start, history = 0, []
        if state is not None and state.meta and state.step > 0:
            weights = state.load("weights")
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(weights[name])
            _load_optimizer(optimizer, names, state.load("optim"))
            start, history = state.step, list(state.meta["history"])
        order = batch_order(config.nsamples, config.steps, config.batch_size, config.seed)

        hidden = config.hidden_weight > 0  # the layer outputs of both models are needed at every step
        t0, c0 = time.perf_counter(), time.process_time()
        model.train()
        step = start
        try:
            for step in range(start, config.steps):
                rows = order[step]
                ids = train_ids[rows].to(config.device)  # [B, S]
                target_hidden = None
                if cache is not None:
                    target = (cache["logprobs"][rows].to(config.device), cache["ids"][rows].to(config.device))
                else:
                    with torch.inference_mode(), config.autocast():
                        out = working(input_ids=ids, use_cache=False, output_hidden_states=hidden)
                    target = out.logits.clone()  # [B, S, V]; clones: inference tensors cannot enter autograd
                    if hidden:
                        target_hidden = tuple(h.clone() for h in out.hidden_states)
                    del out
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, config.steps, config.learning_rate)
                with config.autocast():
                    out = model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
                logits = out.logits  # [B, S, V]
                loss, parts = distill_loss(
                    logits, target, ids, temperature=config.temperature, lm_weight=config.lm_weight
                )
                if hidden:
                    h_loss = hidden_loss(out.hidden_states, target_hidden)
                    loss = loss + config.hidden_weight * h_loss
                    parts["hidden"] = float(h_loss.detach())
                    parts["loss"] = float(loss.detach())
                del out, target_hidden
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(list(params.values()), GRAD_CLIP))
                optimizer.step()
                del logits, loss, target
                parts["lr"] = optimizer.param_groups[0]["lr"]
                history.append({"step": step + 1, **{k: round(v, 6) for k, v in parts.items()}})
                if not math.isfinite(parts["loss"]):
                    from .errors import NumericalError

                    raise NumericalError(f"recovery loss became {parts['loss']} at step {step + 1}; lower --lr")
                if state is not None and ((step + 1) % config.save_every == 0) and step + 1 < config.steps:
                    state.save("weights", {n: p for n, p in params.items()})
                    state.save("optim", _optimizer_tensors(optimizer, names))
                    state.commit(step + 1, history, {"data": data_record})
                if on_step is not None:
                    on_step(step + 1, config.steps, parts)
        except KeyboardInterrupt as err:
            code = getattr(err, "exit_code", 130)
            if state is not None and state.step > 0:
                raise Interrupted(
                    f"interrupted; recover state in {state.directory} (step {state.step}/{config.steps}); "
                    "rerun with --resume",
                    code,
                ) from None
            raise Interrupted("interrupted; no output was written", code) from None
        seconds["train"] = round(time.perf_counter() - t0, 3)
        cpu["train"] = round(time.process_time() - c0, 3)
        if start:
            seconds["train_resumed_from_step"] = start
        model.eval()
        slim = _merged(model, config)
        slim.requires_grad_(False)

        t0 = time.perf_counter()
        after = fidelity(slim, teach, held_ids.flatten(), seqlen=fid_seqlen) if config.heldout else None
        ppl_after = (
            perplexity(slim, ids_eval, seqlen=eval_seqlen, max_tokens=eval_max_tokens) if ids_eval is not None else None
        )
        seconds["eval_after"] = round(time.perf_counter() - t0, 3)
        slim.to("cpu")  # saved from the host
        seconds["total"] = round(time.perf_counter() - t_start, 3)
        # the recovery proper: making the data, caching the teacher, training (not loading, not the before/after checks)
        seconds["recovery"] = round(sum(seconds.get(k, 0.0) for k in ("data", "teacher_cache", "train")), 3)
        cpu["total"] = round(time.process_time() - cpu_start, 3)
        cpu["recovery"] = round(sum(cpu.get(k, 0.0) for k in ("data", "teacher_cache", "train")), 3)

        record = dict(record)
        record["recovery"] = {
            "method": "distillation",
            "trained": "full decoder weights"
            if config.full
            else f"LoRA r={config.rank} alpha={config.alpha:g} on {', '.join(LORA_TARGETS)} (merged)",
            "teacher": teacher,
            "options": config.to_dict(),
            "data": data_record,
            "steps": config.steps,
            "tokens": config.steps * config.batch_size * config.seqlen,
            # where the teacher's top-k came from (None: no cache, or a resumed run's stored one)
            "teacher_topk_from": cache_source,
            "seconds": seconds,
            "cpu_seconds": cpu,  # process CPU time (all threads): on a shared machine, wall time alone misleads
            "threads": torch.get_num_threads(),
            "device": config.device,
            "precision": config.precision,
            "loss": _loss_summary(history),
            "fidelity": {
                "text": f"{config.heldout} held-out sequences of {config.seqlen} tokens ({data_record['source']})",
                "before": before.__dict__ if before else None,
                "after": after.__dict__ if after else None,
            },
            "perplexity": (
                {
                    "text": str(eval_text),
                    "seqlen": eval_seqlen,
                    "max_tokens": eval_max_tokens,
                    "before": ppl_before.ppl,
                    "after": ppl_after.ppl,
                }
                if ppl_after is not None
                else None
            ),
        }
        from .api import versions

        record["recovery"]["versions"] = versions()
        if state is not None:
            record["recovery"]["state_dir"] = str(state.directory)
        logger.info(
            "recovered %s in %.1f s: held-out KL %s -> %s",
            student_dir,
            seconds["total"],
            f"{before.kl:.4f}" if before else "-",
            f"{after.kl:.4f}" if after else "-",
        )
        return RecoverResult(model=slim, tokenizer=student_m.tokenizer, record=record)


@contextmanager
def _removed_if_unused(state: RecoverState | None) -> Iterator[None]:
    """Remove the state directory when the run fails before its first saved step (nothing worth resuming)."""
    try:
        yield
    except BaseException:
        if state is not None and state.step == 0:
            state.remove()
        raise


def _teacher_cache(teacher, train_ids: torch.Tensor, config: RecoverConfig) -> dict[str, torch.Tensor]:
    lps, ids = [], []
    with torch.inference_mode(), config.autocast():
        for start in range(0, train_ids.shape[0], config.batch_size):
            batch = train_ids[start : start + config.batch_size].to(config.device)
            logits = teacher(input_ids=batch, use_cache=False).logits
            lp, top = teacher_topk(logits, config.teacher_topk, config.temperature)
            lps.append(lp.cpu())  # kept (and saved) on the host
            ids.append(top.cpu())
    return {"logprobs": torch.cat(lps), "ids": torch.cat(ids)}  # [N, S, k] each


def _loss_summary(history: list[dict]) -> dict:
    """First/last losses, means of the first and last tenth, and ~20 points of the curve."""
    if not history:
        return {}
    n = len(history)
    tenth = max(1, n // 10)
    keys = [k for k in ("loss", "kl", "lm", "hidden") if k in history[0]]
    stride = max(1, n // 20)
    return {
        "first": {k: history[0][k] for k in keys},
        "last": {k: history[-1][k] for k in keys},
        "mean_first_tenth": {k: round(sum(h[k] for h in history[:tenth]) / tenth, 6) for k in keys},
        "mean_last_tenth": {k: round(sum(h[k] for h in history[-tenth:]) / tenth, 6) for k in keys},
        "curve": [{"step": h["step"], **{k: h[k] for k in keys}} for h in history[::stride]],
    }


def recover_to_checkpoint(
    student_dir: Path,
    teacher: str,
    out: Path,
    config: RecoverConfig | None = None,
    *,
    force: bool = False,
    resume: bool = False,
    state_dir: Path | None = None,
    on_step: Callable[[int, int, dict], None] | None = None,
    **kwargs,
) -> RecoverResult:
    """`recover`, then save the recovered slim checkpoint atomically to `out` (resume state beside it)."""
    from .checkpoint import save_checkpoint

    out = Path(out)
    check_output_dir(out, force)
    state_dir = Path(state_dir) if state_dir is not None else default_state_dir(out)
    result = recover(student_dir, teacher, config, state_dir=state_dir, resume=resume, on_step=on_step, **kwargs)
    save_checkpoint(result.model, result.tokenizer, result.record, out, force=force)
    shutil.rmtree(state_dir, ignore_errors=True)
    result.record["recovery"].pop("state_dir", None)
    return result
