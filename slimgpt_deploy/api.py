"""The Python API: one call from a model source to a pruned model and its record.

    from slimgpt_deploy import PruneConfig, prune
    result = prune("smollm2-135m", PruneConfig(ratio=0.2))
    result.model, result.record

`prune_to_checkpoint` adds the atomic save and resumable state; the CLI's `prune` calls it.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers

from ._version import __version__
from .atomic import check_output_dir, existing_parent
from .calibration import get_calibration
from .checkpoint import save_checkpoint
from .config import PruneConfig
from .errors import Interrupted, ResourceError, SlimGPTError
from .families import layout_of
from .guards import Estimate, available_ram, check_fits, estimate_prune, free_disk, job_size
from .layout import SLIM
from .prune import distributed
from .prune.engine import LayerwisePruner, PruneResult, check_weights
from .resume import ResumeState, calibration_identity, default_state_dir
from .sources import LoadedModel, load_model, model_config, source_identity

if TYPE_CHECKING:
    from .tasks import PreparedTasks, TaskOptions

log = logging.getLogger(__name__)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def versions() -> dict:
    return {
        "slimgpt_deploy": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def prune(
    model: str | Path | LoadedModel,
    config: PruneConfig | None = None,
    *,
    on_layer: Callable[[int, int, dict], None] | None = None,
    max_memory: int | None = None,
) -> PruneResult:
    """Load (if given a source), calibrate and prune; returns the slim model, its tokenizer and record.

    Refuses (ResourceError) a job whose estimated peak memory exceeds what is
    available; `max_memory` (bytes) caps the calibration activations kept in
    memory (beyond it they live on disk; the result is the same).
    """
    config = config or PruneConfig()
    model = str(model) if isinstance(model, Path) else model
    estimate = check_resources(model, config, out=None, max_memory=max_memory)
    return _prune(model, config, on_layer=on_layer, state=None, offload=estimate.activations_on_disk)


def prune_to_checkpoint(
    model: str | Path | LoadedModel,
    out: Path,
    config: PruneConfig | None = None,
    *,
    force: bool = False,
    on_layer: Callable[[int, int, dict], None] | None = None,
    resume: bool = False,
    state_dir: Path | None = None,
    max_memory: int | None = None,
) -> PruneResult:
    """`prune`, then save the slim checkpoint atomically to `out` (refused early if it exists without `force`).

    Every finished layer is committed to `state_dir` (default
    `resume.default_state_dir(out)`, a hidden sibling of `out`), removed once the
    checkpoint is saved. `resume=True` continues from the last finished layer
    (a fresh start when there is no state; BadInputError when the state is from
    another source or options); without it, old state is cleared. Ctrl-C or
    SIGTERM raise `Interrupted` whose message says where the state is.
    Memory and disk are estimated first (guards.py) and a job that cannot fit is refused.
    """
    out = Path(out)
    config = config or PruneConfig()
    model = str(model) if isinstance(model, Path) else model
    check_output_dir(out, force)
    t0 = time.perf_counter()
    model_cfg = model.model.config if isinstance(model, LoadedModel) else model_config(model)
    estimate = check_resources(
        model,
        distributed.per_rank(config),
        out=out,
        max_memory=max_memory,
        model_cfg=model_cfg,
        resumable=not distributed.active(),  # a rank of --nproc keeps no resume state
    )
    if distributed.active():  # one rank of `--nproc` / torchrun: no resume state, rank 0 writes
        return _prune_rank(
            model,
            out,
            config,
            force=force,
            on_layer=on_layer,
            resume=resume,
            offload=estimate.activations_on_disk,
            t0=t0,
        )
    identity = {
        "source": source_identity(model),
        "calibration": calibration_identity(config.calib),
        "options": config.to_dict(),
    }
    state = ResumeState.open(
        Path(state_dir) if state_dir else default_state_dir(out), identity, model_cfg.num_hidden_layers, resume=resume
    )
    try:
        result = _prune(model, config, on_layer=on_layer, state=state, offload=estimate.activations_on_disk)
        result.record["seconds"]["total"] = round(time.perf_counter() - t0, 3)
        save_checkpoint(result.model, result.tokenizer, result.record, out, force=force)
    except KeyboardInterrupt as err:
        code = getattr(err, "exit_code", 130)
        if state.finished == 0 and state.calibration is None:
            state.remove()
            raise Interrupted("interrupted; no output was written", code) from None
        raise Interrupted(f"interrupted; {state.describe()}; rerun with --resume", code) from None
    except BaseException as err:
        worthless = state.finished == 0 and (
            state.calibration is None or isinstance(err, SlimGPTError) and not isinstance(err, ResourceError)
        )
        if worthless:
            state.remove()
            raise
        log.info("kept %s", state.describe())
        if isinstance(err, ResourceError):  # e.g. the disk filled up: worth resuming once there is room
            raise ResourceError(f"{err}; {state.describe()}: rerun with --resume") from err
        raise
    state.remove()
    return result


def _prune_rank(model, out: Path, config: PruneConfig, *, force, on_layer, resume, offload, t0) -> PruneResult:
    """`prune_to_checkpoint` on one rank of a process group (prune/distributed.py): every rank
    prunes its share of the samples, rank 0 alone saves the checkpoint (atomically)."""
    if resume:
        distributed.check_nproc(distributed.world_size(), config, resume=True)  # refused, with what to do
    result = _prune(model, config, on_layer=on_layer, state=None, offload=offload)
    result.record["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    result.record["distributed"] = {
        "world_size": distributed.world_size(),
        "backend": distributed.backend_for(config.device),
    }
    if distributed.is_main():
        save_checkpoint(result.model, result.tokenizer, result.record, out, force=force)
    return result


def check_resources(
    model: str | LoadedModel,
    config: PruneConfig,
    *,
    out: Path | None,
    max_memory: int | None,
    model_cfg=None,
    resumable: bool = False,
) -> Estimate:
    """Estimate the prune's peak memory (and disk under `out`) and refuse it if it cannot fit."""
    if model_cfg is None:
        model_cfg = model.model.config if isinstance(model, LoadedModel) else model_config(model)
    estimate = estimate_prune(
        job_size(model_cfg, config),
        weights_loaded=isinstance(model, LoadedModel),
        max_memory=max_memory,
        resumable=resumable,
    )
    where = existing_parent(out) if out is not None else None
    check_fits(estimate, available_ram=available_ram(), free_disk=free_disk(where) if where else None, where=where)
    log.info(
        "estimated peak memory %.2f GiB, disk %.2f GiB; activations %s",
        estimate.ram_bytes / 2**30,
        estimate.disk_bytes / 2**30,
        "on disk" if estimate.activations_on_disk else "in memory",
    )
    return estimate


def _prune(
    model: str | LoadedModel,
    config: PruneConfig,
    *,
    on_layer: Callable[[int, int, dict], None] | None,
    state: ResumeState | None,
    offload: bool,
) -> PruneResult:
    t0 = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype=config.torch_dtype)
    check_weights(loaded.model)  # every layer, before minutes of calibration
    pruner = LayerwisePruner(loaded.model, config)
    pruner.plans()  # the layer plan's refusals (--layer-ratios, --dense-last, alignment) before calibration too
    input_ids = state.calibration_ids() if state is not None else None
    if input_ids is None:
        calib = distributed.from_rank0(
            lambda: get_calibration(  # every rank calibrates on rank 0's ids
                config.calib,
                loaded.model,
                loaded.tokenizer,
                nsamples=config.nsamples,
                seqlen=config.seqlen,
                seed=config.seed,
                device=config.device,
            ),
            config.device,
        )
        input_ids, calib_record = calib.input_ids, calib.describe()
        t_calib = time.perf_counter() - t0
        if state is not None:
            state.save_calibration(input_ids, {**calib_record, "seconds": round(t_calib, 3)})
    else:
        calib_record = dict(state.calibration)
        t_calib = calib_record.pop("seconds", 0.0)
    dense_params = _params(loaded.model)
    dense_decoder = sum(_params(layer) for layer in layout_of(loaded.model.config).part(loaded.model, "layers"))
    result = pruner.run(input_ids, on_layer=on_layer, state=state, offload=offload)
    slim_params = _params(result.model)
    slim_decoder = sum(_params(layer) for layer in SLIM.part(result.model, "layers"))
    result.record = {
        "format": "slimgpt-deploy/1",
        "source": {"source": loaded.source, "kind": loaded.kind, "model_type": loaded.model.config.model_type},
        "prune": config.to_dict(),
        "calibration": calib_record,
        "ratio_target": result.record.pop("ratio_target"),
        "ratio_achieved_decoder": 1.0 - slim_decoder / dense_decoder,
        "ratio_achieved_model": 1.0 - slim_params / dense_params,
        "params_dense": dense_params,
        "params_slim": slim_params,
        "seconds": {"calibration": round(t_calib, 3), "prune": result.record.pop("prune_seconds")},
        "versions": versions(),
        **result.record,
    }
    result.tokenizer = loaded.tokenizer
    log.info(
        "pruned %s: %.2f%% of decoder parameters removed (target %.2f%%)",
        loaded.source,
        100 * result.record["ratio_achieved_decoder"],
        100 * result.record["ratio_target"],
    )
    return result


def evaluate_model(
    model: str | LoadedModel,
    *,
    text: Path | None = None,
    seqlen: int = 2048,
    max_tokens: int | None = None,
    reference: str | LoadedModel | None = None,
    fidelity_text: Path | None = None,
    fidelity_seqlen: int = 256,
    fidelity_samples: int = 8,
    seed: int = 0,
    tasks: TaskOptions | PreparedTasks | None = None,
    device: str = "cpu",
) -> dict:
    """Perplexity of `model` on a text file, its fidelity (KL, top-1) to `reference`, and/or lm-eval accuracies.

    Without `fidelity_text`, fidelity is measured on text sampled from the
    reference itself (seeded), so it needs no dataset. `tasks` (slimgpt_deploy.tasks)
    are resolved, datasets included, before the model is loaded. Models given by name
    are loaded onto `device` (float32); the evaluations run where each model is.
    """
    from .evaluate import fidelity, load_text, perplexity, text_to_ids
    from .tasks import PreparedTasks, prepare_tasks, run_tasks

    prepared = prepare_tasks(tasks) if tasks is not None and not isinstance(tasks, PreparedTasks) else tasks
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    results: dict = {"model": loaded.source}
    if text is not None:
        ids = text_to_ids(loaded.tokenizer, load_text(text))
        ppl = perplexity(loaded.model, ids, seqlen=seqlen, max_tokens=max_tokens)
        results["perplexity"] = {"text": str(text), **ppl.__dict__}
    if reference is not None:
        ref = reference if isinstance(reference, LoadedModel) else load_model(reference, device=device)
        if fidelity_text is not None:
            ids = text_to_ids(ref.tokenizer, load_text(fidelity_text))
            source = str(fidelity_text)
        else:
            calib = get_calibration(
                "self", ref.model, ref.tokenizer, nsamples=fidelity_samples, seqlen=fidelity_seqlen, seed=seed
            )
            ids, source = calib.input_ids.flatten(), f"self-generated by the reference, seed {seed}"
        fid = fidelity(loaded.model, ref.model, ids, seqlen=fidelity_seqlen)
        results["fidelity"] = {"reference": ref.source, "text": source, **fid.__dict__}
    if prepared is not None:
        results["accuracy"] = run_tasks(loaded.model, loaded.tokenizer, prepared)
    return results
