"""The build's stages: each a function of the build context that writes its output atomically.

    prune        model source -> DIR/slim (SlimGPT prune, shrink, save the slim checkpoint)
    recover      DIR/slim + the dense model -> DIR/recovered (distillation; only when recover.enabled,
                 and then the exports, verification and bench read DIR/recovered instead of DIR/slim)
    export-vllm  DIR/slim -> DIR/vllm          (exporters.vllm, unverified here)
    export-onnx  DIR/slim -> DIR/onnx          (exporters.onnx, unverified here)
    export-gguf  DIR/slim -> DIR/gguf          (exporters.gguf, llama.cpp's deci architecture, gguf.type)
    export-genai DIR/slim -> DIR/genai         (exporters.genai, an ONNX Runtime GenAI folder, genai.weights)
    verify-vllm  DIR/vllm vs DIR/slim -> DIR/verify/vllm.json
    verify-onnx  DIR/onnx vs DIR/slim -> DIR/verify/onnx.json
    verify-gguf  DIR/gguf vs DIR/slim -> DIR/verify/gguf.json (llama.cpp itself)
    verify-genai DIR/genai vs DIR/slim -> DIR/verify/genai.json (ONNX Runtime GenAI itself)
    eval         dense vs DIR/slim: perplexity on eval.text, fidelity (KL, top-1), lm-eval
                 accuracies on eval.tasks -> DIR/eval/eval.json (only when asked; see gate.py)
    bench        dense vs DIR/slim on torch/onnx/vllm -> DIR/bench/bench.json
    report       everything above -> DIR/report/ (report.json, report.md, plots)

Exports run unverified and verification is its own stage, so a failed check is recorded
(and reported) rather than leaving no artifact to look at; a failed verification makes the
build exit with the verification code. Each function returns a JSON-able summary that the
runner stores in DIR/build.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import write_json

if TYPE_CHECKING:  # options.py reads the stage table, so only the type is imported here
    from .options import BuildOptions

WORK_DIR = ".work"  # caches owned by the build: prune resume state, bench's model copies and dense ONNX


@dataclass
class BuildContext:
    out: Path
    options: BuildOptions
    resume: bool = False
    max_memory: int | None = None  # cap on cached activations while pruning (same result, so not in fingerprints)
    log: Callable[[str], None] = lambda msg: None
    on_layer: Callable[[int, int, dict], None] | None = None
    state: dict | None = None  # the runner's build.json, read by the report
    tasks: object | None = None  # the eval stage's lm-eval tasks, resolved before any work (tasks.PreparedTasks)

    def path(self, stage: str) -> Path:
        return self.out / STAGE[stage].output

    @property
    def checkpoint(self) -> Path:
        """The slim checkpoint that ships (exported, verified, benchmarked): recovered when recovery is on."""
        return self.path("recover" if self.options.recover.enabled else "prune")

    @property
    def work(self) -> Path:
        return self.out / WORK_DIR


def prune(ctx: BuildContext) -> dict:
    from ..api import prune_to_checkpoint
    from ..resume import default_state_dir

    out = ctx.path("prune")
    ctx.log(
        f"pruning {ctx.options.model} by {ctx.options.prune.ratio:.0%} "
        f"({ctx.options.prune.schedule} schedule, calibration {ctx.options.prune.calib})"
    )
    result = prune_to_checkpoint(
        ctx.options.model,
        out,
        ctx.options.prune,
        force=True,
        on_layer=ctx.on_layer,
        resume=ctx.resume,
        state_dir=default_state_dir(out),
        max_memory=ctx.max_memory,
    )
    r = result.record
    return {
        "checkpoint": str(out),
        "ratio_target": r["ratio_target"],
        "ratio_achieved_decoder": r["ratio_achieved_decoder"],
        "ratio_achieved_model": r["ratio_achieved_model"],
        "params_dense": r["params_dense"],
        "params_slim": r["params_slim"],
        "seconds": r["seconds"],
    }


def recover(ctx: BuildContext) -> dict:
    from ..recover import recover_to_checkpoint

    out, config = ctx.path("recover"), ctx.options.recover.config
    ctx.log(
        f"recovering {ctx.path('prune')} by distillation from {ctx.options.model} "
        f"({config.steps} steps, {'full weights' if config.full else f'LoRA r={config.rank}'}, data {config.data})"
    )
    result = recover_to_checkpoint(
        ctx.path("prune"),
        ctx.options.model,
        out,
        config,
        force=True,
        resume=ctx.resume,
        state_dir=ctx.work / "recover-state",
    )
    r = result.record["recovery"]
    return {"checkpoint": str(out), **{k: r[k] for k in ("steps", "tokens", "seconds", "fidelity")}}


def _export(fmt: str, ctx: BuildContext, **kwargs) -> dict:
    from ..exporters import get_exporter

    summary = get_exporter(fmt)(
        ctx.checkpoint, ctx.path(f"export-{fmt}"), force=True, verify=False, log=ctx.log, **kwargs
    )
    summary.pop("verification", None)  # verified by its own stage
    return summary


def export_vllm(ctx: BuildContext) -> dict:
    return _export("vllm", ctx, dtype=ctx.options.vllm_dtype, quantize=None)


def export_onnx(ctx: BuildContext) -> dict:
    o = ctx.options
    return _export("onnx", ctx, dtype=o.onnx_dtype, quantize=o.onnx_quantize, fuse=o.onnx_fuse)


def export_gguf(ctx: BuildContext) -> dict:
    return _export("gguf", ctx, quantize=ctx.options.gguf_type)


def export_genai(ctx: BuildContext) -> dict:
    from ..exporters import genai_export_args

    return _export("genai", ctx, **genai_export_args(ctx.options.genai_weights))


def _verify(fmt: str, ctx: BuildContext) -> dict:
    """Run the format's verifier; an artifact that cannot even be loaded is a failed check, not a crash."""
    from ..errors import first_line
    from ..exporters import get_verifier
    from ..extras import MissingExtraError

    try:
        result = get_verifier(fmt)(ctx.path(f"export-{fmt}"), ctx.checkpoint, log=ctx.log)
    except MissingExtraError:
        raise
    except Exception as e:  # noqa: BLE001 -- a broken artifact must be reported, whatever the runtime raised
        result = {"passed": False, "failures": [f"{fmt} could not run the export: {type(e).__name__}: {first_line(e)}"]}
    write_json(ctx.path(f"verify-{fmt}"), result)
    return result


def verify_vllm(ctx: BuildContext) -> dict:
    return _verify("vllm", ctx)


def verify_onnx(ctx: BuildContext) -> dict:
    return _verify("onnx", ctx)


def verify_gguf(ctx: BuildContext) -> dict:
    return _verify("gguf", ctx)


def verify_genai(ctx: BuildContext) -> dict:
    return _verify("genai", ctx)


def bench(ctx: BuildContext) -> dict:
    from ..bench import BACKENDS, BenchOptions, run_bench

    b, o = ctx.options.bench, ctx.options
    # The measuring options, without the back-end choice. llama.cpp and GenAI measure the types the build
    # ships (dense exported alike), so the build's own exports of the pruned model are measured, not redone.
    options = BenchOptions.from_dict({**b.to_dict(), "gguf_type": o.gguf_type, "genai_weights": o.genai_weights})
    # The ONNX export is reused when it is what bench measures (fp32, not quantized, fused).
    shipped = {"onnx": o.onnx_dtype == "fp32" and o.onnx_quantize is None and o.onnx_fuse, "gguf": True, "genai": True}
    formats = {name: b.export.format for name, b in BACKENDS.items() if b.export is not None}
    exports = {
        backend: {"pruned": ctx.path(f"export-{fmt}")}
        for backend, fmt in formats.items()
        if shipped[fmt] and (ctx.path(f"export-{fmt}") / "export.json").exists()
    }
    result = run_bench(
        o.model,
        ctx.checkpoint,
        list(b.backends),
        options=options,
        explicit=b.explicit,
        work_dir=ctx.work / "bench",
        exports=exports,
        log=ctx.log,
    )
    write_json(ctx.path("bench"), result)
    return {name: {"status": r["status"], "reason": r.get("reason")} for name, r in result["backends"].items()}


def prepare_eval(options: BuildOptions):
    """Resolve the eval stage's lm-eval tasks (names and datasets) before any work; None without tasks."""
    e = options.eval
    if "eval" not in options.stages or not e.tasks:
        return None
    from ..tasks import TaskOptions, prepare_tasks

    return prepare_tasks(
        TaskOptions(
            tasks=e.tasks,
            include_path=Path(e.include_path) if e.include_path else None,
            num_fewshot=e.num_fewshot,
            limit=e.limit,
            batch_size=e.batch_size,
        )
    )


def eval_(ctx: BuildContext) -> dict:
    """Dense vs pruned: perplexity on eval.text, fidelity of the pruned model, accuracies on eval.tasks."""
    from ..bench import SAMPLE_TEXT
    from ..evaluate import fidelity, load_text, perplexity, text_to_ids
    from ..sources import load_model
    from ..tasks import run_tasks
    from .gate import measured_metrics

    e = ctx.options.eval
    tasks = ctx.tasks if ctx.tasks is not None else prepare_eval(ctx.options)
    ctx.log(f"evaluating dense {ctx.options.model} and pruned {ctx.path('prune')}")
    device = ctx.options.prune.device  # the build's compute device
    models = {
        "dense": load_model(ctx.options.model, device=device),
        "pruned": load_model(str(ctx.checkpoint), device=device),
    }
    results: dict = {name: {"model": m.source} for name, m in models.items()}
    tokenizer = models["dense"].tokenizer
    if e.text is not None:
        ids = text_to_ids(tokenizer, load_text(e.text))
        for name, m in models.items():
            ppl = perplexity(m.model, ids, seqlen=e.seqlen, max_tokens=e.max_tokens)
            results[name]["perplexity"] = {"text": e.text, **ppl.__dict__}
    fid_text = Path(e.text) if e.text is not None else SAMPLE_TEXT
    ids = text_to_ids(tokenizer, load_text(fid_text))[: e.fidelity_tokens]  # [T]
    fid = fidelity(models["pruned"].model, models["dense"].model, ids, seqlen=min(e.seqlen, ids.numel()))
    fid_record = {"text": e.text or "built-in sample", **fid.__dict__}
    if tasks is not None:
        for name, m in models.items():
            ctx.log(f"lm-eval tasks {', '.join(e.tasks)} on the {name} model")
            results[name]["accuracy"] = run_tasks(m.model, m.tokenizer, tasks)
    metrics = measured_metrics(results["dense"], results["pruned"], fid_record)
    write_json(ctx.path("eval"), {**results, "fidelity": fid_record, "metrics": metrics})
    return {k: v for k, v in metrics.items() if v is not None}


def report(ctx: BuildContext) -> dict:
    from .report import write_report

    return write_report(ctx)


# --- the stage table: everything the runner, the options, `--stages` and the report know of a stage


@dataclass(frozen=True)
class Stage:
    """One build stage. Adding a stage is one row below and its function above."""

    name: str
    run: Callable[[BuildContext], dict]
    output: str  # relative to the build directory
    about: str  # one line for `--stages` help and the README
    needs: tuple[str, ...] = ()  # stages whose outputs it needs (refused before any work when missing)
    uses: tuple[str, ...] = ()  # stages whose outputs it reads when they are there
    requires: tuple[str, ...] = ()  # modules it needs, checked (without importing them) before any stage runs
    options: Callable[[BuildOptions], dict] = lambda o: {}  # what its result depends on (its fingerprint)
    source: bool = False  # its result depends on the model source too
    verifies: bool = False  # a check: a failure is recorded, bench is skipped, the build exits 3
    optional: bool = False  # in the default stages only when switched on (see options.build_options)
    artifact: bool = False  # its output is a deliverable, listed in `build --json`
    reads_checkpoint: bool = False  # reads DIR/slim, or DIR/recovered when the recover stage is on


def _fields(section) -> dict:
    return {f.name: getattr(section, f.name) for f in fields(section)}


TABLE: tuple[Stage, ...] = (
    Stage(
        "prune",
        prune,
        "slim",
        "SlimGPT prune, shrink, save the slim checkpoint",
        options=lambda o: {"model": o.model, "prune": o.prune.to_dict()},
        source=True,
        artifact=True,
    ),
    Stage(
        "recover",
        recover,
        "recovered",
        "distillation from the dense model (when switched on)",
        needs=("prune",),
        requires=("peft",),
        options=lambda o: {"model": o.model, "recover": o.recover.config.to_dict()},
        source=True,
        optional=True,
        artifact=True,
    ),
    Stage(
        "export-vllm",
        export_vllm,
        "vllm",
        "the checkpoint for vLLM",
        needs=("prune",),
        options=lambda o: {"dtype": o.vllm_dtype},
        artifact=True,
        reads_checkpoint=True,
    ),
    Stage(
        "export-onnx",
        export_onnx,
        "onnx",
        "ONNX decoder with a KV cache",
        needs=("prune",),
        requires=("onnx",),
        options=lambda o: {"dtype": o.onnx_dtype, "quantize": o.onnx_quantize, "fuse": o.onnx_fuse},
        artifact=True,
        reads_checkpoint=True,
    ),
    Stage(
        "export-gguf",
        export_gguf,
        "gguf",
        "GGUF for llama.cpp",
        needs=("prune",),
        requires=("gguf", "llama_cpp_py_sync"),  # llama.cpp's quantizer makes q8_0 / q4_k_m
        options=lambda o: {"type": o.gguf_type},
        artifact=True,
        reads_checkpoint=True,
    ),
    Stage(
        "export-genai",
        export_genai,
        "genai",
        "an ONNX Runtime GenAI folder (GroupQueryAttention per layer)",
        needs=("prune",),
        requires=("onnx", "onnxruntime"),
        options=lambda o: {"weights": o.genai_weights},
        artifact=True,
        reads_checkpoint=True,
    ),
    Stage(
        "verify-vllm",
        verify_vllm,
        "verify/vllm.json",
        "vLLM vs transformers",
        needs=("prune", "export-vllm"),
        requires=("vllm",),
        verifies=True,
        reads_checkpoint=True,
    ),
    Stage(
        "verify-onnx",
        verify_onnx,
        "verify/onnx.json",
        "ONNX Runtime vs PyTorch",
        needs=("prune", "export-onnx"),
        requires=("onnxruntime",),
        verifies=True,
        reads_checkpoint=True,
    ),
    Stage(
        "verify-gguf",
        verify_gguf,
        "verify/gguf.json",
        "llama.cpp vs transformers",
        needs=("prune", "export-gguf"),
        requires=("llama_cpp_py_sync",),
        verifies=True,
        reads_checkpoint=True,
    ),
    Stage(
        "verify-genai",
        verify_genai,
        "verify/genai.json",
        "ONNX Runtime GenAI vs transformers",
        needs=("prune", "export-genai"),
        requires=("onnxruntime_genai",),
        verifies=True,
        reads_checkpoint=True,
    ),
    Stage(
        "eval",
        eval_,
        "eval/eval.json",
        "perplexity, fidelity, lm-eval accuracies, dense vs pruned (when asked)",
        needs=("prune",),
        options=lambda o: {"model": o.model, **_fields(o.eval)},
        source=True,
        optional=True,
        reads_checkpoint=True,
    ),
    Stage(
        "bench",
        bench,
        "bench/bench.json",
        "dense vs pruned on each back end",
        needs=("prune",),
        uses=("export-onnx", "export-gguf", "export-genai"),  # measured when they are what it measures
        options=lambda o: {
            "model": o.model,
            **o.bench.to_dict(),
            "explicit": o.bench.explicit,
            "gguf_type": o.gguf_type,
            "genai_weights": o.genai_weights,
        },
        source=True,
        reads_checkpoint=True,
    ),
    Stage(
        "report",
        report,
        "report",
        "report.json, report.md, plots",
        options=lambda o: {"gate": [str(c) for c in o.gate]},
        artifact=True,
        reads_checkpoint=True,
    ),
)
# The report reads every other stage's output that is there (recover's through the checkpoint swap).
TABLE = (*TABLE[:-1], replace(TABLE[-1], uses=tuple(s.name for s in TABLE[:-1] if s.name != "recover")))
STAGE: dict[str, Stage] = {s.name: s for s in TABLE}
STAGES: tuple[str, ...] = tuple(STAGE)  # in the order they run
VERIFY_STAGES = tuple(s.name for s in TABLE if s.verifies)


def stage_inputs(stage: str, options: BuildOptions) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(stages it needs, stages it uses); with recovery on, the recovered checkpoint stands in for the pruned one."""
    needs, uses = STAGE[stage].needs, STAGE[stage].uses
    if options.recover.enabled and STAGE[stage].reads_checkpoint:
        swap = lambda names: tuple("recover" if n == "prune" else n for n in names)  # noqa: E731
        return swap(needs), swap(uses)
    return needs, uses
