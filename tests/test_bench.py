"""`slimgpt-deploy bench`: dense vs pruned on torch / ONNX Runtime / vLLM, each model in its own child process.

Tiny models (the uneven slim checkpoint and a dense model of its shapes) and tiny options, so
the numbers are noise; the tests check the schema, the arithmetic and the error paths.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from dataclasses import replace

import pytest
from click.testing import CliRunner
from conftest import TINY_WORDS, build_bpe_tokenizer, save_tiny_model

from slimgpt_deploy import bench
from slimgpt_deploy.bench import BACKENDS, BenchOptions, run_bench
from slimgpt_deploy.bench.measure import ratios, stats
from slimgpt_deploy.bench.tables import markdown
from slimgpt_deploy.cli import main
from slimgpt_deploy.errors import BadInputError
from slimgpt_deploy.extras import MissingExtraError

M_KEYS = {
    "prefill_ms",
    "decode_ms_per_token",
    "decode_tokens_per_s",
    "peak_rss_bytes",
    "peak_gpu_bytes",
    "weight_bytes",
    "kv_bytes_per_token",
    "seconds",
}
R_KEYS = {
    "ideal_decode_speedup",
    "decode_speedup",
    "of_ideal",
    "prefill_speedup",
    "weight_bytes",
    "peak_rss",
    "kv_bytes_per_token",
}


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """A dense tiny Llama with the uneven slim checkpoint's dense shapes (hidden 128, 3 layers, head_dim 32)."""
    return save_tiny_model(tmp_path_factory.mktemp("bench") / "dense", "llama", hidden_size=128, num_hidden_layers=3)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(rng.choice(TINY_WORDS) for _ in range(400)) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_options(text_file) -> BenchOptions:
    # one thread: on a shared 2-core machine two OpenMP threads can wait ~100x longer than they compute
    return BenchOptions(
        prompt_lens=(16, 32),
        batch_sizes=(1, 2),
        decode_tokens=4,
        repeats=2,
        threads=1,
        quality_tokens=256,
        quality_seqlen=32,
        text=text_file,
    )


TINY_CLI = [
    "--prompt-lens",
    "16,32",
    "--batch-sizes",
    "1,2",
    "--decode-tokens",
    "4",
    "--repeats",
    "2",
    "--quality-tokens",
    "256",
    "--quality-seqlen",
    "32",
    "--threads",
    "1",
]


def _vllm_missing(mp: pytest.MonkeyPatch) -> None:
    """Make vLLM look uninstalled: the availability check finds no spec, `import vllm` fails."""
    real = bench._find_spec
    mp.setattr(bench, "_find_spec", lambda module: None if module.split(".")[0] == "vllm" else real(module))
    mp.setitem(sys.modules, "vllm", None)


@pytest.fixture(scope="module")
def torch_onnx_result(dense_dir, uneven_slim_dir, tiny_options, tmp_path_factory):
    """torch + onnx measured, vllm asked for non-explicitly while 'missing' (so skipped)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    with pytest.MonkeyPatch.context() as mp:
        _vllm_missing(mp)
        return run_bench(
            dense_dir,
            uneven_slim_dir,
            ["torch", "onnx", "vllm"],
            options=tiny_options,
            explicit=False,
            work_dir=tmp_path_factory.mktemp("work"),
        )


def _check_s(s: dict) -> None:
    assert set(s) == {"median", "min", "max", "n"}
    assert s["min"] <= s["median"] <= s["max"] and s["n"] == 2


def _check_m(m: dict, options: BenchOptions) -> None:
    assert set(m) >= M_KEYS
    assert set(m["prefill_ms"]) == {str(n) for n in options.prompt_lens}
    for key in ("decode_ms_per_token", "decode_tokens_per_s"):
        assert set(m[key]) == {str(b) for b in options.batch_sizes}
    for group in ("prefill_ms", "decode_ms_per_token", "decode_tokens_per_s"):
        for s in m[group].values():
            _check_s(s)
            assert s["min"] > 0
    assert m["peak_rss_bytes"] > 40 * 2**20  # a child that loaded a runtime and a model
    assert m["weight_bytes"] > 0 and m["kv_bytes_per_token"] > 0 and m["seconds"] > 0


def test_torch_and_onnx_give_the_whole_schema_with_consistent_ratios(
    torch_onnx_result, tiny_options, dense_dir, uneven_slim_dir
):
    r = torch_onnx_result
    json.dumps(r, allow_nan=False)  # JSON-able
    assert set(r) == {"machine", "versions", "options", "models", "backends", "quality"}
    assert set(r["machine"]) == {"cpu", "cores", "ram_gib", "gpu", "platform"}
    assert {"slimgpt_deploy", "torch", "transformers", "onnxruntime"} <= set(r["versions"])
    assert r["options"]["backends"] == ["torch", "onnx", "vllm"] and r["options"]["decode_tokens"] == 4
    models = r["models"]
    assert models["dense"]["source"] == str(dense_dir) and models["pruned"]["source"] == str(uneven_slim_dir)
    assert models["pruned"]["params"] < models["dense"]["params"]
    assert models["pruned"]["weight_bytes"] < models["dense"]["weight_bytes"]
    # 3 layers x 2 (K, V) x head_dim 32 x 4 B x KV heads: dense 2+2+2, the uneven slim 2+1+2
    assert models["dense"]["kv_bytes_per_token"] == 3 * 2 * 2 * 32 * 4
    assert models["pruned"]["kv_bytes_per_token"] == 5 * 2 * 32 * 4
    for name in ("torch", "onnx"):
        e = r["backends"][name]
        assert e["status"] == "ok" and e["reason"] is None, e
        for role in ("dense", "pruned"):
            _check_m(e[role], tiny_options)
        d, p, R = e["dense"], e["pruned"], e["ratios"]
        assert set(R) == R_KEYS
        assert p["weight_bytes"] < d["weight_bytes"]
        assert (
            R["ideal_decode_speedup"] == pytest.approx(d["weight_bytes"] / p["weight_bytes"])
            and R["ideal_decode_speedup"] > 1
        )
        for b in ("1", "2"):
            speedup = d["decode_ms_per_token"][b]["median"] / p["decode_ms_per_token"][b]["median"]
            assert R["decode_speedup"][b] == pytest.approx(speedup)
            assert R["of_ideal"][b] == pytest.approx(speedup / R["ideal_decode_speedup"])
        for n in ("16", "32"):
            assert R["prefill_speedup"][n] == pytest.approx(d["prefill_ms"][n]["median"] / p["prefill_ms"][n]["median"])
        assert R["weight_bytes"] == pytest.approx(1 / R["ideal_decode_speedup"])
        assert R["peak_rss"] == pytest.approx(p["peak_rss_bytes"] / d["peak_rss_bytes"])
        assert R["kv_bytes_per_token"] == pytest.approx(5 / 6)
    assert r["backends"]["torch"]["dense"]["weight_bytes"] == models["dense"]["weight_bytes"]
    vllm = r["backends"]["vllm"]
    assert vllm["status"] == "skipped" and "slimgpt-deploy[vllm" in vllm["reason"] and "dense" not in vllm
    q = r["quality"]
    assert q["text"] == str(tiny_options.text) and q["seqlen"] == 32 and q["tokens"] == 256
    assert math.isfinite(q["dense"]["perplexity"]) and math.isfinite(q["pruned"]["perplexity"])
    assert q["kl"] > 0 and 0 <= q["top1"] <= 1


# back end -> (the module it needs, its export format, the bench option of the type it measures, that type's exporter
# arguments, an export's weight bytes)
EXPORT_BACKENDS = {
    "llamacpp": (
        "llama_cpp_py_sync",
        "gguf",
        {"gguf_type": "f32"},
        {"quantize": "f32"},
        lambda d: (d / "model-f32.gguf").stat().st_size,
    ),
    "genai": (
        "onnxruntime_genai",
        "genai",
        {"genai_weights": "int8"},
        {"dtype": "fp32", "quantize": "int8"},
        lambda d: sum(p.stat().st_size for p in d.glob("model.onnx*")),
    ),
}


@pytest.mark.parametrize("backend", list(EXPORT_BACKENDS))
def test_export_backed_back_ends_measure_given_exports_and_export_the_rest_alike(
    backend, uneven_slim_bpe_dir, tiny_options, tmp_path, monkeypatch
):
    """llama.cpp (an f32 GGUF) and ONNX Runtime GenAI (an int8 folder) as bench back ends: the pruned model's export
    given (as `build` gives its own), the dense one made in the work dir of the same type; the same schema, the ratio
    of the exports' weight bytes as the ideal, children without torch."""
    from slimgpt_deploy.exporters import get_exporter

    module, fmt, option, kwargs, weight_bytes = EXPORT_BACKENDS[backend]
    pytest.importorskip(module)
    _probe_imports(backend, tmp_path, monkeypatch)
    _no_quality(monkeypatch)
    dense = save_tiny_model(
        tmp_path / "dense", hidden_size=128, num_hidden_layers=3, tokenizer=build_bpe_tokenizer(), vocab_size=320
    )
    given = get_exporter(fmt)(uneven_slim_bpe_dir, tmp_path / "given", force=True, verify=False, **kwargs)
    options = replace(tiny_options, **option)
    r = run_bench(
        dense,
        uneven_slim_bpe_dir,
        [backend],
        options=options,
        work_dir=tmp_path / "w",
        exports={backend: {"pruned": tmp_path / "given"}},
    )
    e = r["backends"][backend]
    assert e["status"] == "ok", e
    for role in ("dense", "pruned"):
        _check_m(e[role], options)
        _check_light_child(e[role])
    assert e["pruned"]["weight_bytes"] == weight_bytes(tmp_path / "given")
    assert not (tmp_path / "w" / fmt / "pruned").exists()  # the given export is measured, not redone
    made = json.loads((tmp_path / "w" / fmt / "dense" / "export.json").read_text())
    assert e["dense"]["weight_bytes"] == weight_bytes(tmp_path / "w" / fmt / "dense")
    type_key = "type" if fmt == "gguf" else "weights"
    assert made[type_key] == given[type_key] == next(iter(option.values()))  # both models of the same type
    if backend == "genai":
        assert (tmp_path / "w" / "genai" / "dense" / "genai_config.json").is_file()
    assert e["ratios"]["ideal_decode_speedup"] == pytest.approx(
        e["dense"]["weight_bytes"] / e["pruned"]["weight_bytes"]
    )
    assert e["ratios"]["ideal_decode_speedup"] > 1
    assert r["options"][next(iter(option))] == next(iter(option.values()))


def test_markdown_tables_show_both_models_per_back_end(torch_onnx_result):
    md = markdown(torch_onnx_result)
    for name in ("torch", "onnx"):
        for role in ("dense", "pruned"):
            assert f"| {name} | {role} |" in md
    assert "| dense |" in md and "| pruned |" in md and "prefill 16 ms" in md and "decode b2 ms/step" in md
    assert "- vllm: skipped" in md
    assert "perplexity" in md
    assert "Protocol: float32;" in md
    options = {**torch_onnx_result["options"], "backends": ["torch", "llamacpp", "genai"], "gguf_type": "q8_0"}
    md = markdown({**torch_onnx_result, "options": options})  # what a build that ships q8_0 and int8 measures
    assert "Protocol: float32 (llamacpp q8_0 GGUF, genai fp32 weights);" in md


def test_explicit_missing_back_end_raises_before_any_work(
    dense_dir, uneven_slim_dir, tiny_options, tmp_path, monkeypatch
):
    _vllm_missing(monkeypatch)
    with pytest.raises(MissingExtraError, match=r"slimgpt-deploy\[vllm") as info:
        run_bench(dense_dir, uneven_slim_dir, ["torch", "vllm"], options=tiny_options, work_dir=tmp_path / "w")
    assert info.value.exit_code == 2
    assert not (tmp_path / "w").exists()  # refused before any child ran
    result = CliRunner().invoke(main, ["bench", str(dense_dir), str(uneven_slim_dir), "--backends", "torch,vllm"])
    assert result.exit_code == 2, result.output
    assert "slimgpt-deploy[vllm" in result.output and len(result.output.strip().splitlines()) == 1


def test_given_exports_are_checked_before_any_work(dense_dir, uneven_slim_dir, tiny_options, tmp_path):
    for exports, words in (
        ({"torch": {"pruned": tmp_path}}, "exports maps onnx, llamacpp, genai.*'torch'"),
        ({"onnx": {"teacher": tmp_path}}, r"'dense' and/or 'pruned'.*\['teacher'\]"),
        ({"llamacpp": {"pruned": tmp_path / "gone"}}, "pruned GGUF export .*gone does not exist.*--format gguf"),
    ):
        with pytest.raises(BadInputError, match=words):
            run_bench(dense_dir, uneven_slim_dir, ["torch"], work_dir=tmp_path / "w", exports=exports)
        assert not (tmp_path / "w").exists()


def test_unknown_back_end_is_bad_input_naming_it(dense_dir, uneven_slim_dir, tmp_path):
    with pytest.raises(BadInputError, match="'tpu'.*torch, onnx, vllm"):
        run_bench(dense_dir, uneven_slim_dir, ["tpu"], work_dir=tmp_path)
    result = CliRunner().invoke(main, ["bench", str(dense_dir), str(uneven_slim_dir), "--backends", "torch,tpu"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "'tpu'" in lines[0] and "vllm" in lines[0]


def _no_quality(monkeypatch) -> None:
    """Skip the quality child where a test is about something else (the torch + onnx run checks it)."""
    monkeypatch.setattr(bench, "_quality", lambda *a, **k: {"status": "skipped", "reason": "not measured in this test"})


def test_cli_bench_prints_json_and_writes_out(dense_dir, uneven_slim_dir, text_file, tmp_path, monkeypatch):
    # ONNX: its children import neither torch nor transformers, so the CLI is checked at the lowest cost
    _no_quality(monkeypatch)
    out = tmp_path / "res" / "bench.json"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            str(dense_dir),
            str(uneven_slim_dir),
            "--backends",
            "onnx",
            "--json",
            "--text",
            str(text_file),
            "--out",
            str(out),
            "--gguf-type",
            "q8_0",
            *TINY_CLI,
        ],
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert (printed["options"]["gguf_type"], printed["options"]["genai_weights"]) == ("q8_0", "fp32")
    assert printed == json.loads(out.read_text())
    assert list(printed["backends"]) == ["onnx"] and printed["backends"]["onnx"]["status"] == "ok"
    assert printed["options"]["prompt_lens"] == [16, 32]
    assert "| onnx | pruned |" in result.stderr
    assert not list(out.parent.glob(".*partial*"))


def test_options_validate_themselves(text_file, tmp_path):
    for bad, words in [
        (dict(prompt_lens=()), "prompt lengths"),
        (dict(batch_sizes=(0,)), "batch sizes"),
        (dict(decode_tokens=0), "decode_tokens"),
        (dict(repeats=0), "repeats"),
        (dict(threads=0), "threads"),
        (dict(quality_tokens=100, quality_seqlen=512), "quality_tokens"),
        (dict(text=tmp_path / "missing.txt"), "does not exist"),
        (dict(gguf_type="q3_k"), "GGUF type 'q3_k'.*q8_0"),
        (dict(genai_weights="int4"), "GenAI weights 'int4'.*int8"),
    ]:
        with pytest.raises(BadInputError, match=words):
            BenchOptions(**bad)
    options = BenchOptions(prompt_lens=[16, 8], text=text_file)
    assert options.decode_context == 8 and BenchOptions.from_dict(options.to_dict()) == options
    assert BenchOptions().text_file == bench.SAMPLE_TEXT and len(bench.SAMPLE_TEXT.read_text().split()) > 1000


def test_lengths_beyond_the_model_are_refused(dense_dir, uneven_slim_dir, tmp_path):
    with pytest.raises(BadInputError, match="positions"):  # tiny models have 256 positions
        run_bench(
            dense_dir,
            uneven_slim_dir,
            ["torch"],
            options=BenchOptions(prompt_lens=(512,), quality_seqlen=32, quality_tokens=64),
            work_dir=tmp_path,
        )


def test_ratios_and_stats_arithmetic():
    def m(ms: float, wb: int) -> dict:
        s = stats([ms, ms * 2, ms * 3])
        return {
            "prefill_ms": {"8": s},
            "decode_ms_per_token": {"1": s},
            "weight_bytes": wb,
            "peak_rss_bytes": wb * 10,
            "kv_bytes_per_token": 100,
        }

    assert stats([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    r = ratios(m(10.0, 1000), m(8.0, 800))
    assert r["ideal_decode_speedup"] == pytest.approx(1.25)
    assert r["decode_speedup"] == {"1": pytest.approx(1.25)} and r["of_ideal"] == {"1": pytest.approx(1.0)}
    assert r["prefill_speedup"]["8"] == pytest.approx(1.25)
    assert (
        r["weight_bytes"] == pytest.approx(0.8)
        and r["peak_rss"] == pytest.approx(0.8)
        and r["kv_bytes_per_token"] == 1.0
    )


def test_a_failing_back_end_is_reported_not_raised(dense_dir, uneven_slim_dir, tiny_options, tmp_path, monkeypatch):
    crash = replace(BACKENDS["torch"], measure="slimgpt_deploy.bench.no_such_module:measure")
    monkeypatch.setitem(BACKENDS, "torch", crash)  # the child crashes
    _no_quality(monkeypatch)
    r = run_bench(dense_dir, uneven_slim_dir, ["torch"], options=tiny_options, work_dir=tmp_path)
    e = r["backends"]["torch"]
    assert e["status"] == "failed" and "ModuleNotFoundError" in e["reason"] and "dense" not in e


PROBE = """
import sys
from {module} import {function} as measure_real

def measure(model, options):
    result = measure_real(model, options)
    result["heavy_modules"] = sorted({{name.split(".")[0] for name in sys.modules}} & {{"torch", "transformers"}})
    return result
"""


def _probe_imports(backend: str, tmp_path, monkeypatch) -> None:
    """Run `backend`'s real measure through a module that also reports whether the child imported torch or
    transformers (the child imports the package without its __init__: child_process.BOOTSTRAP)."""
    module, function = BACKENDS[backend].measure.split(":")
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / f"probe_{backend}.py").write_text(PROBE.format(module=module, function=function))
    monkeypatch.setenv("PYTHONPATH", str(probe))
    monkeypatch.setitem(BACKENDS, backend, replace(BACKENDS[backend], measure=f"probe_{backend}:measure"))


def _check_light_child(m: dict) -> None:
    """A runtime child's peak RSS is the runtime's and the model's, not torch's and transformers' (~0.5 GiB)."""
    assert m["heavy_modules"] == [], m
    assert m["peak_rss_bytes"] < 400 * 2**20  # with torch and transformers imported: ~0.6 GiB


def test_an_onnx_measurement_carries_neither_torch_nor_transformers(
    dense_dir, uneven_slim_dir, tiny_options, tmp_path, monkeypatch
):
    pytest.importorskip("onnxruntime")
    _probe_imports("onnx", tmp_path, monkeypatch)
    _no_quality(monkeypatch)
    r = run_bench(dense_dir, uneven_slim_dir, ["onnx"], options=tiny_options, work_dir=tmp_path / "w")
    e = r["backends"]["onnx"]
    assert e["status"] == "ok", e
    for role in ("dense", "pruned"):
        _check_light_child(e[role])


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_back_end_on_the_tiny_models(dense_dir, uneven_slim_dir, text_file, tmp_path, monkeypatch):
    _no_quality(monkeypatch)
    options = BenchOptions(
        prompt_lens=(16, 32),
        batch_sizes=(1, 2),
        decode_tokens=16,
        repeats=2,
        threads=1,
        quality_tokens=256,
        quality_seqlen=32,
        text=text_file,
    )
    r = run_bench(dense_dir, uneven_slim_dir, ["vllm"], options=options, work_dir=tmp_path)
    e = r["backends"]["vllm"]
    assert e["status"] == "ok", e
    for role in ("dense", "pruned"):
        _check_m(e[role], options)
    assert e["ratios"]["ideal_decode_speedup"] > 1 and r["versions"].get("vllm")


def test_every_back_end_row_names_what_exists():
    """A back end is one `BACKENDS` row: its child's measure module, the export format it measures, its runtime."""
    from slimgpt_deploy.exporters import EXPORTERS

    for name, backend in BACKENDS.items():
        module = backend.measure.split(":")[0]
        assert importlib.util.find_spec(module) is not None, name
        if backend.export is not None:
            assert backend.export.format in EXPORTERS, name
            options = BenchOptions()
            assert isinstance(backend.export.args(options), dict)
            assert set(backend.export.expected(options, "ckpt")) <= {
                "checkpoint",
                "source",
                "dtype",
                "quantize",
                "type",
                "weights",
            }
    assert [n for n, b in BACKENDS.items() if b.export] == ["onnx", "llamacpp", "genai"]
    assert BACKENDS["llamacpp"].unset_env == ("OMP_WAIT_POLICY",)
