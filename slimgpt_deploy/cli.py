"""The `slimgpt-deploy` command line: a thin layer over the library.

Each command builds its options, calls one library function and reports.
Human output goes to stderr (rich); `--json` puts a machine-readable summary
on stdout. Errors: one line on stderr, exit code from errors.py.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from slimgpt_deploy.bench import BACKENDS as BENCH_BACKENDS
from slimgpt_deploy.bench import BenchOptions
from slimgpt_deploy.bench.options import GENAI_WEIGHTS, GGUF_TYPES
from slimgpt_deploy.build.options import PRESETS, BenchSection
from slimgpt_deploy.build.stages import STAGES
from slimgpt_deploy.config import DTYPES, GQA_MODES, HESSIAN_DTYPES, METHODS, SCHEDULES, PruneConfig
from slimgpt_deploy.exporters import DTYPES as EXPORT_DTYPES
from slimgpt_deploy.exporters import EXPORTERS, QUANTIZE
from slimgpt_deploy.recover import PRECISIONS, TEACHER_TOPK, RecoverConfig
from slimgpt_deploy.serving import BACKENDS as GENERATE_BACKENDS

EXIT_INTERNAL = 1


class Ratio(click.ParamType):
    """A fraction in [0, 0.9]; "20%" is refused with a hint rather than a parse error."""

    name = "ratio"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        text = str(value).strip()
        if text.endswith("%"):
            self.fail(
                f"{text!r} is a percentage; give the fraction instead, e.g. {float(text[:-1]) / 100:g}"
                if text[:-1].replace(".", "", 1).isdigit()
                else f"{text!r} is not a number",
                param,
                ctx,
            )
        try:
            return float(text)
        except ValueError:
            self.fail(f"{text!r} is not a number; give a fraction such as 0.2", param, ctx)


def _float_list(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers, e.g. 0.1,0.2,0.3")


def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 128,512")


def _csv(values) -> str:
    return ",".join(map(str, values))


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _run(fn):
    """Call fn, turning our typed errors into a one-line message and their exit code."""
    from .errors import SlimGPTError

    try:
        return fn()
    except SlimGPTError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:  # errors.Interrupted carries its own message (e.g. where resume state is)
        click.echo(str(e) if str(e) else "interrupted; no output was written", err=True)
        sys.exit(getattr(e, "exit_code", 130))
    except OSError as e:
        import errno

        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        click.echo(
            f"error: no space left on the device ({e.filename or 'while writing'}); free some space and rerun", err=True
        )
        sys.exit(2)
    except MemoryError:
        click.echo(
            "error: out of memory; lower --nsamples/--seqlen, or pass --max-memory to keep activations on disk",
            err=True,
        )
        sys.exit(EXIT_INTERNAL)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="slimgpt-deploy")
def main(verbose: int):
    """Prune LLaMA-family models with SlimGPT and ship them to vLLM and ONNX Runtime."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("lm_eval").setLevel(
        logging.ERROR if verbose == 0 else level
    )  # its warnings about in-memory models are expected
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    _on_sigterm_interrupt()


def _on_sigterm_interrupt() -> None:
    """SIGTERM (e.g. a pipeline's timeout) interrupts like Ctrl-C, exit code 143, so outputs stay atomic."""
    import signal
    import threading

    from .errors import Interrupted

    def handler(signum, frame):
        raise Interrupted("terminated; no output was written", exit_code=143)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


# The prune flags, shared by `prune` and `build`: (flag, click arguments, PruneConfig field whose default `prune` shows,
# or None where `prune` leaves the value unset, help).
_PRUNE_FLAGS = (
    ("--ratio", {"type": Ratio()}, "ratio", "Share of decoder-layer parameters to remove, in [0, 0.9]."),
    ("--method", {"type": click.Choice(list(METHODS))}, "method", "Pruning method."),
    ("--schedule", {"type": click.Choice(list(SCHEDULES))}, "schedule", "How the ratio spreads over depth."),
    (
        "--layer-ratios",
        {"callback": _float_list},
        None,
        "Explicit per-layer ratios, comma-separated (implies --schedule list).",
    ),
    (
        "--dense-last",
        {"type": click.IntRange(min=0)},
        "dense_last",
        "Leave the last N decoder layers dense; the schedule removes the same share from the others "
        "(SmolLM2 at 20%: 2 is better; at 30% mixed; at 50% worse).",
    ),
    (
        "--gqa-mode",
        {"type": click.Choice(list(GQA_MODES))},
        None,
        "GQA: prune whole KV groups, or the same number of query heads in every group [per-group].",
    ),
    (
        "--head-multiple",
        {"type": click.IntRange(min=1)},
        None,
        "Every layer keeps query and KV heads in multiples of N (KV heads may instead divide N, as vLLM "
        "replicates them) [1].",
    ),
    (
        "--ffn-multiple",
        {"type": click.IntRange(min=1)},
        None,
        "Every layer keeps FFN channels in multiples of M (e.g. 64 for GPU kernels) [1].",
    ),
    (
        "--tp-size",
        {"type": click.IntRange(min=1)},
        None,
        "Shorthand: shapes that vLLM --tensor-parallel-size T shards (heads and FFN multiples of T).",
    ),
    (
        "--head-share",
        {"type": click.FloatRange(0.0, 1.0)},
        None,
        "Heads are cut at this share of each layer's ratio (whole units); the FFN takes the rest "
        f"[{PruneConfig.head_share}; SlimGPT: 1.0].",
    ),
    ("--calib", {}, "calib", "Calibration data: 'self', a .txt/.jsonl file, or a dataset name."),
    ("--nsamples", {"type": int}, "nsamples", "Calibration samples (paper: 128)."),
    ("--seqlen", {"type": int}, "seqlen", "Tokens per calibration sample (paper: 2048)."),
    ("--seed", {"type": int}, "seed", "Calibration sampling seed."),
    (
        "--fisher-samples",
        {"type": click.IntRange(min=0)},
        "fisher_samples",
        "Weigh each layer's OBS choice by the loss's output-space Fisher, measured on the first N calibration "
        "samples (a backward pass of the dense model); 0: SlimGPT's layer objective.",
    ),
    (
        "--device",
        {},
        "device",
        "Compute device for the layer being pruned: auto (the GPU when CUDA is available), cpu or cuda[:N].",
    ),
    ("--dtype", {"type": click.Choice(list(DTYPES))}, "dtype", "Model dtype while pruning."),
    (
        "--hessian-dtype",
        {"type": click.Choice(list(HESSIAN_DTYPES))},
        "hessian_dtype",
        "Precision of H and its factorizations.",
    ),
)


def prune_options(build: bool):
    """The prune flags. `prune` shows PruneConfig's defaults; `build` passes None for a flag not given (the
    config file, then the same defaults, decide) and names the default in the help."""

    def decorate(fn):
        for flag, kwargs, field, text in reversed(_PRUNE_FLAGS):
            default = getattr(PruneConfig, field) if field else None
            if build or default is None:
                shown = f"{text} [{default}]" if build and default is not None else text
                fn = click.option(flag, default=None, help=shown, **kwargs)(fn)
            else:
                fn = click.option(flag, default=default, show_default=True, help=text, **kwargs)(fn)
        return fn

    return decorate


@main.command()
@click.argument("model")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory for the slim checkpoint.")
@prune_options(build=False)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted prune from its last finished layer (same options and model).",
)
@click.option(
    "--max-memory",
    default=None,
    metavar="SIZE",
    help="Cap on calibration activations (and the Fisher's inputs and curvatures) kept in memory, e.g. 8GiB; "
    "beyond it they stay on disk (same result).",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes to split the calibration samples over (one GPU each with --device cuda); or run under torchrun.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON on stdout.")
def prune(
    model,
    out,
    ratio,
    method,
    schedule,
    layer_ratios,
    dense_last,
    gqa_mode,
    head_multiple,
    ffn_multiple,
    tp_size,
    head_share,
    calib,
    nsamples,
    seqlen,
    seed,
    fisher_samples,
    device,
    dtype,
    hessian_dtype,
    force,
    resume,
    max_memory,
    nproc,
    as_json,
):
    """Prune MODEL (a directory, .gguf file, hub id or 'smollm2-135m') and save a slim checkpoint."""

    def go():
        from .config import PruneConfig

        options = dict(
            ratio=ratio,
            method=method,
            schedule=schedule,
            layer_ratios=layer_ratios,
            dense_last=dense_last,
            calib=calib,
            nsamples=nsamples,
            seqlen=seqlen,
            seed=seed,
            fisher_samples=fisher_samples,
            device=device,
            dtype=dtype,
            hessian_dtype=hessian_dtype,
        )
        if gqa_mode is not None:
            options["gqa_mode"] = gqa_mode
        if head_share is not None:
            options["head_share"] = head_share
        options.update(_alignment(head_multiple, ffn_multiple, tp_size))
        config = PruneConfig(**options)
        from .atomic import check_output_dir
        from .guards import parse_size

        cap = parse_size(max_memory) if max_memory is not None else None
        check_output_dir(out, force)
        console = _console()
        if nproc > 1:
            from .prune.distributed import check_nproc, launch

            check_nproc(nproc, config, resume=resume)
            with _layer_progress(console) as on_layer:
                r = launch(nproc, model, out, config, force=force, max_memory=cap, on_layer=on_layer)
        else:
            from contextlib import nullcontext

            from .api import prune_to_checkpoint  # not above: with --nproc only the ranks need it
            from .prune.distributed import is_main, process_group

            with process_group(config) as config:  # joins torchrun's group when WORLD_SIZE > 1
                main_rank = is_main()
                with _layer_progress(console) if main_rank else nullcontext() as on_layer:
                    result = prune_to_checkpoint(
                        model, out, config, force=force, on_layer=on_layer, resume=resume, max_memory=cap
                    )
            if not main_rank:
                return
            r = result.record
        console.print(
            f"[bold green]saved[/] {out}: removed {r['ratio_achieved_decoder']:.2%} of decoder parameters "
            f"(target {r['ratio_target']:.2%}), {r['ratio_achieved_model']:.2%} of the whole model; "
            f"{r['params_dense']:,} -> {r['params_slim']:,} parameters in {r['seconds']['total']:.1f} s"
        )
        if as_json:
            click.echo(json.dumps(r, indent=2))

    _run(go)


# The recover flags: (flag, click kwargs, RecoverConfig field, help); the defaults are RecoverConfig's.
_RECOVER_FLAGS = (
    ("--data", {}, "data", "Training text: 'self' (sampled from the teacher), a .txt/.jsonl file, or a dataset name."),
    ("--steps", {"type": int}, "steps", "Optimizer steps."),
    ("--batch-size", {"type": int}, "batch_size", "Sequences per step."),
    ("--seqlen", {"type": int}, "seqlen", "Tokens per training sequence."),
    ("--nsamples", {"type": int}, "nsamples", "Training sequences (cycled if steps x batch size is more)."),
    ("--heldout", {"type": int}, "heldout", "Held-out sequences for fidelity before/after."),
    ("--full", {"is_flag": True}, "full", "Train the full decoder weights instead of LoRA adapters."),
    ("--rank", {"type": int}, "rank", "LoRA rank."),
    ("--alpha", {"type": float}, "alpha", "LoRA alpha (scale alpha/rank)."),
    ("--lr", {"type": float}, "lr", "Peak learning rate [LoRA 1e-3, --full 5e-5]; warm-up then cosine decay."),
    ("--temperature", {"type": float}, "temperature", "Distillation temperature T (loss scaled by T^2)."),
    ("--lm-weight", {"type": float}, "lm_weight", "Weight of the next-token (LM) loss added to the KL."),
    ("--hidden-weight", {"type": float}, "hidden_weight", "Weight of the loss on every layer's output (0: off)."),
    (
        "--teacher-topk",
        {"type": int},
        "teacher_topk",
        "Train on the teacher's top-k log-probs, cached once, instead of running it at every step; with `self` "
        "data they come from the sampling pass itself. 0: the full logits, the teacher run at every step "
        f"[{TEACHER_TOPK}; 0 with --hidden-weight].",
    ),
    ("--save-every", {"type": int}, "save_every", "Steps between resume-state saves."),
    ("--seed", {"type": int}, "seed", "Seed of the data and its order."),
    (
        "--precision",
        {"type": click.Choice(PRECISIONS)},
        "precision",
        "Matmul precision of teacher and student: bf16 autocast (float32 weights, moments and loss) or fp32; "
        "auto takes bf16 on a GPU that supports it or a CPU with AMX or AVX512-BF16.",
    ),
    ("--device", {}, "device", "Where teacher and student train: auto, cpu or cuda[:N]."),
)


def recover_options(fn):
    """The recover flags, with RecoverConfig's defaults (a None default, as --lr's, means 'decided there')."""
    for flag, kwargs, field, text in reversed(_RECOVER_FLAGS):
        default = getattr(RecoverConfig, field)
        fn = click.option(flag, default=default, show_default=default is not None, help=text, **kwargs)(fn)
    return fn


@main.command()
@click.argument("slim_dir", type=click.Path(path_type=Path))
@click.option(
    "--teacher",
    required=True,
    help="The dense model SLIM_DIR was pruned from (directory, .gguf, hub id or 'smollm2-135m').",
)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Output directory for the recovered slim checkpoint."
)
@recover_options
@click.option(
    "--eval-text",
    type=click.Path(path_type=Path),
    default=None,
    help="Text for perplexity before/after (e.g. wikitext-2 test.txt).",
)
@click.option("--eval-seqlen", type=int, default=2048, show_default=True)
@click.option("--eval-max-tokens", type=int, default=None, help="Use only the first N tokens of --eval-text.")
@click.option(
    "--resume", is_flag=True, help="Continue an interrupted recovery from its last saved step (same options)."
)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the recovery record as JSON on stdout.")
def recover(slim_dir, teacher, out, eval_text, eval_seqlen, eval_max_tokens, resume, force, as_json, **options):
    """Recover SLIM_DIR's quality by distillation from the dense --teacher; save a slim checkpoint to --out."""

    def go():
        from .atomic import check_output_dir
        from .recover import recover_to_checkpoint

        config = RecoverConfig(**options)
        check_output_dir(out, force)
        console = _console()
        with _step_progress(console) as on_step:
            result = recover_to_checkpoint(
                slim_dir,
                teacher,
                out,
                config,
                force=force,
                resume=resume,
                on_step=on_step,
                eval_text=eval_text,
                eval_seqlen=eval_seqlen,
                eval_max_tokens=eval_max_tokens,
            )
        rec = result.record["recovery"]
        fid = rec["fidelity"]
        line = (
            f"[bold green]saved[/] {out}: {rec['steps']} steps, {rec['tokens']:,} tokens "
            f"in {rec['seconds']['total']:.1f} s"
        )
        if fid["before"] and fid["after"]:
            line += (
                f"; held-out KL {fid['before']['kl']:.4f} -> {fid['after']['kl']:.4f}, "
                f"top-1 {fid['before']['top1']:.2%} -> {fid['after']['top1']:.2%}"
            )
        if rec["perplexity"]:
            line += f"; perplexity {rec['perplexity']['before']:.2f} -> {rec['perplexity']['after']:.2f}"
        console.print(line)
        if as_json:
            click.echo(json.dumps(rec, indent=2))

    _run(go)


class _Progress:
    """A rich progress bar with elapsed time, ETA and the last step's figures (`info`); entered, it gives
    `update`, which each subclass defines for its own callback."""

    label = ""

    def __init__(self, console):
        self.console = console

    def __enter__(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn(f"[bold]{self.label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
        )
        self.progress.start()
        self.task = None
        return self.update

    def __exit__(self, *exc):
        self.progress.stop()
        return False


class _step_progress(_Progress):
    """Over recovery steps, with the last loss."""

    label = "recovering"

    def update(self, step: int, steps: int, parts: dict) -> None:
        if self.task is None:
            self.task = self.progress.add_task("recover", total=steps, completed=step - 1, info="")
        info = f"loss {parts['loss']:.4f} (KL {parts['kl']:.4f}) lr {parts['lr']:.2e}"
        self.progress.update(self.task, completed=step, info=info)


def _alignment(head_multiple: int | None, ffn_multiple: int | None, tp_size: int | None) -> dict:
    """Head/FFN multiples from the flags; --tp-size T folds T into both (least common multiple)."""
    import math

    heads, ffn, tp = head_multiple or 1, ffn_multiple or 1, tp_size or 1
    return {"head_multiple": math.lcm(heads, tp), "ffn_multiple": math.lcm(ffn, tp)}


class _layer_progress(_Progress):
    """Over decoder layers, with the last layer's shape and reconstruction errors."""

    label = "pruning"

    def update(self, i: int, n: int, rec: dict) -> None:
        if self.task is None:
            self.task = self.progress.add_task("prune", total=n, info="")
        info = (
            f"layer {i}: heads {rec['q_heads']}/{rec['kv_heads']} ffn {rec['ffn']} "
            f"err attn {rec['attn_rel_error']:.3f} mlp {rec['mlp_rel_error']:.3f}"
        )
        self.progress.update(self.task, completed=i + 1, info=info)


# build flag -> dotted option (see build/options.py); every flag defaults to None = "not given",
# so a --config file's value stands unless the flag is on the command line.
_BUILD_FLAGS = {
    "ratio": "prune.ratio",
    "method": "prune.method",
    "schedule": "prune.schedule",
    "layer_ratios": "prune.layer_ratios",
    "dense_last": "prune.dense_last",
    "fisher_samples": "prune.fisher_samples",
    "gqa_mode": "prune.gqa_mode",
    "head_multiple": "prune.head_multiple",
    "ffn_multiple": "prune.ffn_multiple",
    "tp_size": "prune.tp_size",
    "head_share": "prune.head_share",
    "calib": "prune.calib",
    "nsamples": "prune.nsamples",
    "seqlen": "prune.seqlen",
    "seed": "prune.seed",
    "device": "prune.device",
    "dtype": "prune.dtype",
    "hessian_dtype": "prune.hessian_dtype",
    "vllm_dtype": "vllm.dtype",
    "onnx_dtype": "onnx.dtype",
    "onnx_quantize": "onnx.quantize",
    "onnx_fuse": "onnx.fuse",
    "gguf_type": "gguf.type",
    "genai_weights": "genai.weights",
    "backends": "bench.backends",
    "bench_repeats": "bench.repeats",
    "bench_decode_tokens": "bench.decode_tokens",
    "bench_prompt_lens": "bench.prompt_lens",
    "bench_batch_sizes": "bench.batch_sizes",
    "bench_threads": "bench.threads",
    "bench_text": "bench.text",
    "quality_tokens": "bench.quality_tokens",
    "preset": "preset",
    "recover": "recover.enabled",
    "recover_steps": "recover.steps",
    "recover_full": "recover.full",
    "recover_data": "recover.data",
    "eval_text": "eval.text",
    "tasks": "eval.tasks",
    "include_path": "eval.include_path",
    "num_fewshot": "eval.num_fewshot",
    "eval_limit": "eval.limit",
    "gate": "gate",
}


@main.command()
@click.argument("model", required=False)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("slimgpt-build"),
    show_default=True,
    help="Build directory (reruns skip finished stages).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    help="YAML file with any build option; flags override it.",
)
@click.option(
    "--stages",
    help=f"Comma-separated subset of: {','.join(STAGES)}.",
)
@click.option(
    "--force", is_flag=True, help="Redo the selected stages even if finished; build in a directory that is not a build."
)
@click.option("--resume", is_flag=True, help="Continue an interrupted prune from its last finished layer.")
@click.option(
    "--max-memory",
    default=None,
    metavar="SIZE",
    help="Cap on calibration activations (and the Fisher's) kept in memory while pruning, e.g. 8GiB.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@prune_options(build=True)
@click.option(
    "--vllm-dtype", type=click.Choice(list(EXPORT_DTYPES["vllm"])), help="vLLM export dtype [the checkpoint's]."
)
@click.option("--onnx-dtype", type=click.Choice(list(EXPORT_DTYPES["onnx"])), help="ONNX export dtype [fp32].")
@click.option("--onnx-quantize", type=click.Choice(list(QUANTIZE["onnx"])), help="ONNX 8-bit weights.")
@click.option("--onnx-fuse/--onnx-no-fuse", default=None, help="Fused attention/norms in the ONNX export [on].")
@click.option("--gguf-type", type=click.Choice(list(QUANTIZE["gguf"])), help="GGUF file type for llama.cpp [q8_0].")
@click.option("--genai-weights", type=click.Choice(list(GENAI_WEIGHTS)), help="ONNX Runtime GenAI weights [int8].")
@click.option(
    "--backends",
    help=f"Bench back ends, comma-separated: {','.join(BENCH_BACKENDS)} [all installed; named ones must be].",
)
@click.option("--bench-repeats", type=int, help=f"Timed runs per measurement [{BenchSection.repeats}].")
@click.option("--bench-decode-tokens", type=int, help=f"Tokens per decode measurement [{BenchSection.decode_tokens}].")
@click.option("--bench-prompt-lens", callback=_int_list, help=f"Prefill lengths [{_csv(BenchSection.prompt_lens)}].")
@click.option("--bench-batch-sizes", callback=_int_list, help=f"Decode batch sizes [{_csv(BenchSection.batch_sizes)}].")
@click.option("--bench-threads", type=int, help="Threads for torch/ONNX Runtime [all cores].")
@click.option("--bench-text", help="Text file for perplexity [a built-in sample].")
@click.option("--quality-tokens", type=int, help=f"Tokens of text for perplexity/KL [{BenchSection.quality_tokens}].")
@click.option(
    "--preset", type=click.Choice(list(PRESETS)), default=None, help="Option preset: release switches recovery on."
)
@click.option(
    "--recover",
    "recover",
    is_flag=True,
    default=None,
    help="Add the recover stage (distillation from the dense model); exports then ship DIR/recovered.",
)
@click.option("--recover-steps", type=int, help=f"Recovery optimizer steps [{RecoverConfig.steps}].")
@click.option(
    "--recover-full", is_flag=True, default=None, help="Recovery trains the full decoder weights instead of LoRA."
)
@click.option(
    "--recover-data", help=f"Recovery text: 'self', a .txt/.jsonl file or a dataset name [{RecoverConfig.data}]."
)
@click.option("--eval-text", help="eval stage: text file for dense and pruned perplexity (and fidelity).")
@click.option("--tasks", help="eval stage: lm-eval multiple-choice tasks for dense and pruned, comma-separated.")
@click.option("--include-path", help="eval stage: directory of extra lm-eval task YAMLs.")
@click.option("--num-fewshot", type=int, help="eval stage: few-shot examples per task document [0].")
@click.option("--eval-limit", type=int, help="eval stage: first N documents of each task [all].")
@click.option(
    "--gate",
    multiple=True,
    help=(
        "Quality condition, repeatable or comma-separated: ppl_ratio<=1.30, kl<=0.25, top1>=0.6, "
        "accuracy_retained>=0.95 (exit 3 when missed)."
    ),
)
def build(model, out, config_file, stages, force, resume, max_memory, as_json, **flags):
    """Build MODEL (default: the embedded SmolLM2-135M) into a verified slim checkpoint, vLLM, ONNX, GGUF and GenAI
    exports and a report.

    Exit codes: 0 every stage passed; 2 bad input; 3 a verification failed or a --gate
    condition was missed (the report says which); 4 NaN/Inf in the model; 1 internal error.
    """

    def go():
        from .build import build_options, read_config_file, run_build
        from .guards import parse_size

        file_values = read_config_file(config_file) if config_file else {}
        flag_values = {_BUILD_FLAGS[k]: v for k, v in flags.items()}
        flag_values["model"] = model
        flag_values["stages"] = stages.split(",") if stages else None
        if flag_values["bench.backends"] is not None:
            flag_values["bench.backends"] = flag_values["bench.backends"].split(",")
        if flag_values["eval.tasks"] is not None:
            flag_values["eval.tasks"] = flag_values["eval.tasks"].split(",")
        flag_values["gate"] = list(flag_values["gate"]) or None  # () when not given
        options = build_options(file_values, flag_values)
        console = _console()
        progress = _BuildProgress(console)
        try:
            result = run_build(
                out,
                options,
                force=force,
                resume=resume,
                max_memory=parse_size(max_memory) if max_memory is not None else None,
                log_fn=lambda msg: console.print(f"  {msg}", highlight=False, markup=False),
                on_stage=progress.stage,
                on_layer=progress.layer,
            )
        finally:
            progress.close()
        summary = result.to_dict()
        if as_json:
            click.echo(json.dumps(summary, indent=2))
        if summary["report"]:
            console.print(f"report: {summary['report']}")
        if result.exit_code:
            failures = [f"{name}: {result.state['stages'][name].get('reason')}" for name in result.verification_failed]
            problem = "; ".join(
                ([f"verification failed: {'; '.join(failures)}"] if failures else [])
                + ([f"quality gate missed: {', '.join(result.gate_failed)}"] if result.gate_failed else [])
            )
            click.echo(f"error: {problem}; artifacts kept, see {summary['report'] or out}", err=True)
            sys.exit(result.exit_code)
        if result.gate:
            console.print(
                "quality gate passed: "
                + ", ".join(f"{r['condition']} ({r['value']:.4g})" for r in result.gate["conditions"])
            )
        console.print(f"[bold green]build passed[/] {out}")

    _run(go)


class _BuildProgress:
    """One line per stage on stderr, and the layer bar while pruning."""

    MARKS = {
        "ok": "[green]done[/]",
        "cached": "[dim]unchanged, skipped[/]",
        "failed": "[bold red]FAILED[/]",
        "skipped": "[yellow]skipped[/]",
    }

    def __init__(self, console):
        self.console = console
        self.layers = None

    def stage(self, name: str, status: str, seconds: float) -> None:
        if status == "running":
            self.console.print(f"[bold]{name}[/] ...")
            return
        self.close()
        tail = f" in {seconds:.1f} s" if status in ("ok", "failed") else ""
        self.console.print(f"[bold]{name}[/] {self.MARKS.get(status, status)}{tail}")

    def layer(self, i: int, n: int, rec: dict) -> None:
        if self.layers is None:
            self.layers = _layer_progress(self.console)
            self.update = self.layers.__enter__()
        self.update(i, n, rec)

    def close(self) -> None:
        if self.layers is not None:
            self.layers.__exit__(None, None, None)
            self.layers = None


@main.command("eval")
@click.argument("model")
@click.option(
    "--text", "text_path", type=click.Path(path_type=Path), help="Text file for perplexity (e.g. wikitext-2 test.txt)."
)
@click.option(
    "--seqlen",
    type=int,
    default=2048,
    show_default=True,
    help="Perplexity window (papers: 2048; LLM-Pruner/SlimGPT also 128).",
)
@click.option("--max-tokens", type=int, default=None, help="Evaluate only the first N tokens of --text.")
@click.option(
    "--reference", help="Reference model for fidelity (KL divergence, top-1 agreement), e.g. the dense model."
)
@click.option(
    "--fidelity-text",
    type=click.Path(path_type=Path),
    help="Text for fidelity; default: text sampled from the reference (seeded).",
)
@click.option("--fidelity-seqlen", type=int, default=256, show_default=True)
@click.option(
    "--fidelity-samples", type=int, default=8, show_default=True, help="Samples of self-generated fidelity text."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--tasks",
    help=(
        "lm-eval multiple-choice tasks, comma-separated "
        "(e.g. boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa)."
    ),
)
@click.option(
    "--include-path",
    type=click.Path(path_type=Path),
    help="Directory of extra lm-eval task YAMLs (e.g. a local JSONL task).",
)
@click.option("--num-fewshot", type=int, default=0, show_default=True, help="Few-shot examples per task document.")
@click.option("--limit", type=int, default=None, help="Evaluate only the first N documents of each task.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Batch size for the task log-likelihoods.")
@click.option(
    "--device", default="auto", show_default=True, help="Where the models run: auto (the GPU if any), cpu or cuda[:N]."
)
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON on stdout.")
def eval_(
    model,
    text_path,
    seqlen,
    max_tokens,
    reference,
    fidelity_text,
    fidelity_seqlen,
    fidelity_samples,
    seed,
    tasks,
    include_path,
    num_fewshot,
    limit,
    batch_size,
    device,
    as_json,
):
    """Evaluate MODEL: perplexity on a text file, fidelity to a reference model, accuracy on lm-eval tasks."""

    def go():
        from .api import evaluate_model
        from .config import resolve_device
        from .errors import BadInputError
        from .tasks import TaskOptions, parse_tasks

        task_options = None
        if tasks is not None:
            task_options = TaskOptions(
                tasks=parse_tasks(tasks),
                include_path=include_path,
                num_fewshot=num_fewshot,
                limit=limit,
                batch_size=batch_size,
            )
        elif include_path is not None or limit is not None:
            raise BadInputError("--include-path and --limit apply to --tasks; name the tasks with --tasks")
        if text_path is None and reference is None and task_options is None:
            raise BadInputError(
                "nothing to evaluate; give --text FILE for perplexity, --reference MODEL for fidelity "
                "and/or --tasks for accuracy"
            )
        results = evaluate_model(
            model,
            text=text_path,
            seqlen=seqlen,
            max_tokens=max_tokens,
            reference=reference,
            fidelity_text=fidelity_text,
            fidelity_seqlen=fidelity_seqlen,
            fidelity_samples=fidelity_samples,
            seed=seed,
            tasks=task_options,
            device=resolve_device(device),
        )
        console = _console()
        for key, value in results.items():
            if key == "accuracy":
                _print_accuracy(console, value)
            else:
                console.print(f"{key}: {value}")
        if as_json:
            click.echo(json.dumps(results, indent=2))

    _run(go)


def _print_accuracy(console, acc: dict) -> None:
    from rich.table import Table

    limit = "" if acc["limit"] is None else f", first {acc['limit']} documents per task"
    table = Table(title=f"{acc['harness']} {acc['harness_version']}, {acc['num_fewshot']}-shot{limit}")
    for col in ("task", "documents", "acc", "acc_norm"):
        table.add_column(col)
    pm = lambda v, e: f"{v:.4f}" + ("" if e is None else f" ± {e:.4f}")  # noqa: E731
    for name, t in acc["tasks"].items():
        table.add_row(name, str(t["samples"]), pm(t["acc"], t["acc_stderr"]), pm(t["acc_norm"], t["acc_norm_stderr"]))
    table.add_row("mean", "", f"{acc['mean']['acc']:.4f}", f"{acc['mean']['acc_norm']:.4f}")
    console.print(table)


@main.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    required=True,
    type=click.Choice(list(EXPORTERS)),
    help="Target runtime: vLLM, ONNX Runtime, llama.cpp (gguf), ONNX Runtime GenAI (genai).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option(
    "--dtype",
    default=None,
    help="Weight dtype: vllm float32|bfloat16|float16 (default: the checkpoint's); onnx, genai fp32|fp16 [fp32].",
)
@click.option(
    "--quantize",
    default=None,
    type=click.Choice(sorted({q for types in QUANTIZE.values() for q in types})),
    help="onnx, genai: int8 (8-bit MatMul weights); gguf: the file type, f32 (default), f16, q8_0 or q4_k_m.",
)
@click.option(
    "--no-fuse",
    is_flag=True,
    help="onnx: standard opset-18 ops only (no fused Attention, RotaryEmbedding, ONNX Runtime norms).",
)
@click.option("--no-verify", is_flag=True, help="Skip the comparison with PyTorch (not recommended).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the export summary as JSON on stdout.")
def export_(checkpoint, fmt, out, dtype, quantize, no_fuse, no_verify, force, as_json):
    """Export a slim (or dense) CHECKPOINT for vLLM, ONNX Runtime, llama.cpp (GGUF) or ONNX Runtime GenAI, verified."""

    def go():
        from slimgpt_deploy.exporters import get_exporter

        from .atomic import check_output_dir
        from .errors import BadInputError

        check_output_dir(out, force)
        if no_fuse and fmt != "onnx":
            raise BadInputError(f"--no-fuse is an ONNX export option; drop it for --format {fmt}")
        console = _console()
        summary = get_exporter(fmt)(
            checkpoint,
            out,
            dtype=dtype,
            quantize=quantize,
            force=force,
            verify=not no_verify,
            log=lambda msg: console.print(msg, highlight=False),
            **({"fuse": False} if no_fuse else {}),
        )
        verdict = summary.get("verification", {}).get("passed")
        tail = "verified" if verdict else "not verified (--no-verify)"
        console.print(f"[bold green]exported[/] {out} ({fmt}, {tail})")
        if as_json:
            click.echo(json.dumps(summary, indent=2))

    _run(go)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--backend", default="torch", show_default=True, type=click.Choice(list(GENERATE_BACKENDS)))
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt text (repeat for a batch).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the completions as JSON on stdout.")
def generate(model, backend, prompts, max_new_tokens, temperature, top_p, seed, as_json):
    """Complete --prompt with MODEL (a checkpoint dir, a vLLM, ONNX or GGUF export) on one back end."""

    def go():
        from slimgpt_deploy.serving import get_backend

        from .errors import BadInputError

        if max_new_tokens < 1:
            raise BadInputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise BadInputError("--temperature must be >= 0 and --top-p in (0, 1]")
        stream = None if as_json or len(prompts) > 1 else (lambda i, delta: click.echo(delta, nl=False))
        texts = get_backend(backend)(
            model,
            list(prompts),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            on_text=stream,
        )
        if as_json:
            click.echo(json.dumps([{"prompt": p, "completion": t} for p, t in zip(prompts, texts)], indent=2))
        elif stream is not None:
            click.echo()
        else:
            for p, t in zip(prompts, texts):
                click.echo(f"{p}{t}\n")

    _run(go)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0 for all).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="VLLM_API_KEY", default=None, help="Require this bearer token (or set VLLM_API_KEY).")
@click.option("--served-model-name", default=None, help="Model name in the API (default: the directory path).")
@click.option(
    "--max-model-len", type=click.IntRange(min=16), default=None, help="Context length (default: the model's)."
)
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", *EXPORT_DTYPES["vllm"]]))
@click.option(
    "--tensor-parallel-size",
    "-tp",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="GPUs to shard over; the per-layer shapes must divide (prune --tp-size).",
)
@click.option(
    "--kv-cache-gb",
    type=click.FloatRange(min=0.01),
    default=None,
    help="KV-cache budget in GiB (default on CPU: 1; on GPU: vLLM's memory share).",
)
@click.option(
    "--enforce-eager",
    is_flag=True,
    help="Skip vLLM's torch.compile (and CUDA graphs on GPUs): a faster first start, slower decoding "
    "(a compiled restart of the same shapes reuses the compile cache).",
)
@click.option("--dry-run", is_flag=True, help="Check the model and print the vLLM command instead of running it.")
def serve(
    model,
    host,
    port,
    api_key,
    served_model_name,
    max_model_len,
    dtype,
    tensor_parallel_size,
    kv_cache_gb,
    enforce_eager,
    dry_run,
):
    """Serve MODEL (a slim checkpoint or a vLLM export) with vLLM's OpenAI-compatible server."""

    def go():
        import os
        import shlex

        from slimgpt_deploy.child_process import CHILD_ENV
        from slimgpt_deploy.serving.vllm_backend import EngineOptions, check_servable, serve_command

        check_servable(model, tensor_parallel_size)
        options = EngineOptions(
            dtype=dtype,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            kv_cache_bytes=int(kv_cache_gb * (1 << 30)) if kv_cache_gb else None,
            enforce_eager=enforce_eager,  # vLLM's default: compiled, with CUDA graphs on GPUs
        )
        cmd = serve_command(model, host=host, port=port, options=options, served_model_name=served_model_name)
        if dry_run:
            click.echo(shlex.join(cmd))
            return
        env = options.env({**os.environ, "TOKENIZERS_PARALLELISM": CHILD_ENV["TOKENIZERS_PARALLELISM"]})
        if api_key:
            env["VLLM_API_KEY"] = api_key
        shown = "0.0.0.0" if host in ("", "0.0.0.0") else host
        _console().print(
            f"[bold]serving[/] {model} with vLLM at [bold]http://{shown}:{port}/v1[/] "
            f"(model name {served_model_name or str(model)!r}{', API key required' if api_key else ''}); "
            "Ctrl-C stops it"
        )
        sys.stderr.flush()
        os.execve(cmd[0], cmd, env)

    _run(go)


def _measured_types(f):
    """--gguf-type and --genai-weights: the type the export-backed back ends measure (BenchOptions' fields)."""
    for flag, choices, default, what in (
        ("--genai-weights", GENAI_WEIGHTS, BenchOptions.genai_weights, "Weights ONNX Runtime GenAI"),
        ("--gguf-type", GGUF_TYPES, BenchOptions.gguf_type, "GGUF file type llama.cpp"),
    ):  # applied bottom up: --gguf-type is listed first
        help_text = f"{what} measures, dense and pruned alike."
        f = click.option(flag, type=click.Choice(choices), default=default, show_default=True, help=help_text)(f)
    return f


@main.command()
@click.argument("dense")
@click.argument("pruned")
@click.option(
    "--backends",
    default=None,
    help=f"Comma-separated: {','.join(BENCH_BACKENDS)} (default: all, skipping those not installed).",
)
@click.option(
    "--text",
    "text_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Text for perplexity/KL (default: a built-in sample).",
)
@click.option(
    "--repeats",
    type=int,
    default=BenchOptions.repeats,
    show_default=True,
    help="Timed runs per measurement (medians reported).",
)
@click.option("--warmups", type=int, default=BenchOptions.warmups, show_default=True)
@click.option(
    "--decode-tokens",
    type=int,
    default=BenchOptions.decode_tokens,
    show_default=True,
    help="Decode steps timed per measurement.",
)
@click.option(
    "--prompt-lens",
    callback=_int_list,
    default=_csv(BenchOptions.prompt_lens),
    show_default=True,
    help="Prefill (TTFT) prompt lengths, batch 1.",
)
@click.option(
    "--batch-sizes",
    callback=_int_list,
    default=_csv(BenchOptions.batch_sizes),
    show_default=True,
    help="Decode batch sizes.",
)
@click.option("--threads", type=int, default=None, help="torch / ONNX Runtime threads (default: all cores).")
@click.option(
    "--quality-tokens",
    type=int,
    default=BenchOptions.quality_tokens,
    show_default=True,
    help="Tokens of --text for perplexity/KL.",
)
@click.option(
    "--quality-seqlen", type=int, default=BenchOptions.quality_seqlen, show_default=True, help="Perplexity/KL window."
)
@_measured_types
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Cache for converted models and ONNX exports (default: a temporary directory).",
)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write the result JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print the result JSON on stdout.")
def bench(
    dense,
    pruned,
    backends,
    text_path,
    repeats,
    warmups,
    decode_tokens,
    prompt_lens,
    batch_sizes,
    threads,
    quality_tokens,
    quality_seqlen,
    gguf_type,
    genai_weights,
    work_dir,
    out,
    as_json,
):
    """Benchmark DENSE against PRUNED: latency, memory and quality on torch, ONNX Runtime and vLLM."""

    def go():
        import tempfile

        from .bench import BACKENDS, BenchOptions, run_bench
        from .bench.tables import markdown

        options = BenchOptions(
            prompt_lens=prompt_lens,
            batch_sizes=batch_sizes,
            decode_tokens=decode_tokens,
            repeats=repeats,
            warmups=warmups,
            threads=threads,
            text=text_path,
            quality_tokens=quality_tokens,
            quality_seqlen=quality_seqlen,
            gguf_type=gguf_type,
            genai_weights=genai_weights,
        )
        names = [b.strip() for b in backends.split(",") if b.strip()] if backends is not None else list(BACKENDS)
        console = _console()
        with tempfile.TemporaryDirectory(prefix="slimgpt-bench-") as tmp:
            result = run_bench(
                dense,
                pruned,
                names,
                options=options,
                explicit=backends is not None,
                work_dir=work_dir or Path(tmp),
                log=lambda msg: console.print(msg, highlight=False),
            )
        console.print(markdown(result), highlight=False, markup=False, soft_wrap=True)
        text = json.dumps(result, indent=2)
        if out is not None:
            from .atomic import atomic_write

            out.absolute().parent.mkdir(parents=True, exist_ok=True)
            atomic_write(out, lambda tmp: tmp.write_text(text + "\n"))
        if as_json:
            click.echo(text)

    _run(go)


if __name__ == "__main__":
    main()
