"""Slim (or dense) checkpoint -> ONNX decoder with a KV cache, verified against PyTorch.

What the export produces (see `serving/onnx_runner.py` for the JSON it is described by):

    OUT/model.onnx           one graph: prefill, cached decode and chunked prefill
                             (inputs/outputs in `exporters/onnx_model.py`), opset 23
                             (18 with --no-fuse), dynamic batch / sequence / past; weights in
                             OUT/model.onnx.data when they pass 2 GB
    OUT/slimgpt_onnx.json    per-layer cache shape, dtype and I/O names
    OUT/tokenizer files, generation_config.json
    OUT/export.json          this summary, with every verification check

Writer: `exporters/onnx_graph.write_decoder`, node by node, the computation of
`exporters/onnx_model.ExportDecoder` (the PyTorch form of the same graph, tested against
transformers). It replaced `torch.onnx.export(dynamo=True)` over ExportDecoder, which took
~50 s on SmolLM2-135M here; the written graph takes a few seconds and has the same I/O.
Fused by default (ONNX RotaryEmbedding, ONNX Runtime's GroupQueryAttention with an in-place
cache and (Skip)SimplifiedLayerNormalization); `fuse=False` (`--no-fuse`) writes standard
opset-18 ONNX ops only. In both forms q/k/v and gate/up are one MatMul each, split after
(`Graph.packed_linear`): four weight MatMuls a layer instead of seven.

int8 (`--quantize int8`): weight-only 8-bit blocks (MatMulNBits, symmetric, block 32,
accuracy_level 4), lm_head untied first. ONNX Runtime's dynamic quantization
(int8 weights *and* activations) is available as `quantize_dynamic_int8` for
measurement only; on SmolLM2 it ruins the outputs (benchmarks/results/onnx.md).

Verification (each check recorded; all mismatches collected, then VerificationError):
  fp32  batch of 2 left-padded prompts: prefill + 8 cached decode steps, max |logits
        difference| vs transformers (float32) within TOLERANCES["fp32"].logits_atol; greedy
        tokens for 32 steps on 3 prompts identical to transformers' own cached decoding.
  fp16  the same logits bound (looser) plus KL / top-1 bounds; greedy agreement recorded.
  int8  KL(P_torch || P_onnx) per position <= kl_max and top-1 agreement >= top1_min
        instead of a logits bound and exact tokens; greedy agreement recorded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from slimgpt_deploy.atomic import atomic_output_dir, check_output_dir
from slimgpt_deploy.errors import BadInputError, VerificationError
from slimgpt_deploy.extras import require
from slimgpt_deploy.families import layer_shapes
from slimgpt_deploy.reference import greedy_reference
from slimgpt_deploy.serving.onnx_runner import (
    MODEL_FILE,
    SPEC_FILE,
    CacheLayer,
    OnnxDecoder,
    OnnxSpec,
    check_runtime,
    left_pad,
    positions,
)

from .onnx_graph import opset_of

logger = logging.getLogger(__name__)

SUMMARY_FILE = "export.json"
EXTERNAL_DATA_FILE = MODEL_FILE + ".data"
PROTOBUF_LIMIT = 2 * 1024**3  # ONNX protobuf files cannot exceed 2 GB; weights go to external data beyond ~1.8 GB
EXTERNAL_DATA_THRESHOLD = int(PROTOBUF_LIMIT * 0.9)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
NP_NAMES = {torch.float32: "float32", torch.float16: "float16"}

# Verification inputs: fixed text, so results are reproducible; any tokenizer encodes them.
VERIFY_PROMPTS = (
    "The capital of France is",
    "the cat sat on the mat and the dog ran to the park",
    "def fibonacci(n):",
)
DECODE_STEPS = 8
GREEDY_STEPS = 32


@dataclass(frozen=True)
class Tolerance:
    """What an export of one kind must meet against PyTorch (float32 reference)."""

    logits_atol: float | None  # max |logits difference| over real positions; None: not checked
    exact_greedy: bool  # greedy tokens identical for GREEDY_STEPS
    kl_max: float | None = None  # mean KL(P_torch || P_onnx) per position, nats
    top1_min: float | None = None  # share of positions with the same argmax


# Measured here (export.json of each benchmark export): fp32 max |diff| 5.6e-5..7.2e-5 on SmolLM2-135M
# dense and pruned 20/30/50% (logits of magnitude ~20), 2e-7 on the tiny test model: ~30x room.
# int8 weight-only vs PyTorch on the 34 verification positions of pruned-20% SmolLM2: KL 0.0057,
# top-1 0.94 (0.004 / 0.95 over 1,024 WikiText-2 positions, benchmarks/results/onnx.md); dynamic
# int8 gives KL 0.47, top-1 0.62 and fails these bounds. fp16 (pruned-20% SmolLM2, ORT CPU): max |diff|
# 0.24 (prefill; 0.06 decode), KL 2.7e-5, top-1 1.0, greedy tokens identical on all 3 prompts.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(logits_atol=2e-3, exact_greedy=True),
    "fp16": Tolerance(logits_atol=1.0, exact_greedy=False, kl_max=0.01, top1_min=0.95),
    "int8": Tolerance(logits_atol=None, exact_greedy=False, kl_max=0.05, top1_min=0.85),
}


def _validate(dtype: str | None, quantize: str | None) -> tuple[str, str | None]:
    dtype = dtype or "fp32"
    if dtype not in DTYPES:
        raise BadInputError(f"unsupported ONNX --dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZERS:
        raise BadInputError(f"unsupported --quantize {quantize!r}; choose one of: {', '.join(QUANTIZERS)}")
    if quantize is not None and dtype != "fp32":
        raise BadInputError(f"--quantize {quantize} keeps fp32 activations; drop --dtype {dtype} (or use --dtype fp32)")
    return dtype, quantize


def export(
    checkpoint: Path,
    out: Path,
    *,
    dtype: str | None = None,
    quantize: str | None = None,
    force: bool = False,
    verify: bool = True,
    log: Callable[[str], None] = logger.info,
    fuse: bool = True,
) -> dict:
    """Export `checkpoint` to an ONNX directory `out` (atomically), verified unless `verify=False`.

    `fuse`: fused attention and norms (opset 23, onnx_graph.write_decoder); False keeps the graph in standard
    opset-18 ONNX ops only. The installed onnxruntime must be able to run what is written, to verify it."""
    from slimgpt_deploy.sources import load_model

    dtype, quantize = _validate(dtype, quantize)
    out = Path(out)
    check_output_dir(out, force)
    if verify:
        weights = QUANTIZERS[quantize].weights if quantize else dtype
        check_runtime(require("onnxruntime").__version__, opset_of(fuse), weights)  # attention follows fuse
    start = time.perf_counter()
    loaded = load_model(str(checkpoint), dtype=torch.float32)
    kind = quantize or dtype
    with atomic_output_dir(out, force) as tmp:
        log(f"writing {checkpoint} as an ONNX graph ({kind}, {'fused' if fuse else 'standard ops only'})")
        spec, fused = write_onnx(loaded.model, tmp, dtype=DTYPES[dtype], fuse=fuse)
        if quantize is not None:
            log(f"quantizing MatMul weights: {QUANTIZERS[quantize].weights}")
            QUANTIZERS[quantize].fn(tmp, tmp)
            spec = replace(spec, weights=QUANTIZERS[quantize].weights)
        write_side_files(loaded, spec, tmp)
        summary = {
            "format": "onnx",
            "checkpoint": str(checkpoint),
            "model_file": spec.model_file,
            "dtype": dtype,
            "quantize": quantize,
            "weights": spec.weights,
            "opset": spec.opset,
            "fused": fused,
            "file_bytes": dir_model_bytes(tmp),
            "export_seconds": None,
            "verification": {"passed": None, "skipped": True},
        }
        if verify:
            log(f"verifying against PyTorch: prefill + {DECODE_STEPS} cached steps, {GREEDY_STEPS} greedy tokens")
            summary["verification"] = verify_against(tmp, loaded.model, loaded.tokenizer, kind)
        summary["export_seconds"] = round(time.perf_counter() - start, 1)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        if verify and not summary["verification"]["passed"]:
            raise VerificationError(
                f"ONNX export of {checkpoint} disagrees with PyTorch: {'; '.join(summary['verification']['failures'])}"
            )
    log(f"wrote {out} ({summary['file_bytes'] / 1e6:.0f} MB)")
    return summary


# --- writing ---------------------------------------------------------------------------------


def write_onnx(
    model: torch.nn.Module,
    directory: Path,
    *,
    dtype: torch.dtype,
    fuse: bool = True,
    attention: bool | None = None,
    untie_lm_head: bool = False,
) -> tuple[OnnxSpec, dict[str, int] | None]:
    """Write `model`'s decoder as `directory/model.onnx` (+ external data when large): its spec and fused-op counts.

    `attention` (default: `fuse`) picks the fused Attention/RotaryEmbedding form independently of the norms
    (benchmarks/onnx_attention.py measures the two)."""
    from .onnx_graph import write_decoder

    with torch.no_grad():
        proto, fused = write_decoder(model, dtype, fuse=fuse, attention=attention, untie_lm_head=untie_lm_head)
    _save_onnx(proto, directory)
    config = model.config
    shapes = layer_shapes(config)
    spec = OnnxSpec(
        model_file=MODEL_FILE,
        dtype=NP_NAMES[dtype],
        weights={torch.float32: "fp32", torch.float16: "fp16"}[dtype],
        head_dim=shapes[0].head_dim,
        vocab_size=int(config.vocab_size),
        max_positions=_max_positions(config),
        layers=tuple(CacheLayer(i, s.q_heads, s.kv_heads) for i, s in enumerate(shapes)),
        eos_token_ids=tuple(_eos_ids(model)),
        pad_token_id=_pad_id(model),
        opset=next(o.version for o in proto.opset_import if o.domain == ""),
        in_place_cache=bool(fused and fused.get("GroupQueryAttention")),
    )
    return spec, fused


def _max_positions(config) -> int:
    limit = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        limit = min(limit, int(window))  # the graph attends over the whole cache: no sliding window
    return limit


def _eos_ids(model) -> list[int]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        for t in value if isinstance(value, (list, tuple)) else [value]:
            if t is not None and int(t) not in ids:
                ids.append(int(t))
    return ids


def _pad_id(model) -> int:
    """Any valid id: padded positions are masked out. pad, else the first EOS, else 0."""
    pad = getattr(model.config, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    eos = _eos_ids(model)
    return eos[0] if eos else 0


def write_side_files(loaded, spec: OnnxSpec, directory: Path) -> None:
    """Tokenizer, generation config and the cache description beside the graph."""
    loaded.tokenizer.save_pretrained(directory)
    generation = getattr(loaded.model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)
    (directory / SPEC_FILE).write_text(json.dumps(spec.to_json(), indent=2) + "\n")


def dir_model_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob(MODEL_FILE + "*"))


# --- int8 ------------------------------------------------------------------------------------


def _load_onnx(directory: Path):
    onnx = require("onnx")
    return onnx.load(str(Path(directory) / MODEL_FILE), load_external_data=True)


def _save_onnx(model, directory: Path) -> None:
    onnx = require("onnx")
    path = Path(directory) / MODEL_FILE
    external = model.ByteSize() > EXTERNAL_DATA_THRESHOLD if model.ByteSize() >= 0 else True
    for stale in (path, path.with_name(EXTERNAL_DATA_FILE)):
        stale.unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_FILE,
        size_threshold=1024,
    )


def untie_transposed_weights(model) -> list[str]:
    """Replace `MatMul(x, Transpose(W))` with a stored W^T, for initializers W (the tied lm_head).

    Quantizers only quantize MatMuls whose B is an initializer; a tied embedding reaches
    the lm_head MatMul through a run-time Transpose, so it would stay float. Returns the
    names of the new initializers.
    """
    numpy_helper = require("onnx.numpy_helper")
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    created = []
    for node in list(model.graph.node):
        if node.op_type != "MatMul":
            continue
        t = producers.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[t.input[0]])  # [V, H]
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        if w.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = f"{t.input[0]}.T"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name))  # [H, V]
        node.input[1] = name
        if all(c is node for c in consumers.get(t.output[0], [])):
            model.graph.node.remove(t)
        created.append(name)
    return created


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime's quantizers log one INFO line per node, some through the root logger."""
    loggers = [
        logging.getLogger(),
        logging.getLogger("onnxruntime.quantization"),
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer"),
        logging.getLogger("onnxruntime.transformers.optimizer"),  # "specify num_heads and hidden_size": not used
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def quantize_matmul_nbits_int8(src: Path, dst: Path, *, block_size: int = 32, accuracy_level: int = 4) -> None:
    """Weight-only 8-bit: every MatMul with a constant weight becomes MatMulNBits (fp32 activations)."""
    require("onnxruntime")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = _load_onnx(src)
    untied = untie_transposed_weights(model)
    quantizer = MatMulNBitsQuantizer(
        model, bits=8, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level
    )
    with _quiet_quantizer():
        quantizer.process()
    _save_onnx(quantizer.model.model, dst)
    logger.info("MatMulNBits int8 written to %s (untied %s)", dst, untied)


def quantize_dynamic_int8(src: Path, dst: Path) -> None:
    """Dynamic quantization: int8 weights and per-batch int8 activations (MatMulInteger). For measurement."""
    onnx = require("onnx")
    require("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = _load_onnx(src)
    untie_transposed_weights(model)
    scratch = Path(dst) / ".quantize-dynamic"
    scratch.mkdir()
    try:
        onnx.save_model(model, str(scratch / "in.onnx"), save_as_external_data=True, location="in.onnx.data")
        with _quiet_quantizer():
            quantize_dynamic(
                str(scratch / "in.onnx"),
                str(scratch / "out.onnx"),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul"],
                use_external_data_format=True,
                # the written graph carries no value_info, and ONNX's shape inference stops at contrib ops
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        _save_onnx(onnx.load(str(scratch / "out.onnx"), load_external_data=True), dst)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass(frozen=True)
class Quantizer:
    fn: Callable[[Path, Path], None]  # (directory holding an fp32 model.onnx, directory to write model.onnx into)
    weights: str  # the label recorded in the JSON


QUANTIZERS: dict[str, Quantizer] = {
    "int8": Quantizer(quantize_matmul_nbits_int8, "int8 weight-only (MatMulNBits bits=8, block 32, accuracy_level 4)"),
}
# Measured alternatives, not offered by the CLI (benchmarks/onnx_bench.py compares them).
EXTRA_QUANTIZERS: dict[str, Quantizer] = {
    "int8-dynamic": Quantizer(quantize_dynamic_int8, "int8 dynamic (weights and activations, MatMulInteger)"),
}


def quantize_dir(src: Path, out: Path, *, method: str = "int8", force: bool = False) -> dict:
    """Quantize an existing fp32 ONNX export into a new directory `out` (tokenizer, JSON copied).

    Runs no verification; call `verify(out, checkpoint)` for that. `method`: a key of
    QUANTIZERS or EXTRA_QUANTIZERS.
    """
    from slimgpt_deploy.serving.onnx_runner import load_spec, resolve_dir

    src = resolve_dir(Path(src))
    spec = load_spec(src)
    choices = {**QUANTIZERS, **EXTRA_QUANTIZERS}
    if method not in choices:
        raise BadInputError(f"unknown quantization {method!r}; choose one of: {', '.join(choices)}")
    if spec.weights != "fp32":
        raise BadInputError(f"{src} holds {spec.weights} weights; quantize an fp32 export")
    quantizer = choices[method]
    with atomic_output_dir(Path(out), force) as tmp:
        for p in src.iterdir():
            if p.is_file() and not p.name.startswith(MODEL_FILE) and p.name != SUMMARY_FILE:
                shutil.copyfile(p, tmp / p.name)
        quantizer.fn(src, tmp)
        spec = replace(spec, weights=quantizer.weights)
        (tmp / SPEC_FILE).write_text(json.dumps(spec.to_json(), indent=2) + "\n")
        summary = {
            "format": "onnx",
            "source": str(src),
            "quantize": method,
            "weights": spec.weights,
            "file_bytes": dir_model_bytes(tmp),
            "verification": {"passed": None, "skipped": True},
        }
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# --- verification ----------------------------------------------------------------------------


def verify(onnx_dir: Path, checkpoint: Path | str, *, log: Callable[[str], None] = logger.info) -> dict:
    """Verify an existing ONNX export against its checkpoint; returns the results (see `verify_against`).

    Does not raise on a mismatch: check `result["passed"]` (and `result["failures"]`).
    """
    from slimgpt_deploy.serving.onnx_runner import load_spec, resolve_dir
    from slimgpt_deploy.sources import load_model

    onnx_dir = resolve_dir(Path(onnx_dir))
    spec = load_spec(onnx_dir)
    kind = "int8" if spec.weights.startswith("int8") else spec.weights
    loaded = load_model(str(checkpoint), dtype=torch.float32)
    log(f"verifying {onnx_dir} ({spec.weights}) against {checkpoint}")
    return verify_against(onnx_dir, loaded.model, loaded.tokenizer, kind)


def verify_against(onnx_dir: Path, model: torch.nn.Module, tokenizer, kind: str) -> dict:
    """Compare the export in `onnx_dir` with `model` (float32 PyTorch); collect every failure.

    Returns {"passed", "failures": [...], "tolerance": {...}, "checks": {...}} where checks hold
    the measured values: logits max abs diff (prefill and decode), KL, top-1, greedy agreement.
    """
    tol = TOLERANCES[kind]
    decoder = _open_for_verification(onnx_dir, kind)
    prompts = [_encode(tokenizer, p) for p in VERIFY_PROMPTS]
    failures: list[str] = []
    checks: dict = {}

    # 1. Batch of two left-padded prompts: prefill + DECODE_STEPS cached steps (teacher-forced).
    batch = prompts[:2]
    ref_logits, ref_tokens, mask_all = _torch_reference(model, batch, decoder.spec.pad_token_id, DECODE_STEPS)
    onnx_logits = _onnx_teacher_forced(decoder, batch, ref_tokens, DECODE_STEPS)
    real = mask_all.astype(bool)  # [B, T] positions that are real tokens
    diff = np.abs(onnx_logits - ref_logits)  # [B, T, V]
    width = max(len(p) for p in batch)
    checks["prefill_max_abs_diff"] = float(diff[:, :width][real[:, :width]].max())
    checks["decode_max_abs_diff"] = float(diff[:, width:].max())
    checks["max_abs_diff"] = max(checks["prefill_max_abs_diff"], checks["decode_max_abs_diff"])
    kl, top1 = _kl_top1(ref_logits[real], onnx_logits[real])
    checks["kl"], checks["top1"] = kl, top1
    checks["positions"] = int(real.sum())
    if tol.logits_atol is not None and not checks["max_abs_diff"] <= tol.logits_atol:
        failures.append(
            f"max |logits diff| {checks['max_abs_diff']:.3g} > {tol.logits_atol:g} "
            f"(prefill {checks['prefill_max_abs_diff']:.3g}, decode {checks['decode_max_abs_diff']:.3g})"
        )
    if tol.kl_max is not None and not kl <= tol.kl_max:
        failures.append(f"KL {kl:.4g} nats > {tol.kl_max:g}")
    if tol.top1_min is not None and not top1 >= tol.top1_min:
        failures.append(f"top-1 agreement {top1:.3f} < {tol.top1_min:g}")

    # 2. Greedy tokens, one prompt at a time, through the runner's generation loop.
    greedy = []
    for i, prompt in enumerate(prompts):
        want = greedy_reference(model, [prompt], GREEDY_STEPS)[0].token_ids
        got = decoder.generate_ids([prompt], max_new_tokens=GREEDY_STEPS, eos_token_ids=())[0]
        same = next((j for j, (a, b) in enumerate(zip(want, got)) if a != b), len(want))
        greedy.append(
            {"prompt": i, "identical_prefix": same, "agreement": float(np.mean(np.array(want) == np.array(got)))}
        )
        if tol.exact_greedy and same < len(want):
            failures.append(f"greedy tokens for prompt {i} differ from step {same} of {GREEDY_STEPS}")
    checks["greedy"] = greedy
    result = {
        "passed": not failures,
        "failures": failures,
        "tolerance": asdict(tol),
        "checks": checks,
        "decode_steps": DECODE_STEPS,
        "greedy_steps": GREEDY_STEPS,
    }
    logger.info("verification %s: %s", "passed" if not failures else "FAILED", checks)
    return result


def _open_for_verification(onnx_dir: Path, kind: str) -> OnnxDecoder:
    """A CPU session: the verification compares on the machine that exported.

    ONNX Runtime 1.32's CPU provider runs the fp16 graph (measured); a runtime that
    cannot raises BadInputError from OnnxDecoder, suggesting fp32 or int8.
    """
    return OnnxDecoder(onnx_dir, providers=["CPUExecutionProvider"])


def _encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text)["input_ids"]
    if not ids:
        raise BadInputError(f"the tokenizer encodes {text!r} to no tokens; cannot verify")
    return list(ids)


@torch.no_grad()
def _torch_reference(model, prompts: list[list[int]], pad_id: int, steps: int):
    """transformers, no cache: logits [B, T, V] over prompt + `steps` greedy tokens, those tokens [B, steps],
    mask [B, T]."""
    ids, mask = left_pad(prompts, pad_id)
    tokens = []
    for _ in range(steps + 1):
        logits = (
            model(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions(mask)),
                use_cache=False,
            )
            .logits.float()
            .numpy()
        )  # [B, T, V]
        nxt = logits[:, -1].argmax(-1)  # [B]
        if len(tokens) == steps:
            break
        tokens.append(nxt)
        ids = np.concatenate([ids, nxt[:, None]], 1)
        mask = np.concatenate([mask, np.ones_like(nxt)[:, None]], 1)
    return logits, np.stack(tokens, 1), mask


def _onnx_teacher_forced(decoder: OnnxDecoder, prompts, tokens: np.ndarray, steps: int) -> np.ndarray:
    """ONNX logits [B, T, V] over the same sequence: prefill, then `steps` cached single-token steps."""
    ids, mask = left_pad(prompts, decoder.spec.pad_token_id)
    logits, past = decoder.forward(ids, mask, positions(mask), decoder.empty_past(len(prompts)))
    out = [logits.astype(np.float32)]
    lengths = mask.sum(-1)
    for step in range(steps):
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], 1)
        logits, past = decoder.forward(
            tokens[:, step : step + 1].astype(np.int64), mask, (lengths + step)[:, None], past
        )
        out.append(logits.astype(np.float32))
    return np.concatenate(out, 1)


def _kl_top1(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """Mean KL(P_ref || P_got) in nats and top-1 agreement over rows of [N, V] logits."""

    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    kl = float(np.maximum((np.exp(lp) * (lp - lq)).sum(-1).mean(), 0.0))
    top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
    return kl, top1
