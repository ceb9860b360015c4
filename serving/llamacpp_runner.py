"""Run a GGUF file in llama.cpp: logits of every position, greedy decoding, tokenizing, quantizing, `generate`.

llama.cpp comes as a prebuilt library in the `llama-cpp-py-sync` wheel (the `llamacpp`
extra; see `LLAMA_CPP_BUILD`), driven here through its C API (the wheel's CFFI
bindings) rather than its `Llama` class, which always asks for embeddings and only
returns the last position's logits. One `LlamaCpp` holds a model and one context
(one sequence); `logits` and `greedy` clear its KV cache first.

The KV cache is float32 by default: with llama.cpp's default float16 cache the
logits of a float32 model move by up to ~7e-3 (measured on a random tiny model),
which would hide the export's own error in the comparison with PyTorch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimgpt_deploy.errors import BadInputError, first_line
from slimgpt_deploy.extras import require

PACKAGE = "llama_cpp_py_sync"
LLAMA_CPP_BUILD = "b11739"  # the llama.cpp release the pinned wheel (llama-cpp-py-sync 0.11739) carries
GGML_TYPE = {"f32": 0, "f16": 1}
# llama.cpp's `enum llama_ftype` values of the file types its quantizer writes here.
FTYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15}


def find_gguf(path: Path) -> Path:
    """The GGUF file at `path`, or the only one in the folder `path`; BadInputError otherwise."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return path
    files = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(files) != 1:
        found = f"{len(files)} .gguf files" if path.is_dir() else "no such folder or .gguf file"
        raise BadInputError(f"{path}: {found}; give a GGUF export folder (slimgpt-deploy export --format gguf)")
    return files[0]


@dataclass(frozen=True)
class Runtime:
    lib: object
    ffi: object
    build: str


_RUNTIME: Runtime | None = None


def require_llamacpp() -> Runtime:
    """llama.cpp's library, loaded once; one-line errors for a missing wheel, a glibc it cannot load on, no `deci`."""
    global _RUNTIME
    if _RUNTIME is not None:
        return _RUNTIME
    package = require(PACKAGE)
    bindings = require(f"{PACKAGE}._cffi_bindings")
    try:
        lib = bindings.get_lib()
    except RuntimeError as e:
        if "GLIBC_2.38" in str(e):
            raise BadInputError(
                "llama.cpp's prebuilt library needs glibc 2.38 symbols this system lacks; run "
                "`python -m slimgpt_deploy.serving.llamacpp_compat` once (make venv does) and retry"
            ) from None
        raise BadInputError(f"llama.cpp's library does not load: {first_line(e)}") from None
    build = getattr(package, "__llama_cpp_tag__", "unknown")
    if not _has_deci(Path(bindings._find_library())):
        raise BadInputError(
            f"the installed llama.cpp ({build}) has no `deci` architecture, which per-layer shapes need; "
            f"install a newer one: pip install 'slimgpt-deploy[llamacpp]'"
        )
    _quiet(lib, bindings.get_ffi())
    lib.llama_backend_init()
    _RUNTIME = Runtime(lib, bindings.get_ffi(), build)
    return _RUNTIME


def cpu_features() -> str:
    """The CPU features llama.cpp's library was built for and uses (its system info), e.g.
    "CPU : SSE3 = 1 | ... | AVX2 = 1 | ..."; features of the machine that it was not built for are not listed."""
    rt = require_llamacpp()
    return rt.ffi.string(rt.lib.llama_print_system_info()).decode().strip()


def _has_deci(library: Path) -> bool:
    """Whether the library knows the architecture name `deci` (its name table holds the string)."""
    return b"\0deci\0" in library.read_bytes()


_LOG_CALLBACK = None  # kept alive: llama.cpp calls it for the life of the process


def _quiet(lib, ffi) -> None:
    """Send llama.cpp's own log lines (model loading, context setup) nowhere unless SLIMGPT_LLAMACPP_LOG is set."""
    global _LOG_CALLBACK
    if os.environ.get("SLIMGPT_LLAMACPP_LOG"):
        return
    _LOG_CALLBACK = ffi.callback("void(enum ggml_log_level, const char *, void *)", lambda level, text, data: None)
    lib.llama_log_set(_LOG_CALLBACK, ffi.NULL)


class LlamaCpp:
    """One GGUF model in llama.cpp with one context: `n_seq` sequences of `n_ctx` positions, `threads` CPU threads."""

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int = 512,
        threads: int | None = None,
        kv_type: str = "f32",
        flash_attn: bool | None = None,
        n_seq: int = 1,
    ):
        rt = require_llamacpp()
        self.lib, self.ffi = rt.lib, rt.ffi
        threads = threads or min(os.cpu_count() or 1, 8)
        model_params = self.lib.llama_model_default_params()
        self.model = self.lib.llama_model_load_from_file(str(path).encode(), model_params)
        if self.model == self.ffi.NULL:
            raise BadInputError(f"llama.cpp could not load {path} (set SLIMGPT_LLAMACPP_LOG=1 to see why)")
        params = self.lib.llama_context_default_params()
        params.n_ctx = n_ctx * n_seq
        params.n_batch = params.n_ubatch = max(n_ctx, n_seq)
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = threads
        params.type_k = params.type_v = GGML_TYPE[kv_type]
        params.no_perf = True
        if flash_attn is not None:  # None: llama.cpp decides (auto)
            params.flash_attn_type = int(flash_attn)
        self.ctx = self.lib.llama_init_from_model(self.model, params)
        if self.ctx == self.ffi.NULL:
            self.lib.llama_model_free(self.model)
            raise BadInputError(f"llama.cpp could not create a context of {n_ctx} positions for {path}")
        self.vocab = self.lib.llama_model_get_vocab(self.model)
        self.n_vocab = self.lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = n_ctx

    def close(self) -> None:
        if self.ctx is not None:
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = self.model = None

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        """Forget every cached position."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def decode(self, tokens: Sequence[int], start: int, every_position: bool = False) -> np.ndarray:
        """Run `tokens` at positions start.. of sequence 0.

        Returns logits [n, vocab] of every position, or [1, vocab] of the last one.
        """
        if start + len(tokens) > self.n_ctx:
            raise BadInputError(f"{start + len(tokens)} positions exceed the llama.cpp context of {self.n_ctx}")
        last = len(tokens) - 1
        rows = [(t, start + i, 0, every_position or i == last) for i, t in enumerate(tokens)]
        return self.decode_rows(rows)

    def decode_rows(self, rows: Sequence[tuple[int, int, int, bool]]) -> np.ndarray:
        """One llama_decode of (token, position, sequence, want logits) rows; logits [wanted rows, vocab]."""
        batch = self.lib.llama_batch_init(len(rows), 0, 1)
        try:
            batch.n_tokens = len(rows)
            for i, (token, pos, seq, want) in enumerate(rows):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = token, pos, 1, seq
                batch.logits[i] = 1 if want else 0
            code = self.lib.llama_decode(self.ctx, batch)
        finally:
            self.lib.llama_batch_free(batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        return np.stack([self._logits(i) for i, row in enumerate(rows) if row[3]])

    def _logits(self, i: int) -> np.ndarray:
        ptr = self.lib.llama_get_logits_ith(self.ctx, i)
        return np.frombuffer(self.ffi.buffer(ptr, self.n_vocab * 4), dtype=np.float32).copy()

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits [len(tokens), vocab] of a fresh sequence, every position in one batch."""
        self.reset()
        return self.decode(tokens, 0, every_position=True)

    def greedy(self, prompt: Sequence[int], max_tokens: int) -> tuple[list[int], np.ndarray]:
        """Greedy continuation (EOS does not stop it) and the log-softmax of each step's logits [steps, vocab]."""
        self.reset()
        logits = self.decode(prompt, 0)[0]
        tokens, steps = [], []
        for step in range(max_tokens):
            logprobs = log_softmax(logits)
            token = int(logprobs.argmax())
            tokens.append(token)
            steps.append(logprobs)
            if step + 1 < max_tokens:
                logits = self.decode([token], len(prompt) + step)[0]
        return tokens, np.stack(steps)

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """llama.cpp's own tokenization of `text` (with BOS where the file says to add one)."""
        data = text.encode()
        size = len(data) + 8
        out = self.ffi.new("llama_token[]", size)
        n = self.lib.llama_tokenize(self.vocab, data, len(data), out, size, add_special, False)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} tokens")
        return list(out[0:n])

    def piece(self, token: int) -> bytes:
        buf = self.ffi.new("char[]", 256)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, 256, 0, False)
        return self.ffi.buffer(buf, max(n, 0))[:]

    def is_eog(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float32)


def quantize(source: Path, out: Path, ftype: str, threads: int | None = None) -> None:
    """llama.cpp's own quantizer (what `llama-quantize` runs): `source` GGUF -> `out` of file type `ftype`."""
    rt = require_llamacpp()
    params = rt.ffi.new("llama_model_quantize_params *", rt.lib.llama_model_quantize_default_params())
    params.ftype = FTYPES[ftype]
    params.nthread = threads or min(os.cpu_count() or 1, 8)
    code = rt.lib.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if code != 0:
        raise RuntimeError(f"llama_model_quantize to {ftype} returned {code}")


def _sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = np.exp(log_softmax(logits / temperature).astype(np.float64))
    order = np.argsort(-probs)
    keep = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)]
    return int(rng.choice(keep, p=probs[keep] / probs[keep].sum()))


def generate(
    model: Path,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    on_text: Callable[[int, str], None] | None = None,
) -> list[str]:
    """The `generate` back-end contract (serving/__init__.py) on a GGUF file, or a folder holding one."""
    path = find_gguf(Path(model))
    rng = np.random.default_rng(seed)
    completions = []
    with LlamaCpp(path, n_ctx=2048) as llm:
        for i, prompt in enumerate(prompts):
            ids = llm.tokenize(prompt)
            if len(ids) + max_new_tokens > llm.n_ctx:
                raise BadInputError(f"prompt {i} has {len(ids)} tokens; with --max-new-tokens it exceeds {llm.n_ctx}")
            llm.reset()
            logits, text = llm.decode(ids, 0)[0], b""
            for step in range(max_new_tokens):
                token = _sample(logits, temperature, top_p, rng)
                if llm.is_eog(token):
                    break
                piece = llm.piece(token)
                text += piece
                if on_text is not None:
                    on_text(i, piece.decode(errors="ignore"))
                logits = llm.decode([token], len(ids) + step)[0]
            completions.append(text.decode(errors="replace"))
    return completions
