"""Calibration across processes with torch.distributed (`prune --nproc N`, or under `torchrun`).

The layer-wise prune (engine.py) stays one algorithm; a process group adds four hooks:
  1. calibration ids come from rank 0 (`from_rank0`): self-sampled text depends on
     the device's floating point, so one rank samples and every rank gets the same ids;
  2. each rank takes a contiguous share of the samples (`shard`) and runs only those
     through every layer;
  3. after accumulating a Hessian, the ranks sum it (`reduce_hessian`): obs.accumulate_hessian
     keeps the running mean H = 2/n sum x x^T, so the sums H*n and the counts n are
     all-reduced and divided again: H = 2/N sum over ALL samples, as in one process;
  4. the pruning decision of each layer (kept units and the OBS-updated weights) is
     computed on rank 0 from the summed Hessian and broadcast (`from_rank0`): every
     rank then holds bit-identical weights, whatever floating-point differences
     its device would have introduced had it repeated the factorizations.
Every rank then runs its own samples through the pruned layer to feed the next one,
and only rank 0 writes the checkpoint.

Outside a process group (WORLD_SIZE unset or 1) every hook is the identity, so the
single-process engine is unchanged. `launch` is the `--nproc` launcher: it starts N
processes on a free localhost port (NCCL with one GPU per rank when the device is CUDA,
each spawned; else gloo, on Linux each forked from a server that has imported the pruner),
streams rank 0's progress back and ends every rank on the first failure with that
rank's one-line message and exit code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import multiprocessing
import os
import queue as queue_mod
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import BadInputError, SlimGPTError, first_line

log = logging.getLogger(__name__)

# How long a rank waits in a collective (e.g. while rank 0 samples the calibration text or
# runs one layer's OBS) before the process group gives up; override with this variable.
TIMEOUT_ENV = "SLIMGPT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800
# After the first rank fails, how long the launcher collects the others' messages (to report
# the root cause, not a peer's "connection reset") before ending them.
FAILURE_GRACE_S = 2.0
STOP_GRACE_S = 10.0


class RankFailed(SlimGPTError):
    """A rank of a `--nproc` run failed; carries that rank's message and exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------- where this process stands


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (or `launch`); 1 when unset."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def backend_for(device: str) -> str:
    """NCCL when the layers are pruned on CUDA devices (one per rank), else gloo."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def _timeout() -> timedelta:
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        raise BadInputError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds; e.g. {DEFAULT_TIMEOUT_S}") from None
    return timedelta(seconds=seconds)


@contextlib.contextmanager
def process_group(config) -> Iterator:
    """Join the process group that WORLD_SIZE/RANK/LOCAL_RANK/MASTER_* describe; yields this rank's config.

    A no-op (yields `config`) in a single process. With CUDA, rank r prunes on
    cuda:LOCAL_RANK (choose the GPUs with CUDA_VISIBLE_DEVICES).
    """
    size = env_world_size()
    if size <= 1 or dist.is_initialized():
        yield config
        return
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    backend = backend_for(config.device)
    device = None
    if backend == "nccl":
        if torch.cuda.device_count() <= local:
            raise BadInputError(
                f"rank with LOCAL_RANK {local} needs its own GPU but {torch.cuda.device_count()} are visible; "
                "run at most one process per GPU (--nproc / torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        config = dataclasses.replace(config, device=str(device))
    kwargs = {"device_id": device} if device is not None else {}
    dist.init_process_group(backend, timeout=_timeout(), **kwargs)
    log.info("rank %d of %d joined (%s, device %s)", dist.get_rank(), size, backend, config.device)
    yield config
    dist.destroy_process_group()  # only on success: after a failure the process exits and its peers see it


# ---------------------------------------------------------------- the engine's hooks


def shard(samples: torch.Tensor, flag: str = "--nsamples") -> torch.Tensor:
    """This rank's contiguous share of the calibration samples [n, ...] (all of them in one process).

    `flag`: the option that set how many there are, named in the error when there are fewer than ranks.
    """
    if not active():
        return samples
    if len(samples) < world_size():
        raise BadInputError(
            f"{len(samples)} calibration samples cannot be split over {world_size()} processes; "
            f"raise {flag} or lower --nproc"
        )
    return torch.tensor_split(samples, world_size())[rank()]


def reduce_hessian(H: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """Sum a running-mean Hessian over the ranks: (2/N sum over all samples of x x^T, N).

    H is 2/n sum x x^T over this rank's n inputs; the ranks add the sums H*n and the
    counts, then divide. H is updated in place (its memory is the largest in the layer).
    """
    if not active():
        return H, n
    count = torch.tensor([n], dtype=torch.int64, device=H.device)
    dist.all_reduce(count)
    total = int(count.item())
    H.mul_(n)  # sum form: 2 * sum x x^T over this rank's inputs
    dist.all_reduce(H)
    if total > 0:
        H.div_(total)
    return H, total


@dataclasses.dataclass(frozen=True)
class _TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    on_cpu: bool


def _meta(value) -> tuple[type | None, object]:
    """(dataclass type, its fields with tensors replaced by their specs), or (None, value) to pickle whole."""
    if not dataclasses.is_dataclass(value):
        return None, value
    fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return type(value), {
        k: _TensorSpec(tuple(v.shape), v.dtype, v.device.type == "cpu") if isinstance(v, torch.Tensor) else v
        for k, v in fields.items()
    }


def from_rank0(fn: Callable[[], object], device: torch.device | str = "cpu"):
    """`fn()` computed on rank 0 only and given to every rank (fn() itself in one process).

    A dataclass result has its tensor fields broadcast as tensors (on `device`, the compute
    device, which NCCL needs; CPU tensors come back to the CPU) and the other fields pickled;
    anything else is pickled whole. Rank 0 gets its own object back.
    """
    if not active():
        return fn()
    device = torch.device(device)
    value = fn() if is_main() else None
    box = [_meta(value) if is_main() else None]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    cls, payload = box[0]
    if cls is None:
        return payload
    fields = dict(payload)
    for k, spec in payload.items():
        if isinstance(spec, _TensorSpec):
            t = (
                getattr(value, k).to(device).contiguous()
                if is_main()
                else torch.empty(spec.shape, dtype=spec.dtype, device=device)
            )
            dist.broadcast(t, src=0)
            fields[k] = t.cpu() if spec.on_cpu else t
    return value if is_main() else cls(**fields)


# ---------------------------------------------------------------- the --nproc launcher


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class _Job:
    """What every rank of a `launch` runs: prune_to_checkpoint(model, out, config, ...)."""

    model: str
    out: Path
    config: object  # PruneConfig
    force: bool
    max_memory: int | None
    log_level: int
    threads: int | None
    env: dict[str, str]  # the launcher's environment when it starts the ranks (a forkserver's may be older)


def per_rank(config):
    """The config with this group's share of the samples (for memory estimates); `config` in one process."""
    size = world_size() if active() else env_world_size()
    return config if size <= 1 else _share(config, size)


def _share(config, size: int):
    """`config` with one of `size` processes' share of the calibration and Fisher samples."""
    return dataclasses.replace(
        config,
        nsamples=math.ceil(config.nsamples / size),
        fisher_samples=math.ceil(config.fisher_samples / size),
    )


def check_nproc(nproc: int, config, *, resume: bool = False) -> None:
    """Refuse a `--nproc` that cannot run here, before any process starts."""
    if resume:
        raise BadInputError(
            "--resume does not work with --nproc or torchrun yet (each process holds its own share of the "
            "activations); rerun without --resume, or resume a single-process prune without --nproc"
        )
    if nproc < 1:
        raise BadInputError(f"--nproc {nproc} must be at least 1")
    if active() or env_world_size() > 1:
        raise BadInputError("--nproc cannot be used under torchrun (it already started the processes); drop --nproc")
    counts = {"--nsamples": config.nsamples}
    if config.fisher_samples:
        counts["--fisher-samples"] = config.fisher_samples
    for flag, count in counts.items():
        if count < nproc:
            raise BadInputError(f"{flag} {count} cannot be split over {nproc} processes; raise {flag} or lower --nproc")
    if backend_for(config.device) == "nccl" and torch.cuda.device_count() < nproc:
        raise BadInputError(
            f"--nproc {nproc} on {config.device} needs one GPU per process but {torch.cuda.device_count()} are "
            "visible; lower --nproc (or pass --device cpu for processes on the CPU)"
        )


def check_memory(nproc: int, model: str, config, *, max_memory: int | None) -> None:
    """All ranks of `launch` share this host's RAM: each holds the whole model (on the CPU) and
    its share of the activations. Refuse (ResourceError) if nproc of them cannot fit."""
    from ..guards import available_ram, check_fits, estimate_prune, job_size
    from ..sources import model_config

    share = _share(config, nproc)
    one = estimate_prune(job_size(model_config(model), share), max_memory=max_memory)
    total = dataclasses.replace(
        one, ram_bytes=nproc * one.ram_bytes, parts={f"{nproc} x {k}": v for k, v in one.parts.items()}
    )
    check_fits(total, available_ram=available_ram(), free_disk=None)


def launch(
    nproc: int,
    model: str | Path,
    out: Path,
    config,
    *,
    force: bool = False,
    max_memory: int | None = None,
    on_layer: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """`prune_to_checkpoint` over `nproc` local processes; returns rank 0's record.

    Raises RankFailed with the failing rank's one-line message and exit code (every other
    rank is ended); Interrupted on Ctrl-C/SIGTERM (the ranks are ended too).
    """
    from ..atomic import check_output_dir

    check_nproc(nproc, config)
    check_output_dir(Path(out), force)
    backend = backend_for(config.device)
    ctx = rank_context(backend)
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()  # the server imports the pruner while this process checks the memory
    check_memory(nproc, str(model), config, max_memory=max_memory)
    threads = max(1, (os.cpu_count() or 1) // nproc) if backend == "gloo" else None
    level = logging.getLogger().getEffectiveLevel()
    job = _Job(str(model), Path(out), config, force, max_memory, level, threads, dict(os.environ))
    events = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, nproc, port, job, events), name=f"slimgpt-rank{r}") for r in range(nproc)
    ]
    try:
        for p in procs:
            p.start()
        return _supervise(procs, events, on_layer)
    finally:
        _stop(procs)
        events.close()
        events.join_thread()


def rank_context(backend: str, mp=multiprocessing):
    """Where a process that runs the pruner starts (the ranks of `launch`; tests that kill a prune): on CPU (gloo)
    forked from a server that has imported the pruner, else spawned. `mp`: the multiprocessing module (or a stand-in).

    A fresh interpreter spends ~5 s importing torch and transformers (6 s on the 2-core test CPU), once
    per rank. The forkserver imports them once and forks every rank from that state; it runs no tensor
    op, so no torch or OpenMP thread pool exists to break in a fork. CUDA ranks (NCCL) are spawned: a
    CUDA driver initialised by anything in that import (none seen on the CPU build) would not survive the
    fork, and next to pruning a model that needs GPUs the imports cost nothing. Outside Linux every
    rank is spawned: Windows has no forkserver, and macOS's system frameworks (loaded with torch) are not
    safe to fork, which is why Python spawns there by default.
    """
    if backend != "gloo" or not sys.platform.startswith("linux") or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["slimgpt_deploy.api"])
    return ctx


def _supervise(procs, events, on_layer) -> dict:
    """Relay rank 0's progress until every rank has exited; raise on the first failure."""
    record, errors = None, []
    failed_at = None
    while True:
        try:
            event = events.get(timeout=0.2)
        except queue_mod.Empty:
            event = None
        if event is not None:
            kind = event[0]
            if kind == "layer" and on_layer is not None:
                on_layer(*event[1:])
            elif kind == "done":
                record = event[1]
            elif kind == "error":
                errors.append(event[1:])
        codes = [p.exitcode for p in procs]
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = time.monotonic()
        if failed_at is not None and (
            time.monotonic() - failed_at > FAILURE_GRACE_S or all(c is not None for c in codes)
        ):
            raise _failure(procs, codes, errors)
        if all(c == 0 for c in codes):
            if event is None and events.empty():
                break
    if record is None:
        raise RankFailed("rank 0 exited without a result; rerun with -v to see its log", 1)
    return record


def _failure(procs, codes, errors) -> RankFailed:
    """The root cause: a rank's own error (not a peer's broken connection), else a rank that ended
    without a word (killed), else the first error reported."""
    own = [e for e in errors if e[3]]
    reported = {e[0] for e in errors}
    silent = [(r, c) for r, c in enumerate(codes) if c not in (None, 0) and r not in reported]
    if not own and silent:
        r, code = silent[0]
        if code < 0:
            name = signal.Signals(-code).name
            hint = "; out of memory? lower --nproc, --nsamples or --seqlen" if name == "SIGKILL" else ""
            return RankFailed(f"rank {r} of {len(procs)} was killed by {name}{hint}", 128 - code)
        return RankFailed(f"rank {r} of {len(procs)} exited with code {code}; rerun with -v to see its log", code)
    r, message, code, _ = (own or errors)[0]
    return RankFailed(f"{message} (rank {r} of {len(procs)})", code)


def _stop(procs) -> None:
    """End every rank still running: SIGTERM, then SIGKILL after a grace period."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        if p.pid is not None:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()


def _worker(r: int, nproc: int, port: int, job: _Job, events) -> None:
    """One rank of `launch`: join the group, prune, report to the launcher; exit with the error's code."""
    # A forked rank has the environment its server started with; what the launcher has now is what counts
    # (settings read at import, e.g. HF_HUB_OFFLINE, are the server's: the first launch of the process).
    os.environ.clear()
    os.environ.update(job.env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(r),
        LOCAL_RANK=str(r),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
    )
    logging.basicConfig(
        level=job.log_level, format=f"%(levelname)s [rank {r}] %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # rank 0's progress reaches the launcher's bar instead
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launcher, which ends the ranks
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    from ..api import prune_to_checkpoint

    try:
        with process_group(job.config) as config:
            on_layer = (lambda i, n, rec: events.put(("layer", i, n, rec))) if r == 0 else None
            result = prune_to_checkpoint(
                job.model, job.out, config, force=job.force, on_layer=on_layer, max_memory=job.max_memory
            )
        if r == 0:
            events.put(("done", result.record))
    except SlimGPTError as err:
        events.put(("error", r, str(err), err.exit_code, True))
        _exit(events, err.exit_code)
    except BaseException as err:  # a bug, or a peer's failure seen as a broken connection
        secondary = _peer_failure(err)
        if not secondary or log.isEnabledFor(logging.DEBUG):
            traceback.print_exc()
        events.put(("error", r, f"{type(err).__name__}: {first_line(str(err))}", 1, not secondary))
        _exit(events, 1)
    _exit(events, 0)


def _peer_failure(err: BaseException) -> bool:
    """Whether `err` is this rank noticing another rank's end (a broken connection, a timeout)."""
    dist_error = getattr(dist, "DistError", ())
    text = str(err)
    return isinstance(err, dist_error) or (
        isinstance(err, RuntimeError)
        and any(w in text for w in ("gloo", "NCCL", "Connection", "connection", "timed out"))
    )


def _exit(events, code: int) -> None:
    events.close()
    events.join_thread()  # the message reaches the launcher before this rank is seen to exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown (a peer's broken process group can hang it)
