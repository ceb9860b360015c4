"""Shared fixtures: tiny random LLaMA-family models saved as HF-style directories.

Every tiny model has the same small shapes (hidden 64, 2 layers, 4 query heads,
2 KV heads, vocab 128) and a word-level tokenizer built offline, so tests run
on CPU in well under a second per model without any download.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# torch, transformers and tokenizers are imported where they are used: pytest-xdist's controller
# process loads this file too, and runs no test (the imports cost it ~6 s before any worker starts).

# The test files that take longest, first (each file's test time in make test, --durations=0, 2026-12-05).
# `make test` runs the files on two pytest-xdist workers (`--dist loadfile --no-loadscope-reorder`), which
# then take the long ones at once and fill in with the short ones, finishing together. Every other file
# keeps its place after these.
SLOWEST_FIRST = (
    "test_vllm.py",
    "test_bench.py",
    "test_build.py",
    "test_smollm2.py",
    "test_onnx_smollm2.py",
    "test_distributed.py",
    "test_gguf.py",
    "test_genai.py",
    "test_resume.py",
    "test_tasks.py",
    "test_sources.py",
    "test_docker.py",
    "test_gate.py",
    "test_onnx_export.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order inside a file is kept


TINY_SIZES = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
TINY_WORDS = "the a cat dog sat on mat and ran to park big small red blue".split()


def build_tiny_tokenizer(vocab_size: int = TINY_SIZES["vocab_size"]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: <unk>=0, <s>=1, </s>=2, then words; no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = ["<unk>", "<s>", "</s>"] + TINY_WORDS
    tokens += [f"w{i}" for i in range(vocab_size - len(tokens))]
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


BPE_TEXT = [
    "the cat sat on the mat and the dog ran to the park",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Once upon a time, there was a big red dog; 12345 apples cost $3.50.",
    "The capital of France is Paris. The three laws of thermodynamics are",
]


def build_bpe_tokenizer(vocab_size: int = 300, split: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here on BPE_TEXT (256 byte tokens, merges, <unk> <s> </s>).

    The pre-tokenizer is GPT-2's (`split` None) or a regex split followed by byte-level mapping
    (how Llama 3 and Qwen2 tokenizers are built). What GGUF's llama.cpp tokenizer can carry.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    backend.pre_tokenizer = (
        byte_level
        if split is None
        else pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(BPE_TEXT * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_spm_tokenizer(vocab_size: int = 400, metaspace: bool = False) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE tokenizer (byte fallback, "▁" for spaces, BOS added) trained on BPE_TEXT.

    Llama 2's layout (a normalizer prepends "▁" and replaces spaces), or with `metaspace` the newer
    one (a Metaspace pre-tokenizer, as Mistral's). Ids: <unk> 0, <s> 1, </s> 2, then the 256 byte tokens.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    if metaspace:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(BPE_TEXT * 20, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


# Llama-3 RoPE scaling for a tiny model (a short original context, so the scaling changes every position).
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
# Weights 5x the usual init: attention is then sharp enough that RoPE (and its scaling) moves the
# logits by far more than the exporters' tolerances (measured for GGUF: no rope_freqs -> 2.9 log-prob
# difference; 0.006 at 0.02).
SHARP = {"initializer_range": 0.1}


def randomize_biases(directory: Path, seed: int = 1) -> None:
    """Give a saved model's biases values (they start at zero, where a misplaced bias goes unnoticed)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(directory)


def save_tiny_model(
    directory: Path,
    model_type: str = "llama",
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
    **overrides,
) -> Path:
    """Save a tiny random `model_type` causal LM (+ tokenizer) into `directory`; return it.

    `overrides` replace config fields (e.g. tie_word_embeddings=False); `tokenizer` replaces the
    word-level one (its vocabulary must fit the config's vocab_size).
    Llama models tie their embeddings by default, like SmolLM2.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(TINY_SIZES, bos_token_id=1, eos_token_id=2)
    if model_type == "llama":
        fields["tie_word_embeddings"] = True
    fields.update(overrides)
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    directory = Path(directory)
    model.save_pretrained(directory)
    (tokenizer or build_tiny_tokenizer(config.vocab_size)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir_factory(tmp_path_factory):
    """`make(model_type="llama", seed=0, **overrides) -> Path`: a fresh tiny model directory."""

    def make(model_type: str = "llama", seed: int = 0, **overrides) -> Path:
        return save_tiny_model(tmp_path_factory.mktemp(f"tiny-{model_type}"), model_type, seed, **overrides)

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dir_factory) -> Path:
    """A tiny random Llama (GQA 4/2, tied embeddings) with tokenizer; shared, do not modify."""
    return tiny_model_dir_factory("llama")


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


def save_uneven_slim(directory: Path, seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None) -> Path:
    """A tiny random *slim* checkpoint with deliberately uneven layers, saved like `prune` saves.

    3 layers of a tiny Llama (hidden 128, head_dim 32 -- the smallest vLLM's CPU attention
    supports -- 4 query / 2 KV heads, FFN 128) cut to:
    layer 0 dense; layer 1 one KV group left (2 query / 1 KV heads), FFN 96;
    layer 2 4 query / 2 KV heads but a much narrower FFN (8).
    With `tokenizer` (e.g. build_bpe_tokenizer()), the vocabulary is 320 and that tokenizer is saved.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from slimgpt_deploy.checkpoint import save_checkpoint
    from slimgpt_deploy.prune.schedule import LayerPlan
    from slimgpt_deploy.shrink import LayerCut, assemble, make_slim_config, shrink_layer

    fields = dict(
        TINY_SIZES, hidden_size=128, num_hidden_layers=3, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True
    )
    if tokenizer is not None:
        fields["vocab_size"] = 320
    torch.manual_seed(seed)
    dense = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **fields), dtype=torch.float32).eval()
    kept = [  # (query heads, KV heads, FFN channels) per layer
        ([0, 1, 2, 3], [0, 1], list(range(128))),
        ([2, 3], [1], list(range(0, 128, 4)) + list(range(1, 128, 4)) + list(range(2, 128, 4))),
        ([0, 1, 2, 3], [0, 1], list(range(3, 128, 16))),
    ]
    config = make_slim_config(
        dense.config, [LayerPlan(q_heads=len(q), kv_heads=len(kv), ffn=len(f), ratio=0.0) for q, kv, f in kept]
    )
    layers = []
    for i, (layer, (q, kv, f)) in enumerate(zip(dense.model.layers, kept)):
        cut = LayerCut(
            q_heads=q,
            kv_heads=kv,
            ffn=sorted(f),
            o_proj=layer.self_attn.o_proj.weight,
            down_proj=layer.mlp.down_proj.weight,
        )
        layers.append(shrink_layer(layer, cut, config, i))
    slim = assemble(dense, layers, config)
    record = {"format": "slimgpt-deploy/1", "source": {"source": "tiny-random", "kind": "test"}}
    save_checkpoint(slim, tokenizer or build_tiny_tokenizer(), record, Path(directory))
    return Path(directory)


@pytest.fixture(scope="session")
def uneven_slim_dir(tmp_path_factory) -> Path:
    """A tiny slim checkpoint whose layers differ in query heads, KV heads and FFN width; do not modify."""
    return save_uneven_slim(tmp_path_factory.mktemp("uneven") / "slim")


@pytest.fixture(scope="session")
def uneven_slim_bpe_dir(tmp_path_factory) -> Path:
    """The uneven slim checkpoint with a byte-level BPE tokenizer (vocab 320), as GGUF needs; do not modify."""
    return save_uneven_slim(tmp_path_factory.mktemp("uneven-bpe") / "slim", tokenizer=build_bpe_tokenizer())


def shared_across_workers(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """`make(path)` run once for the whole test run, however many pytest-xdist workers ask for `path`.

    Under xdist every worker has its own session (and session fixtures); the first to ask builds
    the artifact in the run's common temporary root under a file lock, the others wait and reuse it.
    `make` must write `path` atomically (as prune_to_checkpoint does).
    """
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the basetemp every worker's own one lives in
    path = root / "shared" / name
    path.parent.mkdir(exist_ok=True)
    with FileLock(f"{path}.lock"):
        if not path.exists():
            make(path)
    return path


@pytest.fixture(scope="session")
def smollm2_references() -> Callable[[], contextlib.AbstractContextManager]:
    """`with smollm2_references():` around an export of `smollm2_slim_dir`: its transformers greedy reference
    (the same 4 prompts x 32 tokens for vLLM, GGUF, ONNX and GenAI) is decoded once per worker, not per test."""
    from slimgpt_deploy.reference import shared_references

    return functools.partial(shared_references, {})


@pytest.fixture(scope="session")
def smollm2_slim_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M pruned by 20% (log schedule, per-group GQA, heads cut at the layer ratio so head counts differ
    per layer; quick self-calibration 8x128); built once per test run; do not modify."""
    from slimgpt_deploy.api import prune_to_checkpoint
    from slimgpt_deploy.config import PruneConfig

    def make(out: Path) -> None:
        prune_to_checkpoint("smollm2-135m", out, PruneConfig(ratio=0.2, nsamples=8, seqlen=128, head_share=1.0))

    return shared_across_workers(tmp_path_factory, "smollm2-slim-20", make)
