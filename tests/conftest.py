"""Shared fixtures: tiny random LLaMA-family models saved as HF-style directories.

Every tiny model has the same small shapes (hidden 64, 2 layers, 4 query heads,
2 KV heads, vocab 128) and a word-level tokenizer built offline, so tests run
on CPU in well under a second per model without any download.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

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
    tokens = ["<unk>", "<s>", "</s>"] + TINY_WORDS
    tokens += [f"w{i}" for i in range(vocab_size - len(tokens))]
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_tiny_model(directory: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a tiny random `model_type` causal LM (+ tokenizer) into `directory`; return it.

    `overrides` replace config fields (e.g. tie_word_embeddings=False).
    Llama models tie their embeddings by default, like SmolLM2.
    """
    fields = dict(TINY_SIZES, bos_token_id=1, eos_token_id=2)
    if model_type == "llama":
        fields["tie_word_embeddings"] = True
    fields.update(overrides)
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    directory = Path(directory)
    model.save_pretrained(directory)
    build_tiny_tokenizer(config.vocab_size).save_pretrained(directory)
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
