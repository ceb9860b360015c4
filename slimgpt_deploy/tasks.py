"""Standard accuracy through lm-evaluation-harness (the `lm-eval` extra), on an already-loaded model.

The pruning papers (SlimGPT, LLM-Pruner, FLAP) report zero-shot accuracy on BoolQ, PIQA,
HellaSwag, WinoGrande, ARC-e, ARC-c and OBQA through lm-eval. Here the model we already
loaded (dense, or a slim checkpoint's SlimGPTForCausalLM) is handed to lm-eval's `HFLM`
directly, so nothing is reloaded or converted.

For a multiple-choice document with context c and choices a_1..a_k, lm-eval scores

    ll_i = sum over the tokens of " " + a_i of log p(token | c, earlier tokens of a_i)
    acc      = [argmax_i ll_i == gold]
    acc_norm = [argmax_i ll_i / len(a_i) == gold]        (len in characters of the choice text)

averaged over documents, with the standard error of the mean. Task names are lm-eval's own;
`include_path` adds a directory of task YAMLs (e.g. one with `dataset_path: json` over a local
JSONL file, which runs without any network). Datasets are resolved *before* any model work
(`prepare_tasks`), so an unknown task or a dataset that cannot be had offline fails in seconds
with one line that says what to do.
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_write
from .errors import BadInputError, first_line
from .extras import require

log = logging.getLogger(__name__)

HARNESS = "lm-evaluation-harness"
METRICS = ("acc", "acc_norm")
# The seven zero-shot tasks of the pruning papers (lm-eval names); they need their datasets (network once).
PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


@dataclass(frozen=True)
class TaskOptions:
    tasks: tuple[str, ...]
    include_path: Path | None = None
    num_fewshot: int = 0
    limit: int | None = None  # first N documents of each task (None: all)
    batch_size: int = 8

    def __post_init__(self):
        if not self.tasks:
            raise BadInputError("no tasks given; name lm-eval tasks, e.g. --tasks boolq,piqa")
        if self.num_fewshot < 0:
            raise BadInputError(f"--num-fewshot must be >= 0, got {self.num_fewshot}")
        if self.limit is not None and self.limit < 1:
            raise BadInputError(f"--limit must be at least 1 document per task, got {self.limit}")
        if self.batch_size < 1:
            raise BadInputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise BadInputError(
                f"--include-path {self.include_path} is not a directory; give a directory of lm-eval task YAMLs"
            )

    def to_dict(self) -> dict:
        return {
            "tasks": list(self.tasks),
            "include_path": str(self.include_path) if self.include_path else None,
            "num_fewshot": self.num_fewshot,
            "limit": self.limit,
            "batch_size": self.batch_size,
        }


def parse_tasks(text: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """`boolq, piqa` (or a list) -> ("boolq", "piqa"), duplicates dropped, order kept."""
    if text is None:
        return ()
    items = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    return tuple(dict.fromkeys(t.strip() for t in items if t.strip()))


@dataclass
class PreparedTasks:
    """lm-eval Task objects with their datasets loaded, and the manager that found them."""

    options: TaskOptions
    manager: object
    tasks: dict  # name -> lm_eval Task


def harness_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _index_cache() -> Path:
    """One file per lm-eval version *and* install (the index holds the YAML files' absolute paths)."""
    import hashlib
    from importlib.metadata import version

    import lm_eval

    from .sources import cache_root

    where = hashlib.sha256(str(Path(lm_eval.__file__).resolve().parent).encode()).hexdigest()[:12]
    return cache_root() / "lm-eval" / f"task-index-{version('lm_eval')}-{where}.json"


def _default_index():
    """lm-eval's index of its built-in tasks, from our JSON cache (written on first use), or None if unusable.

    `TaskManager()` parses its ~14,700 task YAMLs on every construction (about 10 s on a 2-core CPU); the
    index depends only on the installed lm-eval, so it is cached per version. It is rebuilt through lm-eval's
    own (private) index classes, which the pinned version has; anything unexpected gives None: no cache.
    """
    try:
        from lm_eval.tasks._index import Entry, Kind
        from lm_eval.tasks.manager import TaskManager

        path = _index_cache()
        if path.is_file():
            rows = json.loads(path.read_text())
        else:
            rows = [
                {"name": e.name, "kind": e.kind.name, "yaml_path": e.yaml_path and str(e.yaml_path), "cfg": e.cfg}
                | {"tags": sorted(e.tags)}
                for e in TaskManager().task_index.values()
            ]
            text = json.dumps(rows)  # TypeError on anything JSON cannot carry back
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: tmp.write_text(text))
        entries = {}
        for r in rows:  # the JSON row back into lm-eval's Entry (same field names)
            path = r["yaml_path"] and Path(r["yaml_path"])
            entries[r["name"]] = Entry(**r | {"kind": Kind[r["kind"]], "yaml_path": path, "tags": set(r["tags"])})
        return entries
    except Exception as e:  # noqa: BLE001 -- a cache: any failure means building the index as lm-eval does
        log.debug("lm-eval task index cache not used: %s", first_line(e))
        return None


def task_manager(include: str | None, wanted: tuple[str, ...] = ()):
    """lm-eval's `TaskManager(include_path=include)`, its built-in tasks' index read from the cache when possible.

    When every `wanted` task is in the include directory, its index alone (the built-in tasks are not needed).
    Else the same index as lm-eval builds: the built-in tasks, then the include directory's, which override them.
    """
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    manager = TaskManager(include_path=include, include_defaults=False)  # the include directory's alone: fast
    if wanted and set(wanted) <= set(manager.all_tasks):  # (an empty index without an include directory)
        return manager
    defaults = _default_index()
    if defaults is None or not hasattr(manager, "_index"):
        return TaskManager(include_path=include)
    index = defaults | manager._index

    def named(*kinds: Kind) -> list[str]:
        return sorted(name for name, e in index.items() if e.kind in kinds)

    manager._index, manager._all_tasks = index, sorted(index)
    manager._all_subtasks, manager._all_groups = named(Kind.TASK, Kind.PY_TASK), named(Kind.GROUP)
    manager._all_tags = named(Kind.TAG)
    return manager


def prepare_tasks(options: TaskOptions) -> PreparedTasks:
    """Find every task and load its dataset, before any model is loaded.

    Unknown name -> BadInputError naming the closest and how to list them; a dataset that cannot
    be loaded (offline, or missing) -> BadInputError naming the task and how to make it available.
    """
    require("lm_eval")
    include = str(options.include_path) if options.include_path else None
    manager = task_manager(include, options.tasks)
    known = set(manager.all_tasks)
    for name in options.tasks:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise BadInputError(
                f"unknown lm-eval task {name!r}{hint}: list the available ones with `lm-eval ls tasks`"
                f"{' --include_path ' + include if include else ''}, "
                "or add a task YAML in a directory given by --include-path"
            )
    tasks: dict = {}
    for name in options.tasks:
        try:
            loaded = manager.load([name])
        except Exception as e:  # noqa: BLE001 -- datasets raises many kinds (ConnectionError, FileNotFoundError, ...)
            raise BadInputError(
                f"task {name!r}: its dataset is not available ({type(e).__name__}: {first_line(e)}); "
                "run once with network access "
                f"(the Hugging Face datasets cache then keeps it for offline runs), or give a local task YAML "
                f"(dataset_path: json over a JSONL file) in a directory passed with --include-path"
            ) from e
        tasks.update(loaded["tasks"])
    for name, task in tasks.items():
        if task.get_config("output_type") != "multiple_choice":
            raise BadInputError(
                f"task {name!r} is {task.get_config('output_type')}, not multiple_choice; "
                f"only multiple-choice tasks (acc / acc_norm) are supported"
            )
    return PreparedTasks(options=options, manager=manager, tasks=tasks)


def run_tasks(model, tokenizer, prepared: PreparedTasks) -> dict:
    """Accuracy of an in-memory model on the prepared tasks (see the module docstring).

    Returns {"harness", "harness_version", "num_fewshot", "limit", "tasks": {name: {acc, acc_stderr,
    acc_norm, acc_norm_stderr, samples}}, "mean": {acc, acc_norm}} (means over tasks, unweighted).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from .evaluate import eval_mode

    o = prepared.options
    with eval_mode(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=o.batch_size)
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(prepared.tasks.values()),
            num_fewshot=o.num_fewshot,
            limit=o.limit,
            task_manager=prepared.manager,
            log_samples=False,
            random_seed=0,
            numpy_random_seed=1234,
            torch_random_seed=1234,
            fewshot_random_seed=1234,
        )
    per_task = {}
    for name in prepared.tasks:
        r = raw["results"][name]
        entry = {"samples": raw["n-samples"][name]["effective"]}
        for metric in METRICS:
            entry[metric] = r.get(f"{metric},none")
            stderr = r.get(f"{metric}_stderr,none")  # "N/A" for a single document
            entry[f"{metric}_stderr"] = stderr if isinstance(stderr, (int, float)) else None
        per_task[name] = entry
        log.info(
            "%s: acc %.4f, acc_norm %.4f over %d documents", name, entry["acc"], entry["acc_norm"], entry["samples"]
        )
    return {
        "harness": HARNESS,
        "harness_version": harness_version(),
        "num_fewshot": o.num_fewshot,
        "limit": o.limit,
        "tasks": per_task,
        "mean": {m: sum(t[m] for t in per_task.values()) / len(per_task) for m in METRICS},
    }
