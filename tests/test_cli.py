"""The command line: --help everywhere, a prune end to end, and every bad input the engine issue names.

Each bad input must give a one-line error, a non-zero exit code and no output.
"""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from slimgpt_deploy.cli import main

GQA = dict(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, intermediate_size=128)
CALIB_TEXT = "the big red cat sat on a small blue mat and ran to the park " * 200


@pytest.fixture(scope="module")
def work(tiny_model_dir_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "calib.txt").write_text(CALIB_TEXT)
    return root, tiny_model_dir_factory("llama", **GQA)


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _prune_args(model, out, calib, *extra):
    return ["prune", model, "--out", out, "--calib", calib, "--nsamples", 8, "--seqlen", 32, *extra]


@pytest.mark.parametrize("command", [[], ["prune"], ["recover"], ["eval"], ["export"], ["generate"], ["serve"]])
def test_help(command):
    result = _invoke(*command, "--help")
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_prune_then_eval(work):
    root, model = work
    out = root / "slim"
    result = _invoke(*_prune_args(model, out, root / "calib.txt", "--ratio", "0.25", "--json"))
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout[result.stdout.index("{") :])
    assert abs(record["ratio_achieved_decoder"] - 0.25) < 0.01
    assert (out / "model.safetensors").exists()
    result = _invoke(
        "eval",
        out,
        "--text",
        root / "calib.txt",
        "--seqlen",
        32,
        "--reference",
        model,
        "--fidelity-text",
        root / "calib.txt",
        "--fidelity-seqlen",
        32,
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["perplexity"]["ppl"] > 1
    assert 0 <= report["fidelity"]["top1"] <= 1 and report["fidelity"]["kl"] >= 0


def test_prune_dense_last_keeps_the_last_layers_and_the_share(work):
    root, model = work
    out = root / "slim-dense-last"
    result = _invoke(*_prune_args(model, out, root / "calib.txt", "--ratio", "0.25", "--dense-last", 1, "--json"))
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout[result.stdout.index("{") :])
    assert abs(record["ratio_achieved_decoder"] - 0.25) < 0.02  # the other three layers take the share
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size_per_layer"][-1] == 128 and max(config["intermediate_size_per_layer"][:-1]) < 128
    assert config["num_attention_heads_per_layer"][-1] == 8
    assert json.loads((out / "slimgpt.json").read_text())["prune"]["dense_last"] == 1


def test_prune_fisher_samples_are_recorded_and_timed(work):
    root, model = work
    out = root / "slim-fisher"
    result = _invoke(*_prune_args(model, out, root / "calib.txt", "--fisher-samples", 4, "--json"))
    assert result.exit_code == 0, result.output
    record = json.loads((out / "slimgpt.json").read_text())
    assert record["prune"]["fisher_samples"] == 4 and record["fisher_seconds"] > 0


def test_a_bad_layer_plan_is_refused_before_calibration(work, monkeypatch, tmp_path):
    """`--dense-last` / `--layer-ratios` that no plan can meet fail before minutes of calibration, not after."""
    from slimgpt_deploy import api

    monkeypatch.setattr(api, "get_calibration", lambda *a, **k: pytest.fail("calibrated before the plan was checked"))
    root, model = work
    for bad, says in ((("--dense-last", 4), "leaves no layer to prune"), (("--layer-ratios", "0.1,0.2"), "one per")):
        out = tmp_path / "out"
        result = CliRunner().invoke(main, [str(a) for a in _prune_args(model, out, "self", *bad)])
        assert result.exit_code == 2 and says in result.stderr, result.output
        assert not out.exists()


def _nan_model(tiny_model_dir_factory):
    path = tiny_model_dir_factory("llama", seed=5, **GQA)
    weights = load_file(path / "model.safetensors")
    weights["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config

    path = tmp_path_factory.mktemp("gpt2")
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(path)
    return path


BAD = {
    "nonexistent model path": (
        lambda w, f, t: _prune_args("/no/such/model", "{out}", w[0] / "calib.txt"),
        2,
        "does not exist",
    ),
    "unsupported architecture": (lambda w, f, t: _prune_args(_gpt2_dir(t), "{out}", w[0] / "calib.txt"), 2, "gpt2"),
    "ratio above 0.9": (
        lambda w, f, t: _prune_args(w[1], "{out}", w[0] / "calib.txt", "--ratio", "0.95"),
        2,
        "outside [0, 0.9]",
    ),
    "negative ratio": (
        lambda w, f, t: _prune_args(w[1], "{out}", w[0] / "calib.txt", "--ratio", "-0.1"),
        2,
        "outside [0, 0.9]",
    ),
    "ratio as a percentage": (
        lambda w, f, t: _prune_args(w[1], "{out}", w[0] / "calib.txt", "--ratio", "20%"),
        2,
        "fraction",
    ),
    "seqlen above the model maximum": (
        lambda w, f, t: [
            "prune",
            w[1],
            "--out",
            "{out}",
            "--calib",
            w[0] / "calib.txt",
            "--nsamples",
            1,
            "--seqlen",
            4096,
        ],
        2,
        "maximum",
    ),
    "calibration text too short": (
        lambda w, f, t: [
            "prune",
            w[1],
            "--out",
            "{out}",
            "--calib",
            w[0] / "calib.txt",
            "--nsamples",
            500,
            "--seqlen",
            64,
        ],
        2,
        "fewer than",
    ),
    "layer ratio list of the wrong length": (
        lambda w, f, t: _prune_args(w[1], "{out}", w[0] / "calib.txt", "--layer-ratios", "0.1,0.2"),
        2,
        "one per layer",
    ),
    "more dense layers than the model has": (
        lambda w, f, t: _prune_args(w[1], "{out}", w[0] / "calib.txt", "--dense-last", 4),
        2,
        "leaves no layer to prune",
    ),
    "the output Fisher with a method that has no OBS objective": (
        lambda w, f, t: _prune_args(w[1], "{out}", w[0] / "calib.txt", "--method", "magnitude", "--fisher-samples", 4),
        2,
        "--fisher-samples weighs the OBS objective",
    ),
    "NaN in the weights": (lambda w, f, t: _prune_args(_nan_model(f), "{out}", w[0] / "calib.txt"), 4, "layer 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, work, tiny_model_dir_factory, tmp_path_factory, tmp_path):
    make_args, code, words = BAD[case]
    out = tmp_path / "out"
    args = [str(a).replace("{out}", str(out)) for a in make_args(work, tiny_model_dir_factory, tmp_path_factory)]
    result = _invoke(*args)
    assert result.exit_code == code, result.output
    message = result.stderr.strip().splitlines()
    assert len([line for line in message if line.startswith("error") or "Error" in line]) == 1, result.stderr
    assert words in result.stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))


def test_existing_output_is_refused_without_force(work, tmp_path):
    root, model = work
    out = tmp_path / "slim"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _invoke(*_prune_args(model, out, root / "calib.txt"))
    assert result.exit_code == 2
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    result = _invoke(*_prune_args(model, out, root / "calib.txt", "--force"))
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_tp_aligned_prune_divides_and_serves_with_tensor_parallel(work):
    """--tp-size 2 (8 query / 2 KV heads, FFN 128): every layer's counts divide by 2; serve accepts -tp 2."""
    root, model = work
    out = root / "tp2"
    result = _invoke(*_prune_args(model, out, root / "calib.txt", "--ratio", "0.5", "--tp-size", 2, "--json"))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    for q, kv, f in zip(
        config["num_attention_heads_per_layer"],
        config["num_key_value_heads_per_layer"],
        config["intermediate_size_per_layer"],
    ):
        assert q % 2 == 0 and kv % 2 == 0 and f % 2 == 0, (q, kv, f)
    assert config["num_attention_heads_per_layer"] != [8] * 4  # heads were pruned, not only FFN
    record = json.loads((out / "slimgpt.json").read_text())
    assert record["prune"]["head_multiple"] == 2 and record["prune"]["ffn_multiple"] == 2
    assert abs(record["ratio_achieved_decoder"] - 0.5) < 0.02
    served = _invoke("serve", out, "--tensor-parallel-size", 2, "--dry-run")
    assert served.exit_code == 0 and "--tensor-parallel-size 2" in served.output


def test_tp_size_folds_into_the_multiples(work):
    root, model = work
    result = _invoke(*_prune_args(model, root / "tp-bad", root / "calib.txt", "--tp-size", 3))
    assert result.exit_code == 2
    assert "no head count that is a multiple of 3" in result.output
    assert not (root / "tp-bad").exists()


def test_demo_flags_are_the_build_time_benchmarks():
    """benchmarks/build_time.py measures what `make demo` runs (it reads the Makefile's DEMO_FLAGS)."""
    import importlib.util
    import re

    root = Path(__file__).resolve().parents[1]
    text = (root / "Makefile").read_text().replace("\\\n", " ")
    make_flags = re.search(r"^DEMO_FLAGS := (.*)$", text, re.M).group(1).split()
    spec = importlib.util.spec_from_file_location("build_time", root / "benchmarks" / "build_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.demo_flags() == make_flags and "--backends" in make_flags


def test_export_dtype_choices_are_each_exporters_own():
    """The CLI's and build's dtype choices (exporters.DTYPES) are what each exporter accepts."""
    from slimgpt_deploy.exporters import DTYPES, genai, gguf, onnx, vllm

    assert DTYPES["vllm"] == tuple(vllm.DTYPES)
    assert DTYPES["onnx"] == tuple(onnx.DTYPES)
    assert DTYPES["genai"] == genai.WEIGHTS[:2]
    for dtype in DTYPES["gguf"]:
        assert gguf.resolve_type(dtype, None) == dtype
