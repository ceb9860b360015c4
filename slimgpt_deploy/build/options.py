"""What a build does: one validated options object from defaults < a YAML file < CLI flags.

The file mirrors the stages (every key optional):

    model: smollm2-135m
    stages: [prune, export-vllm, export-onnx, verify-vllm, verify-onnx, bench, report]
    preset: release    # optional: release switches recovery on
    prune:  {ratio: 0.2, schedule: log, calib: self, nsamples: 64, seqlen: 512, seed: 0, ...}
    recover: {enabled: false, steps: 100, full: false, rank: 8, data: self, ...}   (recover.py)
    vllm:   {dtype: float32}
    onnx:   {dtype: fp32, quantize: null}
    bench:  {backends: [torch, onnx, vllm], repeats: 3, decode_tokens: 32, ...}
    eval:   {text: wiki.txt, tasks: [boolq, piqa], include_path: null, num_fewshot: 0, limit: null, ...}
    gate:   ["ppl_ratio<=1.30", "kl<=0.25", "accuracy_retained>=0.95"]

The eval stage runs only when asked for: an eval option, a gate, or `eval` named in stages.

Internally every option has a dotted name ("prune.ratio"); the schema below is the one
list of them, with the type each accepts. A key that does not exist is refused with the
closest valid name; a value of the wrong type is refused naming the key and the type.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..bench import BACKENDS, BenchOptions
from ..bench.options import GENAI_WEIGHTS, GGUF_TYPES
from ..config import PruneConfig
from ..errors import BadInputError, first_line
from ..exporters import DTYPES
from ..recover import RecoverConfig
from .gate import Condition, check_measurable, parse_gate
from .stages import STAGE, STAGES, TABLE

# In the default stages only when switched on: recover by recover.enabled, eval by an eval option or a gate.
OPTIONAL_STAGES = tuple(s.name for s in TABLE if s.optional)
DEFAULT_STAGES = tuple(s for s in STAGES if s not in OPTIONAL_STAGES)
BENCH_BACKENDS = tuple(BACKENDS)  # bench's registry, in its order
# A preset sets option values below the config file and the flags.
PRESETS: dict[str, dict[str, Any]] = {"release": {"recover.enabled": True}}
DEFAULT_MODEL = "smollm2-135m"

_ANNOTATED = {"str": str, "int": int, "float": float, "bool": bool}


def _fields_schema(cls, section: str, nullable: tuple[str, ...] = ()) -> dict[str, tuple[type, type | None, bool]]:
    """`section.<field>` for every field of the dataclass `cls`, typed from its annotation: "float", "float | None"
    (None allowed), "tuple[float, ...] | None" (a list of numbers). The dataclass validates the values."""
    schema = {}
    for f in fields(cls):
        base, _, rest = f.type.partition(" | ")
        if base.startswith("tuple["):
            kind, item = list, _ANNOTATED[base.removeprefix("tuple[").split(",")[0]]
        else:
            kind, item = _ANNOTATED[base], None
        schema[f"{section}.{f.name}"] = (kind, item, rest == "None" or f.name in nullable)
    return schema


# dotted key -> (expected type, element type for lists, None allowed); prune.* and recover.* are their
# config dataclasses' fields (null gqa_mode: the default), plus prune.tp_size (sets both multiples) and
# recover.enabled.
SCHEMA: dict[str, tuple[type, type | None, bool]] = {
    "model": (str, None, False),
    "preset": (str, None, True),
    "recover.enabled": (bool, None, False),
    **_fields_schema(RecoverConfig, "recover"),
    "stages": (list, str, False),
    **_fields_schema(PruneConfig, "prune", nullable=("gqa_mode",)),
    "prune.tp_size": (int, None, True),
    "vllm.dtype": (str, None, True),
    "onnx.dtype": (str, None, False),
    "onnx.quantize": (str, None, True),
    "onnx.fuse": (bool, None, False),
    "gguf.type": (str, None, False),
    "genai.weights": (str, None, False),
    "bench.backends": (list, str, False),
    "bench.repeats": (int, None, False),
    "bench.warmups": (int, None, False),
    "bench.decode_tokens": (int, None, False),
    "bench.prompt_lens": (list, int, False),
    "bench.batch_sizes": (list, int, False),
    "bench.threads": (int, None, True),
    "bench.text": (str, None, True),
    "bench.quality_tokens": (int, None, False),
    "bench.quality_seqlen": (int, None, False),
    "eval.text": (str, None, True),
    "eval.tasks": (list, str, False),
    "eval.include_path": (str, None, True),
    "eval.num_fewshot": (int, None, False),
    "eval.limit": (int, None, True),
    "eval.batch_size": (int, None, False),
    "eval.seqlen": (int, None, False),
    "eval.max_tokens": (int, None, True),
    "eval.fidelity_tokens": (int, None, False),
    "gate": (list, str, False),
}
_TYPE_NAMES = {bool: "true or false", str: "a string", int: "an integer", float: "a number", list: "a list"}
_PLURAL = {str: "strings", int: "integers", float: "numbers"}


@dataclass(frozen=True)
class BenchSection(BenchOptions):
    """bench's own options (one type: `BenchOptions`, validated there) and which back ends to run.

    The build's default is 3 repeats (bench's 5): its bench is a pipeline check beside the exports."""

    repeats: int = 3
    backends: tuple[str, ...] = BENCH_BACKENDS
    explicit: bool = False  # back ends named by the user: a missing one fails instead of being skipped

    def to_dict(self) -> dict:
        return {**super().to_dict(), "backends": list(self.backends)}


@dataclass(frozen=True)
class RecoverSection:
    enabled: bool = False
    config: RecoverConfig = field(default_factory=RecoverConfig)


@dataclass(frozen=True)
class EvalSection:
    text: str | None = None  # perplexity (dense and pruned) and fidelity text; None: fidelity on bench's sample
    tasks: tuple[str, ...] = ()  # lm-eval multiple-choice tasks, run on dense and pruned
    include_path: str | None = None
    num_fewshot: int = 0
    limit: int | None = None
    batch_size: int = 8
    seqlen: int = 512  # perplexity and fidelity window
    max_tokens: int | None = None  # perplexity on the first N tokens of text (None: all of it)
    fidelity_tokens: int = 4096


@dataclass(frozen=True)
class BuildOptions:
    model: str = DEFAULT_MODEL
    stages: tuple[str, ...] = DEFAULT_STAGES
    prune: PruneConfig = field(default_factory=PruneConfig)
    recover: RecoverSection = field(default_factory=RecoverSection)
    vllm_dtype: str | None = None
    onnx_dtype: str = "fp32"
    onnx_quantize: str | None = None
    onnx_fuse: bool = True
    gguf_type: str = "q8_0"
    genai_weights: str = "int8"
    bench: BenchSection = field(default_factory=BenchSection)
    eval: EvalSection = field(default_factory=EvalSection)
    gate: tuple[Condition, ...] = ()

    def stage_options(self, stage: str) -> dict:
        """The options a stage's result depends on (its fingerprint's own part)."""
        return STAGE[stage].options(self)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "stages": list(self.stages),
            "prune": self.prune.to_dict(),
            "recover": {"enabled": self.recover.enabled, **self.recover.config.to_dict()},
            "vllm": {"dtype": self.vllm_dtype},
            "onnx": {"dtype": self.onnx_dtype, "quantize": self.onnx_quantize, "fuse": self.onnx_fuse},
            "gguf": {"type": self.gguf_type},
            "genai": {"weights": self.genai_weights},
            "bench": self.bench.to_dict(),
            "eval": {f.name: _plain(getattr(self.eval, f.name)) for f in fields(EvalSection)},
            "gate": [str(c) for c in self.gate],
        }


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML build file as dotted keys; refuses unknown keys (naming the closest) and wrong types."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"config file {path} does not exist; pass the path of a YAML build file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise BadInputError(f"config file {path} is not valid YAML ({first_line(e)}); fix the syntax") from e
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise BadInputError(
            f"config file {path} must hold a mapping of options (model:, prune:, ...), not {type(data).__name__}"
        )
    flat: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        if isinstance(value, Mapping) and key in {k.split(".")[0] for k in SCHEMA if "." in k}:
            for sub, v in value.items():
                flat[f"{key}.{sub}"] = v
        else:
            flat[key] = value
    for key, value in flat.items():
        check_value(key, value, where=f"in {path}")
    return flat


def check_value(key: str, value: Any, where: str = "") -> None:
    """Refuse an unknown dotted key (suggesting the closest) or a value of the wrong type."""
    where = f" {where}" if where else ""
    if key not in SCHEMA:
        close = difflib.get_close_matches(key, SCHEMA, n=1, cutoff=0.6)
        if not close:  # e.g. a prune option given at the top level: match its last part
            leaves: dict[str, str] = {}
            for k in SCHEMA:
                leaves.setdefault(k.split(".")[-1], k)
            close = [leaves[m] for m in difflib.get_close_matches(key.split(".")[-1], leaves, n=1, cutoff=0.6)]
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise BadInputError(f"unknown build option {key!r}{where}{hint} (valid: {', '.join(sorted(SCHEMA))})")
    kind, element, nullable = SCHEMA[key]
    if value is None:
        if nullable:
            return
        raise BadInputError(f"build option {key!r}{where} must be {_TYPE_NAMES[kind]}, not empty")
    if not _is(value, kind):
        raise BadInputError(
            f"build option {key!r}{where} must be {_TYPE_NAMES[kind]}, got {value!r} ({type(value).__name__})"
        )
    if element is not None and not all(_is(v, element) for v in value):
        bad = next(v for v in value if not _is(v, element))
        raise BadInputError(
            f"build option {key!r}{where} must be a list of {_PLURAL[element]}, got {bad!r} ({type(bad).__name__})"
        )


def _is(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    if kind is list:
        return isinstance(value, (list, tuple))  # YAML gives lists, click gives tuples
    return isinstance(value, kind)


def parse_stages(text: str | list[str]) -> tuple[str, ...]:
    """`prune,export-onnx` -> validated, in pipeline order."""
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if str(s).strip()]
    if not names:
        raise BadInputError(f"no stages given; choose from: {', '.join(STAGES)}")
    for name in names:
        if name not in STAGES:
            close = difflib.get_close_matches(name, STAGES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise BadInputError(f"unknown stage {name!r}{hint} (stages: {', '.join(STAGES)})")
    return tuple(s for s in STAGES if s in names)


def parse_backends(text: str | list[str]) -> tuple[str, ...]:
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if str(s).strip()]
    for name in names:
        if name not in BENCH_BACKENDS:
            raise BadInputError(f"unknown back end {name!r} for bench; choose from: {', '.join(BENCH_BACKENDS)}")
    if not names:
        raise BadInputError(f"no back ends given; choose from: {', '.join(BENCH_BACKENDS)}")
    return tuple(dict.fromkeys(names))


def build_options(file_values: Mapping[str, Any], flag_values: Mapping[str, Any]) -> BuildOptions:
    """Merge defaults < file < flags (flags given as dotted keys; None means not given) and validate."""
    merged: dict[str, Any] = dict(file_values)
    for key, value in flag_values.items():
        if value is not None:
            check_value(key, value, where="(command line)")
            merged[key] = value
    preset = merged.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise BadInputError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        merged = {**PRESETS[preset], **merged}
    recover = {k.split(".", 1)[1]: v for k, v in merged.items() if k.startswith("recover.")}
    recover_on = bool(recover.pop("enabled", False))
    if "stages" in merged and "recover" in merged["stages"] and not recover_on:
        raise BadInputError(
            "stage recover is off; pass --recover (or recover.enabled: true, or --preset release) to run it"
        )
    prune = {k.split(".", 1)[1]: v for k, v in merged.items() if k.startswith("prune.")}
    tp = prune.pop("tp_size", None)
    if tp is not None:
        import math

        prune["head_multiple"] = math.lcm(prune.get("head_multiple", 1), tp)
        prune["ffn_multiple"] = math.lcm(prune.get("ffn_multiple", 1), tp)
    if prune.get("gqa_mode", "") is None:
        prune.pop("gqa_mode")
    if "layer_ratios" in prune and prune["layer_ratios"] is not None:
        prune["layer_ratios"] = tuple(prune["layer_ratios"])
    bench = {k.split(".", 1)[1]: v for k, v in merged.items() if k.startswith("bench.")}
    if "backends" in bench:
        bench["backends"] = parse_backends(bench["backends"])
        bench["explicit"] = True
    for key in ("prompt_lens", "batch_sizes"):
        if key in bench:
            bench[key] = tuple(bench[key])
    for key in ("repeats", "decode_tokens", "quality_tokens", "quality_seqlen"):
        if key in bench and bench[key] < 1:
            raise BadInputError(f"build option 'bench.{key}' must be at least 1, got {bench[key]}")
    for key in ("prompt_lens", "batch_sizes"):
        if key in bench and (not bench[key] or min(bench[key]) < 1):
            raise BadInputError(f"build option 'bench.{key}' must be a non-empty list of positive integers")
    onnx_dtype = merged.get("onnx.dtype", "fp32")
    if onnx_dtype not in DTYPES["onnx"]:
        raise BadInputError(f"unsupported onnx.dtype {onnx_dtype!r}; choose one of: {', '.join(DTYPES['onnx'])}")
    quantize = merged.get("onnx.quantize")
    if quantize not in (None, "int8"):
        raise BadInputError(f"unsupported onnx.quantize {quantize!r}; choose int8 or leave it empty")
    gguf_type = merged.get("gguf.type", "q8_0")
    if gguf_type not in GGUF_TYPES:
        raise BadInputError(f"unsupported gguf.type {gguf_type!r}; choose one of: {', '.join(GGUF_TYPES)}")
    genai_weights = merged.get("genai.weights", "int8")
    if genai_weights not in GENAI_WEIGHTS:
        raise BadInputError(f"unsupported genai.weights {genai_weights!r}; choose one of: {', '.join(GENAI_WEIGHTS)}")
    vllm_dtype = merged.get("vllm.dtype")
    if vllm_dtype not in (None, *DTYPES["vllm"]):
        raise BadInputError(f"unsupported vllm.dtype {vllm_dtype!r}; choose one of: {', '.join(DTYPES['vllm'])}")
    evaluation, gate = _eval_and_gate(merged)
    eval_on = bool(gate) or any(k.startswith("eval.") for k in merged)
    switched_on = {"recover": recover_on, "eval": eval_on}
    default_stages = tuple(s for s in STAGES if s not in OPTIONAL_STAGES or switched_on[s])
    stages = parse_stages(merged["stages"]) if "stages" in merged else default_stages
    if gate and "eval" not in stages:
        raise BadInputError(f"a --gate needs the eval stage; add eval to --stages ({', '.join(stages)})")
    return BuildOptions(
        model=merged.get("model", DEFAULT_MODEL),
        stages=stages,
        prune=PruneConfig(**prune),
        recover=RecoverSection(enabled=recover_on, config=RecoverConfig(**recover)),
        vllm_dtype=vllm_dtype,
        onnx_dtype=onnx_dtype,
        onnx_quantize=quantize,
        onnx_fuse=merged.get("onnx.fuse", True),
        gguf_type=gguf_type,
        genai_weights=genai_weights,
        bench=BenchSection(**bench),
        eval=evaluation,
        gate=gate,
    )


def _eval_and_gate(merged: Mapping[str, Any]) -> tuple[EvalSection, tuple[Condition, ...]]:
    """The eval section and the parsed gate, refusing a condition on a metric the eval will not measure."""
    values = {k.split(".", 1)[1]: v for k, v in merged.items() if k.startswith("eval.")}
    if "tasks" in values:
        from ..tasks import parse_tasks

        values["tasks"] = parse_tasks(list(values["tasks"]))
    for key in ("batch_size", "seqlen", "fidelity_tokens", "limit", "max_tokens"):
        if values.get(key) is not None and values[key] < (2 if key == "seqlen" else 1):
            raise BadInputError(
                f"build option 'eval.{key}' must be at least {2 if key == 'seqlen' else 1}, got {values[key]}"
            )
    if values.get("num_fewshot", 0) < 0:
        raise BadInputError(f"build option 'eval.num_fewshot' must be >= 0, got {values['num_fewshot']}")
    for key in ("text", "include_path"):
        if values.get(key) is not None and not Path(values[key]).exists():
            raise BadInputError(
                f"build option 'eval.{key}': {values[key]} does not exist; give an existing "
                f"{'UTF-8 text file' if key == 'text' else 'directory of lm-eval task YAMLs'}"
            )
    evaluation = EvalSection(**values)
    gate = parse_gate(merged.get("gate"))
    check_measurable(gate, {name for name, on in (("text", evaluation.text), ("tasks", evaluation.tasks)) if on})
    return evaluation, gate
