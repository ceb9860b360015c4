"""The optional runtimes' table (extras.RUNTIMES) against the package's extras, and what a run records of them."""

import importlib.util
import re
from importlib.metadata import requires, version

import pytest

from slimgpt_deploy.extras import RUNTIMES, MissingExtraError, installed_versions, require


def _extras() -> dict[str, set[str]]:
    """extra -> the distributions it installs, from the installed package's metadata (pyproject.toml)."""
    out: dict[str, set[str]] = {}
    for req in requires("slimgpt-deploy") or []:
        m = re.search(r"""extra == ["']([^"']+)["']""", req)
        if m:
            out.setdefault(m.group(1), set()).add(re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0])
    return out


EXTRAS = _extras()


def _alternatives(extra: str) -> list[str]:
    return [alt.split()[0] for alt in extra.split(" or ")]


@pytest.mark.parametrize("module", list(RUNTIMES))
def test_each_runtime_names_extras_that_install_its_distributions(module):
    runtime = RUNTIMES[module]
    names = _alternatives(runtime.extra)
    assert all(name in EXTRAS for name in names), (module, names, list(EXTRAS))
    required = set().union(*(EXTRAS[name] for name in names))
    assert set(runtime.dists) <= required, (module, runtime.dists, required)


def test_a_missing_runtime_names_every_extra_that_installs_it(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(MissingExtraError) as info:
        require("onnxruntime")
    message = str(info.value)
    assert "pip install 'slimgpt-deploy[onnx]' or pip install 'slimgpt-deploy[onnx-gpu]'" in message
    assert message.count("\n") == 0


def test_installed_versions_come_from_the_distributions_under_their_record_names():
    got = installed_versions()
    assert got["onnxruntime"] == version("onnxruntime")  # the test environment installs the onnx extra
    assert "llama_cpp_py_sync" not in got  # recorded under its own key, not the import name
    if importlib.util.find_spec("llama_cpp_py_sync") is not None:  # the llamacpp extra (make venv installs it)
        assert got["llama_cpp"] == version("llama-cpp-py-sync")
    assert set(got) <= {runtime.record_as or module for module, runtime in RUNTIMES.items()}
