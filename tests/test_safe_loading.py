"""Safe loading: no code shipped with a model runs, and every tensor's shape, dtype and bytes
are checked against config.json from the safetensors headers before any weights are read."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimgpt_deploy import sources
from slimgpt_deploy.checkpoint import check_tensors, read_safetensors_header, validate_checkpoint
from slimgpt_deploy.errors import CheckpointError, ModelSourceError, UnsupportedArchitectureError
from slimgpt_deploy.sources import load_model

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = {model_type!r}
class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


def _with_remote_code(src, tmp_path, model_type):
    model = shutil.copytree(src, tmp_path / "model")
    marker = tmp_path / "pwned"
    (model / "evil.py").write_text(EVIL.format(marker=str(marker), model_type=model_type))
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForCausalLM": "evil.EvilForCausalLM",
        "AutoTokenizer": ["evil.EvilTokenizer", None],
    }
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


def test_remote_code_of_a_supported_type_is_not_executed(tiny_llama_dir, tmp_path):
    model, marker = _with_remote_code(tiny_llama_dir, tmp_path, "llama")
    loaded = load_model(str(model))
    assert not marker.exists()
    assert type(loaded.model).__module__.startswith("transformers.models.llama")


def test_remote_code_of_an_unknown_type_is_refused_not_executed(tiny_llama_dir, tmp_path):
    model, marker = _with_remote_code(tiny_llama_dir, tmp_path, "evil")
    with pytest.raises(UnsupportedArchitectureError, match="'evil'"):
        load_model(str(model))
    assert not marker.exists()


def test_trust_remote_code_is_never_passed(tiny_llama_dir, monkeypatch):
    seen = []
    for cls in (sources.AutoConfig, sources.AutoModelForCausalLM, sources.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_model(str(tiny_llama_dir))
    assert {name for name, _ in seen} == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    assert all(flag is False for _, flag in seen), seen


def _copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / "model")


def _no_weight_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the header checks")

    monkeypatch.setattr(sources.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda b: b[:4], "shorter than the 8-byte header length"),
        (lambda b: struct.pack("<Q", 10**7) + b[8:], "runs past the end of the file"),
        (
            lambda b: b[:8] + b"\x00" * (struct.unpack("<Q", b[:8])[0]) + b[8 + struct.unpack("<Q", b[:8])[0] :],
            "not valid JSON",
        ),
        (lambda b: b[: len(b) - 100], "the header describes"),
    ],
    ids=["shorter-than-length", "length-past-end", "bad-json", "data-short"],
)
def test_truncated_or_corrupt_shard_is_named_before_loading(tiny_llama_dir, tmp_path, monkeypatch, damage, words):
    model = _copy(tiny_llama_dir, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    _no_weight_reads(monkeypatch)
    with pytest.raises(ModelSourceError, match=words) as info:
        load_model(str(model))
    message = str(info.value)
    assert str(weights) in message and "re-download or re-export" in message and "\n" not in message


def test_a_truncated_second_shard_is_named(tiny_llama_dir, tmp_path):
    model = _copy(tiny_llama_dir, tmp_path)
    weights = load_file(model / "model.safetensors")
    names = sorted(weights)
    (model / "model.safetensors").unlink()
    half = len(names) // 2
    save_file(
        {k: weights[k] for k in names[:half]}, model / "model-00001-of-00002.safetensors", metadata={"format": "pt"}
    )
    save_file(
        {k: weights[k] for k in names[half:]}, model / "model-00002-of-00002.safetensors", metadata={"format": "pt"}
    )
    index = {
        "metadata": {},
        "weight_map": {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(names)},
    }
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert load_model(str(model)).model is not None  # sharded and whole: loads
    second = model / "model-00002-of-00002.safetensors"
    second.write_bytes(second.read_bytes()[:-10])
    with pytest.raises(ModelSourceError, match="model-00002-of-00002.safetensors is truncated"):
        load_model(str(model))


def _rewrite(model, edit):
    weights = load_file(model / "model.safetensors")
    edit(weights)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, words",
    [
        (
            lambda w: w.update(
                {
                    "model.layers.0.self_attn.q_proj.weight": w["model.layers.0.self_attn.q_proj.weight"][
                        :, :32
                    ].contiguous()
                }
            ),
            r"q_proj.weight has shape \[64, 32\] but config.json implies \[64, 64\]",
        ),
        (lambda w: w.pop("model.layers.1.mlp.down_proj.weight"), "model.layers.1.mlp.down_proj.weight missing"),
        (
            lambda w: w.update({"model.layers.5.mlp.up_proj.weight": torch.zeros(128, 64)}),
            "model.layers.5.mlp.up_proj.weight is not part",
        ),
        (lambda w: w.update({"model.norm.weight": w["model.norm.weight"].to(torch.int32)}), "dtype I32"),
    ],
    ids=["shape", "missing", "extra-layer", "integer-dtype"],
)
def test_dense_tensors_are_checked_against_the_config(tiny_llama_dir, tmp_path, monkeypatch, edit, words):
    model = _copy(tiny_llama_dir, tmp_path)
    _rewrite(model, edit)
    _no_weight_reads(monkeypatch)
    with pytest.raises(ModelSourceError, match=words):
        load_model(str(model))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("tied", [True, False])
def test_check_tensors_accepts_every_supported_family(tiny_model_dir_factory, family, tied):
    from transformers import AutoConfig

    directory = tiny_model_dir_factory(family, tie_word_embeddings=tied)
    check_tensors(directory, AutoConfig.from_pretrained(directory))


def test_untied_head_missing_is_refused(tiny_model_dir_factory, tmp_path):
    model = _copy(tiny_model_dir_factory("llama", tie_word_embeddings=False), tmp_path)
    _rewrite(model, lambda w: w.pop("lm_head.weight"))
    with pytest.raises(ModelSourceError, match="lm_head.weight missing"):
        load_model(str(model))


def test_slim_checkpoint_header_checks(uneven_slim_dir, tmp_path):
    slim = _copy(uneven_slim_dir, tmp_path)
    validate_checkpoint(slim)
    weights = slim / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt"):
        validate_checkpoint(slim)
    with pytest.raises(ModelSourceError, match="is truncated or corrupt"):
        load_model(str(slim))


def test_header_reader_returns_the_tensor_table(tiny_llama_dir):
    header = read_safetensors_header(tiny_llama_dir / "model.safetensors")
    info = header["model.layers.0.mlp.up_proj.weight"]
    assert info["dtype"] == "F32" and info["shape"] == [128, 64]
    assert "__metadata__" not in header
