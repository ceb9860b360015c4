"""Benchmark a dense model against its pruned version on torch, ONNX Runtime and vLLM.

    from slimgpt_deploy.bench import BenchOptions, run_bench
    result = run_bench("smollm2-135m", "out/slim", ["torch", "onnx"], work_dir=Path("build/bench-cache"))

Method (docs/DESIGN.md, "Benchmark method"): every back end x model measurement runs
in its own child process (`python -m slimgpt_deploy.bench.child JOB.json`), dense
first, then pruned, one at a time, so each child's peak RSS (and CUDA peak) is its
own. Per model: prefill / time to first token at batch 1 for each prompt length,
and decode ms per step at each batch size after a prompt of the shortest prompt
length; medians of `repeats` runs after `warmups`. Quality (perplexity of both,
KL(dense || pruned) and top-1 agreement) runs once, in torch, in a child too.
The ideal decode speed-up is the ratio of weight bytes read per token.

The result dict's schema is documented on `run_bench`; `tables.markdown` renders it.
Here: the back-end registries and the orchestration (run_bench, exports, children); the options
in options.py, the two models in models.py, the machine and versions in environment.py.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInputError, SlimGPTError, first_line
from .environment import machine, versions
from .models import MODEL_MARKER, RUN_DTYPE_BYTES, _check_lengths, _read_config, model_dir, model_info
from .options import SAMPLE_TEXT, BenchOptions

__all__ = [
    "BACKENDS",
    "Backend",
    "MeasuredExport",
    "MODEL_MARKER",
    "RUN_DTYPE_BYTES",
    "SAMPLE_TEXT",
    "BenchOptions",
    "machine",
    "missing_extra",
    "model_dir",
    "model_info",
    "run_bench",
    "run_child",
    "versions",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MeasuredExport:
    """The export an export-backed back end measures: how to make it, when an earlier one is reusable, its size."""

    format: str  # exporters' format name
    args: Callable[[BenchOptions], dict]  # exporter keyword arguments for these options
    # what the export.json of a reusable export says, for (options, source checkpoint)
    expected: Callable[[BenchOptions, Path], dict]
    weight_bytes: Callable[[Path], int]  # the bytes of weights the back end reads, from the export's directory
    requires: tuple[str, ...] = ()  # import names needed only to make it here (a given export needs none)


@dataclass(frozen=True)
class Backend:
    """One bench back end, the only place it is listed: the child's measurement, the runtime it needs, what it
    measures (the checkpoint, or an export), and the environment variables its child runs without."""

    measure: str  # "module:function" measuring one model in the child: fn(model_dir, options) -> partial M
    requires: tuple[str, ...] = ()  # import names, checked in the parent before any child starts
    export: MeasuredExport | None = None  # None: the checkpoint itself
    unset_env: tuple[str, ...] = ()


def _onnx_bytes(d: Path) -> int:
    from ..exporters.onnx import dir_model_bytes

    return dir_model_bytes(d)


def _gguf_bytes(d: Path) -> int:
    from ..serving.llamacpp_runner import find_gguf

    return find_gguf(d).stat().st_size


def _genai_args(options: BenchOptions) -> dict:
    from ..exporters import genai_export_args

    return genai_export_args(options.genai_weights)


BACKENDS: dict[str, Backend] = {
    "torch": Backend("slimgpt_deploy.bench.torch_backend:measure"),
    "onnx": Backend(
        "slimgpt_deploy.bench.onnx_backend:measure",
        ("onnxruntime",),
        MeasuredExport(
            "onnx",
            lambda o: {"dtype": "fp32", "quantize": None},
            lambda o, c: {"checkpoint": str(c), "dtype": "fp32", "quantize": None},
            _onnx_bytes,
            requires=("onnx",),
        ),
    ),
    "vllm": Backend("slimgpt_deploy.bench.vllm_backend:measure", ("vllm",)),
    # llama.cpp's OpenMP threads meet at a barrier after every op; OMP_WAIT_POLICY=PASSIVE (make test sets it for
    # its parallel processes) puts them to sleep there, and decode ran 3.6x slower (q8_0 SmolLM2 at 20%, 2 threads:
    # 36.6 vs 131.7 tokens/s): its child runs without it.
    "llamacpp": Backend(
        "slimgpt_deploy.bench.llamacpp_backend:measure",
        ("llama_cpp_py_sync",),
        MeasuredExport(
            "gguf",
            lambda o: {"quantize": o.gguf_type},
            lambda o, c: {"source": str(c), "type": o.gguf_type},
            _gguf_bytes,
        ),
        unset_env=("OMP_WAIT_POLICY",),
    ),
    "genai": Backend(
        "slimgpt_deploy.bench.genai_backend:measure",
        ("onnxruntime_genai",),
        MeasuredExport("genai", _genai_args, lambda o, c: {"source": str(c), "weights": o.genai_weights}, _onnx_bytes),
    ),
}
QUALITY = "slimgpt_deploy.bench.quality:measure"
CHILD_TIMEOUT_S = 3 * 3600


def run_bench(
    dense: str | Path,
    pruned: str | Path,
    backends: Sequence[str],
    *,
    options: BenchOptions = BenchOptions(),
    explicit: bool = True,
    work_dir: Path,
    exports: Mapping[str, Mapping[str, Path]] | None = None,
    log: Callable[[str], None] = logger.info,
) -> dict:
    """Measure `dense` and `pruned` on each back end; returns a JSON-able result dict.

    Sources: whatever `slimgpt_deploy.sources.load_model` accepts; a source that is not a
    directory is saved once as safetensors under `work_dir/models/<dense|pruned>`.
    `exports`: existing exports of what an export-backed back end measures (onnx: fp32 ONNX, llamacpp:
    a GGUF of `options.gguf_type`, genai: a GenAI folder of `options.genai_weights`), as
    {back end: {"dense": DIR, "pruned": DIR}} (either role or both); the others are exported
    (unverified) into `work_dir/<format>/<dense|pruned>`, reused when complete.
    A back end that is not installed raises MissingExtraError when `explicit`, else is
    reported {"status": "skipped", "reason": ...}; one that fails while running is
    reported {"status": "failed", "reason": <its last error line>}. Raises only for bad input.

    Result: {"machine", "versions", "options", "models": {"dense"|"pruned": {"source", "params",
    "weight_bytes", "kv_bytes_per_token"}}, "backends": {name: {"status", "reason", "dense": M,
    "pruned": M, "ratios": R}}, "quality": {"text", "tokens", "seqlen", "dense": {"perplexity"},
    "pruned": {"perplexity"}, "kl", "top1"}} with M and R as in `measure` / `measure.ratios`.
    """
    names = list(dict.fromkeys(backends))
    if not names:
        raise BadInputError(f"no back ends to benchmark; choose from: {', '.join(BACKENDS)}")
    for name in names:
        if name not in BACKENDS:
            raise BadInputError(f"unknown bench back end {name!r}; choose from: {', '.join(BACKENDS)}")
    work_dir = Path(work_dir)
    entries: dict[str, dict] = {}
    exports = dict(exports or {})
    for name in names:
        backend = BACKENDS[name]
        exporting = backend.export is not None and set(exports.get(name, {})) != {"dense", "pruned"}
        needs = backend.requires + (backend.export.requires if exporting else ())
        problem = missing_extra(needs)
        if problem is not None:
            if explicit:
                raise problem
            logger.warning("skipping the %s back end: %s", name, problem)
            entries[name] = {"status": "skipped", "reason": str(problem)}
    export_backed = [n for n, b in BACKENDS.items() if b.export is not None]
    for name, given in exports.items():
        if name not in export_backed or not set(given) <= {"dense", "pruned"}:
            raise BadInputError(
                f"exports maps {', '.join(export_backed)} to 'dense' and/or 'pruned' export directories, "
                f"got {name!r}: {sorted(given)}"
            )
        fmt = BACKENDS[name].export.format
        for role, d in given.items():
            if not Path(d).is_dir():
                raise BadInputError(
                    f"the {role} {fmt.upper()} export {d} does not exist; "
                    f"export it with `slimgpt-deploy export --format {fmt}`"
                )

    sources = {"dense": str(dense), "pruned": str(pruned)}
    dirs = {role: model_dir(src, work_dir / "models" / role, log) for role, src in sources.items()}
    configs = {role: _read_config(d) for role, d in dirs.items()}
    for role, config in configs.items():
        _check_lengths(options, config, role)
    models = {role: model_info(sources[role], dirs[role]) for role in dirs}

    start = time.perf_counter()
    quality = _quality(dirs, options, work_dir, log)
    for name in names:
        if name in entries:
            continue
        entries[name] = _bench_backend(name, dirs, models, options, work_dir, exports.get(name), log)
    log(f"bench finished in {time.perf_counter() - start:.0f} s")
    return {
        "machine": machine(),
        "versions": versions(),
        "options": {**options.to_dict(), "backends": names},
        "models": models,
        "backends": {name: entries[name] for name in names},
        "quality": quality,
    }


# --- the parent: models, availability, children -------------------------------------------------


def missing_extra(modules: Sequence[str]):
    """The MissingExtraError for the first of `modules` that is not installed, else None (nothing imported)."""
    from ..extras import EXTRAS, MissingExtraError, require

    for module in modules:
        if _find_spec(module) is None:
            try:
                require(module)  # raises the one-line "install the extra" error
            except MissingExtraError as err:
                return err
            extra = EXTRAS.get(module, module).split()[0]
            return MissingExtraError(
                f"{module} is not installed; install it with pip install 'slimgpt-deploy[{extra}]'"
            )
    return None


def _find_spec(module: str):
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None


def _export_dirs(name: str, dirs, options: BenchOptions, work_dir: Path, given: Mapping[str, Path] | None, log):
    """The back end's exports of each model: `given`, a complete earlier one, or one made now (unverified:
    the bench measures, `export` verifies) in work_dir/<format>/<role>."""
    from ..exporters import get_exporter

    export = BACKENDS[name].export
    fmt, kwargs = export.format, export.args(options)
    given = given or {}
    out = {}
    for role, checkpoint in dirs.items():
        if role in given:
            out[role] = Path(given[role])
            continue
        target = work_dir / fmt / role
        summary = target / "export.json"
        if summary.is_file():
            s = json.loads(summary.read_text())
            if all(s.get(k) == v for k, v in export.expected(options, checkpoint).items()):
                out[role] = target
                continue
        log(f"exporting the {role} model to {fmt.upper()} ({kwargs}) in {target}")
        get_exporter(fmt)(checkpoint, target, force=True, verify=False, log=log, **kwargs)
        out[role] = target
    return out


def _bench_backend(name, dirs, models, options, work_dir, given, log) -> dict:
    """Dense then pruned, each in its own child; {"status": "failed", ...} on the first failure."""
    from .measure import ratios

    export = BACKENDS[name].export
    what = export.format if export else None
    try:
        run_dirs = _export_dirs(name, dirs, options, work_dir, given, log) if export else dict(dirs)
    except SlimGPTError as err:
        return _failed(name, f"{what} export failed: {err}", log)
    except Exception as err:  # an exporter bug must not lose the other back ends' results
        return _failed(name, f"{what} export failed: {type(err).__name__}: {first_line(str(err))}", log)
    entry = {"status": "ok", "reason": None}
    for role in ("dense", "pruned"):
        log(f"bench {name}: {role} ({run_dirs[role]})")
        ok, result = run_child(
            {
                "task": "backend",
                "backend": name,
                "entry": BACKENDS[name].measure,
                "model": str(run_dirs[role]),
                "options": options.to_dict(),
            },
            work_dir / "logs" / f"{name}-{role}",
        )
        if not ok:
            return _failed(name, f"{role} model: {result}", log)
        weight_bytes = export.weight_bytes(run_dirs[role]) if export else models[role]["weight_bytes"]
        entry[role] = {**result, "weight_bytes": weight_bytes, "kv_bytes_per_token": models[role]["kv_bytes_per_token"]}
        b1 = next(iter(result["decode_ms_per_token"].values()))["median"]
        log(
            f"bench {name}: {role} decode {b1:.2f} ms/token (batch {options.batch_sizes[0]}), {result['seconds']:.0f} s"
        )
    entry["ratios"] = ratios(entry["dense"], entry["pruned"])
    return entry


def _failed(name: str, reason: str, log) -> dict:
    logger.warning("the %s back end failed: %s", name, reason)
    return {"status": "failed", "reason": reason}


def _quality(dirs, options: BenchOptions, work_dir: Path, log) -> dict:
    text = "built-in sample" if options.text is None else str(options.text)
    base = {"text": text, "tokens": 0, "seqlen": options.quality_seqlen}
    log(
        f"quality: perplexity, KL and top-1 on {text} "
        f"({options.quality_tokens} tokens, windows of {options.quality_seqlen})"
    )
    ok, result = run_child(
        {
            "task": "quality",
            "entry": QUALITY,
            "dense": str(dirs["dense"]),
            "pruned": str(dirs["pruned"]),
            "options": options.to_dict(),
        },
        work_dir / "logs" / "quality",
    )
    if not ok:
        if isinstance(result, BadInputError):
            raise result
        logger.warning("quality measurement failed: %s", result)
        return {**base, "status": "failed", "reason": str(result)}
    result.pop("peak_rss_bytes", None)
    result.pop("peak_gpu_bytes", None)
    result.pop("seconds", None)
    return {**base, **result, "status": "ok", "reason": None}


def run_child(job: dict, stem: Path, timeout: float = CHILD_TIMEOUT_S) -> tuple[bool, dict | str | SlimGPTError]:
    """Run one job in `python -m slimgpt_deploy.bench.child` (the child_process protocol); (True, result) or
    (False, reason): a typed error raised in the child as that error, anything else as its last error line."""
    from ..child_process import ChildFailed, run

    try:
        backend = BACKENDS.get(job.get("backend", ""))
        unset = backend.unset_env if backend else ()
        return True, run("slimgpt_deploy.bench.child", job, stem, timeout=timeout, unset=unset)
    except ChildFailed as err:
        return False, str(err)
    except SlimGPTError as err:
        return False, err
