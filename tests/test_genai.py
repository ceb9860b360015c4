"""ONNX Runtime GenAI export: a folder `onnxruntime_genai.Model(DIR)` loads, run there and compared with transformers.

The graph is also run on its own in a plain onnxruntime session (teacher-forced logits over a
text, every position, an empty cache of each layer's own shape), so the comparisons here are
computed independently of the exporter's verification, which is checked too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import LLAMA3_ROPE, SHARP, build_bpe_tokenizer, randomize_biases, save_tiny_model

from slimgpt_deploy.bench.options import GENAI_WEIGHTS
from slimgpt_deploy.cli import main
from slimgpt_deploy.errors import BadInputError, VerificationError
from slimgpt_deploy.exporters import QUANTIZE, genai
from slimgpt_deploy.reference import load_reference

pytest.importorskip("onnxruntime_genai")

TEXT = "The capital of France is Paris. def fibonacci(n): return n if n < 2 else fibonacci(n - 1)"


def graph_io(directory: Path) -> tuple[dict, dict, dict]:
    """(input shapes, output shapes, GroupQueryAttention attributes per layer) of DIR/model.onnx."""
    import onnx

    g = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    dims = lambda v: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]  # noqa: E731
    gqa = [
        {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        for n in g.node
        if n.op_type == "GroupQueryAttention"
    ]
    return {i.name: dims(i) for i in g.input}, {o.name: dims(o) for o in g.output}, gqa


def torch_vs_graph(checkpoint: Path, directory: Path, text: str = TEXT) -> tuple[float, float]:
    """(max |logits difference| over every position, argmax agreement): the graph in plain onnxruntime."""
    import onnxruntime as ort

    model, tokenizer = load_reference(checkpoint, torch.float32)
    ids = tokenizer(text).input_ids
    with torch.inference_mode():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    got = session.run(["logits"], feeds)[0][0].astype(np.float32)
    return float(np.abs(got - ref).max()), float((got.argmax(-1) == ref.argmax(-1)).mean())


@pytest.fixture(scope="module")
def fp32_export(uneven_slim_bpe_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("genai") / "fp32"
    result = CliRunner().invoke(main, ["export", str(uneven_slim_bpe_dir), "--format", "genai", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_per_layer_kv_heads_reach_genai(fp32_export, uneven_slim_bpe_dir):
    inputs, outputs, gqa = graph_io(fp32_export)
    # layer 1 keeps one KV group (2 query / 1 KV heads): a static cache dimension GenAI sizes its cache from
    assert [inputs[f"past_key_values.{i}.key"][1] for i in range(3)] == [2, 1, 2]
    assert [outputs[f"present.{i}.value"][1] for i in range(3)] == [2, 1, 2]
    assert [(a["num_heads"], a["kv_num_heads"], a["do_rotary"]) for a in gqa] == [(4, 2, 1), (2, 1, 1), (4, 2, 1)]
    config = json.loads((fp32_export / "genai_config.json").read_text())
    assert config["model"]["type"] == "llama" and config["model"]["decoder"]["head_size"] == 32
    diff, agree = torch_vs_graph(uneven_slim_bpe_dir, fp32_export)
    assert diff < 1e-4 and agree == 1.0, (diff, agree)


def test_graph_carries_its_opsets_ir_version(fp32_export):
    """IR 10 (opset 21's), not the installed onnx package's newest, which older runtimes refuse to load."""
    import onnx

    model = onnx.load(str(fp32_export / "model.onnx"), load_external_data=False)
    assert model.ir_version == 10 and ("", 21) in {(o.domain, o.version) for o in model.opset_import}


def test_verification_is_recorded(fp32_export):
    summary = json.loads((fp32_export / "export.json").read_text())
    v = summary["verification"]
    assert v["passed"] and v["failures"] == [] and v["checks"]["tokenizer_equal"]
    assert v["checks"]["max_abs_diff"] < 1e-4 and v["checks"]["positions"] == 3 * genai.VERIFY_TOKENS
    assert all(g["tokens_equal"] for g in v["checks"]["greedy"] + v["checks"]["greedy_batch2"])
    assert len(v["checks"]["greedy_batch2"]) == 2
    assert summary["layers"] == [
        {"q_heads": 4, "kv_heads": 2, "ffn": 128},
        {"q_heads": 2, "kv_heads": 1, "ffn": 96},
        {"q_heads": 4, "kv_heads": 2, "ffn": 8},
    ]


def test_greedy_ends_at_eos_as_genai_search_does(fp32_export, uneven_slim_bpe_dir, tmp_path):
    """GenAI stops a row at EOS (and leaves that EOS out of its sequence): the comparison ends there, EOS included."""
    import shutil

    from slimgpt_deploy.reference import greedy_reference

    model, tokenizer = load_reference(uneven_slim_bpe_dir, torch.float32)
    prompts = [tokenizer(p).input_ids for p in genai.VERIFY_PROMPTS]
    want = greedy_reference(model, prompts, genai.VERIFY_TOKENS)
    eos = want[0].token_ids[4]  # make prompt 0's 5th greedy token the end of sequence
    folder = tmp_path / "eos"
    shutil.copytree(fp32_export, folder)
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["eos_token_id"] = eos
    (folder / "genai_config.json").write_text(json.dumps(config))
    result = genai.verify_against(folder, model, tokenizer, "fp32")
    assert result["passed"], result["failures"]
    first = want[0].token_ids.index(eos) + 1
    assert result["checks"]["greedy"][0]["reference_tokens"] == first <= 5
    assert result["checks"]["greedy"][0]["steps_compared"] == first


def test_generate_with_genai_matches_torch(fp32_export, uneven_slim_bpe_dir):
    runner = CliRunner()
    args = ["--prompt", "the cat sat on", "--max-new-tokens", "12", "--json"]
    got = runner.invoke(main, ["generate", str(fp32_export), "--backend", "genai", *args])
    want = runner.invoke(main, ["generate", str(uneven_slim_bpe_dir), "--backend", "torch", *args])
    assert got.exit_code == 0 and want.exit_code == 0, (got.output, want.output)
    assert json.loads(got.stdout)[0]["completion"] == json.loads(want.stdout)[0]["completion"]


def test_sampling_is_seeded(fp32_export):
    from slimgpt_deploy.serving.genai_runner import generate

    run = lambda seed: generate(fp32_export, ["the cat"], max_new_tokens=8, temperature=1.0, seed=seed)  # noqa: E731
    assert run(3) == run(3)


@pytest.mark.parametrize("weights", ["fp16", "int8"])
def test_other_weights_verify(weights, uneven_slim_bpe_dir, tmp_path):
    kwargs = {"quantize": "int8"} if weights == "int8" else {"dtype": "fp16"}
    summary = genai.export(uneven_slim_bpe_dir, tmp_path / weights, **kwargs)
    assert summary["verification"]["passed"], summary["verification"]["failures"]
    _, _, _ = graph_io(tmp_path / weights)
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / weights / "model.onnx"), load_external_data=False).graph.node}
    assert ("MatMulNBits" in ops) == (weights == "int8")
    fp32 = genai.export(uneven_slim_bpe_dir, tmp_path / "fp32", verify=False)["file_bytes"]
    assert summary["file_bytes"] < 0.6 * fp32  # 8-bit blocks or 16-bit floats, not a copy
    # the folder verifies again on its own (the build's verify-genai stage)
    again = genai.verify(tmp_path / weights, uneven_slim_bpe_dir)
    assert again["passed"] and again["tolerance"] == summary["verification"]["tolerance"]


def test_weights_are_the_build_and_cli_choices():
    assert GENAI_WEIGHTS == genai.WEIGHTS and QUANTIZE["genai"] == ("int8",)


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("qwen2", {}),  # q/k/v biases
        ("llama", {"rope_parameters": LLAMA3_ROPE}),  # Llama-3 RoPE scaling in the cos/sin caches
        ("mistral", {"tie_word_embeddings": False}),  # untied output
        ("llama", {"attention_bias": True, "mlp_bias": True}),  # every bias
    ],
    ids=["qwen2", "llama3-rope", "mistral-untied", "llama-biases"],
)
def test_families(family, overrides, tmp_path):
    model = save_tiny_model(
        tmp_path / "model", family, tokenizer=build_bpe_tokenizer(), vocab_size=320, **SHARP, **overrides
    )
    if family == "qwen2" or "attention_bias" in overrides:
        randomize_biases(model)
    summary = genai.export(model, tmp_path / "out")
    assert summary["verification"]["passed"], summary["verification"]["failures"]
    diff, agree = torch_vs_graph(model, tmp_path / "out")
    assert diff < 1e-4 and agree == 1.0, (diff, agree)


def test_wrong_rope_layout_is_caught(uneven_slim_bpe_dir, tmp_path, monkeypatch):
    """GroupQueryAttention rotating neighbouring pairs instead of halves must fail verification, leaving nothing."""
    real = genai.Graph.node

    def interleaved(self, op, inputs, name, outputs=1, domain="", **attrs):
        if op == "GroupQueryAttention":
            attrs["rotary_interleaved"] = 1
        return real(self, op, inputs, name, outputs, domain, **attrs)

    monkeypatch.setattr(genai.Graph, "node", interleaved)
    model = save_tiny_model(tmp_path / "model", tokenizer=build_bpe_tokenizer(), vocab_size=320, **SHARP)
    with pytest.raises(VerificationError, match="disagrees with transformers"):
        genai.export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_pruned_smollm2(weights, smollm2_slim_dir, smollm2_references, tmp_path):
    """Pruned SmolLM2 (heads differ per layer) in GenAI: its real tokenizer, the weights' bounds."""
    with smollm2_references():
        summary = genai.export(smollm2_slim_dir, tmp_path / weights, quantize="int8" if weights == "int8" else None)
    v = summary["verification"]
    assert v["passed"] and v["checks"]["tokenizer_equal"], v["failures"]
    config = json.loads((smollm2_slim_dir / "config.json").read_text())
    inputs, _, gqa = graph_io(tmp_path / weights)
    heads = [a["num_heads"] for a in gqa]
    assert heads == config["num_attention_heads_per_layer"] and len(set(heads)) > 1
    assert [inputs[f"past_key_values.{i}.key"][1] for i in range(len(gqa))] == config["num_key_value_heads_per_layer"]
    if weights == "fp32":
        assert v["checks"]["max_abs_diff"] < 2e-3
        rows = v["checks"]["greedy"] + v["checks"]["greedy_batch2"]
        assert all(g["tokens_equal"] or g["parted_at_tie"] for g in rows)
    else:
        assert v["checks"]["kl"] < 0.02 and v["checks"]["top1"] >= 0.9


# --- bad input: one line, exit 2, nothing written


def _cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_missing_config_is_refused(fp32_export, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in fp32_export.iterdir():
        if p.name != "genai_config.json":
            (broken / p.name).symlink_to(p)
    result = _cli("generate", broken, "--backend", "genai", "--prompt", "hi")
    assert result.exit_code == 2 and "no genai_config.json" in result.output


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c["model"]["decoder"].update(num_hidden_layers=2), "num_hidden_layers=2 but the graph has 3"),
        (lambda c: c["model"]["decoder"].update(head_size=64), "head_size=64"),
        (lambda c: c["model"].update(vocab_size=999), "vocab_size=999"),
        (lambda c: c["model"]["decoder"].pop("inputs"), "not a valid GenAI config"),
    ],
    ids=["layers", "head-size", "vocab", "no-inputs"],
)
def test_inconsistent_config_is_refused(change, message, fp32_export, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in fp32_export.iterdir():
        if p.name != "genai_config.json":
            (broken / p.name).symlink_to(p)
    config = json.loads((fp32_export / "genai_config.json").read_text())
    change(config)
    (broken / "genai_config.json").write_text(json.dumps(config))
    result = _cli("generate", broken, "--backend", "genai", "--prompt", "hi")
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_runtime_too_old_for_per_layer_kv_is_refused(fp32_export, monkeypatch):
    import onnxruntime_genai as og

    monkeypatch.setattr(og, "__version__", "0.14.1")
    result = _cli("generate", fp32_export, "--backend", "genai", "--prompt", "hi")
    assert result.exit_code == 2 and "onnxruntime-genai >= 0.15" in result.output, result.output


def test_missing_contrib_op_is_one_line(fp32_export, tmp_path):
    """A graph op the runtime has no kernel for: GenAI's own message, one line, exit 2."""
    import onnx

    broken = tmp_path / "broken"
    broken.mkdir()
    for p in fp32_export.iterdir():
        if p.name != "model.onnx":
            (broken / p.name).symlink_to(p)
    model = onnx.load(str(fp32_export / "model.onnx"), load_external_data=False)
    next(n for n in model.graph.node if n.op_type == "GroupQueryAttention").op_type = "GroupQueryAttentionV9"
    onnx.save(model, str(broken / "model.onnx"))
    result = _cli("generate", broken, "--backend", "genai", "--prompt", "hi")
    assert result.exit_code == 2 and "ONNX Runtime GenAI cannot load" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_word_level_tokenizer_is_refused_before_writing(uneven_slim_dir, tmp_path):
    result = _cli("export", uneven_slim_dir, "--format", "genai", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "WordLevel" in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_bad_weights_are_refused(uneven_slim_bpe_dir, tmp_path):
    with pytest.raises(BadInputError, match="drop --dtype fp16"):
        genai.export(uneven_slim_bpe_dir, tmp_path / "o", dtype="fp16", quantize="int8")
    result = _cli("export", uneven_slim_bpe_dir, "--format", "genai", "--out", tmp_path / "o", "--quantize", "q8_0")
    assert result.exit_code == 2 and "choose int8" in result.output
    assert not (tmp_path / "o").exists()
