"""benchmarks/gpu_check.sh: refuses clearly (one line, exit 2, nothing written) where it cannot run.

The GPU path itself has not run anywhere yet (no CUDA host here); these tests hold it to its refusals.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils' timeout"
)


def run(tmp_path, *args, env=None):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.skipif(
    torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES") != "",
    reason="CUDA_VISIBLE_DEVICES='' hides the GPUs; checked on CPU hosts",
)
def test_refuses_without_cuda(tmp_path):
    proc = run(tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "GPU host" in lines[0]
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_refuses_a_missing_model_dir_first(tmp_path):
    proc = run(tmp_path, tmp_path / "nowhere")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a model directory" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_refuses_extra_arguments(tmp_path):
    proc = run(tmp_path, "a", "b")
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_refuses_a_python_without_torch(tmp_path):
    proc = run(tmp_path, env={"PYTHON": "/bin/false"})
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot import torch" in proc.stderr


def test_help_says_it_has_not_run_on_a_gpu(tmp_path):
    proc = run(tmp_path, "--help")
    assert proc.returncode == 0
    assert "NOT YET RUN ON A GPU" in proc.stdout and "prune" in proc.stdout
