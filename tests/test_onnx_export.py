"""ONNX export of a tiny slim checkpoint with uneven layers, checked in ONNX Runtime against transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

import slimgpt_deploy  # noqa: E402,F401  (registers the slimgpt model type)
from slimgpt_deploy.cli import main  # noqa: E402
from slimgpt_deploy.errors import BadInputError, CheckpointError, VerificationError  # noqa: E402
from slimgpt_deploy.exporters import onnx as onnx_export  # noqa: E402
from slimgpt_deploy.exporters.onnx_model import ExportDecoder, empty_past  # noqa: E402
from slimgpt_deploy.serving.onnx_runner import SPEC_FILE, OnnxDecoder, left_pad, positions  # noqa: E402


@pytest.fixture(scope="module")
def uneven_onnx(uneven_slim_dir, tmp_path_factory) -> Path:
    """The uneven tiny checkpoint exported (fp32) and verified; do not modify."""
    out = tmp_path_factory.mktemp("onnx") / "uneven-onnx"
    onnx_export.export(uneven_slim_dir, out)
    return out


@pytest.fixture(scope="module")
def reference(uneven_slim_dir):
    return AutoModelForCausalLM.from_pretrained(uneven_slim_dir, dtype=torch.float32).eval()


def test_export_module_matches_transformers_with_padding_and_chunks(reference):
    decoder = ExportDecoder(reference).eval()
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24]], pad_id=0)  # [2, 8]
    pos = torch.from_numpy(positions(mask))
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, position_ids=pos).logits  # [2, 8, V]
        first = decoder(ids[:, :5], mask[:, :5], pos[:, :5], *empty_past(decoder, 2, torch.float32))
        second = decoder(ids[:, 5:], mask, pos[:, 5:], *first[1:])  # chunked prefill on a cache
    got = torch.cat([first[0], second[0]], dim=1)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    assert [t.shape[1] for t in second[1::2]] == [2, 1, 2]  # per-layer KV heads


def test_export_writes_graph_cache_json_and_tokenizer(uneven_onnx, uneven_slim_dir):
    import onnx

    files = {p.name for p in uneven_onnx.iterdir()}
    assert {"model.onnx", SPEC_FILE, "export.json", "tokenizer.json", "generation_config.json"} <= files
    assert not any(n.startswith(".") for n in files)
    spec = json.loads((uneven_onnx / SPEC_FILE).read_text())
    config = json.loads((uneven_slim_dir / "config.json").read_text())
    layers = spec["cache"]["layers"]
    D = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    assert spec["head_dim"] == D
    assert [e["num_key_value_heads"] for e in layers] == config["num_key_value_heads_per_layer"] == [2, 1, 2]
    assert [e["num_attention_heads"] for e in layers] == config["num_attention_heads_per_layer"] == [4, 2, 4]
    assert layers[1]["past_shape"] == ["batch", 1, "past_sequence", D]
    assert layers[1]["inputs"] == ["past_key_values.1.key", "past_key_values.1.value"]
    assert spec["eos_token_ids"] == [2]

    model = onnx.load(uneven_onnx / "model.onnx", load_external_data=False)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    graph_in = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    graph_out = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert graph_in["input_ids"] == ["batch", "sequence"]
    assert graph_in["attention_mask"] == ["batch", "total_sequence"]
    assert graph_in["past_key_values.1.value"] == ["batch", 1, "past_sequence", D]
    assert graph_out["logits"] == ["batch", "sequence", 128]
    assert set(graph_out) == {"logits"} | {f"present.{i}.{t}" for i in range(3) for t in ("key", "value")}

    summary = json.loads((uneven_onnx / "export.json").read_text())
    assert summary["verification"]["passed"] is True
    assert summary["verification"]["checks"]["max_abs_diff"] < 1e-4


def test_norms_are_fused_and_no_fuse_keeps_standard_ops(uneven_onnx, uneven_slim_dir, tmp_path):
    """The default export fuses RMSNorm (+ residual add) and attention (RotaryEmbedding, ONNX Runtime's
    GroupQueryAttention with each layer its own head counts and an in-place cache); --no-fuse keeps standard
    opset-18 ONNX ops and a concatenated cache. Both verified against PyTorch."""
    import onnx

    summary = json.loads((uneven_onnx / "export.json").read_text())
    assert summary["fused"] == {  # 3 layers
        "SimplifiedLayerNormalization": 1,
        "SkipSimplifiedLayerNormalization": 6,
        "GroupQueryAttention": 3,
        "RotaryEmbedding": 6,
    }
    assert json.loads((uneven_onnx / "slimgpt_onnx.json").read_text())["cache"]["in_place"] is True
    assert summary["opset"] == 23 and summary["verification"]["passed"]
    ops = lambda d: {n.op_type for n in onnx.load(d / "model.onnx", load_external_data=False).graph.node}  # noqa: E731
    assert "SkipSimplifiedLayerNormalization" in ops(uneven_onnx)
    fused = onnx.load(uneven_onnx / "model.onnx", load_external_data=False)
    assert ("com.microsoft", 1) in {(o.domain, o.version) for o in fused.opset_import}
    assert fused.ir_version == 11  # the lowest IR carrying opset 23 (not the onnx package's newest): ORT >= 1.23
    heads = [
        {a.name: a.i for a in n.attribute if a.name in ("num_heads", "kv_num_heads")}
        for n in fused.graph.node
        if n.op_type == "GroupQueryAttention"
    ]
    assert heads == [  # the uneven checkpoint's layers: dense, one KV group left, dense heads
        {"num_heads": 4, "kv_num_heads": 2},
        {"num_heads": 2, "kv_num_heads": 1},
        {"num_heads": 4, "kv_num_heads": 2},
    ]
    onnx.shape_inference.infer_shapes(fused, strict_mode=True)  # what ONNX Runtime's quantizers run first
    out = tmp_path / "plain"
    result = CliRunner().invoke(
        main, ["export", str(uneven_slim_dir), "--format", "onnx", "--out", str(out), "--no-fuse"]
    )
    assert result.exit_code == 0, result.output
    plain = json.loads((out / "export.json").read_text())
    assert plain["fused"] is None and plain["opset"] == 18 and plain["verification"]["passed"]
    assert onnx.load(out / "model.onnx", load_external_data=False).ir_version == 8  # opset 18's: ORT >= 1.20
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}  # no com.microsoft contrib op: any ONNX runtime
    assert "ReduceMean" in ops(out) and "SimplifiedLayerNormalization" not in ops(out)
    assert not {"GroupQueryAttention", "RotaryEmbedding"} & ops(out) and {"Softmax", "Concat"} <= ops(out)
    assert json.loads((out / "slimgpt_onnx.json").read_text())["cache"]["in_place"] is False
    refused = CliRunner().invoke(
        main, ["export", str(uneven_slim_dir), "--format", "vllm", "--out", str(tmp_path / "v"), "--no-fuse"]
    )
    assert refused.exit_code == 2 and "--no-fuse is an ONNX export option" in refused.output


def test_onnx_logits_match_pytorch_prefill_and_8_cached_steps(uneven_onnx, reference):
    """ONNX Runtime with its own cache vs transformers with DynamicCache, step by step."""
    decoder = OnnxDecoder(uneven_onnx)
    prompt = [1, 3, 4, 5, 6, 7, 8, 9, 10]
    ids = np.array([prompt], dtype=np.int64)
    mask = np.ones_like(ids)
    logits, past = decoder.forward(ids, mask, positions(mask), decoder.empty_past(1))
    cache = DynamicCache(config=reference.config)
    with torch.no_grad():
        want = reference(input_ids=torch.from_numpy(ids), past_key_values=cache, use_cache=True).logits.numpy()
        np.testing.assert_allclose(logits, want, atol=1e-5, rtol=0)
        for step in range(8):
            token = np.array([[int(want[0, -1].argmax())]], dtype=np.int64)
            mask = np.ones((1, len(prompt) + step + 1), dtype=np.int64)
            logits, past = decoder.forward(token, mask, np.array([[len(prompt) + step]]), past)
            want = reference(input_ids=torch.from_numpy(token), past_key_values=cache, use_cache=True).logits.numpy()
            np.testing.assert_allclose(logits, want, atol=1e-5, rtol=0, err_msg=f"decode step {step}")
    assert [p.shape[1] for p in past[::2]] == [2, 1, 2]


def test_onnx_greedy_tokens_identical_to_transformers(uneven_onnx, reference):
    decoder = OnnxDecoder(uneven_onnx)
    for prompt in ([1, 3, 4, 5], [1, 9, 10, 11, 12, 13, 14], [7]):
        with torch.no_grad():
            want = reference.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        got = decoder.generate_ids([prompt], max_new_tokens=32, eos_token_ids=())[0]
        assert got == want


def test_verify_existing_export(uneven_onnx, uneven_slim_dir):
    result = onnx_export.verify(uneven_onnx, uneven_slim_dir)
    assert result["passed"], result["failures"]
    assert result["checks"]["prefill_max_abs_diff"] < 1e-4 and result["checks"]["decode_max_abs_diff"] < 1e-4
    assert all(g["identical_prefix"] == 32 for g in result["checks"]["greedy"])


def test_int8_quantization_of_an_export(uneven_onnx, uneven_slim_dir, tmp_path):
    import onnx

    summary = onnx_export.quantize_dir(uneven_onnx, tmp_path / "int8")
    assert summary["weights"].startswith("int8 weight-only")
    model = onnx.load(tmp_path / "int8" / "model.onnx", load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 3 * 4 + 1  # q/k/v, o, gate/up and down of each layer; the untied lm_head
    result = onnx_export.verify(tmp_path / "int8", uneven_slim_dir)
    assert result["passed"], result["failures"]
    assert result["checks"]["kl"] < 1e-3 and result["checks"]["top1"] >= 0.95


def test_dynamic_int8_quantizes_the_written_graph(uneven_onnx, uneven_slim_dir, tmp_path):
    """The measurement-only dynamic quantizer (benchmarks/onnx_bench.py) on the written graph, which has no
    value_info and contrib ops that stop ONNX's shape inference: every MatMul quantized, the graph runs."""
    import onnx

    onnx_export.quantize_dir(uneven_onnx, tmp_path / "dyn", method="int8-dynamic")
    ops = [n.op_type for n in onnx.load(tmp_path / "dyn" / "model.onnx", load_external_data=False).graph.node]
    assert ops.count("MatMulInteger") == 3 * 4 + 1 and "MatMul" not in ops  # q/k/v, o, gate/up, down; lm_head
    result = onnx_export.verify(tmp_path / "dyn", uneven_slim_dir)
    assert result["checks"]["positions"] > 0 and 0.0 <= result["checks"]["top1"] <= 1.0  # it ran; no quality bound


def test_int8_export_with_external_data(uneven_slim_dir, tmp_path, monkeypatch):
    """`export --quantize int8` end to end, with weights forced into external data (as for models > 2 GB)."""
    import onnx

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    summary = onnx_export.export(uneven_slim_dir, tmp_path / "int8", quantize="int8")
    files = sorted(p.name for p in (tmp_path / "int8").glob("model.onnx*"))
    assert files == ["model.onnx", "model.onnx.data"]
    graph = onnx.load(tmp_path / "int8" / "model.onnx", load_external_data=False).graph
    external = {i.name for i in graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
    quantized = {n.input[1] for n in graph.node if n.op_type == "MatMulNBits"}
    assert quantized and quantized <= external  # every weight lives in model.onnx.data
    assert summary["verification"]["passed"] and summary["quantize"] == "int8"
    assert OnnxDecoder(tmp_path / "int8").generate_ids([[1, 3, 4]], max_new_tokens=4, eos_token_ids=())


def test_untie_transposed_weights_makes_lm_head_quantizable():
    import onnx
    from onnx import helper, numpy_helper

    w = np.arange(12, dtype=np.float32).reshape(4, 3)  # an embedding [V=4, H=3]
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]), helper.make_node("MatMul", ["x", "Et"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(w, "E")],
    )
    model = helper.make_model(graph)
    assert onnx_export.untie_transposed_weights(model) == ["E.T"]
    assert [n.op_type for n in model.graph.node] == ["MatMul"]
    stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(stored["E.T"], w.T)


def test_packed_linear_equals_the_separate_linears():
    """Graph.packed_linear: q/k/v (or gate/up) in one MatMul and a Split give each Linear's own output, a bias
    where only some of the Linears have one included (zeros for the others), in fp32 through ONNX Runtime."""
    import onnx
    import onnxruntime as ort

    from slimgpt_deploy.exporters.onnx_graph import Graph

    torch.manual_seed(0)
    linears = [torch.nn.Linear(6, 4, bias=True), torch.nn.Linear(6, 2, bias=False), torch.nn.Linear(6, 3)]
    g = Graph(torch.float32)
    outs = g.packed_linear("x", linears, "layer.qkv_proj")
    assert [n.op_type for n in g.nodes] == ["MatMul", "Add", "Split"]
    value = lambda name, shape: onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)  # noqa: E731
    graph = onnx.helper.make_graph(
        g.nodes, "g", [value("x", [2, 6])], [value(o, None) for o in outs], initializer=g.inits
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    model.ir_version = 9
    x = torch.randn(2, 6)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})
    for linear, y in zip(linears, got):
        np.testing.assert_allclose(y, linear(x).detach().numpy(), rtol=1e-5, atol=1e-6)


# --- bad input ---------------------------------------------------------------------------------


def test_a_runtime_too_old_for_the_export_is_refused_in_one_line(uneven_slim_dir, uneven_onnx, tmp_path, monkeypatch):
    """The floors measured with older onnxruntime wheels (serving/onnx_runner.MIN_ORT): the export's own
    verification refuses (exit 2, nothing written) and so does every runner of an existing export."""
    import onnxruntime

    from slimgpt_deploy.serving.onnx_runner import check_runtime, load_spec

    monkeypatch.setattr(onnxruntime, "__version__", "1.22.1")
    out = tmp_path / "fused"
    result = CliRunner().invoke(main, ["export", str(uneven_slim_dir), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: onnxruntime 1.22.1 cannot run this export (opset 23): install onnxruntime >= 1.23; "
        "or re-export with --no-fuse (opset 18)"
    ]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BadInputError, match=">= 1.23"):
        OnnxDecoder(uneven_onnx)
    plain = CliRunner().invoke(
        main, ["export", str(uneven_slim_dir), "--format", "onnx", "--out", str(tmp_path / "plain"), "--no-fuse"]
    )
    assert plain.exit_code == 0, plain.output  # opset 18 runs from 1.20
    spec = load_spec(tmp_path / "plain")
    check_runtime("1.20.1", spec.opset, spec.weights)
    int8 = onnx_export.QUANTIZERS["int8"].weights
    check_runtime("1.22.0", spec.opset, int8)
    with pytest.raises(BadInputError, match=r"1\.21\.1 cannot run this export \(int8 .*>= 1\.22$"):
        check_runtime("1.21.1", spec.opset, int8)
    with pytest.raises(BadInputError, match=r"\(opset 18\): install onnxruntime >= 1\.20$"):
        check_runtime("1.19.2", spec.opset, spec.weights)


def test_cli_refuses_existing_out_and_leaves_it_unchanged(uneven_slim_dir, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["export", str(uneven_slim_dir), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "--force" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


@pytest.mark.parametrize("make_bad", ["missing", "no-config", "corrupt-weights"])
def test_cli_checkpoint_that_fails_to_load(make_bad, uneven_slim_dir, tmp_path):
    bad = tmp_path / "ckpt"
    if make_bad != "missing":
        shutil.copytree(uneven_slim_dir, bad)
    if make_bad == "no-config":
        (bad / "config.json").unlink()
    if make_bad == "corrupt-weights":
        for f in bad.glob("*.safetensors"):
            f.write_bytes(b"not safetensors")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", str(bad), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(dtype="int4"), "fp32, fp16"),
        (dict(quantize="int4"), "int8"),
        (dict(dtype="fp16", quantize="int8"), "--dtype fp32"),
    ],
)
def test_bad_dtype_or_quantize_is_refused_before_any_work(kwargs, words, uneven_slim_dir, tmp_path):
    with pytest.raises(BadInputError, match=words):
        onnx_export.export(uneven_slim_dir, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_failed_verification_raises_and_leaves_nothing(uneven_slim_dir, tmp_path, monkeypatch):
    strict = onnx_export.Tolerance(logits_atol=0.0, exact_greedy=True)  # no float graph meets 0.0
    monkeypatch.setitem(onnx_export.TOLERANCES, "fp32", strict)
    with pytest.raises(VerificationError, match=r"max \|logits diff\|") as err:
        onnx_export.export(uneven_slim_dir, tmp_path / "out")
    assert err.value.exit_code == 3
    assert list(tmp_path.iterdir()) == []


def test_cli_fp16_export_runs_on_cpu_and_a_runtime_without_fp16_is_a_bad_input(
    uneven_slim_dir, uneven_onnx, tmp_path, monkeypatch
):
    """ORT 1.32's CPU provider runs our fp16 graph (measured); a runtime that cannot gets a clear error."""
    import onnxruntime

    out = tmp_path / "fp16"
    result = CliRunner().invoke(
        main, ["export", str(uneven_slim_dir), "--format", "onnx", "--out", str(out), "--dtype", "fp16", "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "export.json").read_text())
    assert summary["dtype"] == "fp16" and summary["verification"]["passed"]
    assert json.loads((out / SPEC_FILE).read_text())["cache"]["dtype"] == "float16"

    def refuse(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for MatMul(13)")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    with pytest.raises(BadInputError, match="--dtype fp32 or --quantize int8"):
        OnnxDecoder(out)
    with pytest.raises(CheckpointError, match="cannot load"):  # fp32: a broken file, not a dtype choice
        OnnxDecoder(uneven_onnx)
