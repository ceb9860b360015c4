"""Same inputs, options and seed -> bit-identical checkpoints; another seed -> other calibration, same shapes."""

import hashlib
import json

from click.testing import CliRunner

from slimgpt_deploy.cli import main


def _digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_same_seed_gives_identical_checkpoints_and_another_seed_does_not(tiny_llama_dir, tmp_path):
    outs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / name
        result = CliRunner().invoke(
            main,
            [
                "prune",
                str(tiny_llama_dir),
                "--out",
                str(out),
                "--ratio",
                "0.3",
                "--nsamples",
                "8",
                "--seqlen",
                "32",
                "--seed",
                str(seed),
            ],
        )
        assert result.exit_code == 0, result.output
        outs[name] = out
    assert _digest(outs["a"]) == _digest(outs["b"])
    assert _digest(outs["a"]) != _digest(outs["c"])
    config = {k: json.loads((outs[k] / "config.json").read_text()) for k in outs}
    for key in ("num_attention_heads_per_layer", "num_key_value_heads_per_layer", "intermediate_size_per_layer"):
        assert config["a"][key] == config["c"][key]
    record = {k: json.loads((outs[k] / "slimgpt.json").read_text()) for k in outs}
    assert record["a"]["prune"]["seed"] == 0 and record["c"]["prune"]["seed"] == 1
    assert record["a"]["calibration"]["seed"] == 0 and record["c"]["calibration"]["seed"] == 1
    assert "torch" in record["a"]["versions"] and "transformers" in record["a"]["versions"]
