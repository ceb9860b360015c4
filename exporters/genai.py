"""Slim (or dense) checkpoint -> a folder ONNX Runtime GenAI runs, verified in GenAI against transformers.

    OUT/model.onnx, model.onnx.data   the decoder graph, weights in the data file
    OUT/genai_config.json             what `onnxruntime_genai.Model(OUT)` reads
    OUT/tokenizer.json, tokenizer_config.json, ...   for GenAI's tokenizer
    OUT/export.json                   this summary, with every verification check

The graph is written node by node here (onnx.helper), in the form ONNX Runtime's own
model builder gives a Llama, but from each layer's own shapes: a layer is
SimplifiedLayerNormalization -> one packed QKV MatMul (q_i + 2 kv_i heads) ->
`com.microsoft.GroupQueryAttention` (num_heads q_i, kv_num_heads kv_i, RoPE inside from
cos/sin caches, the KV cache in and out) -> o_proj -> SkipSimplifiedLayerNormalization
(residual add and norm in one op) -> one gate/up MatMul, SiLU, down. Each layer's
past_key_values.{i}.key / value input (and present.{i} output) has that layer's KV-head
count as a static dimension: GenAI (>= 0.15) sizes its cache from it. ONNX Runtime's model
builder cannot write such a graph (it takes one head count for every layer).

Inputs: input_ids, attention_mask [batch, total]; GroupQueryAttention takes seqlens_k =
sum(mask) - 1 and the total length from them, as GenAI feeds it.

Weights (`--quantize` / `--dtype`): fp32; fp16 (weights, activations and cache; ONNX Runtime's
CPU provider runs it); int8 = weight-only 8-bit blocks (MatMulNBits bits 8, block 32, the plain
ONNX export's quantizer) with fp32 activations.

Verification (GenAI's CPU provider against transformers, float32):
  tokenizer  GenAI's tokenizer encodes the prompts and a mixed text to transformers' ids;
  logits     GenAI's logits after the prompt and at each of transformers' 32 greedy steps
             (teacher-forced, cached): max |diff| (fp32/fp16) or KL and top-1 (int8) bounds;
  greedy     GenAI's own greedy tokens for up to 32 steps (to the reference's first EOS, where GenAI's
             search stops), each prompt alone and two prompts of different
             lengths as a batch of 2: identical to transformers' (fp32; a parting at a near-tie
             of the reference is reported as such), agreement recorded for fp16/int8.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from slimgpt_deploy.atomic import atomic_output_dir, check_output_dir
from slimgpt_deploy.errors import BadInputError, VerificationError
from slimgpt_deploy.extras import require
from slimgpt_deploy.families import layout_of
from slimgpt_deploy.reference import greedy_reference
from slimgpt_deploy.serving.genai_runner import CONFIG_FILE, GenAIModel, require_genai

from .onnx_graph import Graph

logger = logging.getLogger(__name__)

FORMAT = "genai"
MODEL_FILE = "model.onnx"
DATA_FILE = MODEL_FILE + ".data"
SUMMARY_FILE = "export.json"
OPSET = 21
WEIGHTS = ("fp32", "fp16", "int8")  # --dtype fp32|fp16 (exporters.DTYPES) or --quantize int8
VERIFY_PROMPTS = (
    "The capital of France is",
    "the cat sat on the mat and the dog ran to the park",
    "def fibonacci(n):",
)
VERIFY_TOKENS = 32
TOKENIZER_CHECK = "Hello world!  It's 2026: 12345 apples\n\n\tcost $3.50 -- naïve café, 東京 ✓ 'quoted' (x+y)*2"
GENAI_TOKENIZERS = ("BPE", "Unigram", "WordPiece")  # tokenizer.json models GenAI's tokenizer reads
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # cos/sin tables that do not depend on the sequence length


@dataclass(frozen=True)
class Tolerance:
    logits_atol: float | None  # max |logits diff| over every teacher-forced step
    exact_greedy: bool  # GenAI's greedy tokens equal transformers' (a parting at a near-tie excepted)
    tie_margin: float = 0.0  # reference log-probability margin under which a parting is a tie
    kl_max: float | None = None
    top1_min: float | None = None


# The plain ONNX export's bounds (exporters/onnx.py), measured again here: see export.json of each export.
TOLERANCES = {
    "fp32": Tolerance(logits_atol=2e-3, exact_greedy=True, tie_margin=1e-3),
    "fp16": Tolerance(logits_atol=1.0, exact_greedy=False, kl_max=0.01, top1_min=0.95),
    "int8": Tolerance(logits_atol=None, exact_greedy=False, kl_max=0.05, top1_min=0.85),
}


def resolve_weights(dtype: str | None, quantize: str | None) -> str:
    dtype = {"float32": "fp32", "float16": "fp16"}.get(dtype or "fp32", dtype or "fp32")
    if dtype not in ("fp32", "fp16"):
        raise BadInputError(f"unsupported GenAI --dtype {dtype!r}; choose fp32 or fp16")
    if quantize is None:
        return dtype
    if quantize != "int8":
        raise BadInputError(f"unsupported GenAI --quantize {quantize!r}; choose int8")
    if dtype != "fp32":
        raise BadInputError("--quantize int8 keeps fp32 activations; drop --dtype fp16")
    return "int8"


def export(
    checkpoint: Path,
    out: Path,
    *,
    dtype: str | None = None,
    quantize: str | None = None,
    force: bool = False,
    verify: bool = True,
    log: Callable[[str], None] = logger.info,
) -> dict:
    """Write `checkpoint` as an ONNX Runtime GenAI folder `out`; verified in GenAI before `out` appears."""
    from slimgpt_deploy.sources import load_model

    weights = resolve_weights(dtype, quantize)
    out = Path(out)
    check_output_dir(out, force)
    require("onnx")
    if verify:
        require_genai()
    loaded = load_model(str(checkpoint), dtype=torch.float32)
    plan = Plan.of(loaded.model)  # every refusal (activation, RoPE, tokenizer) before writing
    _check_tokenizer(loaded.tokenizer)
    t0 = time.perf_counter()
    with atomic_output_dir(out, force) as tmp:
        log(f"writing the GenAI decoder graph ({weights}, GroupQueryAttention per layer)")
        write_graph(loaded.model, plan, tmp, torch.float16 if weights == "fp16" else torch.float32)
        if weights == "int8":
            from slimgpt_deploy.exporters.onnx import quantize_matmul_nbits_int8

            log("quantizing MatMul weights: MatMulNBits bits=8, block 32")
            quantize_matmul_nbits_int8(tmp, tmp)
        write_config(loaded.model, plan, tmp)
        loaded.tokenizer.save_pretrained(str(tmp))
        summary = {
            "format": FORMAT,
            "source": str(checkpoint),
            "weights": weights,
            "opset": OPSET,
            "file_bytes": sum(p.stat().st_size for p in tmp.glob(MODEL_FILE + "*")),
            "layers": [{"q_heads": q, "kv_heads": kv, "ffn": f} for q, kv, f in plan.layers],
            "onnxruntime_genai": None,
            "run": f"python -c \"import onnxruntime_genai as og; og.Model('{out}')\"",
            "verification": {"passed": None, "skipped": not verify},
        }
        if verify:
            log(f"verifying in ONNX Runtime GenAI: tokenizer, logits and {VERIFY_TOKENS} greedy tokens vs transformers")
            report = verify_against(tmp, loaded.model, loaded.tokenizer, weights)
            summary["verification"] = report
            summary["onnxruntime_genai"] = report["runtime"]
            if not report["passed"]:
                raise VerificationError(
                    f"GenAI export of {checkpoint} disagrees with transformers: {'; '.join(report['failures'])}"
                )
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    log(f"wrote {out} ({summary['file_bytes'] / 1e6:.0f} MB)")
    return summary


# ---------------------------------------------------------------- the graph


@dataclass(frozen=True)
class Plan:
    layers: list[tuple[int, int, int]]  # (query heads, KV heads, FFN width) per layer
    head_dim: int
    hidden: int
    vocab: int
    eps: float
    context: int
    cos: np.ndarray  # [context, head_dim / 2], attention scaling folded in
    sin: np.ndarray

    @classmethod
    def of(cls, model) -> Plan:
        from slimgpt_deploy.families import layer_shapes

        config = model.config
        if getattr(config, "hidden_act", "silu") != "silu":
            raise BadInputError(f"activation {config.hidden_act!r} has no GenAI graph here (silu does)")
        params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in STATIC_ROPE:
            raise BadInputError(
                f"RoPE {kind!r} changes with the sequence length; GroupQueryAttention's cos/sin caches cannot hold it "
                "(export --format onnx instead)"
            )
        shapes = layer_shapes(config)
        context = int(config.max_position_embeddings)
        head_dim = shapes[0].head_dim
        with torch.no_grad():
            probe = torch.zeros(1, 1, head_dim)
            cos, sin = model.model.rotary_emb(probe, torch.arange(context)[None])  # [1, T, head_dim], halves repeated
        half = head_dim // 2
        return cls(
            layers=[(s.q_heads, s.kv_heads, s.ffn) for s in shapes],
            head_dim=head_dim,
            hidden=config.hidden_size,
            vocab=config.vocab_size,
            eps=float(config.rms_norm_eps),
            context=context,
            cos=cos[0, :, :half].float().numpy(),
            sin=sin[0, :, :half].float().numpy(),
        )


def _check_tokenizer(tokenizer) -> None:
    """GenAI's tokenizer reads tokenizer.json's BPE, Unigram and WordPiece models; refuse the others up front."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    kind = json.loads(backend.to_str())["model"]["type"] if backend is not None else None
    if kind not in GENAI_TOKENIZERS:
        raise BadInputError(
            f"the checkpoint's tokenizer is {kind or 'not a tokenizers (fast) tokenizer'}; ONNX Runtime GenAI's "
            f"tokenizer reads {', '.join(GENAI_TOKENIZERS)} tokenizer.json files: export --format onnx instead"
        )


def write_graph(model, plan: Plan, directory: Path, dtype: torch.dtype) -> None:
    """DIR/model.onnx + model.onnx.data: the decoder of `model` (float32 in memory) in `dtype`."""
    from onnx import TensorProto, helper

    g = Graph(dtype)
    elem = TensorProto.FLOAT16 if dtype == torch.float16 else TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", elem, ["batch_size", "sequence_length", plan.vocab])]
    for i, (_, kv, _) in enumerate(plan.layers):
        for kind in ("key", "value"):
            shape_in = ["batch_size", kv, "past_sequence_length", plan.head_dim]
            shape_out = ["batch_size", kv, "total_sequence_length", plan.head_dim]
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", elem, shape_in))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", elem, shape_out))

    # GroupQueryAttention's lengths: seqlens_k = tokens seen - 1 per row, and the total length.
    one = g.int64("const_one", [1])
    seen = g.node("ReduceSum", ["attention_mask", one], "mask/ReduceSum", keepdims=0)[0]
    seqlens = g.node("Cast", [g.node("Sub", [seen, one], "mask/Sub")[0]], "mask/seqlens_k", to=TensorProto.INT32)[0]
    width = g.node("Gather", [g.node("Shape", ["attention_mask"], "mask/Shape")[0], "const_axis1"], "mask/Gather")[0]
    g.int64("const_axis1", [1], scalar=True)
    total = g.node("Cast", [width], "mask/total_len", to=TensorProto.INT32)[0]
    cos, sin = g.weight("cos_cache", plan.cos), g.weight("sin_cache", plan.sin)

    L = layout_of(model.config)
    embed = model.get_input_embeddings().weight
    residual, pending = g.node("Gather", [g.weight(f"{L.embed}.weight", embed), "input_ids"], "embed")[0], None
    scale = float(plan.head_dim**-0.5)
    for i, (layer, (q, kv, _)) in enumerate(zip(L.part(model, "layers"), plan.layers)):
        p = f"{L.layers}.{i}"
        norm_in = g.weight(f"{p}.{L.attention_norm}.weight", L.part(layer, "attention_norm").weight)
        if pending is None:
            h = g.node(
                "SimplifiedLayerNormalization", [residual, norm_in], f"{p}/{L.attention_norm}", epsilon=plan.eps
            )[0]
        else:
            h, _, _, residual = g.node(
                "SkipSimplifiedLayerNormalization",
                [residual, pending, norm_in],
                f"{p}/{L.attention_norm}",
                outputs=4,
                domain="com.microsoft",
                epsilon=plan.eps,
            )
        # [B, S, (q + 2 kv) d]: GroupQueryAttention takes q, k and v packed
        qkv = g.packed_matmul(h, [L.proj(layer, role) for role in "qkv"], f"{p}.{L.attention}.qkv_proj")
        ctx = g.node(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total, cos, sin],
            f"{p}/GroupQueryAttention",
            outputs=3,
            domain="com.microsoft",
            num_heads=q,
            kv_num_heads=kv,
            scale=scale,
            do_rotary=1,
            rotary_interleaved=0,
            local_window_size=-1,
        )
        g.nodes[-1].output[1], g.nodes[-1].output[2] = f"present.{i}.key", f"present.{i}.value"
        o = g.linear(ctx[0], L.proj(layer, "o"), f"{p}.{L.projections['o']}")
        h, _, _, residual = g.node(
            "SkipSimplifiedLayerNormalization",
            [residual, o, g.weight(f"{p}.{L.mlp_norm}.weight", L.part(layer, "mlp_norm").weight)],
            f"{p}/{L.mlp_norm}",
            outputs=4,
            domain="com.microsoft",
            epsilon=plan.eps,
        )
        gate, up = g.packed_linear(h, [L.proj(layer, "gate"), L.proj(layer, "up")], f"{p}.{L.mlp}.gate_up")
        silu = g.node("Mul", [gate, g.node("Sigmoid", [gate], f"{p}/mlp/Sigmoid")[0]], f"{p}/mlp/SiLU")[0]
        down = L.proj(layer, "down")
        pending = g.linear(g.node("Mul", [silu, up], f"{p}/mlp/Mul")[0], down, f"{p}.{L.projections['down']}")
    final = g.node(
        "SkipSimplifiedLayerNormalization",
        [residual, pending, g.weight(f"{L.norm}.weight", L.part(model, "norm").weight)],
        "model/norm",
        outputs=4,
        domain="com.microsoft",
        epsilon=plan.eps,
    )[0]
    # A tied lm_head gets its own [hidden, vocab] copy: MatMul's layout, and what MatMulNBits quantizes.
    logits = g.linear(final, model.get_output_embeddings(), "lm_head")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))
    _save(g.model("slimgpt_genai_decoder", inputs, outputs, OPSET, contrib=True), directory)


def _save(model, directory: Path) -> None:
    import onnx

    for stale in (directory / MODEL_FILE, directory / DATA_FILE):
        stale.unlink(missing_ok=True)
    onnx.save_model(
        model, str(directory / MODEL_FILE), save_as_external_data=True, location=DATA_FILE, size_threshold=1024
    )


def _eos_ids(model) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])] if eos is not None else []


def write_config(model, plan: Plan, directory: Path) -> None:
    """DIR/genai_config.json: GenAI's `llama` decoder, this graph's I/O names and sizes, greedy defaults."""
    config = model.config
    eos = _eos_ids(model)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    genai = {
        "model": {
            "type": "llama",
            "bos_token_id": config.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": pad,
            "context_length": plan.context,
            "vocab_size": plan.vocab,
            "decoder": {
                "filename": MODEL_FILE,
                "session_options": {"log_id": "slimgpt-deploy", "provider_options": []},
                "head_size": plan.head_dim,
                "hidden_size": plan.hidden,
                # GenAI takes one count here; the cache of each layer is sized from the graph's inputs.
                "num_attention_heads": max(q for q, _, _ in plan.layers),
                "num_key_value_heads": max(kv for _, kv, _ in plan.layers),
                "num_hidden_layers": len(plan.layers),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "max_length": min(plan.context, 4096),
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }
    (directory / CONFIG_FILE).write_text(json.dumps(genai, indent=2) + "\n")


# ---------------------------------------------------------------- verification


def verify(export_dir: Path, checkpoint: Path, *, log: Callable[[str], None] = logger.info) -> dict:
    """Verify an existing GenAI folder against its checkpoint; does not raise on a mismatch (see `passed`)."""
    from slimgpt_deploy.serving.genai_runner import check_folder
    from slimgpt_deploy.sources import load_model

    weights = check_folder(Path(export_dir)).weights
    loaded = load_model(str(checkpoint), dtype=torch.float32)
    log(f"verifying {export_dir} ({weights}) in ONNX Runtime GenAI against {checkpoint}")
    return verify_against(Path(export_dir), loaded.model, loaded.tokenizer, weights)


def verify_against(directory: Path, model, tokenizer, weights: str) -> dict:
    """Compare the GenAI folder with `model` (float32 transformers); every failure collected."""
    from slimgpt_deploy.exporters.onnx import _kl_top1
    from slimgpt_deploy.exporters.vllm import Tolerance as GreedyTolerance

    tol = TOLERANCES[weights]
    runtime = GenAIModel(directory)
    failures: list[str] = []
    checks: dict = {}

    prompts = [list(tokenizer(p)["input_ids"]) for p in VERIFY_PROMPTS]
    mismatched = [
        text
        for text in (*VERIFY_PROMPTS, TOKENIZER_CHECK)
        if runtime.tokenize(text) != list(tokenizer(text)["input_ids"])
    ]
    checks["tokenizer_equal"] = not mismatched
    if mismatched:
        failures.append(f"GenAI's tokenizer encodes {mismatched[0]!r} differently from transformers")

    want = greedy_reference(model, prompts, VERIFY_TOKENS)  # EOS does not stop it; GenAI's search stops there
    greedy_tol = GreedyTolerance(logprob_tol=float("inf"), tie_margin=tol.tie_margin)
    diffs, refs, gots, greedy = [], [], [], []
    for i, (prompt, ref) in enumerate(zip(prompts, want)):
        got_logits = runtime.teacher_forced(prompt, ref.token_ids)  # [steps, vocab]
        ref_lp = ref.logprobs.numpy()
        refs.append(ref_lp)
        gots.append(got_logits)
        diffs.append(_logits_diff(model, prompt, ref.token_ids, got_logits))
        ids = runtime.greedy([prompt], VERIFY_TOKENS)[0]
        row = _compare(ids, ref, runtime.eos, greedy_tol, "GenAI") | {"prompt": i}
        greedy.append(row)
        if tol.exact_greedy and row["failure"]:
            failures.append(f"prompt {i}: {row['failure']}")
    checks["max_abs_diff"] = float(max(diffs))
    kl, top1 = _kl_top1(np.concatenate(refs), np.concatenate(gots))
    checks["kl"], checks["top1"], checks["positions"] = kl, top1, int(sum(len(r) for r in refs))
    if tol.logits_atol is not None and not checks["max_abs_diff"] <= tol.logits_atol:
        failures.append(f"max |logits diff| {checks['max_abs_diff']:.3g} > {tol.logits_atol:g}")
    if tol.kl_max is not None and not kl <= tol.kl_max:
        failures.append(f"KL {kl:.4g} nats > {tol.kl_max:g}")
    if tol.top1_min is not None and not top1 >= tol.top1_min:
        failures.append(f"top-1 agreement {top1:.3f} < {tol.top1_min:g}")
    checks["greedy"] = greedy

    # A batch of 2 prompts of different lengths (GenAI pads the shorter on the right), each row against its own
    # reference: the batch-1 continuations above.
    batch = []
    for b, ids in enumerate(runtime.greedy(prompts[:2], VERIFY_TOKENS)):
        row = _compare(ids, want[b], runtime.eos, greedy_tol, "GenAI (batch 2)") | {"row": b}
        batch.append(row)
        if tol.exact_greedy and row["failure"]:
            failures.append(f"batch row {b}: {row['failure']}")
    checks["greedy_batch2"] = batch
    result = {
        "passed": not failures,
        "failures": failures,
        "tolerance": asdict(tol),
        "checks": checks,
        "greedy_steps": VERIFY_TOKENS,
        "runtime": runtime.og.__version__,
    }
    logger.info("GenAI verification %s: %s", "passed" if not failures else "FAILED", checks)
    return result


def _compare(ids: list[int], ref, eos: set[int], tol, engine: str) -> dict:
    """GenAI's greedy tokens against transformers' up to the reference's first EOS (where GenAI's search stops)."""
    from slimgpt_deploy.exporters.vllm import compare_greedy
    from slimgpt_deploy.serving.genai_runner import until_eos

    want = until_eos(list(ref.token_ids), eos)
    row = compare_greedy(ids, [{}] * len(ids), want, ref.logprobs[: len(want)], tol, engine=engine)
    same = sum(a == b for a, b in zip(ids, want))
    return row | {"agreement": same / len(want), "reference_tokens": len(want)}


@torch.no_grad()
def _logits_diff(model, prompt: list[int], tokens: list[int], got: np.ndarray) -> float:
    """max |GenAI logits - transformers logits| at the last prompt position and each teacher-forced step."""
    ids = torch.tensor([prompt + tokens[:-1]])
    ref = model(ids, use_cache=False).logits[0, len(prompt) - 1 :].float().numpy()  # [steps, vocab]
    return float(np.abs(ref - got).max())
