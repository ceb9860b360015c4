"""Run the build's stages in order, skipping those whose inputs and outputs have not changed.

A stage's fingerprint is a hash of its own options, the tool's version and the current
fingerprints of the outputs it reads (upstream directories as they are on disk now). After a
stage finishes, DIR/build.json records its fingerprint, its output's fingerprint, its status,
time and summary (written atomically after every stage). A rerun skips a stage when its
fingerprint matches and its output is still what it wrote; `force` redoes every selected stage.
A changed option therefore reruns exactly the stages that read it and those downstream.

Directory fingerprints are over relative paths, sizes and modification times (no hashing of
gigabytes); the slim checkpoint's README.md and slimgpt.json are left out, since the report
stage adds the build's numbers to them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .._version import __version__
from ..atomic import write_json
from ..errors import BadInputError, OutputExistsError, first_line
from .options import BuildOptions
from .stages import STAGE, STAGES, TABLE, VERIFY_STAGES, BuildContext, prepare_eval, stage_inputs

log = logging.getLogger(__name__)

STATE_FILE = "build.json"
STATE_FORMAT = "slimgpt-deploy-build/1"
FINGERPRINT_EXCLUDES = {"prune": {"README.md", "slimgpt.json"}, "recover": {"README.md", "slimgpt.json"}}


@dataclass
class StageRun:
    name: str
    status: str  # "ok" | "cached" | "failed" | "skipped"
    seconds: float = 0.0
    summary: dict = field(default_factory=dict)
    reason: str | None = None


@dataclass
class BuildResult:
    out: Path
    stages: list[StageRun]
    state: dict
    gate: dict | None = None  # gate.check_gate's result when the build has a gate

    @property
    def verification_failed(self) -> list[str]:
        return [s.name for s in self.stages if s.name in VERIFY_STAGES and s.status == "failed"]

    @property
    def gate_failed(self) -> list[str]:
        from .gate import failures

        return failures(self.gate) if self.gate else []

    @property
    def exit_code(self) -> int:
        return 3 if self.verification_failed or self.gate_failed else 0

    def to_dict(self) -> dict:
        """The machine-readable summary `build --json` prints."""
        stages = {
            s.name: {"status": s.status, "seconds": round(s.seconds, 2), **({"reason": s.reason} if s.reason else {})}
            for s in self.stages
        }
        verification = {
            name.split("-", 1)[1]: {
                "passed": rec["summary"].get("passed"),
                "failures": rec["summary"].get("failures", []),
            }
            for name, rec in self.state["stages"].items()
            if name in VERIFY_STAGES
        }
        artifacts = {s.name: str(self.out / s.output) for s in TABLE if s.artifact and (self.out / s.output).exists()}
        return {
            "out": str(self.out),
            "exit_code": self.exit_code,
            "passed": self.exit_code == 0,
            "stages": stages,
            "verification": verification,
            **({"gate": self.gate} if self.gate is not None else {}),
            "artifacts": artifacts,
            "report": str(self.out / "report" / "report.md") if (self.out / "report" / "report.md").exists() else None,
        }


# --- fingerprints ------------------------------------------------------------------------


def path_fingerprint(path: Path, exclude: set[str] = frozenset()) -> str | None:
    """Hash of a file's or directory's (relative path, size, mtime) entries; None if it does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        rel = p.relative_to(path).as_posix() if p != path else p.name
        if rel in exclude:
            continue
        st = p.stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def source_fingerprint(source: str) -> str:
    """Identity of a model source: its files when local, the package version when embedded, else the name."""
    from ..sources import EMBEDDED_MODELS

    path = Path(source).expanduser()
    if path.exists():
        return path_fingerprint(path)
    if source in EMBEDDED_MODELS:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"embedded:{source}:{version(EMBEDDED_MODELS[source].pip_name)}"
        except (PackageNotFoundError, AttributeError):
            return f"embedded:{source}"
    return f"name:{source}"


def _hash(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def output_fingerprint(out: Path, stage: str) -> str | None:
    return path_fingerprint(out / STAGE[stage].output, FINGERPRINT_EXCLUDES.get(stage, set()))


def stage_fingerprint(out: Path, stage: str, options: BuildOptions) -> str:
    needs, uses = stage_inputs(stage, options)
    upstream = {name: output_fingerprint(out, name) for name in (*needs, *uses)}
    own = options.stage_options(stage)
    if STAGE[stage].source:
        own = {**own, "source": source_fingerprint(options.model)}
    return _hash({"stage": stage, "version": __version__, "options": own, "upstream": upstream})


# --- the build directory -----------------------------------------------------------------


def check_build_dir(out: Path, force: bool) -> dict:
    """The build state of `out` ({} for a new build); refuses a directory that is not a build without `force`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory; choose another --out")
    state_path = out / STATE_FILE
    if state_path.exists():
        try:
            state = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            state = None
        if isinstance(state, dict) and state.get("format") == STATE_FORMAT:
            return state
        if not force:
            raise OutputExistsError(
                f"{state_path} is not a slimgpt-deploy build record; "
                "choose a new --out, or pass --force to rebuild there"
            )
        return {}
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir())
        if foreign and not force:
            raise OutputExistsError(
                f"output {out} holds files that are not a slimgpt-deploy build ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new --out, or pass --force to build there"
            )
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise BadInputError(f"cannot write to {parent}; choose an --out in a writable directory")
    return {}


def run_build(
    out: Path,
    options: BuildOptions,
    *,
    force: bool = False,
    resume: bool = False,
    max_memory: int | None = None,
    log_fn: Callable[[str], None] = log.info,
    on_stage: Callable[[str, str, float], None] | None = None,
    on_layer: Callable[[int, int, dict], None] | None = None,
) -> BuildResult:
    """Run the selected stages of a build in `out`; see the module docstring.

    `on_stage(name, status, seconds)` is called when a stage starts ("running") and ends.
    Raises the stage's typed error on bad input or numerical failure (the state is saved
    first); a failed verification does not raise: see `BuildResult.exit_code`.
    """
    out = Path(out)
    state = check_build_dir(out, force)
    for stage in options.stages:
        _check_inputs(out, stage, options)
    _check_extras(options)
    tasks = prepare_eval(options)  # unknown task or a dataset not available: refused before any work
    out.mkdir(parents=True, exist_ok=True)
    state = {"format": STATE_FORMAT, "stages": {}, **state}
    state["options"] = options.to_dict()
    ctx = BuildContext(
        out=out,
        options=options,
        resume=resume,
        max_memory=max_memory,
        log=log_fn,
        on_layer=on_layer,
        state=state,
        tasks=tasks,
    )
    notify = on_stage or (lambda name, status, seconds: None)
    runs: list[StageRun] = []
    from ..reference import shared_references

    with shared_references():  # the verify stages decode the same reference once
        _run_stages(out, options, ctx, state, runs, notify, force)
    gate = gate_result(out, options)
    if gate is not None:
        state["gate"] = gate
        _save_state(out, state)
    return BuildResult(out=out, stages=runs, state=state, gate=gate)


def _run_stages(out: Path, options: BuildOptions, ctx: BuildContext, state: dict, runs: list, notify, force: bool):
    """Run (or find cached) each selected stage in order, appending a StageRun to `runs` for each."""
    for stage in STAGES:
        if stage not in options.stages:
            continue
        failed_checks = [r.name for r in runs if r.name in VERIFY_STAGES and r.status == "failed"]
        if stage == "bench" and failed_checks:
            runs.append(
                StageRun(
                    stage,
                    "skipped",
                    reason=(
                        f"{', '.join(failed_checks)} failed; not benchmarking an artifact that disagrees with PyTorch"
                    ),
                )
            )
            notify(stage, "skipped", 0.0)
            continue
        fingerprint = stage_fingerprint(out, stage, options)
        rec = state["stages"].get(stage)
        if (
            not force
            and rec
            and rec.get("status") == "ok"
            and rec.get("fingerprint") == fingerprint
            and rec.get("output_fingerprint") == output_fingerprint(out, stage)
        ):
            runs.append(StageRun(stage, "cached", summary=rec.get("summary", {})))
            notify(stage, "cached", 0.0)
            continue
        notify(stage, "running", 0.0)
        t0 = time.perf_counter()
        try:
            summary = STAGE[stage].run(ctx)
        except BaseException as e:
            seconds = time.perf_counter() - t0
            reason = first_line(e)
            state["stages"][stage] = {
                "status": "failed",
                "fingerprint": fingerprint,
                "seconds": round(seconds, 2),
                "reason": reason,
                "error": type(e).__name__,
                "finished_at": _now(),
            }
            _save_state(out, state)
            notify(stage, "failed", seconds)
            raise
        seconds = time.perf_counter() - t0
        status = "failed" if stage in VERIFY_STAGES and not summary.get("passed") else "ok"
        reason = "; ".join(summary.get("failures", [])) or None if status == "failed" else None
        state["stages"][stage] = {
            "status": status,
            "fingerprint": fingerprint,
            "output_fingerprint": output_fingerprint(out, stage),
            "seconds": round(seconds, 2),
            "finished_at": _now(),
            "summary": summary,
            **({"reason": reason} if reason else {}),
        }
        _save_state(out, state)
        runs.append(StageRun(stage, status, seconds, summary, reason))
        notify(stage, status, seconds)


def gate_result(out: Path, options: BuildOptions) -> dict | None:
    """The gate checked against DIR/eval/eval.json; None without a gate."""
    from .gate import check_gate_file

    return check_gate_file(options.gate, out / STAGE["eval"].output) if options.gate else None


def _check_inputs(out: Path, stage: str, options: BuildOptions) -> None:
    """Refuse, before any work, a stage whose required input is neither on disk nor made in this run."""
    needs, _ = stage_inputs(stage, options)
    for need in needs:
        if need not in options.stages and not (out / STAGE[need].output).exists():
            raise BadInputError(
                f"stage {stage} needs the output of stage {need} ({out / STAGE[need].output}), which does not exist; "
                f"add {need} to --stages or run the full build first"
            )


def _check_extras(options: BuildOptions) -> None:
    """Refuse, before any work, a stage or a named bench back end whose runtime is not installed."""
    from ..bench import BACKENDS as BENCH_BACKENDS
    from ..bench import missing_extra

    needs = [m for stage in options.stages for m in STAGE[stage].requires]
    if "bench" in options.stages and options.bench.explicit:  # unnamed back ends are skipped by bench instead
        needs += [m for backend in options.bench.backends for m in BENCH_BACKENDS[backend].requires]
    problem = missing_extra(list(dict.fromkeys(needs)))
    if problem is not None:
        raise problem


def _save_state(out: Path, state: dict) -> None:
    write_json(out / STATE_FILE, state)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
