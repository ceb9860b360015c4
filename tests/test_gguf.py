"""GGUF export (llama.cpp's `deci` architecture), run in llama.cpp itself and compared with transformers.

The exports are read back with the `gguf` package (per-layer arrays, tensor shapes) and run
in llama.cpp (the prebuilt library of the `llamacpp` extra); the comparisons in this file are
computed here, independently of the exporter's own verification, which is also checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import LLAMA3_ROPE, SHARP, build_bpe_tokenizer, build_spm_tokenizer, randomize_biases, save_tiny_model

from slimgpt_deploy.cli import main
from slimgpt_deploy.errors import VerificationError
from slimgpt_deploy.exporters import QUANTIZE, gguf
from slimgpt_deploy.reference import load_reference
from slimgpt_deploy.serving.llamacpp_runner import LlamaCpp, log_softmax

TEXT = "The capital of France is Paris. def fibonacci(n): return n if n < 2 else fibonacci(n - 1)"


def read_back(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    return {
        "arch": field("general.architecture"),
        "q": field("deci.attention.head_count"),
        "kv": field("deci.attention.head_count_kv"),
        "ffn": field("deci.feed_forward_length"),
        "pre": field("tokenizer.ggml.pre"),
        "tensors": {t.name: (list(reversed(t.shape.tolist())), t.tensor_type.name) for t in reader.tensors},
    }


def torch_vs_llamacpp(checkpoint: Path, path: Path, text: str = TEXT) -> tuple[float, float]:
    """(max |log-prob difference| over every position and token, argmax agreement), computed here."""
    model, tokenizer = load_reference(checkpoint, torch.float32)
    ids = tokenizer(text).input_ids
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1).numpy()
    with LlamaCpp(path, n_ctx=256, threads=2, flash_attn=False) as llm:
        assert llm.tokenize(text) == ids  # the file's tokenizer is transformers' tokenizer
        got = log_softmax(llm.logits(ids))
    return float(np.abs(got - ref).max()), float((got.argmax(-1) == ref.argmax(-1)).mean())


@pytest.fixture(scope="module")
def f32_export(uneven_slim_bpe_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "f32"
    result = CliRunner().invoke(main, ["export", str(uneven_slim_bpe_dir), "--format", "gguf", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_per_layer_shapes_reach_llamacpp(f32_export, uneven_slim_bpe_dir):
    summary = json.loads((f32_export / "export.json").read_text())
    assert summary["verification"]["passed"] and summary["architecture"] == "deci"
    file = read_back(f32_export / "model-f32.gguf")
    assert file["arch"] == "deci"
    assert (file["q"], file["kv"], file["ffn"]) == ([4, 2, 4], [2, 1, 2], [128, 96, 8])
    assert file["tensors"]["blk.1.attn_q.weight"] == ([64, 128], "F32")  # 2 heads of 32, [out, in]
    assert file["tensors"]["blk.1.attn_k.weight"] == ([32, 128], "F32")
    assert file["tensors"]["blk.2.ffn_down.weight"] == ([128, 8], "F32")
    assert "output.weight" not in file["tensors"]  # tied: llama.cpp reads token_embd
    diff, agree = torch_vs_llamacpp(uneven_slim_bpe_dir, f32_export / "model-f32.gguf")
    assert diff < 1e-4 and agree == 1.0, (diff, agree)


def test_verification_is_recorded(f32_export):
    v = json.loads((f32_export / "export.json").read_text())["verification"]
    assert v["tokenizer_equal"] and v["greedy_tokens_equal"] == len(v["prompts"])
    assert v["max_logprob_diff"] < 1e-4 and v["failures"] == []


def test_the_runtime_names_the_instruction_sets_it_uses(f32_export):
    """What benchmarks/gguf_bench.py records beside its figures: the CPU features the wheel's kernels use."""
    from slimgpt_deploy.serving.llamacpp_runner import cpu_features

    features = cpu_features()
    assert features.startswith("CPU :") and " = 1 |" in features, features  # e.g. "CPU : SSE3 = 1 | ... AVX2 = 1 |"


def test_generate_with_llamacpp_matches_torch(f32_export, uneven_slim_bpe_dir):
    runner = CliRunner()
    args = ["--prompt", "the cat sat on", "--max-new-tokens", "12", "--json"]
    got = runner.invoke(main, ["generate", str(f32_export), "--backend", "llamacpp", *args])
    want = runner.invoke(main, ["generate", str(uneven_slim_bpe_dir), "--backend", "torch", *args])
    assert got.exit_code == 0 and want.exit_code == 0, (got.output, want.output)
    assert json.loads(got.stdout)[0]["completion"] == json.loads(want.stdout)[0]["completion"]


@pytest.mark.parametrize("ftype", ["f16", "q8_0", "q4_k_m"])
def test_every_type_verifies(ftype, uneven_slim_bpe_dir, tmp_path):
    summary = gguf.export(uneven_slim_bpe_dir, tmp_path / ftype, quantize=ftype)
    assert summary["verification"]["passed"], summary["verification"]["failures"]
    file = read_back(tmp_path / ftype / f"model-{ftype}.gguf")
    tensors = file["tensors"]
    assert tensors["blk.0.attn_norm.weight"][1] == "F32"
    # q4_k_m: rows of 128 are not a multiple of the k-quants' 256-wide blocks; llama.cpp falls back to q5_0.
    block_type = {"f16": "F16", "q8_0": "Q8_0", "q4_k_m": "Q5_0"}[ftype]
    assert tensors["blk.0.attn_q.weight"][1] == block_type
    # Layer 2's FFN width, 8, is no multiple of the 32-wide blocks: quantized files pad it with zero channels, so its
    # ffn_down quantizes too (unpadded, llama.cpp would leave it in f16); the verification above ran on the padding.
    width = 8 if ftype == "f16" else 32
    assert file["ffn"] == [128, 96, width]
    assert [layer["ffn_in_file"] for layer in summary["layers"]] == [128, 96, width]
    assert [layer["ffn"] for layer in summary["layers"]] == [128, 96, 8]
    down_shape, down_type = tensors["blk.2.ffn_down.weight"]
    # q4_k_m keeps ffn_down at higher precision (q6_k, whose fallback is q8_0) in some layers
    assert down_shape == [128, width] and down_type in {block_type, "Q8_0"}, (down_shape, down_type)
    assert tensors["blk.2.ffn_gate.weight"][0] == tensors["blk.2.ffn_up.weight"][0] == [width, 128]
    diff, agree = torch_vs_llamacpp(uneven_slim_bpe_dir, tmp_path / ftype / f"model-{ftype}.gguf")
    assert agree >= 0.9 and diff < {"f16": 0.01, "q8_0": 0.05, "q4_k_m": 0.5}[ftype], (diff, agree)


def test_ffn_padding_computes_the_same_mlp():
    """Zero channels appended to gate/up rows (and biases) and down columns leave a SwiGLU MLP's output unchanged."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 16))
    gate, up, down = rng.standard_normal((12, 16)), rng.standard_normal((12, 16)), rng.standard_normal((16, 12))
    b_gate, b_up, b_down = rng.standard_normal(12), rng.standard_normal(12), rng.standard_normal(16)
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    mlp = lambda g, bg, u, bu, d, bd: (silu(x @ g.T + bg) * (x @ u.T + bu)) @ d.T + bd  # noqa: E731
    padded = [gguf.pad_ffn(role, t, 32) for role, t in [("gate", gate), ("gate", b_gate), ("up", up), ("up", b_up)]]
    padded += [gguf.pad_ffn("down", down, 32), gguf.pad_ffn("down", b_down, 32)]
    assert padded[0].shape == (32, 16) and padded[1].shape == (32,) and padded[4].shape == (16, 32)
    assert padded[5].shape == (16,)  # down's bias is hidden-sized
    np.testing.assert_allclose(mlp(*padded), mlp(gate, b_gate, up, b_up, down, b_down), rtol=1e-12)
    assert gguf.pad_ffn("q", gate, 32) is gate and gguf.pad_ffn("down", down, 12) is down


def test_types_are_the_clis_choices():
    assert QUANTIZE["gguf"] == gguf.TYPES


def test_hf_rope_layout_is_caught(uneven_slim_bpe_dir, tmp_path, monkeypatch):
    """Without the per-head Q/K permutation llama.cpp's RoPE rotates the wrong pairs: verification must fail."""
    monkeypatch.setattr(gguf, "rope_permute", lambda w, heads: w)
    with pytest.raises(VerificationError, match="disagrees with transformers"):
        gguf.export(uneven_slim_bpe_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("metaspace", [False, True], ids=["llama2-normalizer", "metaspace"])
def test_sentencepiece_style_tokenizer(metaspace, tmp_path):
    """Byte-fallback BPE (Llama 2, Mistral) becomes llama.cpp's `llama` vocab: scores, byte tokens, space prefix."""
    tokenizer = build_spm_tokenizer(metaspace=metaspace)
    model = save_tiny_model(tmp_path / "model", "mistral", tokenizer=tokenizer, vocab_size=448, **SHARP)
    summary = gguf.export(model, tmp_path / "out")
    v = summary["verification"]
    assert v["passed"] and v["tokenizer_equal"], v["failures"]  # the non-ASCII check text goes through byte tokens
    assert summary["tokenizer"] == {"model": "llama", "pre": None}
    from gguf import GGUFReader

    reader = GGUFReader(tmp_path / "out" / "model-f32.gguf")
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[0] == 2 and types[1] == 3 and types[3:259] == [6] * 256  # unknown, control, the 256 bytes
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is True
    diff, agree = torch_vs_llamacpp(model, tmp_path / "out" / "model-f32.gguf")
    assert diff < 1e-4 and agree == 1.0, (diff, agree)


@pytest.mark.parametrize(
    "family,overrides,split",
    [
        ("qwen2", {}, gguf.QWEN2_SPLIT),  # q/k/v biases, Qwen2's pre-tokenizer
        ("llama", {"rope_parameters": LLAMA3_ROPE}, gguf.LLAMA3_SPLIT),  # Llama-3 RoPE scaling -> rope_freqs
        ("mistral", {"tie_word_embeddings": False}, None),  # untied output
        ("llama", {"attention_bias": True, "mlp_bias": True}, None),  # every bias llama.cpp's deci reads
    ],
    ids=["qwen2", "llama3-rope", "mistral-untied", "llama-biases"],
)
def test_families(family, overrides, split, tmp_path):
    tokenizer = build_bpe_tokenizer(split=split)
    model = save_tiny_model(tmp_path / "model", family, tokenizer=tokenizer, vocab_size=320, **SHARP, **overrides)
    if family == "qwen2" or "attention_bias" in overrides:
        randomize_biases(model)
    summary = gguf.export(model, tmp_path / "out")
    assert summary["verification"]["passed"], summary["verification"]["failures"]
    tensors = read_back(tmp_path / "out" / "model-f32.gguf")["tensors"]
    assert ("rope_freqs.weight" in tensors) == (overrides.get("rope_parameters") is not None)
    tied = json.loads((model / "config.json").read_text()).get("tie_word_embeddings")
    assert ("output.weight" in tensors) == (not tied)
    if family == "qwen2" or "attention_bias" in overrides:
        assert "blk.0.attn_q.bias" in tensors and "blk.0.attn_k.bias" in tensors
    diff, agree = torch_vs_llamacpp(model, tmp_path / "out" / "model-f32.gguf")
    assert diff < 1e-4 and agree == 1.0, (diff, agree)


def test_llama3_rope_factors_matter(tmp_path, monkeypatch):
    """The Llama-3 test model is sensitive to its RoPE scaling: without rope_freqs verification fails."""
    tokenizer = build_bpe_tokenizer(split=gguf.LLAMA3_SPLIT)
    model = save_tiny_model(
        tmp_path / "model", tokenizer=tokenizer, vocab_size=320, rope_parameters=LLAMA3_ROPE, **SHARP
    )
    real = gguf._rope
    monkeypatch.setattr(gguf, "_rope", lambda config, head_dim: (real(config, head_dim)[0], None))
    with pytest.raises(VerificationError):
        gguf.export(model, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["f32", "q8_0"])
def test_pruned_smollm2(ftype, smollm2_slim_dir, smollm2_references, tmp_path):
    """Pruned SmolLM2 (heads differ per layer) in llama.cpp: its real tokenizer and the type's bounds."""
    with smollm2_references():
        summary = gguf.export(smollm2_slim_dir, tmp_path / ftype, quantize=ftype)
    v = summary["verification"]
    assert v["passed"] and v["tokenizer_equal"], v["failures"]
    # transformers' tokenizer for the embedded GGUF model is plain GPT-2 byte-level BPE (no digit split).
    assert summary["tokenizer"]["pre"] == "gpt-2"
    config = json.loads((smollm2_slim_dir / "config.json").read_text())
    file = read_back(tmp_path / ftype / f"model-{ftype}.gguf")
    assert file["q"] == config["num_attention_heads_per_layer"] and len(set(file["q"])) > 1
    block = 32 if ftype == "q8_0" else 1  # quantized files pad each FFN width to llama.cpp's 32-wide blocks
    assert file["ffn"] == [-(-f // block) * block for f in config["intermediate_size_per_layer"]]
    if ftype == "f32":
        assert v["greedy_tokens_equal"] >= 3 and v["max_logprob_diff"] < 1e-3
    else:
        assert v["kl_mean"] < 0.02 and v["top1_agreement"] >= 0.9
        assert {t for name, (_, t) in file["tensors"].items() if name.endswith("ffn_down.weight")} == {"Q8_0"}


def test_sentencepiece_scores_decide_the_merges(tmp_path, monkeypatch):
    """With every score equal llama.cpp merges in another order: the tokenizer check must catch it."""
    model = save_tiny_model(tmp_path / "model", "mistral", tokenizer=build_spm_tokenizer(), vocab_size=448)
    real = gguf.read_tokenizer

    def flat_scores(checkpoint, config):
        tok = real(checkpoint, config)
        tok.scores = [0.0] * len(tok.scores)
        return tok

    monkeypatch.setattr(gguf, "read_tokenizer", flat_scores)
    with pytest.raises(VerificationError, match="tokenizes"):
        gguf.export(model, tmp_path / "out")
