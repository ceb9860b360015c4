"""build's eval stage and quality gate on a tiny random model: pass, miss (exit 3), bad conditions (exit 2), reruns.

Builds run only prune, eval and report (no exports), so each takes seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from slimgpt_deploy.build import DEFAULT_STAGES, build_options, read_config_file
from slimgpt_deploy.build.gate import METRICS, OPERATORS, check_gate, parse_condition, parse_gate
from slimgpt_deploy.cli import main
from slimgpt_deploy.errors import BadInputError

CONFIG = """\
stages: [prune, eval, report]
prune: {ratio: 0.3, nsamples: 4, seqlen: 32}
eval: {seqlen: 32, fidelity_tokens: 96}
"""


def _build(out: Path, *args, config: Path):
    result = CliRunner().invoke(main, ["build", *map(str, args), "--out", str(out), "--config", str(config), "--json"])
    summary = json.loads(result.stdout[result.stdout.index("{") :]) if "{" in result.stdout else None
    return result, summary


@pytest.fixture(scope="module")
def tiny_dense(tiny_model_dir_factory) -> Path:
    return tiny_model_dir_factory("llama", hidden_size=128, num_hidden_layers=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gate-cfg")
    text = d / "text.txt"
    text.write_text(" ".join(["the cat sat on the mat and the dog ran to the park"] * 20))
    config = d / "build.yaml"
    config.write_text(CONFIG)
    return {"text": text, "config": config}


@pytest.fixture(scope="module")
def passed_build(tiny_dense, files, tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "out"
    result, summary = _build(
        out,
        tiny_dense,
        "--eval-text",
        files["text"],
        "--gate",
        "kl<=100,top1>=0",
        "--gate",
        "ppl_ratio<=1000",
        config=files["config"],
    )
    assert result.exit_code == 0, result.output
    return out, summary


# --- conditions --------------------------------------------------------------------------


def test_conditions_parse_strictly():
    assert parse_condition(" ppl_ratio <= 1.30 ").threshold == 1.30
    assert [str(c) for c in parse_gate(["kl<=0.25,top1>=0.6", "accuracy_retained>=0.95", "kl<=0.25"])] == [
        "kl<=0.25",
        "top1>=0.6",
        "accuracy_retained>=0.95",
    ]
    for bad, words in (
        ("kl~0.2", "METRIC OP NUMBER"),
        ("perplexity<=2", "unknown metric 'perplexity'"),
        ("kl==0.2", "unsupported operator '=='"),
        ("kl<=abc", "not a number"),
        ("kl<=nan", "finite"),
    ):
        with pytest.raises(BadInputError, match="gate condition") as e:
            parse_condition(bad)
        assert words in str(e.value)
        if "metric" in words or "operator" in words:
            assert all(m in str(e.value) for m in METRICS) and all(o in str(e.value) for o in OPERATORS)


def test_check_gate_compares_and_an_unmeasured_metric_fails():
    gate = check_gate(parse_gate("kl<=0.25,top1>=0.6,ppl_ratio<1.3"), {"kl": 0.3, "top1": 0.6, "ppl_ratio": None})
    assert [r["passed"] for r in gate["conditions"]] == [False, True, False] and not gate["passed"]
    assert gate["conditions"][0]["value"] == 0.3


def test_eval_runs_only_when_asked_and_gate_needs_what_it_measures(files):
    assert "eval" not in build_options({}, {}).stages and build_options({}, {}).stages == DEFAULT_STAGES
    assert "eval" in build_options({}, {"gate": ["kl<=1"]}).stages
    assert "eval" in build_options({}, {"eval.text": str(files["text"])}).stages
    with pytest.raises(BadInputError, match="ppl_ratio<=1.3 needs .*--eval-text"):
        build_options({}, {"gate": ["ppl_ratio<=1.3"]})
    with pytest.raises(BadInputError, match="accuracy_retained>=0.95 needs .*--tasks"):
        build_options({}, {"gate": ["accuracy_retained>=0.95"]})
    with pytest.raises(BadInputError, match="needs the eval stage"):
        build_options({}, {"gate": ["kl<=1"], "stages": ["prune", "report"]})


def test_gate_and_eval_in_the_config_file(tmp_path, files):
    path = tmp_path / "b.yaml"
    path.write_text(
        f"eval:\n  text: {files['text']}\n  tasks: [a, b]\n  limit: 5\ngate: ['ppl_ratio<=1.3', 'kl<=0.2']\n"
    )
    options = build_options(read_config_file(path), {})
    assert options.eval.tasks == ("a", "b") and options.eval.limit == 5
    assert [str(c) for c in options.gate] == ["ppl_ratio<=1.3", "kl<=0.2"]
    path.write_text("eval:\n  taks: [a]\n")
    with pytest.raises(BadInputError, match="did you mean 'eval.tasks'"):
        read_config_file(path)


# --- builds ------------------------------------------------------------------------------


def test_a_passing_gate_is_in_the_report_and_the_json(passed_build, files):
    out, summary = passed_build
    assert summary["exit_code"] == 0 and summary["gate"]["passed"]
    assert list(summary["stages"]) == ["prune", "eval", "report"]
    ev = json.loads((out / "eval" / "eval.json").read_text())
    assert ev["metrics"]["ppl_ratio"] == pytest.approx(
        ev["pruned"]["perplexity"]["ppl"] / ev["dense"]["perplexity"]["ppl"]
    )
    assert ev["metrics"]["kl"] > 0 and 0 <= ev["metrics"]["top1"] <= 1
    by_name = {r["condition"]: r for r in summary["gate"]["conditions"]}
    assert set(by_name) == {"kl<=100", "top1>=0", "ppl_ratio<=1000"}
    assert by_name["kl<=100"]["value"] == ev["metrics"]["kl"]
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["passed"] and report["gate"] == summary["gate"] and report["eval"]["metrics"] == ev["metrics"]
    md = (out / "report" / "report.md").read_text()
    assert "## Quality gate" in md and "`ppl_ratio<=1000` |" in md and "## Evaluation: dense vs pruned" in md
    assert "quality gate passed" in (out / "slim" / "README.md").read_text()


def test_a_missed_gate_keeps_the_artifacts_names_condition_and_value_and_exits_3(
    passed_build, files, tiny_dense, tmp_path
):
    src, _ = passed_build
    out = tmp_path / "out"
    shutil.copytree(src, out)
    result, summary = _build(
        out, tiny_dense, "--eval-text", files["text"], "--gate", "kl<=0,top1>=0", config=files["config"]
    )
    assert result.exit_code == 3, result.output
    kl = json.loads((out / "eval" / "eval.json").read_text())["metrics"]["kl"]
    assert summary["exit_code"] == 3 and not summary["gate"]["passed"]
    assert [(r["condition"], r["passed"]) for r in summary["gate"]["conditions"]] == [
        ("kl<=0", False),
        ("top1>=0", True),
    ]
    # only the gate changed: prune and eval are reused, the report is redone
    assert summary["stages"]["prune"]["status"] == "cached" and summary["stages"]["eval"]["status"] == "cached"
    assert summary["stages"]["report"]["status"] == "ok"
    assert f"quality gate missed: kl<=0 (measured {kl:.4g})" in result.stderr
    report = json.loads((out / "report" / "report.json").read_text())
    assert not report["passed"] and any("kl<=0" in f for f in report["failures"])
    assert f"| `kl<=0` | {kl:.4g} | **FAIL** |" in (out / "report" / "report.md").read_text()
    assert (out / "slim" / "model.safetensors").exists()  # kept for inspection


def test_bad_gate_syntax_or_an_unmeasured_metric_is_refused_before_any_work(tiny_dense, files, tmp_path):
    for gate, words in (
        ("kl=<0.2", "unsupported operator"),
        ("ppl<=2", "needs pruned perplexity"),
        ("speed>=2", "unknown metric 'speed'"),
    ):
        out = tmp_path / gate.replace("<", "l").replace("=", "e").replace(">", "g")
        result, _ = _build(out, tiny_dense, "--gate", gate, config=files["config"])
        assert result.exit_code == 2, result.output
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not out.exists()


def test_eval_is_skipped_when_unchanged_and_redone_when_its_options_change(passed_build, files, tiny_dense, tmp_path):
    src, _ = passed_build
    out = tmp_path / "out"
    shutil.copytree(src, out)
    args = (tiny_dense, "--eval-text", files["text"], "--gate", "kl<=100,top1>=0", "--gate", "ppl_ratio<=1000")
    result, summary = _build(out, *args, config=files["config"])
    assert result.exit_code == 0, result.output
    assert all(s["status"] == "cached" for s in summary["stages"].values()), summary["stages"]
    other = tmp_path / "other.txt"
    other.write_text(" ".join(["a big red dog and a small blue cat"] * 30))
    result, summary = _build(out, tiny_dense, "--eval-text", other, "--gate", "kl<=100", config=files["config"])
    assert result.exit_code == 0, result.output
    assert [summary["stages"][s]["status"] for s in ("prune", "eval", "report")] == ["cached", "ok", "ok"]


def test_build_tasks_give_accuracy_retained(passed_build, files, tiny_dense, tmp_path):
    pytest.importorskip("lm_eval")
    from test_tasks import word_docs, write_task

    src, _ = passed_build
    out = tmp_path / "out"
    shutil.copytree(src, out)
    tasks = write_task(tmp_path / "tasks", word_docs(12))
    result, summary = _build(
        out,
        tiny_dense,
        "--tasks",
        "slim_local_mc",
        "--include-path",
        tasks,
        "--gate",
        "accuracy_retained>=0",
        config=files["config"],
    )
    assert result.exit_code == 0, result.output
    ev = json.loads((out / "eval" / "eval.json").read_text())
    dense, pruned = (ev[m]["accuracy"]["mean"]["acc"] for m in ("dense", "pruned"))
    assert ev["dense"]["accuracy"]["tasks"]["slim_local_mc"]["samples"] == 12
    if dense:
        assert ev["metrics"]["accuracy_retained"] == pytest.approx(pruned / dense)
    assert summary["gate"]["conditions"][0]["value"] == ev["metrics"]["accuracy_retained"]
    assert "| slim_local_mc | 12 |" in (out / "report" / "report.md").read_text()


def test_an_unknown_build_task_is_refused_before_any_work(tiny_dense, files, tmp_path):
    pytest.importorskip("lm_eval")
    from test_tasks import word_docs, write_task

    tasks = write_task(tmp_path / "tasks", word_docs(3))
    result, _ = _build(
        tmp_path / "out", tiny_dense, "--tasks", "slim_local_mcq", "--include-path", tasks, config=files["config"]
    )
    assert result.exit_code == 2 and "unknown lm-eval task 'slim_local_mcq'" in result.stderr
    assert not (tmp_path / "out").exists()
