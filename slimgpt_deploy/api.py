"""The Python API: one call from a model source to a pruned model and its record.

    from slimgpt_deploy import PruneConfig, prune
    result = prune("smollm2-135m", PruneConfig(ratio=0.2))
    result.model, result.record

`prune_to_checkpoint` adds the atomic save; the CLI's `prune` calls it.
"""
from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from . import __version__
from .atomic import check_output_dir
from .calibration import get_calibration
from .checkpoint import save_checkpoint
from .config import PruneConfig
from .prune.engine import LayerwisePruner, PruneResult
from .sources import LoadedModel, load_model

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
    model: str | LoadedModel,
    config: PruneConfig | None = None,
    *,
    on_layer: Callable[[int, int, dict], None] | None = None,
) -> PruneResult:
    """Load (if given a source), calibrate and prune; returns the slim model, its tokenizer and record."""
    config = config or PruneConfig()
    t0 = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype=config.torch_dtype)
    calib = get_calibration(
        config.calib, loaded.model, loaded.tokenizer, nsamples=config.nsamples, seqlen=config.seqlen, seed=config.seed
    )
    t_calib = time.perf_counter() - t0
    dense_params = _params(loaded.model)
    dense_decoder = sum(_params(layer) for layer in loaded.model.model.layers)
    result = LayerwisePruner(loaded.model, config).run(calib.input_ids, on_layer=on_layer)
    slim_params = _params(result.model)
    slim_decoder = sum(_params(layer) for layer in result.model.model.layers)
    result.record = {
        "format": "slimgpt-deploy/1",
        "source": {"source": loaded.source, "kind": loaded.kind, "model_type": loaded.model.config.model_type},
        "prune": config.to_dict(),
        "calibration": calib.describe(),
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


def prune_to_checkpoint(
    model: str | LoadedModel,
    out: Path,
    config: PruneConfig | None = None,
    *,
    force: bool = False,
    on_layer: Callable[[int, int, dict], None] | None = None,
) -> PruneResult:
    """`prune`, then save the slim checkpoint atomically to `out` (refused early if it exists without `force`)."""
    check_output_dir(Path(out), force)
    t0 = time.perf_counter()
    result = prune(model, config, on_layer=on_layer)
    result.record["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    save_checkpoint(result.model, result.tokenizer, result.record, Path(out), force=force)
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
) -> dict:
    """Perplexity of `model` on a text file and/or its fidelity (KL, top-1) to `reference`.

    Without `fidelity_text`, fidelity is measured on text sampled from the
    reference itself (seeded), so it needs no dataset.
    """
    from .evaluate import fidelity, load_text, perplexity, text_to_ids

    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    results: dict = {"model": loaded.source}
    if text is not None:
        ids = text_to_ids(loaded.tokenizer, load_text(text))
        ppl = perplexity(loaded.model, ids, seqlen=seqlen, max_tokens=max_tokens)
        results["perplexity"] = {"text": str(text), **ppl.__dict__}
    if reference is not None:
        ref = reference if isinstance(reference, LoadedModel) else load_model(reference)
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
    return results
