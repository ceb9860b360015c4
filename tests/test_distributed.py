"""Calibration across processes (prune/distributed.py) on this CPU: gloo, 2 processes.

The collectives are checked against one process on the same data; the whole prune through
`prune --nproc 2` (and torchrun) against a single-process prune with the same calibration
ids: same plans, same kept heads and FFN channels, weights within float tolerance. A
failure on one rank must end every rank with that rank's one-line message and exit code.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp
from click.testing import CliRunner
from dist_collectives import collectives
from safetensors.torch import load_file, save_file

from slimgpt_deploy.api import prune_to_checkpoint
from slimgpt_deploy.cli import main
from slimgpt_deploy.config import PruneConfig
from slimgpt_deploy.prune import distributed

SHAPE = dict(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, intermediate_size=128)
OPTIONS = dict(
    ratio=0.3, nsamples=9, seqlen=32, device="cpu", head_share=1.0
)  # 5 + 4 samples: unequal shares; gloo even on a GPU host
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "120"}
TIMEOUT_S = 300


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _prune_args(model, out, *extra):
    o = OPTIONS
    return [
        "prune",
        str(model),
        "--out",
        str(out),
        "--ratio",
        str(o["ratio"]),
        "--nsamples",
        str(o["nsamples"]),
        "--seqlen",
        str(o["seqlen"]),
        "--device",
        o["device"],
        "--head-share",
        str(o["head_share"]),
        *extra,
    ]


def _invoke(*args):
    """The CLI in this process: its ranks fork from this test process's forkserver, which the first launch starts
    (one import of the pruner) and the later ones reuse. The killed-rank and torchrun tests run separate processes."""
    return CliRunner().invoke(main, list(args))


# ---------------------------------------------------------------- the collectives, 2 gloo processes


def test_collectives_match_one_process():
    tmp.spawn(collectives, args=(2, distributed.free_port()), nprocs=2, join=True)


def test_hooks_are_identities_in_one_process():
    H = torch.randn(4, 4)
    assert distributed.reduce_hessian(H, 7) == (H, 7)
    X = torch.arange(6).reshape(3, 2)
    assert distributed.shard(X) is X
    assert distributed.from_rank0(lambda: 5) == 5
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()


def test_cpu_ranks_fork_from_a_preloaded_server_on_linux_and_cuda_ranks_are_spawned(monkeypatch):
    import multiprocessing

    linux = sys.platform.startswith("linux")  # elsewhere spawned: no forkserver (Windows), fork-unsafe (macOS)
    assert distributed.rank_context("gloo").get_start_method() == ("forkserver" if linux else "spawn")
    assert distributed.rank_context("nccl").get_start_method() == "spawn"

    class WithoutForkserver:  # a platform without a forkserver: every rank is spawned
        get_all_start_methods = staticmethod(lambda: ["spawn"])
        get_context = staticmethod(multiprocessing.get_context)

    assert distributed.rank_context("gloo", WithoutForkserver).get_start_method() == "spawn"
    if linux:
        monkeypatch.setattr(sys, "platform", "darwin")
        assert distributed.rank_context("gloo").get_start_method() == "spawn"


# ---------------------------------------------------------------- the whole prune


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir_factory):
    return tiny_model_dir_factory("llama", seed=3, **SHAPE)


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory):
    """The single-process prune (self-calibration, seed 0) every distributed run must reproduce."""
    out = tmp_path_factory.mktemp("single") / "slim"
    prune_to_checkpoint(str(model_dir), out, PruneConfig(**OPTIONS))
    return out


@pytest.fixture(scope="module")
def nproc2(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("nproc") / "slim"
    run = _invoke(*_prune_args(model_dir, out, "--nproc", "2", "--json"))
    assert run.exit_code == 0, run.output
    return out, run


def _same_prune(a: Path, b: Path, *, exact: bool = False) -> None:
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (a, b))
    for key in ("num_attention_heads_per_layer", "num_key_value_heads_per_layer", "intermediate_size_per_layer"):
        assert ca[key] == cb[key], key  # same plans
    ra, rb = (json.loads((p / "slimgpt.json").read_text()) for p in (a, b))
    assert ra["calibration"] == rb["calibration"]
    for la, lb in zip(ra["layers"], rb["layers"], strict=True):
        assert (la["kept_q_heads"], la["kept_kv_heads"]) == (lb["kept_q_heads"], lb["kept_kv_heads"])
        assert la["mlp_error"] == pytest.approx(lb["mlp_error"], rel=1e-3, abs=1e-7)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape, k
        if exact or not k.endswith(("o_proj.weight", "down_proj.weight")):
            # kept rows of q/k/v/gate/up are copied from the dense model: same kept units, exactly
            assert torch.equal(wa[k], wb[k]), k
        else:  # OBS-compensated weights from Hessians summed in another order
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=5e-5, msg=k)  # weights ~0.03; seen: 1.1e-5


def test_nproc_2_matches_one_process(single, nproc2):
    out, run = nproc2
    _same_prune(single, out)
    record = json.loads(run.stdout[run.stdout.index("{") :])
    assert record["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert json.loads((out / "slimgpt.json").read_text())["distributed"]["world_size"] == 2
    assert "saved" in run.stderr and "pruning" in run.stderr  # rank 0's progress reached the launcher's bar
    assert "Traceback" not in run.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["slim"]  # no resume state, nothing half-written


def test_nproc_2_with_the_output_fisher_matches_one_process(model_dir, tmp_path):
    # 5 of the 9 samples measure the Fisher: 3 on rank 0, 2 on rank 1; the ranks' sums are reduced
    single = tmp_path / "single" / "slim"
    prune_to_checkpoint(str(model_dir), single, PruneConfig(**OPTIONS, fisher_samples=5))
    out = tmp_path / "nproc" / "slim"
    run = _invoke(*_prune_args(model_dir, out, "--nproc", "2", "--fisher-samples", "5"))
    assert run.exit_code == 0, run.output
    _same_prune(single, out)
    assert json.loads((out / "slimgpt.json").read_text())["prune"]["fisher_samples"] == 5


def test_torchrun_matches_nproc(model_dir, nproc2, tmp_path):
    out = tmp_path / "slim"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(distributed.free_port()),
        "-m",
        "slimgpt_deploy.cli",
        *_prune_args(model_dir, out),
    ]
    run = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stderr
    _same_prune(nproc2[0], out, exact=True)  # the same split and reduction order: bit for bit
    assert run.stderr.count("saved ") == 1  # only rank 0 reports (and writes)


# ---------------------------------------------------------------- failures


def test_a_failing_rank_ends_all_with_its_message_and_code(tiny_model_dir_factory, tmp_path):
    path = tiny_model_dir_factory("llama", seed=4, **SHAPE)
    weights = load_file(path / "model.safetensors")
    weights["model.layers.2.mlp.up_proj.weight"][1, 2] = float("nan")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    t0 = time.monotonic()
    run = _invoke(*_prune_args(path, tmp_path / "slim", "--nproc", "2"))
    assert run.exit_code == 4, run.output  # NumericalError's code
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "NaN/Inf in the weights of layer 2" in lines[0] and "of 2)" in lines[0], run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "slim").exists()
    assert time.monotonic() - t0 < TIMEOUT_S / 2


def test_ranks_see_the_launchers_environment_not_the_forkservers(model_dir, tmp_path, monkeypatch):
    from multiprocessing import forkserver

    if distributed.rank_context("gloo").get_start_method() == "forkserver":
        forkserver.ensure_running()  # started (or already running) before the variable is set
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")  # read by each rank when it joins the group
    run = _invoke(*_prune_args(model_dir, tmp_path / "slim", "--nproc", "2"))
    assert run.exit_code == 2, run.output
    assert f"{distributed.TIMEOUT_ENV}='soon' is not a number of seconds" in run.output, run.output
    assert not (tmp_path / "slim").exists()


def _ranks(launcher: int) -> list[int]:
    """The launcher's ranks: forked by its forkserver (a child of the launcher), or spawned by the launcher."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            procs[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    servers = {p for p, (ppid, cmd) in procs.items() if ppid == launcher and b"forkserver" in cmd}
    spawned = {p for p, (ppid, cmd) in procs.items() if ppid == launcher and b"spawn_main" in cmd}
    return sorted(
        p for p, (ppid, cmd) in procs.items() if ppid in servers or (p in spawned and b"resource_tracker" not in cmd)
    )


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks through /proc")
def test_a_killed_rank_ends_the_others_without_a_hang(model_dir, tmp_path):
    proc = subprocess.Popen(
        [_bin("slimgpt-deploy"), *_prune_args(model_dir, tmp_path / "slim", "--nproc", "2")],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while len(ranks := _ranks(proc.pid)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(ranks) == 2, "the launcher did not start two ranks"
        # at once: forked from a server that has imported the pruner, the ranks prune this model in about a second
        os.kill(ranks[-1], signal.SIGKILL)  # e.g. the out-of-memory killer
        _, stderr = proc.communicate(timeout=60)  # the survivor does not wait for its process-group timeout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGKILL, stderr
    assert "was killed by SIGKILL" in stderr.splitlines()[-1], stderr
    assert all(not Path(f"/proc/{r}").exists() or "Z" in Path(f"/proc/{r}/stat").read_text().split()[2] for r in ranks)
    assert not (tmp_path / "slim").exists()


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--resume"], "--resume does not work with --nproc"),
        (["--nsamples", "1"], "cannot be split over 2 processes"),
        (["--fisher-samples", "1"], "--fisher-samples 1 cannot be split over 2 processes; raise --fisher-samples"),
        pytest.param(
            ["--device", "cuda"],
            "CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA host"),
        ),
    ],
)
def test_nproc_refuses_what_it_cannot_do(model_dir, tmp_path, extra, says):
    result = CliRunner().invoke(main, [*_prune_args(model_dir, tmp_path / "slim", "--nproc", "2"), *extra])
    assert result.exit_code == 2, result.output
    assert says in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "slim").exists()
