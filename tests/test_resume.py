"""Resumable pruning: a prune killed after layer k (SIGKILL, Ctrl-C, SIGTERM) and resumed gives
the same model.safetensors bytes as an uninterrupted one; resume state from other options is refused.

The kill is exact: a child process runs the Python API with an `on_layer` callback that
SIGKILLs its own process after layer k (the engine commits the layer before calling it),
or kills it inside the commit, before the state file says the layer is finished. The
children fork from a server that has imported the pruner once for all of them.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from slimgpt_deploy.cli import main
from slimgpt_deploy.prune import distributed
from slimgpt_deploy.resume import default_state_dir

GQA = dict(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, intermediate_size=128)
OPTIONS = [
    "--ratio",
    "0.3",
    "--nsamples",
    "8",
    "--seqlen",
    "32",
    "--seed",
    "3",
    "--head-share",
    "1.0",
]  # calibration: self-sampled; heads cut


def _prune_then_kill(src: str, out: str, k: int, where: str) -> None:
    """Prune, and SIGKILL this process after layer k (`after-layer`: the engine has committed it) or inside layer
    k's commit (`mid-commit`: its weights and outputs written, state.json not yet)."""
    from slimgpt_deploy.api import prune_to_checkpoint
    from slimgpt_deploy.config import PruneConfig
    from slimgpt_deploy.resume import ResumeState

    def after_layer(i, n, rec):
        if where == "after-layer" and i == k:
            os.kill(os.getpid(), signal.SIGKILL)

    if where == "mid-commit":  # this process only: it is killed before it could undo the patch
        write_meta = ResumeState._write_meta

        def killing_write_meta(self):
            if self.finished == k + 1:
                os.kill(os.getpid(), signal.SIGKILL)
            write_meta(self)

        ResumeState._write_meta = killing_write_meta

    prune_to_checkpoint(
        src, Path(out), PruneConfig(ratio=0.3, nsamples=8, seqlen=32, seed=3, head_share=1.0), on_layer=after_layer
    )
    raise SystemExit("not killed")


def _killed(*args) -> int | None:
    """The exit code of `_prune_then_kill(*args)` in a child process started as `--nproc` starts a CPU rank: on Linux
    forked from this test process's forkserver, which imports the pruner once for every kill (a fresh interpreter per
    kill spent ~6 s importing it)."""
    child = distributed.rank_context("gloo").Process(target=_prune_then_kill, args=args)
    child.start()
    child.join(300)
    if child.exitcode is None:
        child.kill()
        child.join()
    return child.exitcode


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def _finished(state_dir):
    return json.loads((state_dir / "state.json").read_text())["finished"]


@pytest.fixture(scope="module")
def model(tiny_model_dir_factory):
    return tiny_model_dir_factory("llama", **GQA)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "slim"
    result = _invoke("prune", model, "--out", out, *OPTIONS)
    assert result.exit_code == 0, result.output
    assert not default_state_dir(out).exists()  # removed once the checkpoint is saved
    return out


@pytest.mark.parametrize(
    "k, where, resume_extra",
    [
        (0, "after-layer", []),
        (1, "after-layer", ["--max-memory", "1KiB"]),  # resumed with the activations on disk
        (2, "mid-commit", []),
        (3, "after-layer", []),  # every layer finished, the checkpoint not yet saved
    ],
)
def test_sigkill_after_layer_k_then_resume_is_bit_identical(model, reference, tmp_path, k, where, resume_extra):
    out = tmp_path / "slim"
    assert _killed(str(model), str(out), k, where) == -signal.SIGKILL  # else its traceback is on the test's stderr
    state = default_state_dir(out)
    assert not out.exists()  # nothing that looks like an output
    assert not list(tmp_path.glob(".slim.partial-*"))
    assert state.is_dir()
    assert _finished(state) == (k if where == "mid-commit" else k + 1)

    result = _invoke("prune", model, "--out", out, *OPTIONS, "--resume", *resume_extra)
    assert result.exit_code == 0, result.output
    assert _digest(out) == _digest(reference)
    assert not state.exists()
    ours, theirs = (json.loads((p / "slimgpt.json").read_text()) for p in (out, reference))
    assert ours["calibration"] == theirs["calibration"]
    assert [layer_rec["kept_q_heads"] for layer_rec in ours["layers"]] == [
        layer_rec["kept_q_heads"] for layer_rec in theirs["layers"]
    ]


def test_ctrl_c_prints_where_the_state_is_and_resume_finishes(model, reference, tmp_path, monkeypatch):
    import slimgpt_deploy.cli as cli

    def interrupt(self, i, n, rec):
        if i == 1:
            raise KeyboardInterrupt

    out = tmp_path / "slim"
    with monkeypatch.context() as m:
        m.setattr(cli._layer_progress, "update", interrupt)
        result = _invoke("prune", model, "--out", out, *OPTIONS)
    assert result.exit_code == 130, result.output
    state = default_state_dir(out)
    line = f"interrupted; resume state in {state} (finished layers 2/4); rerun with --resume"
    assert [ln for ln in result.stderr.splitlines() if ln.startswith("interrupted")] == [line]
    assert "Traceback" not in result.stderr
    assert not out.exists() and _finished(state) == 2

    result = _invoke("prune", model, "--out", out, *OPTIONS, "--resume")
    assert result.exit_code == 0, result.output
    assert _digest(out) == _digest(reference)


def test_sigterm_interrupts_like_ctrl_c(model, tmp_path):
    out = tmp_path / "slim"
    code = textwrap.dedent(f"""
        import os, signal, sys
        import slimgpt_deploy.cli as cli
        def update(self, i, n, rec):
            if i == 0:
                os.kill(os.getpid(), signal.SIGTERM)
        cli._layer_progress.update = update
        cli.main({["prune", str(model), "--out", str(out), *OPTIONS]!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr[-2000:]
    state = default_state_dir(out)
    assert f"interrupted; resume state in {state} (finished layers 1/4); rerun with --resume" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and _finished(state) == 1


def test_resume_refuses_state_from_other_options_and_a_fresh_run_clears_it(model, tmp_path, monkeypatch, caplog):
    import slimgpt_deploy.cli as cli

    def interrupt(self, i, n, rec):
        raise KeyboardInterrupt

    out = tmp_path / "slim"
    with monkeypatch.context() as m:
        m.setattr(cli._layer_progress, "update", interrupt)
        assert _invoke("prune", model, "--out", out, *OPTIONS).exit_code == 130
    state = default_state_dir(out)
    result = _invoke("prune", model, "--out", out, *OPTIONS, "--ratio", "0.2", "--resume")
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "--ratio 0.3 there, 0.2 now" in result.stderr and "drop --resume" in result.stderr
    assert not out.exists() and _finished(state) == 1  # the refused run left the state alone

    result = _invoke("prune", model, "--out", out, *OPTIONS, "--ratio", "0.2")  # no --resume: start over
    assert result.exit_code == 0, result.output
    assert "clearing old resume state" in caplog.text
    assert out.is_dir() and not state.exists()


def test_resume_without_state_is_a_fresh_start(model, reference, tmp_path):
    out = tmp_path / "slim"
    result = _invoke("prune", model, "--out", out, *OPTIONS, "--resume")
    assert result.exit_code == 0, result.output
    assert _digest(out) == _digest(reference)


def test_resume_refuses_a_changed_model(model, tiny_model_dir_factory, tmp_path, monkeypatch):
    import shutil

    import slimgpt_deploy.cli as cli

    src = tmp_path / "model"
    shutil.copytree(model, src)
    out = tmp_path / "slim"

    def interrupt(self, i, n, rec):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(cli._layer_progress, "update", interrupt)
        assert _invoke("prune", src, "--out", out, *OPTIONS).exit_code == 130
    other = tiny_model_dir_factory("llama", seed=9, **GQA)
    shutil.copyfile(other / "model.safetensors", src / "model.safetensors")
    result = _invoke("prune", src, "--out", out, *OPTIONS, "--resume")
    assert result.exit_code == 2
    assert "model source changed" in result.stderr
