"""`slimgpt-deploy build` end to end on a tiny random model: artifacts, report, reruns, failures, bad input.

The tiny model has head_dim 32 (vLLM's CPU attention needs it). One full build (with the
vLLM export verified in vLLM) is shared by the tests of this module; the tests that change
it work on copies.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import build_bpe_tokenizer
from helpers import assert_refused

from slimgpt_deploy.build import DEFAULT_STAGES, build_options, read_config_file
from slimgpt_deploy.cli import main
from slimgpt_deploy.errors import BadInputError

SMALL_BENCH = """\
prune:
  ratio: 0.3
  nsamples: 4
  seqlen: 32
bench:
  backends: [torch, onnx]
  repeats: 1
  warmups: 1
  decode_tokens: 2
  prompt_lens: [8, 16]
  batch_sizes: [1, 2]
  quality_tokens: 96
  quality_seqlen: 32
  threads: 1
"""
REPORT_FIELDS = (
    "format",
    "created",
    "out",
    "machine",
    "versions",
    "options",
    "passed",
    "failures",
    "model",
    "layers",
    "stages",
    "artifacts",
    "verification",
    "bench",
    "plots",
)


def _build(*args, config: Path | None = None):
    argv = ["build", *map(str, args)] + (["--config", str(config)] if config else []) + ["--json"]
    result = CliRunner().invoke(main, argv)
    summary = None
    if result.stdout.strip().startswith("{"):
        summary = json.loads(result.stdout)
    return result, summary


def _mtimes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny_dense(tiny_model_dir_factory) -> Path:
    # A byte-level BPE tokenizer: the GGUF stages carry the tokenizer to llama.cpp, which has no word-level one.
    bpe = build_bpe_tokenizer()
    return tiny_model_dir_factory("llama", hidden_size=128, num_hidden_layers=3, tokenizer=bpe, vocab_size=320)


@pytest.fixture(scope="module")
def build_config(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("cfg")
    text = directory / "text.txt"
    text.write_text(" ".join(["the cat sat on the mat and the dog ran to the park"] * 20))
    path = directory / "build.yaml"
    path.write_text(SMALL_BENCH + f"  text: {text}\n")
    return path


@pytest.fixture(scope="module")
def full_build(tiny_dense, build_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "out"
    result, summary = _build(tiny_dense, "--out", out, config=build_config)
    assert result.exit_code == 0, result.output
    return out, summary


def test_build_writes_every_artifact_and_a_complete_report(full_build):
    out, summary = full_build
    assert summary["passed"] and summary["exit_code"] == 0
    assert [s for s in summary["stages"]] == list(DEFAULT_STAGES)
    assert all(s["status"] == "ok" for s in summary["stages"].values()), summary["stages"]
    for path in (
        "slim/model.safetensors",
        "slim/config.json",
        "vllm/config.json",
        "vllm/export.json",
        "onnx/export.json",
        "onnx/slimgpt_onnx.json",
        "verify/vllm.json",
        "verify/onnx.json",
        "genai/genai_config.json",
        "verify/genai.json",
        "bench/bench.json",
        "report/report.json",
        "report/report.md",
        "build.json",
    ):
        assert (out / path).exists(), path
    report = json.loads((out / "report" / "report.json").read_text())
    assert set(REPORT_FIELDS) <= set(report)
    assert report["passed"] and report["failures"] == []
    assert all(report["verification"][f]["passed"] for f in ("vllm", "onnx", "gguf", "genai"))
    assert len(report["layers"]) == 3 and report["layers"][0]["dense_q_heads"] == 4
    assert 0.25 < report["model"]["ratio_achieved_decoder"] < 0.35
    assert {"torch", "onnx"} <= set(report["bench"]["backends"])
    assert report["bench"]["quality"]["pruned"]["perplexity"] > 0
    assert report["options"]["prune"]["nsamples"] == 4
    assert set(report["plots"]) == {"shapes", "latency", "memory", "quality"}
    for name in report["plots"].values():
        png = (out / "report" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000, name
    md = (out / "report" / "report.md").read_text()
    assert "passed" in md and "## Benchmark" in md and "![shapes](shapes.png)" in md
    card = (out / "slim" / "README.md").read_text()
    assert "## Build report" in card and "report/report.md" in card
    record = json.loads((out / "slim" / "slimgpt.json").read_text())
    assert record["verification"]["onnx"]["passed"] and record["build_report"].endswith("report/report.md")


def test_rerun_skips_finished_stages_and_leaves_outputs_untouched(full_build, build_config, tiny_dense):
    out, _ = full_build
    before = _mtimes(out)
    result, summary = _build(tiny_dense, "--out", out, config=build_config)
    assert result.exit_code == 0, result.output
    assert all(s["status"] == "cached" for s in summary["stages"].values()), summary["stages"]
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if k != "build.json"} == {
        k: v for k, v in before.items() if k != "build.json"
    }


def test_changed_option_reruns_exactly_the_stages_that_depend_on_it(full_build, build_config, tiny_dense, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(full_build[0], out, copy_function=shutil.copy2)
    slim_before = _mtimes(out / "slim")
    result, summary = _build(tiny_dense, "--out", out, "--bench-repeats", 2, config=build_config)
    assert result.exit_code == 0, result.output
    status = {k: v["status"] for k, v in summary["stages"].items()}
    assert status == {
        "prune": "cached",
        "export-vllm": "cached",
        "export-onnx": "cached",
        "export-gguf": "cached",
        "export-genai": "cached",
        "verify-vllm": "cached",
        "verify-onnx": "cached",
        "verify-gguf": "cached",
        "verify-genai": "cached",
        "bench": "ok",
        "report": "ok",
    }
    assert json.loads((out / "bench" / "bench.json").read_text())["options"]["repeats"] == 2
    assert {k: v for k, v in _mtimes(out / "slim").items() if k not in ("README.md", "slimgpt.json")} == {
        k: v for k, v in slim_before.items() if k not in ("README.md", "slimgpt.json")
    }


def test_a_corrupted_export_fails_verification_with_exit_3_and_the_report_says_which(
    full_build, build_config, tiny_dense, tmp_path
):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    out = tmp_path / "copy"
    shutil.copytree(full_build[0], out, copy_function=shutil.copy2)
    spec = json.loads((out / "onnx" / "slimgpt_onnx.json").read_text())
    path = out / "onnx" / spec.get("model_file", "model.onnx")
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the largest weight
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * -3.0, init.name))
    onnx.save(model, str(path))

    result, summary = _build(tiny_dense, "--out", out, "--stages", "verify-onnx,bench,report", config=build_config)
    assert result.exit_code == 3, result.output
    assert summary["exit_code"] == 3 and not summary["passed"]
    assert summary["stages"]["verify-onnx"]["status"] == "failed"
    assert summary["stages"]["bench"]["status"] == "skipped"
    assert "error: verification failed: verify-onnx" in result.stderr
    report = json.loads((out / "report" / "report.json").read_text())
    assert not report["passed"] and report["failures"][0].startswith("verify-onnx")
    assert not report["verification"]["onnx"]["passed"] and report["verification"]["onnx"]["failures"]
    assert "FAILED" in (out / "report" / "report.md").read_text()


def test_a_corrupted_gguf_fails_its_verification(full_build, build_config, tiny_dense, tmp_path):
    from gguf import GGUFReader

    out = tmp_path / "copy"
    shutil.copytree(full_build[0], out, copy_function=shutil.copy2)
    path = out / "gguf" / "model-q8_0.gguf"  # the build's default type
    tensor = next(t for t in GGUFReader(path).tensors if t.name == "token_embd.weight")
    data = bytearray(path.read_bytes())
    data[tensor.data_offset : tensor.data_offset + tensor.n_bytes] = bytes(tensor.n_bytes)  # zero scales: W = 0
    path.write_bytes(bytes(data))

    result, summary = _build(tiny_dense, "--out", out, "--stages", "verify-gguf,report", config=build_config)
    assert result.exit_code == 3, result.output
    assert summary["stages"]["verify-gguf"]["status"] == "failed"
    report = json.loads((out / "report" / "report.json").read_text())
    assert any("KL" in f or "top-1" in f for f in report["verification"]["gguf"]["failures"])


def test_a_corrupted_genai_folder_fails_its_verification(full_build, build_config, tiny_dense, tmp_path):
    import onnx

    out = tmp_path / "copy"
    shutil.copytree(full_build[0], out, copy_function=shutil.copy2)
    import numpy as np
    from onnx import numpy_helper

    path = out / "genai" / "model.onnx"
    model = onnx.load(str(path))
    embed = next(t for t in model.graph.initializer if t.name == "model.embed_tokens.weight")
    embed.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(embed)), embed.name))  # all zero
    (out / "genai" / "model.onnx.data").unlink(missing_ok=True)  # int8 (the default) keeps weights inline
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data")

    result, summary = _build(tiny_dense, "--out", out, "--stages", "verify-genai,report", config=build_config)
    assert result.exit_code == 3, result.output
    assert summary["stages"]["verify-genai"]["status"] == "failed"
    report = json.loads((out / "report" / "report.json").read_text())
    assert any("KL" in f or "top-1" in f for f in report["verification"]["genai"]["failures"])


def test_config_file_and_flag_precedence(build_config):
    file_values = read_config_file(build_config)
    options = build_options(file_values, {"prune.ratio": 0.4, "prune.seed": None})
    assert options.prune.ratio == 0.4  # the flag wins
    assert options.prune.nsamples == 4 and options.prune.seed == 0  # the file, then the default
    assert options.bench.backends == ("torch", "onnx") and options.bench.explicit
    assert build_options({}, {}).bench.explicit is False
    assert build_options({}, {"prune.tp_size": 2}).prune.head_multiple == 2


def test_the_prune_and_recover_keys_are_their_config_fields():
    """The schema reads PruneConfig's and RecoverConfig's fields: a field with no flag is a key too, typed from its
    annotation; a new field needs no second list."""
    from dataclasses import fields

    from slimgpt_deploy.build.options import SCHEMA
    from slimgpt_deploy.config import PruneConfig
    from slimgpt_deploy.recover import RecoverConfig

    for cls, section in ((PruneConfig, "prune"), (RecoverConfig, "recover")):
        assert {f"{section}.{f.name}" for f in fields(cls)} <= set(SCHEMA)
    assert {k for k in SCHEMA if k.startswith(("prune.", "recover."))} == {
        *(f"prune.{f.name}" for f in fields(PruneConfig)),
        *(f"recover.{f.name}" for f in fields(RecoverConfig)),
        "prune.tp_size",
        "recover.enabled",
    }
    assert SCHEMA["prune.layer_ratios"] == (list, float, True) and SCHEMA["recover.lr"] == (float, None, True)
    assert SCHEMA["prune.percdamp"] == (float, None, False) and SCHEMA["recover.full"] == (bool, None, False)
    options = build_options({"prune.percdamp": 0.001, "prune.ffn_group_fraction": 0.5}, {})
    assert options.prune.percdamp == 0.001 and options.prune.ffn_group_fraction == 0.5
    with pytest.raises(BadInputError, match="prune.percdamp"):
        build_options({}, {"prune.percdamp": "small"})  # checked as a YAML value is when the file is read


def test_stages_subset_runs_only_those(tiny_dense, build_config, tmp_path):
    out = tmp_path / "b"
    result, summary = _build(tiny_dense, "--out", out, "--stages", "prune", "--ratio", "0.5", config=build_config)
    assert result.exit_code == 0, result.output
    assert list(summary["stages"]) == ["prune"]
    assert json.loads((out / "slim" / "slimgpt.json").read_text())["ratio_target"] == 0.5  # flag over the file's 0.3
    assert not (out / "onnx").exists() and not (out / "report").exists()


# --- bad input: one line, exit code 2, nothing written ----------------------------------


def test_unknown_stage_isassert_refused(tiny_dense, tmp_path):
    result, _ = _build(tiny_dense, "--out", tmp_path / "o", "--stages", "prune,exprot-onnx")
    assert_refused(result, "unknown stage 'exprot-onnx'", "did you mean 'export-onnx'")
    assert not (tmp_path / "o").exists()


def test_unknown_config_key_names_the_closest(tiny_dense, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("prune:\n  ratoi: 0.2\n")
    result, _ = _build(tiny_dense, "--out", tmp_path / "o", config=cfg)
    assert_refused(result, "unknown build option 'prune.ratoi'", "did you mean 'prune.ratio'")
    cfg.write_text("nsamples: 8\n")
    result, _ = _build(tiny_dense, "--out", tmp_path / "o", config=cfg)
    assert_refused(result, "'nsamples'", "did you mean 'prune.nsamples'")
    assert not (tmp_path / "o").exists()


def test_config_value_of_the_wrong_type_is_refused(tiny_dense, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("prune:\n  ratio: 20%\n")
    result, _ = _build(tiny_dense, "--out", tmp_path / "o", config=cfg)
    assert_refused(result, "'prune.ratio'", "must be a number", "'20%'")
    cfg.write_text("bench:\n  backends: torch\n")
    result, _ = _build(tiny_dense, "--out", tmp_path / "o", config=cfg)
    assert_refused(result, "'bench.backends'", "must be a list")
    assert not (tmp_path / "o").exists()


def test_a_directory_that_is_not_a_build_is_refused_without_force(tiny_dense, build_config, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result, _ = _build(tiny_dense, "--out", out, "--stages", "prune", config=build_config)
    assert_refused(result, "not a slimgpt-deploy build", "notes.txt", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    result, _ = _build(tiny_dense, "--out", out, "--stages", "prune", "--force", config=build_config)
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "keep me" and (out / "slim" / "config.json").exists()


def test_a_stage_whose_input_is_missing_isassert_refused(tiny_dense, tmp_path):
    result, _ = _build(tiny_dense, "--out", tmp_path / "o", "--stages", "export-onnx")
    assert_refused(result, "stage export-onnx needs the output of stage prune")


def test_a_back_end_not_installed_is_skipped_in_the_report_unless_named(
    tiny_dense, build_config, tmp_path, monkeypatch
):
    import slimgpt_deploy.bench as bench

    real = bench._find_spec
    missing = ("vllm", "onnxruntime", "llama_cpp_py_sync", "onnxruntime_genai")  # every back end but torch
    monkeypatch.setattr(bench, "_find_spec", lambda module: None if module in missing else real(module))
    cfg = tmp_path / "all-backends.yaml"
    cfg.write_text(build_config.read_text().replace("  backends: [torch, onnx]\n", ""))  # default: every back end
    out = tmp_path / "o"
    result, summary = _build(tiny_dense, "--out", out, "--stages", "prune,bench,report", config=cfg)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report" / "report.json").read_text())
    backends = report["bench"]["backends"]
    assert backends["torch"]["status"] == "ok"
    assert backends["vllm"]["status"] == "skipped" and "vllm" in backends["vllm"]["reason"]
    assert backends["onnx"]["status"] == "skipped" and "onnx" in backends["onnx"]["reason"]
    assert backends["llamacpp"]["status"] == "skipped" and "llamacpp" in backends["llamacpp"]["reason"]
    assert backends["genai"]["status"] == "skipped" and "genai" in backends["genai"]["reason"]
    assert "skipped" in (out / "report" / "report.md").read_text()

    result, _ = _build(tiny_dense, "--out", out, "--stages", "bench", "--backends", "torch,vllm", config=cfg)
    assert_refused(result, "vllm")


def test_a_missing_runtime_is_refused_before_any_work(tiny_dense, build_config, tmp_path, monkeypatch):
    import slimgpt_deploy.bench as bench

    real = bench._find_spec
    monkeypatch.setattr(bench, "_find_spec", lambda module: None if module == "vllm" else real(module))
    out = tmp_path / "o"
    result, _ = _build(tiny_dense, "--out", out, "--stages", "prune,export-vllm,verify-vllm", config=build_config)
    assert_refused(result, "vllm")
    assert not out.exists()  # refused before the prune stage, not after it


def test_the_stage_table_is_consistent_and_the_help_reads_it():
    from slimgpt_deploy.build.stages import STAGES, TABLE

    order = {s.name: i for i, s in enumerate(TABLE)}
    for s in TABLE:  # a stage reads only stages that run before it
        assert all(order[n] < order[s.name] for n in (*s.needs, *s.uses)), s.name
        assert s.verifies == s.name.startswith("verify-")
    assert set(DEFAULT_STAGES) == {s.name for s in TABLE if not s.optional}
    help_text = " ".join(CliRunner().invoke(main, ["build", "--help"]).output.split())
    assert ",".join(STAGES).replace("-", "") in help_text.replace("- ", "").replace("-", "")
