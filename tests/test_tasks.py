"""`eval --tasks` through lm-evaluation-harness, really run offline on a local multiple-choice task.

The task is made here from a local JSONL file (a YAML with `dataset_path: json`); the
accuracies lm-eval reports are checked against ones computed in this file from the model's
own log-likelihoods of each choice: acc = argmax of the summed log-probabilities of
" " + choice after the context; acc_norm = the same divided by the choice's length in characters.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_WORDS

pytest.importorskip("lm_eval")

from slimgpt_deploy.cli import main  # noqa: E402

TASK = "slim_local_mc"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def write_task(directory: Path, docs: list[dict], name: str = TASK, data: Path | None = None) -> Path:
    """A multiple-choice lm-eval task over a local JSONL file (fields: context, choices, label)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = data or directory / f"{name}.jsonl"
    if docs:
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return directory


def word_docs(n: int, seed: int = 0) -> list[dict]:
    """Contexts and 2-4 choices of 1-3 words from the tiny tokenizer's vocabulary (choice lengths differ)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        k = rng.randint(2, 4)
        choices = list(dict.fromkeys(" ".join(rng.choices(TINY_WORDS, k=rng.randint(1, 3))) for _ in range(k)))
        docs.append(
            {
                "context": " ".join(rng.choices(TINY_WORDS, k=rng.randint(3, 6))),
                "choices": choices,
                "label": rng.randrange(len(choices)),
            }
        )
    return docs


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """sum log p(continuation tokens | context), tokenizing context+continuation whole (lm-eval's rule)."""
    whole = tokenizer.encode(context + continuation)
    n_ctx = len(tokenizer.encode(context))
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # [T, V]
    return sum(logp[t - 1, whole[t]].item() for t in range(n_ctx, len(whole)))


def expected_accuracy(model, tokenizer, docs: list[dict]) -> tuple[float, float]:
    acc = acc_norm = 0
    for d in docs:
        lls = [loglikelihood(model, tokenizer, d["context"], " " + c) for c in d["choices"]]
        norm = [ll / len(c) for ll, c in zip(lls, d["choices"])]
        acc += max(range(len(lls)), key=lls.__getitem__) == d["label"]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == d["label"]
    return acc / len(docs), acc_norm / len(docs)


def run_eval(*args):
    result = CliRunner().invoke(main, ["eval", *map(str, args), "--json"])
    return result, (json.loads(result.stdout[result.stdout.index("{") :]) if result.exit_code == 0 else None)


@pytest.fixture(scope="module")
def offline_env():
    saved = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _check(acc: dict, model, tokenizer, docs, limit=None):
    expected = expected_accuracy(model, tokenizer, docs)
    t = acc["tasks"][TASK]
    assert t["samples"] == len(docs)
    assert (t["acc"], t["acc_norm"]) == pytest.approx(expected, abs=1e-12)
    assert t["acc_stderr"] is not None and t["acc_stderr"] > 0
    assert acc["harness"] == "lm-evaluation-harness" and acc["harness_version"].startswith("0.4.")
    assert acc["num_fewshot"] == 0 and acc["limit"] == limit
    assert acc["mean"]["acc"] == t["acc"]


def test_tiny_model_accuracy_equals_the_one_computed_from_its_loglikelihoods(tiny_llama_dir, tmp_path, offline_env):
    from slimgpt_deploy.sources import load_model

    docs = word_docs(24)
    tasks = write_task(tmp_path / "tasks", docs)
    result, out = run_eval(tiny_llama_dir, "--tasks", TASK, "--include-path", tasks, "--batch-size", 3)
    assert result.exit_code == 0, result.output
    loaded = load_model(str(tiny_llama_dir))
    _check(out["accuracy"], loaded.model, loaded.tokenizer, docs)
    # --limit: the first N documents only, recorded
    result, out = run_eval(tiny_llama_dir, "--tasks", TASK, "--include-path", tasks, "--limit", 7)
    assert result.exit_code == 0, result.output
    _check(out["accuracy"], loaded.model, loaded.tokenizer, docs[:7], limit=7)


def test_a_slim_checkpoint_is_evaluated_in_memory(uneven_slim_dir, tmp_path, offline_env):
    from slimgpt_deploy.sources import load_model

    docs = word_docs(10, seed=1)
    result, out = run_eval(uneven_slim_dir, "--tasks", TASK, "--include-path", write_task(tmp_path / "tasks", docs))
    assert result.exit_code == 0, result.output
    loaded = load_model(str(uneven_slim_dir))
    assert type(loaded.model).__name__ == "SlimGPTForCausalLM"
    _check(out["accuracy"], loaded.model, loaded.tokenizer, docs)


def test_unknown_task_is_refused_with_how_to_list_them(tiny_llama_dir):
    result = CliRunner().invoke(main, ["eval", str(tiny_llama_dir), "--tasks", "boolqq"])
    assert result.exit_code == 2
    assert "unknown lm-eval task 'boolqq'" in result.output and "did you mean 'boolq'" in result.output
    assert "lm-eval ls tasks" in result.output


@pytest.mark.slow  # builds lm-eval's index twice (~10 s each on 2 cores)
def test_the_cached_task_index_is_the_one_lm_eval_builds(tmp_path, monkeypatch):
    """`task_manager` serves lm-eval's own index of its built-in tasks and an include directory, from a cache file.

    The first call writes the cache; the second must not walk lm-eval's task folder (TaskIndex.build patched to
    refuse it) and both must give what `TaskManager(include_path=...)` gives: the same names by kind, and the same
    entries (kind, YAML path, config, tags); the include directory's task loads through it.
    """
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks import _index as lm_index

    from slimgpt_deploy import sources, tasks

    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
    include = str(write_task(tmp_path / "tasks", word_docs(4)))
    fresh = TaskManager(include_path=include)
    first = tasks.task_manager(include)
    assert tasks._index_cache().is_file() and tasks._index_cache().is_relative_to(tmp_path / "cache")
    defaults = Path(sys.modules[TaskManager.__module__].__file__).parent  # lm_eval/tasks: what TaskManager() walks
    build = lm_index.TaskIndex.build

    def only_the_include(paths, **kw):
        paths = list(paths)
        assert defaults not in [Path(p) for p in paths], "lm-eval's own task folder was walked again"
        return build(paths, **kw)

    monkeypatch.setattr(lm_index.TaskIndex, "build", staticmethod(only_the_include))
    second = tasks.task_manager(include)
    for manager in (first, second):
        for listing in ("all_tasks", "all_subtasks", "all_groups", "all_tags"):
            assert getattr(manager, listing) == getattr(fresh, listing), listing
        assert manager.task_index == fresh.task_index
        assert TASK in manager.load([TASK])["tasks"]


def test_a_local_task_whose_data_file_is_missing_is_refused(tiny_llama_dir, tmp_path):
    tasks = write_task(tmp_path / "tasks", [], data=tmp_path / "gone.jsonl")
    result = CliRunner().invoke(main, ["eval", str(tiny_llama_dir), "--tasks", TASK, "--include-path", str(tasks)])
    assert result.exit_code == 2, result.output
    assert f"task {TASK!r}: its dataset is not available" in result.output


def test_a_hub_task_offline_is_one_line_naming_it_exit_2(tiny_llama_dir, tmp_path):
    """boolq's dataset is a download: offline, one line that names the task and the way out, nothing on stdout."""
    env = {**os.environ, **OFFLINE}
    proc = subprocess.run(
        [sys.executable, "-m", "slimgpt_deploy.cli", "eval", str(tiny_llama_dir), "--tasks", "boolq", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "task 'boolq'" in errors[0] and "--include-path" in errors[0] and "network" in errors[0]
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_task_options_are_checked(tiny_llama_dir, tmp_path):
    for args, words in (
        (["--tasks", TASK, "--limit", "0"], "--limit"),
        (["--tasks", TASK, "--num-fewshot", "-1"], "--num-fewshot"),
        (["--tasks", TASK, "--include-path", str(tmp_path / "nope")], "not a directory"),
        (["--limit", "3"], "--tasks"),
    ):
        result = CliRunner().invoke(main, ["eval", str(tiny_llama_dir), *args])
        assert result.exit_code == 2 and words in result.output, (args, result.output)


@pytest.mark.slow
def test_smollm2_accuracy_equals_the_one_computed_from_its_loglikelihoods(tmp_path, offline_env):
    from slimgpt_deploy.sources import load_model

    sentences = [  # context, right ending, wrong endings
        ("The capital of France is", "Paris.", ["a small green vegetable.", "seven."]),
        ("Water freezes at zero degrees", "Celsius.", ["of happiness.", "and then sings."]),
        ("The cat chased the", "mouse across the kitchen.", ["theorem.", "Tuesday quickly."]),
        ("She opened the door and walked", "into the room.", ["the number four.", "blue."]),
        ("Two plus two equals", "four.", ["purple.", "the Atlantic Ocean."]),
        ("In the morning, people usually eat", "breakfast.", ["mountains.", "a loud silence."]),
    ]
    docs = []
    for i, (ctx, right, wrong) in enumerate(sentences):
        choices = wrong[: i % 2 + 1] + [right] + wrong[i % 2 + 1 :]
        docs.append({"context": ctx, "choices": choices, "label": choices.index(right)})
    result, out = run_eval("smollm2-135m", "--tasks", TASK, "--include-path", write_task(tmp_path / "tasks", docs))
    assert result.exit_code == 0, result.output
    loaded = load_model("smollm2-135m")
    _check(out["accuracy"], loaded.model, loaded.tokenizer, docs)
    assert out["accuracy"]["tasks"][TASK]["acc"] >= 0.5  # these are easy for a real model
