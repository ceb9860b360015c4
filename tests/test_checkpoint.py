"""The slim checkpoint contract: files, round trips, remote-code loading without this package."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimgpt_deploy.api import prune_to_checkpoint
from slimgpt_deploy.config import PruneConfig

GQA = dict(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, intermediate_size=128)
CALIB = "the big red cat sat on a small blue mat and ran to the park " * 200


@pytest.fixture(scope="module")
def slim_dir(tiny_model_dir_factory, tmp_path_factory):
    src = tiny_model_dir_factory("llama", **GQA)
    work = tmp_path_factory.mktemp("ckpt")
    (work / "calib.txt").write_text(CALIB)
    out = work / "slim"
    config = PruneConfig(ratio=0.3, calib=str(work / "calib.txt"), nsamples=8, seqlen=64, head_share=1.0)
    result = prune_to_checkpoint(str(src), out, config)
    return src, out, result


def test_checkpoint_files(slim_dir):
    _, out, _ = slim_dir
    names = {p.name for p in out.iterdir()}
    for required in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "slimgpt.json",
        "README.md",
        "configuration_slimgpt.py",
        "modeling_slimgpt.py",
    ):
        assert required in names, required
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "slimgpt"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_slimgpt.SlimGPTForCausalLM"
    for key in ("num_attention_heads_per_layer", "num_key_value_heads_per_layer", "intermediate_size_per_layer"):
        assert len(config[key]) == config["num_hidden_layers"]
    record = json.loads((out / "slimgpt.json").read_text())
    for key in (
        "prune",
        "calibration",
        "ratio_target",
        "ratio_achieved_decoder",
        "ratio_achieved_model",
        "layers",
        "seconds",
        "versions",
    ):
        assert key in record, key
    assert abs(record["ratio_achieved_decoder"] - 0.3) < 0.01
    layer = record["layers"][-1]
    for key in ("q_heads", "kv_heads", "ffn", "kept_q_heads", "attn_rel_error", "mlp_rel_error"):
        assert key in layer
    assert not list(out.parent.glob(".slim.partial-*"))


def test_round_trip_without_remote_code(slim_dir):
    _, out, result = slim_dir
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(3, 128, (2, 16))
    torch.testing.assert_close(loaded(x).logits, result.model(x).logits)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied stays tied
    assert loaded.config.num_attention_heads_per_layer == result.model.config.num_attention_heads_per_layer


def test_round_trip_with_remote_code(slim_dir):
    _, out, result = slim_dir
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    x = torch.randint(3, 128, (2, 16))
    torch.testing.assert_close(loaded(x).logits, result.model(x).logits)


def test_loads_where_slimgpt_deploy_is_not_installed(slim_dir, tmp_path):
    _, out, result = slim_dir
    x = torch.arange(3, 19)[None]
    expected = result.model(x).logits
    torch.save(expected, tmp_path / "expected.pt")
    code = f"""
import sys
sys.modules["slimgpt_deploy"] = None  # any import of the package now fails
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
# the tokenizer is plain tokenizer.json: trust_remote_code=False loads it with no prompt and no code run
tok = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=False)
assert tok("the cat sat").input_ids, "empty encoding"
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
assert "slimgpt_deploy" not in type(m).__module__, type(m).__module__
got = m(torch.arange(3, 19)[None]).logits
exp = torch.load({str(tmp_path / "expected.pt")!r})
assert torch.allclose(got, exp, atol=1e-5), (got - exp).abs().max()
try:
    import slimgpt_deploy
    raise SystemExit("slimgpt_deploy was importable")
except ImportError:
    pass
print("ok", type(m).__module__)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ok transformers_modules" in proc.stdout
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
    card = (out / "README.md").read_text()  # the model card shows the same two calls
    assert 'AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)' in card
    assert 'AutoTokenizer.from_pretrained("PATH", trust_remote_code=False)' in card


def test_the_package_registers_when_transformers_is_imported_and_the_cli_does_not_import_it(slim_dir):
    # In a fresh interpreter: the CLI module starts without transformers (its Auto classes cost ~3 s);
    # a lookup of transformers' spec (an "is the extra installed" check) does not use up the hook;
    # the first `import transformers` registers the slim model type, so no remote code is needed.
    _, out, _ = slim_dir
    code = f"""
import importlib.util, sys
import slimgpt_deploy.cli
assert "transformers" not in sys.modules, "the CLI imported transformers"
assert importlib.util.find_spec("transformers") is not None
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r})
assert type(m).__module__ == "slimgpt_deploy.modeling.modeling_slimgpt", type(m).__module__
print("ok")
"""
    # and where slimgpt_deploy.modeling is what imports transformers first (the vLLM plugin, sources.py)
    first = f"""
import slimgpt_deploy.modeling
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r})
assert type(m).__module__ == "slimgpt_deploy.modeling.modeling_slimgpt", type(m).__module__
print("ok")
"""
    for source in (code, first):
        proc = subprocess.run(
            [sys.executable, "-c", source], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
        )
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
        assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr


def test_generate_runs_on_the_slim_model(slim_dir):
    _, out, _ = slim_dir
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=8, do_sample=False)
    assert ids.shape == (1, 12)
