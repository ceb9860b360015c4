"""Slim (or dense) checkpoint -> one GGUF file that llama.cpp runs, verified against PyTorch.

Architecture: llama.cpp's `deci` (DeciLM / Nemotron-NAS), the one llama.cpp architecture
whose loader and graph read the query heads, KV heads and FFN width of every layer from
per-layer arrays (`deci.attention.head_count`, `deci.attention.head_count_kv`,
`deci.feed_forward_length`); its plain `llama` takes layer 0's counts for every layer.
The head size must be the same in every layer (it is, in every slim checkpoint).

    OUT/model-<type>.gguf   weights, per-layer shapes, RoPE, norms, the tokenizer
                            (vocab, merges, special tokens, chat template)
    OUT/export.json         this summary, with every verification check

Weights: token_embd / blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
ffn_gate, ffn_up, ffn_down} / output_norm / output (absent when the embeddings are tied,
llama.cpp then reads token_embd), in transformers' [out, in] layout. llama.cpp applies
RoPE to pairs of neighbouring values of a head, transformers to its two halves
(`rotate_half`), so the rows of each layer's Q and K projections (and biases) are
permuted per head from [half 0 | half 1] to interleaved pairs. Llama-3 RoPE scaling
becomes the `rope_freqs` tensor (a divisor per frequency); other scalings are refused.

Types (`--quantize`): f32 and f16 (2-D weights in f16, norms in f32) are written here with
the `gguf` package; q8_0 and q4_k_m are made from the f32 file by llama.cpp's own quantizer
(`llama_model_quantize`, what `llama-quantize` runs), so its choices of per-tensor types
and fallbacks for widths its blocks do not divide are the ones llama.cpp users get.
For them, each layer's FFN width is padded with zero channels to a multiple of `QUANT_BLOCK`:
llama.cpp quantizes a tensor in blocks along its rows and leaves one whose row length the block
does not divide in f16, which a pruned width (the input of `ffn_down`) usually is. A zero row of
`ffn_gate` and `ffn_up` gives silu(0) * 0 = 0 on that channel, and a zero column of `ffn_down`
adds nothing, so the padded layer computes what the checkpoint's does (the verification checks
it); `deci.feed_forward_length` holds the padded widths, export.json both.

Verification (llama.cpp through `serving/llamacpp_runner.py`, CPU, float32 KV cache, no flash
attention -- its CPU kernel works in f16 and moved f32 log-probabilities by 0.0185 against 6.3e-5
without it on pruned SmolLM2, benchmarks/results/gguf-amd-2026-12-06.md -- so the
file, not the runtime's fast paths, is what is checked):
  tokens   llama.cpp's tokenizer gives transformers' ids on the prompts and a mixed text;
  every type: llama.cpp's distribution at every step of transformers' greedy continuation
           of each prompt (teacher-forced): KL(P_torch || P_llama.cpp), top-1 agreement, and
           the largest difference on the reference's top-5 log-probabilities, all recorded;
  f32/f16  that difference within the type's tolerance, and llama.cpp's own greedy tokens for
           `VERIFY_TOKENS` steps equal transformers' (float32), a parting only at a near-tie
           of the reference (as for vLLM), top-5 log-probabilities within it up to a parting;
  q8_0/q4_k_m  mean KL and top-1 agreement within the type's bounds; greedy agreement recorded.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from slimgpt_deploy.atomic import atomic_output_dir, check_output_dir
from slimgpt_deploy.checkpoint import read_config, safetensors_files, validate_checkpoint
from slimgpt_deploy.errors import BadInputError, CheckpointError, VerificationError
from slimgpt_deploy.families import SLIM_MODEL_TYPE, layout_of
from slimgpt_deploy.serving.llamacpp_runner import find_gguf

FORMAT = "gguf"
ARCH = "deci"
TYPES = ("f32", "f16", "q8_0", "q4_k_m")
QUANTIZED = ("q8_0", "q4_k_m")  # made by llama.cpp's quantizer from the f32 file
# FFN widths of quantized files are padded to this: the block of q8_0, q4_0, q5_0 (the fallback of the k-quants for
# rows 256 does not divide) and q5_1; rows it does not divide stay f16. Pruning with `--ffn-multiple 256` lets the
# k-quants themselves apply to ffn_down on models whose hidden size 256 divides.
QUANT_BLOCK = 32
DTYPE_ALIASES = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16"}
VERIFY_TOKENS = 32
TOP_K = 5
SUMMARY_FILE = "export.json"
# Text whose tokenization llama.cpp must reproduce: digits, runs of spaces, newlines, punctuation, non-ASCII.
TOKENIZER_CHECK = "Hello world!  It's 2026: 12345 apples\n\n\tcost $3.50 -- naïve café, 東京 ✓ 'quoted' (x+y)*2"


@dataclass(frozen=True)
class Tolerance:
    logprob_tol: float | None = None  # max |logprob_llama - logprob_torch| over the top-5 of every step
    tie_margin: float = 0.0  # a greedy parting at a smaller reference margin is a tie, not a mismatch
    kl_max: float | None = None  # quantized types: mean KL(P_torch || P_llama) per position
    top1_min: float | None = None  # quantized types: share of positions with the same argmax


# Measured (benchmarks/results/gguf.md): the bounds leave a margin over what two pruned
# SmolLM2-135M checkpoints and the tiny uneven checkpoint gave.
TOLERANCES = {
    "f32": Tolerance(logprob_tol=0.01, tie_margin=0.01),
    "f16": Tolerance(logprob_tol=0.25, tie_margin=0.1),
    "q8_0": Tolerance(kl_max=0.02, top1_min=0.9),
    "q4_k_m": Tolerance(kl_max=0.15, top1_min=0.8),
}


def file_name(ftype: str) -> str:
    return f"model-{ftype}.gguf"


def resolve_type(dtype: str | None, quantize: str | None) -> str:
    """The file type from --quantize (any of TYPES) or --dtype (fp32/fp16); f32 by default."""
    ftype = quantize or DTYPE_ALIASES.get(dtype or "", dtype) or "f32"
    if ftype not in TYPES:
        raise BadInputError(f"GGUF type {ftype!r} is not supported; choose one of: {', '.join(TYPES)}")
    if quantize and dtype and DTYPE_ALIASES.get(dtype, dtype) not in ("f32", quantize):
        raise BadInputError(f"--dtype {dtype} and --quantize {quantize} disagree; give one of them for GGUF")
    return ftype


def export(
    checkpoint: Path,
    out: Path,
    *,
    dtype: str | None = None,
    quantize: str | None = None,
    force: bool = False,
    verify: bool = True,
    ffn_padding: bool = True,
    log: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Write `checkpoint` as OUT/model-<type>.gguf for llama.cpp; verify it there before `out` appears.

    `ffn_padding=False` keeps the checkpoint's FFN widths in a quantized file (benchmarks/gguf_bench.py compares).
    """
    from slimgpt_deploy.serving.llamacpp_runner import require_llamacpp

    checkpoint, out = Path(checkpoint), Path(out)
    ftype = resolve_type(dtype, quantize)
    config = read_config(checkpoint)
    safetensors_files(checkpoint)
    if config.get("model_type") == SLIM_MODEL_TYPE:
        validate_checkpoint(checkpoint)
    check_output_dir(out, force)
    # every refusal (tokenizer, RoPE, shapes) before any writing
    plan = GGUFPlan.of(checkpoint, config, ffn_block=QUANT_BLOCK if ftype in QUANTIZED and ffn_padding else 1)
    runtime = require_llamacpp() if verify or ftype in QUANTIZED else None

    t0 = time.perf_counter()
    with atomic_output_dir(out, force=force) as tmp:
        target = tmp / file_name(ftype)
        if ftype in QUANTIZED:
            source = tmp / ".f32.gguf"
            log("writing f32 GGUF")
            write_gguf(plan, source, "f32")
            log(f"quantizing to {ftype} with llama.cpp's quantizer")
            from slimgpt_deploy.serving.llamacpp_runner import quantize as llama_quantize

            llama_quantize(source, target, ftype)
            source.unlink()
        else:
            log(f"writing {ftype} GGUF")
            write_gguf(plan, target, ftype)
        summary = {
            "format": FORMAT,
            "architecture": ARCH,
            "source": str(checkpoint),
            "type": ftype,
            "file": target.name,
            "bytes": target.stat().st_size,
            "layers": plan.layer_summary(),
            "tokenizer": {"model": plan.tokenizer.model, "pre": plan.tokenizer.pre},
            "llama_cpp": runtime.build if runtime else None,
            "run": f"llama-cli -m {out / target.name} -p 'Hello'",
            "verification": {"passed": None, "skipped": not verify},
        }
        if verify:
            log("verifying: llama.cpp vs transformers, tokenizer, greedy tokens and log-probabilities")
            report = verify_file(target, checkpoint, ftype)
            summary["verification"] = report
            if not report["passed"]:
                raise VerificationError(
                    f"GGUF export of {checkpoint} disagrees with transformers: {'; '.join(report['failures'])}"
                )
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------- what goes in the file


@dataclass
class Tokenizer:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style, byte fallback)
    pre: str | None  # tokenizer.ggml.pre: llama.cpp's name of the pre-tokenizer (gpt2 only)
    tokens: list[str]
    types: list[int]  # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    merges: list[str]  # gpt2 only
    special: dict[str, int]  # bos / eos / unk / pad -> id
    add_bos: bool
    chat_template: str | None
    scores: list[float] | None = None  # llama only: llama.cpp merges the adjacent pair whose token scores highest
    add_space_prefix: bool | None = None  # llama only: "▁" before the text, as the normalizer / Metaspace does


@dataclass
class GGUFPlan:
    checkpoint: Path
    config: dict
    q_heads: list[int]
    kv_heads: list[int]
    ffn: list[int]  # the checkpoint's FFN widths
    ffn_in_file: list[int]  # the file's: `ffn` padded with zero channels to the quantizer's block
    head_dim: int
    rope_theta: float
    rope_freqs: np.ndarray | None  # Llama-3 scaling: [head_dim / 2] divisors
    tokenizer: Tokenizer

    @classmethod
    def of(cls, checkpoint: Path, config: dict, ffn_block: int = 1) -> GGUFPlan:
        n = config["num_hidden_layers"]
        q = config.get("num_attention_heads_per_layer") or [config["num_attention_heads"]] * n
        kv_default = config.get("num_key_value_heads") or config["num_attention_heads"]
        kv = config.get("num_key_value_heads_per_layer") or [kv_default] * n
        ffn = config.get("intermediate_size_per_layer") or [config["intermediate_size"]] * n
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        theta, freqs = _rope(config, head_dim)
        _check_heads(checkpoint, q, kv, head_dim)
        padded = [-(-f // ffn_block) * ffn_block for f in ffn]
        tokenizer = read_tokenizer(checkpoint, config)
        return cls(checkpoint, config, q, kv, ffn, padded, head_dim, theta, freqs, tokenizer)

    def layer_summary(self) -> list[dict]:
        return [
            {"q_heads": q, "kv_heads": kv, "ffn": f, "ffn_in_file": p}
            for q, kv, f, p in zip(self.q_heads, self.kv_heads, self.ffn, self.ffn_in_file)
        ]


def _rope(config: dict, head_dim: int) -> tuple[float, np.ndarray | None]:
    """RoPE base and, for Llama-3 scaling, llama.cpp's per-frequency divisors; other scalings are refused."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise BadInputError(
            f"RoPE scaling {kind!r} has no GGUF mapping here (default and llama3 do); export to ONNX or vLLM instead"
        )
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    context = params["original_max_position_embeddings"]
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((context / wavelen - low) / (high - low), 0.0, 1.0)
    # Long waves are slowed by `factor`, short ones kept, the band between blended (transformers' llama3 rule).
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return theta, (inv_freq / scaled).astype(np.float32)


# llama.cpp's pre-tokenizer names for the byte-level BPE tokenizers of the supported families.
# Llama 3 and Qwen2 split alike, but for digits: in threes (Llama 3) or one by one (Qwen2).
_SPLIT_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_SPLIT_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = _SPLIT_WORDS + r"\p{N}{1,3}" + _SPLIT_REST
QWEN2_SPLIT = _SPLIT_WORDS + r"\p{N}" + _SPLIT_REST


def _pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, or BadInputError naming what is unknown."""
    steps = (spec or {}).get("pretokenizers") if (spec or {}).get("type") == "Sequence" else [spec] if spec else []
    kinds = [s.get("type") for s in steps]
    splits = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    digits = any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps)
    byte_regex = any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps)
    if kinds == ["ByteLevel"] and byte_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and digits and byte_regex:
        return "smollm"  # SmolLM / SmolLM2: every digit alone, then GPT-2's split
    if splits == [LLAMA3_SPLIT] and not byte_regex:
        return "llama-bpe"
    if splits == [QWEN2_SPLIT] and not byte_regex:
        return "qwen2"
    raise BadInputError(
        f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has no llama.cpp name known here "
        "(GPT-2, SmolLM, Llama-3 and Qwen2 byte-level BPE are); export to ONNX or vLLM instead"
    )


def read_tokenizer(checkpoint: Path, config: dict) -> Tokenizer:
    """The checkpoint's byte-level BPE tokenizer as GGUF metadata; BadInputError for any other kind."""
    from transformers import AutoTokenizer

    file = checkpoint / "tokenizer.json"
    if not file.is_file():
        raise BadInputError(f"{checkpoint} has no tokenizer.json; GGUF needs the tokenizer's vocab and merges")
    spec = json.loads(file.read_text())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise BadInputError(
            f"the tokenizer is {model.get('type')}; GGUF export carries BPE tokenizers (byte-level: Llama 3, "
            "Qwen2, SmolLM; SentencePiece-style with byte fallback: Llama 2, Mistral) only"
        )
    spm = bool(model.get("byte_fallback"))
    pre = None if spm else _pre_tokenizer(spec.get("pre_tokenizer"))
    space_prefix = _space_prefix(spec) if spm else None
    vocab_size = config["vocab_size"]
    tokens: list[str | None] = [None] * vocab_size
    types = [5] * vocab_size  # unused until filled
    for token, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = token, 1
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]], types[added["id"]] = added["content"], 3 if added.get("special") else 4
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise BadInputError(f"{file} has no BPE merges; llama.cpp's BPE tokenizers need them")
    scores = None
    if spm:
        # llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined token scores highest;
        # a token's score is minus the rank of the merge that makes it, so merges run in BPE's order.
        scores = [0.0] * vocab_size
        for rank, merge in enumerate(merges):
            i = model["vocab"].get(merge.replace(" ", "", 1))
            if i is not None and i < vocab_size:
                scores[i] = -float(rank)
        for token, i in model["vocab"].items():
            if i < vocab_size and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                types[i] = 6  # a byte of the fallback
        unk = model.get("unk_token")
        if unk in model["vocab"] and model["vocab"][unk] < vocab_size:
            types[model["vocab"][unk]] = 2

    hf = AutoTokenizer.from_pretrained(checkpoint)
    special = {
        name: getattr(hf, f"{name}_token_id")
        for name in ("bos", "eos", "unk", "pad")
        if getattr(hf, f"{name}_token_id", None) is not None
    }
    if "eos" not in special and config.get("eos_token_id") is not None:
        eos = config["eos_token_id"]
        special["eos"] = eos[0] if isinstance(eos, list) else eos
    probe = hf("a").input_ids
    add_bos = "bos" in special and bool(probe) and probe[0] == special["bos"]
    template = getattr(hf, "chat_template", None)
    template = template if isinstance(template, str) else None
    if spm:
        return Tokenizer("llama", None, tokens, types, [], special, add_bos, template, scores, space_prefix)
    return Tokenizer("gpt2", pre, tokens, types, merges, special, add_bos, template)


def _space_prefix(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" before the text; BadInputError for a layout llama.cpp lacks.

    Two layouts map to llama.cpp's: a normalizer that prepends "▁" and replaces spaces with it (Llama 2), or a
    Metaspace pre-tokenizer (newer conversions, Mistral), prepending unless its scheme is "never".
    """
    norm, pre = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm] if norm else []
    kinds = [s.get("type") for s in steps]
    if kinds in (["Prepend", "Replace"], ["Replace"]) and not pre:
        return kinds[0] == "Prepend"
    if pre.get("type") == "Metaspace" and not steps:
        return pre.get("prepend_scheme", "always") != "never"
    raise BadInputError(
        f"the SentencePiece-style tokenizer's normalizer ({' + '.join(map(str, kinds)) or 'none'}) and "
        f"pre-tokenizer ({pre.get('type') or 'none'}) have no llama.cpp equivalent known here; export to ONNX or vLLM"
    )


# ---------------------------------------------------------------- writing


def load_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = {}
    for file in safetensors_files(checkpoint):
        weights.update(load_file(file))
    return weights


def rope_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a Q/K projection (or bias) per head from [half 0 | half 1] (rotate_half) to interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# llama.cpp's tensor names for a decoder layer: its norms, then its projections by role (layout.py), per block.
GGUF_BLOCK = (
    ("attention_norm", "attn_norm", ("q", "k", "v", "o")),
    ("mlp_norm", "ffn_norm", ("gate", "up", "down")),
)
GGUF_PROJECTIONS = {
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "o": "attn_output",
    "gate": "ffn_gate",
    "up": "ffn_up",
    "down": "ffn_down",
}


def pad_ffn(role: str, t: np.ndarray, width: int) -> np.ndarray:
    """An MLP tensor with zero channels appended up to `width`: rows of gate/up (and their biases), columns of down."""
    axis = 1 if role == "down" else 0
    if role not in ("gate", "up", "down") or t.ndim <= axis or t.shape[axis] == width:
        return t  # not an MLP tensor, down's bias (hidden-sized), or already that wide
    pad = [(0, 0)] * t.ndim
    pad[axis] = (0, width - t.shape[axis])
    return np.pad(t, pad)


def gguf_tensors(plan: GGUFPlan) -> dict[str, np.ndarray]:
    """Every tensor of the file, float32, in transformers' [out, in] layout (gguf reverses the dims)."""
    L = layout_of(plan.config)
    weights = load_weights(plan.checkpoint)
    f32 = lambda name: weights.pop(name).float().numpy()  # noqa: E731
    out = {"token_embd.weight": f32(f"{L.embed}.weight")}
    for i, (q, kv, ffn) in enumerate(zip(plan.q_heads, plan.kv_heads, plan.ffn_in_file)):
        p, b = L.layer_prefix(i), f"blk.{i}."
        rope_heads = {"q": q, "k": kv}  # llama.cpp rotates interleaved pairs of Q and K (rows and biases)
        for norm, norm_name, roles in GGUF_BLOCK:
            out[f"{b}{norm_name}.weight"] = f32(f"{p}{getattr(L, norm)}.weight")
            for role in roles:
                kinds = ("weight", "bias") if p + L.tensor(role, "bias") in weights else ("weight",)
                for kind in kinds:
                    t = pad_ffn(role, f32(p + L.tensor(role, kind)), ffn)
                    out[f"{b}{GGUF_PROJECTIONS[role]}.{kind}"] = (
                        rope_permute(t, rope_heads[role]) if role in rope_heads else t
                    )
    out["output_norm.weight"] = f32(f"{L.norm}.weight")
    head = f"{L.head}.weight"
    if head in weights and not plan.config.get("tie_word_embeddings"):
        out["output.weight"] = f32(head)
    weights.pop(head, None)
    if plan.rope_freqs is not None:
        out["rope_freqs.weight"] = plan.rope_freqs
    if weights:
        raise CheckpointError(f"{plan.checkpoint}: tensors with no GGUF place: {', '.join(sorted(weights)[:5])}")
    return out


def _check_heads(checkpoint: Path, q_heads: list[int], kv_heads: list[int], head_dim: int) -> None:
    """Refuse a layer whose projections do not hold whole heads of the model's one head size (headers only)."""
    from slimgpt_deploy.checkpoint import read_safetensors_header

    shapes = {
        name: info["shape"] for f in safetensors_files(checkpoint) for name, info in read_safetensors_header(f).items()
    }
    L = layout_of(read_config(checkpoint))
    for i, (q, kv) in enumerate(zip(q_heads, kv_heads)):
        for role, heads in (("q", q), ("k", kv), ("v", kv)):
            rows = shapes[L.layer_prefix(i) + L.tensor(role)][0]
            if rows != heads * head_dim:
                raise BadInputError(
                    f"layer {i}: {L.projections[role]} has {rows} rows, not {heads} heads of size {head_dim}; "
                    "llama.cpp's deci "
                    "architecture needs one head size in every layer"
                )


def write_gguf(plan: GGUFPlan, path: Path, ftype: str) -> None:
    """Write the plan as a GGUF file of type f32 or f16 (2-D weights in f16, everything else f32)."""
    import gguf

    c, tok = plan.config, plan.tokenizer
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_name(c.get("_name_or_path") or plan.checkpoint.name)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(plan.ffn_in_file)
    w.add_head_count(plan.q_heads)
    w.add_head_count_kv(plan.kv_heads)
    w.add_key_length(plan.head_dim)
    w.add_value_length(plan.head_dim)
    w.add_rope_dimension_count(plan.head_dim)
    w.add_rope_freq_base(plan.rope_theta)
    w.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
    w.add_vocab_size(c["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if ftype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model(tok.model)
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.types)
    if tok.model == "llama":
        w.add_token_scores(tok.scores)
        w.add_add_space_prefix(tok.add_space_prefix)
    else:
        w.add_tokenizer_pre(tok.pre)
        w.add_token_merges(tok.merges)
    setters = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id}
    for name, token_id in tok.special.items():
        setters.get(name, w.add_pad_token_id)(token_id)
    w.add_add_bos_token(tok.add_bos)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    for name, array in gguf_tensors(plan).items():
        half = ftype == "f16" and array.ndim == 2
        w.add_tensor(name, array.astype(np.float16) if half else array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------- verification


def verify(export_dir: Path, checkpoint: Path, *, log: Callable[[str], None] = lambda msg: None) -> dict:
    """llama.cpp on the export in `export_dir` vs transformers on `checkpoint`; never raises on a mismatch."""
    from slimgpt_deploy.serving.llamacpp_runner import require_llamacpp

    export_dir = Path(export_dir)
    summary = export_dir / SUMMARY_FILE
    ftype = json.loads(summary.read_text()).get("type") if summary.is_file() else None
    if ftype not in TYPES:
        raise BadInputError(f"{export_dir} has no GGUF export summary ({SUMMARY_FILE}); export it again")
    require_llamacpp()
    path = find_gguf(export_dir)
    log(f"verifying {path} ({ftype}) in llama.cpp against {checkpoint} in transformers")
    return verify_file(path, Path(checkpoint), ftype)


def verify_file(path: Path, checkpoint: Path, ftype: str, prompts=None, max_tokens: int = VERIFY_TOKENS) -> dict:
    """Compare llama.cpp on `path` with transformers (float32) on `checkpoint`; a report with every failure."""
    from slimgpt_deploy.reference import VERIFY_PROMPTS, greedy_reference, load_reference
    from slimgpt_deploy.serving.llamacpp_runner import LlamaCpp, log_softmax

    from .vllm import Tolerance as GreedyTolerance
    from .vllm import compare_greedy

    tol = TOLERANCES[ftype]
    model, tokenizer = load_reference(checkpoint, torch.float32)
    texts = list(prompts or VERIFY_PROMPTS)
    prompt_ids = [tokenizer(p).input_ids for p in texts]
    want = greedy_reference(model, prompt_ids, max_tokens)
    del model
    failures, prompts_report = [], []
    n_ctx = max(len(p) for p in prompt_ids) + max_tokens + 8
    with LlamaCpp(path, n_ctx=max(n_ctx, 128), threads=2, kv_type="f32", flash_attn=False) as llm:
        token_mismatch = [t for t in [*texts, TOKENIZER_CHECK] if llm.tokenize(t) != tokenizer(t).input_ids]
        if token_mismatch:
            failures.append(f"llama.cpp tokenizes {token_mismatch[0]!r} differently from transformers")
        kls, agree, diffs = [], [], []
        greedy_tol = GreedyTolerance(logprob_tol=tol.logprob_tol or 0.0, tie_margin=tol.tie_margin)
        for i, (ids, w) in enumerate(zip(prompt_ids, want)):
            # The distribution at every step of the reference's own continuation, teacher-forced.
            full = ids + w.token_ids
            got = log_softmax(llm.logits(full)[len(ids) - 1 : len(full) - 1])  # [steps, vocab]
            ref = w.logprobs.numpy()
            kl = (np.exp(ref.astype(np.float64)) * (ref - got)).sum(axis=-1)
            top = np.argsort(-ref, axis=-1)[:, :TOP_K]  # the reference's top-5 of every step
            diff = float(np.abs(np.take_along_axis(got, top, -1) - np.take_along_axis(ref, top, -1)).max())
            kls += kl.tolist()
            agree += (got.argmax(-1) == ref.argmax(-1)).tolist()
            diffs.append(diff)
            got_ids, got_lp = llm.greedy(ids, max_tokens)
            record = {"tokens_equal": got_ids == w.token_ids, "kl_mean": float(f"{kl.mean():.3g}")}
            if tol.logprob_tol is not None:
                top_dicts = [dict(zip(*_top_k(lp))) for lp in got_lp]
                record |= compare_greedy(got_ids, top_dicts, w.token_ids, w.logprobs, greedy_tol, engine="llama.cpp")
                record["teacher_forced_max_logprob_diff"] = float(f"{diff:.3g}")
                if record["failure"]:
                    failures.append(f"prompt {i}: {record['failure']}")
                elif diff > tol.logprob_tol:
                    failures.append(f"prompt {i}: teacher-forced top-{TOP_K} log-probability differs by {diff:.3g}")
            prompts_report.append(record)
    kl_mean, top1 = float(np.mean(kls)), float(np.mean(agree))
    report = {
        "dtype": ftype,
        "tolerance": asdict(tol),
        "prompts": prompts_report,
        "max_logprob_diff": float(f"{max(diffs):.3g}"),  # teacher-forced, the reference's top-5 of every step
        "kl_mean": float(f"{kl_mean:.3g}"),
        "top1_agreement": round(top1, 4),
        "greedy_tokens_equal": sum(r["tokens_equal"] for r in prompts_report),
    }
    if not np.isfinite(kl_mean):
        failures.append("llama.cpp's log-probabilities are not finite")
    elif tol.kl_max is not None and kl_mean > tol.kl_max:
        failures.append(f"mean KL(torch || llama.cpp) {kl_mean:.4g} > {tol.kl_max}")
    if tol.top1_min is not None and top1 < tol.top1_min:
        failures.append(f"top-1 agreement {top1:.3f} < {tol.top1_min}")
    report["tokenizer_equal"] = not token_mismatch
    return {"passed": not failures, **report, "failures": failures}


def _top_k(logprobs: np.ndarray, k: int = TOP_K) -> tuple[list[int], list[float]]:
    top = np.argsort(-logprobs)[:k]
    return [int(t) for t in top], [float(logprobs[t]) for t in top]
