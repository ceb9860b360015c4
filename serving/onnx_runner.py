"""ONNX Runtime back end: run an export of `slimgpt-deploy export --format onnx`.

The export directory holds `model.onnx` (one decoder graph with a KV cache, see
`exporters/onnx_model.py` for its inputs and outputs), the tokenizer files and
`slimgpt_onnx.json`, which describes every layer's cache (KV heads, head size,
dtype, I/O names). The runner reads that JSON to allocate the cache and checks
it against the graph before running anything.

Generation (`OnnxDecoder.generate_ids`):
  - prompts of different lengths are left-padded into one batch; position ids count
    real tokens only, so a padded row computes exactly what it would alone;
  - prefill runs the whole prompt against an empty cache (P = 0), then one token per
    step against the cache;
  - the cache is preallocated for prompt + new tokens and bound through I/O binding, so no
    cache memory is allocated or copied by Python after prefill. An export whose attention is
    ONNX Runtime's GroupQueryAttention (the fused graph since 2026-12-06; `"in_place": true` in
    the JSON's cache section) gets one buffer of the full length per tensor, bound as both past
    and present: each step's keys and values are written in place (`_InPlaceCache`). Other
    graphs (--no-fuse, older fused exports) concatenate: two flat buffers per tensor, step t
    reads `past` from one and ONNX Runtime writes `present` (= past + new token, contiguous
    [B, kv, P+1, D]) into the other (`_PingPongCache`);
  - greedy (temperature 0) or temperature + top-p sampling with a seeded NumPy RNG;
    each row stops at an EOS token; `on_token` streams.
CUDAExecutionProvider is used when onnxruntime-gpu provides it, else the CPU one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimgpt_deploy.errors import BadInputError, CheckpointError
from slimgpt_deploy.extras import major_minor, require

logger = logging.getLogger(__name__)

SPEC_FILE = "slimgpt_onnx.json"
SPEC_FORMAT = "slimgpt-deploy/onnx-1"
MODEL_FILE = "model.onnx"
INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")
LOGITS = "logits"
NP_DTYPES = {"float32": np.float32, "float16": np.float16}
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}
# The first onnxruntime release that runs each kind of export (benchmarks/ort_floor.py: 1.20.1 runs the
# opset-18 fp32 graph; 1.21.1 has only 4-bit MatMulNBits, 1.22.1 runs the int8 one; 1.22.1 refuses opset
# 23's IR version 11, 1.23.2 runs it; docs/DESIGN.md, "ONNX export").
MIN_ORT = {"opset 18": (1, 20), "int8 (8-bit MatMulNBits)": (1, 22), "opset 23": (1, 23)}


# --- the cache description (written by the exporter, read here) -----------------------------


@dataclass(frozen=True)
class CacheLayer:
    """One decoder layer's cache: [batch, kv_heads, sequence, head_dim] for key and value."""

    index: int
    q_heads: int
    kv_heads: int

    @property
    def past_names(self) -> tuple[str, str]:
        return (f"past_key_values.{self.index}.key", f"past_key_values.{self.index}.value")

    @property
    def present_names(self) -> tuple[str, str]:
        return (f"present.{self.index}.key", f"present.{self.index}.value")


@dataclass(frozen=True)
class OnnxSpec:
    """What a runner needs to know about an export without reading the graph."""

    model_file: str
    dtype: str  # activations, logits and cache: "float32" | "float16"
    weights: str  # "fp32" | "fp16" | "int8 ..." (informational)
    head_dim: int
    vocab_size: int
    max_positions: int
    layers: tuple[CacheLayer, ...]
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    opset: int
    in_place_cache: bool = False  # past and present may share one buffer of max length (GroupQueryAttention)

    @property
    def np_dtype(self):
        return NP_DTYPES[self.dtype]

    @property
    def past_names(self) -> list[str]:
        return [n for layer in self.layers for n in layer.past_names]

    @property
    def present_names(self) -> list[str]:
        return [n for layer in self.layers for n in layer.present_names]

    def cache_bytes_per_token(self) -> int:
        """Bytes of KV cache one token adds (all layers, key and value)."""
        return sum(2 * layer.kv_heads * self.head_dim for layer in self.layers) * np.dtype(self.np_dtype).itemsize

    def to_json(self) -> dict:
        return {
            "format": SPEC_FORMAT,
            "model_file": self.model_file,
            "opset": self.opset,
            "dtype": self.dtype,
            "weights": self.weights,
            "num_layers": len(self.layers),
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_positions,
            "eos_token_ids": list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
            "inputs": {
                "input_ids": {"dtype": "int64", "shape": ["batch", "sequence"]},
                "attention_mask": {"dtype": "int64", "shape": ["batch", "past_sequence + sequence"]},
                "position_ids": {"dtype": "int64", "shape": ["batch", "sequence"]},
            },
            "outputs": {"logits": {"dtype": self.dtype, "shape": ["batch", "sequence", self.vocab_size]}},
            "cache": {
                "dtype": self.dtype,
                "layout": ["batch", "kv_heads", "sequence", "head_dim"],
                "in_place": self.in_place_cache,
                "bytes_per_token": self.cache_bytes_per_token(),
                "layers": [
                    {
                        "layer": layer.index,
                        "num_attention_heads": layer.q_heads,
                        "num_key_value_heads": layer.kv_heads,
                        "past_shape": ["batch", layer.kv_heads, "past_sequence", self.head_dim],
                        "present_shape": ["batch", layer.kv_heads, "past_sequence + sequence", self.head_dim],
                        "inputs": list(layer.past_names),
                        "outputs": list(layer.present_names),
                    }
                    for layer in self.layers
                ],
            },
        }

    @classmethod
    def from_json(cls, data: dict) -> "OnnxSpec":
        """Parse the JSON; raise KeyError/TypeError/ValueError on a malformed one."""
        if data.get("format") != SPEC_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {SPEC_FORMAT!r}")
        layers = tuple(
            CacheLayer(
                index=int(e["layer"]), q_heads=int(e["num_attention_heads"]), kv_heads=int(e["num_key_value_heads"])
            )
            for e in data["cache"]["layers"]
        )
        if [layer.index for layer in layers] != list(range(len(layers))) or len(layers) != int(data["num_layers"]):
            raise ValueError("cache.layers must list layers 0..num_layers-1 in order")
        for layer in layers:
            expected = {"inputs": list(layer.past_names), "outputs": list(layer.present_names)}
            entry = data["cache"]["layers"][layer.index]
            if any(entry.get(k) != v for k, v in expected.items()):
                raise ValueError(
                    f"layer {layer.index}: I/O names {entry.get('inputs')}/{entry.get('outputs')}, expected {expected}"
                )
        dtype = data["dtype"]
        if dtype not in NP_DTYPES or data["cache"]["dtype"] != dtype:
            raise ValueError(
                f"dtype {dtype!r} / cache dtype {data['cache']['dtype']!r}; expected one of {list(NP_DTYPES)}"
            )
        return cls(
            model_file=str(data["model_file"]),
            dtype=dtype,
            weights=str(data.get("weights", dtype)),
            head_dim=int(data["head_dim"]),
            vocab_size=int(data["vocab_size"]),
            max_positions=int(data["max_position_embeddings"]),
            layers=layers,
            eos_token_ids=tuple(int(t) for t in data["eos_token_ids"]),
            pad_token_id=int(data["pad_token_id"]),
            opset=int(data["opset"]),
            in_place_cache=_flag(data["cache"].get("in_place", False), "cache.in_place"),  # absent before 2026-12-06
        )


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} is {value!r}, expected true or false")
    return value


def resolve_dir(model: Path) -> Path:
    """An export directory, or the model.onnx inside one."""
    model = Path(model)
    if model.is_file() and model.suffix == ".onnx":
        return model.parent
    if not model.is_dir():
        raise BadInputError(
            f"ONNX export {model} does not exist; pass a directory written by `slimgpt-deploy export --format onnx`"
        )
    return model


def load_spec(directory: Path) -> OnnxSpec:
    """Read `slimgpt_onnx.json`; raise CheckpointError saying how to fix a missing or malformed one."""
    path = Path(directory) / SPEC_FILE
    redo = "re-export it with `slimgpt-deploy export CHECKPOINT --format onnx --out DIR --force`"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {SPEC_FILE} (the cache description); {redo}")
    try:
        return OnnxSpec.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is malformed ({type(err).__name__}: {err}); {redo}") from err


def check_spec(spec: OnnxSpec, session) -> list[str]:
    """Every way the graph's inputs/outputs disagree with the JSON (empty when consistent)."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    problems = []
    want_in = list(INPUT_NAMES) + spec.past_names
    want_out = [LOGITS] + spec.present_names
    if sorted(inputs) != sorted(want_in):
        problems.append(f"graph inputs {_diff(inputs, want_in)}")
    if sorted(outputs) != sorted(want_out):
        problems.append(f"graph outputs {_diff(outputs, want_out)}")
    for layer in spec.layers:
        for name in layer.past_names + layer.present_names:
            node = inputs.get(name) or outputs.get(name)
            if node is None:
                continue
            shape, dtype = node.shape, ORT_TYPES.get(node.type, node.type)
            if len(shape) != 4 or shape[1] != layer.kv_heads or shape[3] != spec.head_dim:
                problems.append(f"{name} has shape {shape}, JSON says [batch, {layer.kv_heads}, seq, {spec.head_dim}]")
            if dtype != spec.dtype:
                problems.append(f"{name} is {dtype}, JSON says {spec.dtype}")
    logits = outputs.get(LOGITS)
    if logits is not None and (logits.shape[-1] != spec.vocab_size or ORT_TYPES.get(logits.type) != spec.dtype):
        problems.append(f"logits is {logits.type} {logits.shape}, JSON says {spec.dtype} [.., {spec.vocab_size}]")
    return problems


def _diff(have: dict, want: list[str]) -> str:
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    return (
        f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
        f"unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}"
    )


# --- sampling (pure functions over NumPy arrays) ---------------------------------------------


def next_tokens(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> np.ndarray:
    """Pick one token per row of `logits` [B, V]: greedy when temperature == 0, else top-p sampling."""
    if temperature == 0:
        return logits.argmax(-1).astype(np.int64)  # [B]
    z = logits.astype(np.float64) / temperature
    z -= z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)  # [B, V]
    if top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")  # [B, V]
        sorted_p = np.take_along_axis(p, order, -1)
        keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < top_p  # the smallest prefix reaching top_p (>= 1 token)
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    u = rng.random((p.shape[0], 1))  # [B, 1]
    return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1).astype(np.int64)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """ids, mask: [B, S] int64, prompts right-aligned (left padding), mask 1 on real tokens."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
    return ids, mask


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids [B, S] from a left-padded mask: real tokens count from 0, pads get 0."""
    return np.maximum(mask.cumsum(-1) - 1, 0).astype(np.int64)


# --- the session -----------------------------------------------------------------------------


def default_providers() -> list[str]:
    ort = require("onnxruntime")
    available = ort.get_available_providers()
    return (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if "CUDAExecutionProvider" in available
        else ["CPUExecutionProvider"]
    )


class OnnxDecoder:
    """An ONNX Runtime session over one export, checked against its cache description."""

    def __init__(
        self,
        directory: Path,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        in_place: bool = True,
    ):
        """`in_place=False` binds the cache as a concatenating graph needs it even where the export allows writing
        it in place (what benchmarks/onnx_interleaved.py compares)."""
        ort = require("onnxruntime")
        self.directory = resolve_dir(directory)
        self.spec = load_spec(self.directory)
        check_runtime(ort.__version__, self.spec.opset, self.spec.weights)
        path = self.directory / self.spec.model_file
        if not path.is_file():
            raise CheckpointError(f"{self.directory} has no {self.spec.model_file}; re-export it with --force")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=options, providers=list(providers or default_providers())
            )
        except Exception as err:  # onnxruntime raises its own types (Fail, InvalidGraph, NotImplemented, ...)
            raise _load_error(path, self.spec, err) from err
        problems = check_spec(self.spec, self.session)
        if problems:
            raise CheckpointError(
                f"{SPEC_FILE} does not match {self.spec.model_file} in {self.directory}: {'; '.join(problems)}; "
                "re-export with `slimgpt-deploy export ... --force` instead of editing either file"
            )
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        # In place on the CPU provider only (where it is measured and tested): under CUDA an fp32
        # GroupQueryAttention node may fall back to the CPU provider, and a node fed copies of the buffers can no
        # longer share them.
        self.in_place = in_place and self.spec.in_place_cache and self.device == "cpu"
        logger.info("ONNX Runtime session on %s (%s), %d layers", self.device, self.spec.weights, len(self.spec.layers))

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [
            np.zeros((batch, layer.kv_heads, 0, self.spec.head_dim), dtype=self.spec.np_dtype)
            for layer in self.spec.layers
            for _ in range(2)
        ]

    def bound_cache(self, batch: int, max_len: int) -> "_BoundCache":
        """A KV cache for `max_len` positions bound to this session (in place when `self.in_place`):
        `.step(ids, mask, positions)` runs one forward."""
        return (_InPlaceCache if self.in_place else _PingPongCache)(self, batch, max_len)

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One plain (unbound) run: logits [B, S, V] and the present cache (per layer key, value)."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feeds.update(zip(self.spec.past_names, past))
        logits, *present = self.session.run([LOGITS] + self.spec.present_names, feeds)
        return logits, present

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        eos_token_ids: Sequence[int] | None = None,
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[list[int]]:
        """Complete every prompt (token ids); returns the new ids of each, EOS excluded.

        `eos_token_ids=None` uses the export's; pass `()` to always produce max_new_tokens.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise BadInputError("every prompt needs at least one token")
        eos = set(self.spec.eos_token_ids if eos_token_ids is None else eos_token_ids)
        ids, mask = left_pad(prompts, self.spec.pad_token_id)
        B, S = ids.shape
        if S + max_new_tokens > self.spec.max_positions:
            raise BadInputError(
                f"prompt ({S} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"{self.spec.max_positions} positions; shorten the prompt or lower --max-new-tokens"
            )
        rng = np.random.default_rng(seed)
        cache = self.bound_cache(B, S + max_new_tokens)
        lengths = mask.sum(-1)  # [B] real tokens so far
        pos = positions(mask)
        out: list[list[int]] = [[] for _ in range(B)]
        done = np.zeros(B, dtype=bool)
        for step in range(max_new_tokens):
            logits = cache.step(ids, mask, pos)  # [B, S, V]
            token = next_tokens(logits[:, -1].astype(np.float32), temperature, top_p, rng)  # [B]
            for row in np.flatnonzero(~done):
                t = int(token[row])
                if t in eos:
                    done[row] = True
                    continue
                out[row].append(t)
                if on_token is not None:
                    on_token(int(row), t)
            if done.all() or step == max_new_tokens - 1:
                break
            ids = token[:, None]  # [B, 1]
            pos = lengths[:, None].astype(np.int64)  # [B, 1]
            lengths = lengths + 1
            mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], axis=1)  # [B, T+1]
        return out


def check_runtime(version: str, opset: int, weights: str) -> None:
    """BadInputError when onnxruntime `version` is older than the first release that runs an export of this
    opset and weights (OnnxSpec.weights: "fp32", "int8 weight-only (MatMulNBits bits=8 ...)", ...)."""
    needs = [f"opset {opset}"] + (["int8 (8-bit MatMulNBits)"] if "MatMulNBits bits=8" in weights else [])
    for need in needs:
        floor = MIN_ORT.get(need, (0,))
        if major_minor(version) < floor:
            hint = "; or re-export with --no-fuse (opset 18)" if need == "opset 23" else ""
            raise BadInputError(
                f"onnxruntime {version} cannot run this export ({need}): "
                f"install onnxruntime >= {'.'.join(map(str, floor))}{hint}"
            )


def _load_error(path: Path, spec: OnnxSpec, err: Exception) -> BadInputError:
    """A runtime that lacks fp16 kernels is a wrong choice of dtype; anything else, a broken file."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if spec.dtype == "float16" and "NOT_IMPLEMENTED" in first.upper().replace(" ", "_"):
        return BadInputError(
            f"this onnxruntime ({', '.join(default_providers())}) cannot run the fp16 graph {path} ({first}); "
            "export with --dtype fp32 or --quantize int8, or install onnxruntime-gpu"
        )
    if "Unsupported model IR version" in first:  # older exports carry the onnx package's newest IR version
        return BadInputError(f"ONNX Runtime cannot load {path}: {first}; re-export it or upgrade onnxruntime")
    return CheckpointError(f"ONNX Runtime cannot load {path}: {first}; re-export it with --force")


class _BoundCache:
    """The KV cache of one generate_ids call, preallocated for `max_len` positions and bound through I/O binding."""

    def __init__(self, decoder: OnnxDecoder, batch: int, max_len: int):
        spec = decoder.spec
        self.decoder, self.max_len = decoder, max_len
        self.np_dtype = spec.np_dtype
        self.binding = decoder.session.io_binding()
        self.shapes = [(batch, layer.kv_heads, spec.head_dim) for layer in spec.layers for _ in range(2)]
        self.past_len = 0
        self.logits = None

    def _buffer(self, elements: int):
        ort = require("onnxruntime")
        return ort.OrtValue.ortvalue_from_shape_and_type([elements], self.np_dtype, self.decoder.device, 0)

    def _bind_cache(self, total: int) -> None:
        raise NotImplementedError

    def step(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Run one forward over `ids` [B, S]; returns logits [B, S, V] (a host array reused by decode steps)."""
        spec, binding = self.decoder.spec, self.binding
        B, S = ids.shape
        total = self.past_len + S
        assert mask.shape == (B, total) and total <= self.max_len, (mask.shape, B, total, self.max_len)
        self._inputs = [np.ascontiguousarray(a) for a in (ids, mask, pos)]  # alive until the run ends
        for name, array in zip(INPUT_NAMES, self._inputs):
            binding.bind_cpu_input(name, array)
        self._bind_cache(total)
        if self.logits is None or self.logits.shape != (B, S, spec.vocab_size):
            self.logits = np.empty((B, S, spec.vocab_size), dtype=self.np_dtype)
        binding.bind_output(LOGITS, "cpu", 0, self.np_dtype, list(self.logits.shape), self.logits.ctypes.data)
        self.decoder.session.run_with_iobinding(binding)
        self.past_len = total
        return self.logits


class _PingPongCache(_BoundCache):
    """Two flat device buffers per cache tensor; each step reads one and ONNX Runtime writes past + new into the
    other (graphs whose attention concatenates: --no-fuse, fused exports before 2026-12-06)."""

    def __init__(self, decoder: OnnxDecoder, batch: int, max_len: int):
        super().__init__(decoder, batch, max_len)
        self.buffers = [[self._buffer(b * kv * max_len * d) for _ in range(2)] for b, kv, d in self.shapes]
        self.parity = 0

    def _bind_cache(self, total: int) -> None:
        spec, binding, device = self.decoder.spec, self.binding, self.decoder.device
        src, dst = self.parity, 1 - self.parity
        for (b, kv, d), bufs, past, present in zip(self.shapes, self.buffers, spec.past_names, spec.present_names):
            binding.bind_input(past, device, 0, self.np_dtype, [b, kv, self.past_len, d], bufs[src].data_ptr())
            binding.bind_output(present, device, 0, self.np_dtype, [b, kv, total, d], bufs[dst].data_ptr())
        self.parity = dst


class _InPlaceCache(_BoundCache):
    """One device buffer [B, kv, max_len, D] per cache tensor, bound as both past and present: GroupQueryAttention
    reads positions < seqlens_k + 1 - S and writes the S new ones in place (ONNX Runtime's shared-buffer mode)."""

    def __init__(self, decoder: OnnxDecoder, batch: int, max_len: int):
        super().__init__(decoder, batch, max_len)
        self.buffers = [self._buffer(b * kv * max_len * d) for b, kv, d in self.shapes]
        spec, device = decoder.spec, decoder.device
        for (b, kv, d), buf, past, present in zip(self.shapes, self.buffers, spec.past_names, spec.present_names):
            shape = [b, kv, max_len, d]
            self.binding.bind_input(past, device, 0, self.np_dtype, shape, buf.data_ptr())
            self.binding.bind_output(present, device, 0, self.np_dtype, shape, buf.data_ptr())

    def _bind_cache(self, total: int) -> None:
        pass  # bound once: the lengths come from attention_mask


# --- the `generate` back-end contract (serving/__init__.py) ----------------------------------


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load the tokenizer saved in {directory}: {err}; re-export with --force") from err


def generate(
    model: Path,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    on_text: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Complete each prompt with the ONNX export in `model`; returns completions without the prompt."""
    decoder = OnnxDecoder(model)
    tokenizer = load_tokenizer(decoder.directory)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    stream = _TextStream(tokenizer, len(prompts), on_text)
    ids = decoder.generate_ids(
        encoded,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        on_token=stream.push if on_text is not None else None,
    )
    stream.flush()
    return [tokenizer.decode(row, skip_special_tokens=True) for row in ids]


class _TextStream:
    """Turn per-row token ids into text deltas; holds back an incomplete UTF-8 character."""

    def __init__(self, tokenizer, rows: int, on_text: Callable[[int, str], None] | None):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.sent = [0] * rows

    def push(self, row: int, token: int) -> None:
        self.tokens[row].append(token)
        self._emit(row, final=False)

    def flush(self) -> None:
        for row in range(len(self.tokens)):
            self._emit(row, final=True)

    def _emit(self, row: int, final: bool) -> None:
        if self.on_text is None:
            return
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return
        if len(text) > self.sent[row]:
            self.on_text(row, text[self.sent[row] :])
            self.sent[row] = len(text)
