"""The bad-input suite (issue 6): every case through the CLI, each asserting

  * the exit code (2 bad input, 4 numerical),
  * exactly one error line on stderr, naming the problem (a substring),
  * that no output appears: no --out, no hidden `.out.partial-*`, and no resume
    state left behind unless it is worth resuming (then the message says so).

Tiny models only; the whole file runs in well under two minutes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from slimgpt_deploy.cli import main

GQA = dict(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, intermediate_size=128)
CALIB_TEXT = "the big red cat sat on a small blue mat and ran to the park " * 200


@dataclass
class Work:
    root: Path  # shared inputs (do not modify)
    model: Path  # a tiny 4-layer GQA llama
    slim: Path  # a tiny slim checkpoint (uneven layers)
    tmp: Path  # this case's own directory
    out: Path = field(init=False)

    def __post_init__(self):
        self.out = self.tmp / "out"

    def prune(self, model, *extra):
        return [
            "prune",
            model,
            "--out",
            self.out,
            "--calib",
            self.root / "calib.txt",
            "--nsamples",
            8,
            "--seqlen",
            32,
            "--seed",
            3,
            *extra,
        ]

    def copy(self, src: Path, name: str) -> Path:
        return Path(shutil.copytree(src, self.tmp / name))


@pytest.fixture(scope="module")
def shared(tiny_model_dir_factory, uneven_slim_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    (root / "calib.txt").write_text(CALIB_TEXT)
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 50)
    (root / "empty.txt").write_text("  \n")
    return root, tiny_model_dir_factory("llama", **GQA), uneven_slim_dir


# --- the cases: each returns the CLI arguments (and may prepare files or mock a failure) -------


def truncated_safetensors(w: Work, mp):
    model = w.copy(w.model, "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return w.prune(model)


def corrupt_safetensors_header(w: Work, mp):
    model = w.copy(w.model, "model")
    data = bytearray((model / "model.safetensors").read_bytes())
    data[8:12] = b"\xff\xfe{{"
    (model / "model.safetensors").write_bytes(bytes(data))
    return w.prune(model)


def pickle_checkpoint(w: Work, mp):
    model = w.copy(w.model, "model")
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    return w.prune(model)


def per_layer_lists_disagree_with_weights(w: Work, mp):
    slim = w.copy(w.slim, "slim")
    config = json.loads((slim / "config.json").read_text())
    config["intermediate_size_per_layer"][2] = 16  # the weights have 8 channels
    (slim / "config.json").write_text(json.dumps(config))
    return w.prune(slim)


def export_of_inconsistent_slim_checkpoint(w: Work, mp):
    per_layer_lists_disagree_with_weights(w, mp)
    return ["export", w.tmp / "slim", "--format", "vllm", "--out", w.out, "--no-verify"]


def dense_weight_of_wrong_shape(w: Work, mp):
    model = w.copy(w.model, "model")
    weights = load_file(model / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"][:100]
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    return w.prune(model)


def non_utf8_calibration_text(w: Work, mp):
    return ["prune", w.model, "--out", w.out, "--calib", w.root / "latin1.txt", "--nsamples", 2, "--seqlen", 8]


def empty_calibration_file(w: Work, mp):
    return ["prune", w.model, "--out", w.out, "--calib", w.root / "empty.txt", "--nsamples", 2, "--seqlen", 8]


def ratio_as_percentage(w: Work, mp):
    return w.prune(w.model, "--ratio", "20%")


def nonsense_dtype(w: Work, mp):
    return w.prune(w.model, "--dtype", "float7")


def unknown_method(w: Work, mp):
    return w.prune(w.model, "--method", "obs-magic")


def nonexistent_model_path(w: Work, mp):
    return w.prune(w.tmp / "no-such-model")


def existing_out_without_force(w: Work, mp):
    w.out.mkdir()
    (w.out / "mine.txt").write_text("keep")
    return w.prune(w.model)


def read_only_output_directory(w: Work, mp):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions; see read_only_filesystem")
    parent = w.tmp / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    w.out = parent / "out"
    return w.prune(w.model)


def read_only_filesystem(w: Work, mp):
    """The output's directory passes the permission check but writing fails with EROFS (as on a read-only mount)."""
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name.startswith(".out."):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, *args, **kwargs)

    mp.setattr(Path, "mkdir", mkdir)
    return w.prune(w.model)


def disk_full_writing_resume_state(w: Work, mp):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    mp.setattr("slimgpt_deploy.resume.save_file", full)
    return w.prune(w.model)


def disk_full_writing_checkpoint(w: Work, mp):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    mp.setattr("transformers.modeling_utils.safe_save_file", full)
    return w.prune(w.model)


def not_enough_memory(w: Work, mp):
    mp.setattr("slimgpt_deploy.api.available_ram", lambda: 2**20)
    return w.prune(w.model)


def not_enough_disk(w: Work, mp):
    mp.setattr("slimgpt_deploy.api.free_disk", lambda path: 1000)
    return w.prune(w.model)


def nonsense_max_memory(w: Work, mp):
    return w.prune(w.model, "--max-memory", "lots")


def resume_with_other_options(w: Work, mp):
    import slimgpt_deploy.cli as cli

    def interrupt(self, i, n, rec):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as m:
        m.setattr(cli._layer_progress, "update", interrupt)
        assert CliRunner().invoke(main, [str(a) for a in w.prune(w.model)]).exit_code == 130
    return w.prune(w.model, "--seed", "7", "--resume")


def nan_weights(w: Work, mp):
    model = w.copy(w.model, "model")
    weights = load_file(model / "model.safetensors")
    weights["model.layers.3.self_attn.k_proj.weight"][1, 2] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    return w.prune(model)


def export_of_non_checkpoint_dir(w: Work, mp):
    (w.tmp / "notes").mkdir()
    (w.tmp / "notes" / "README.md").write_text("not a model")
    return ["export", w.tmp / "notes", "--format", "onnx", "--out", w.out]


def eval_with_nothing_to_do(w: Work, mp):
    return ["eval", w.model]


def generate_zero_new_tokens(w: Work, mp):
    return ["generate", w.slim, "--prompt", "the cat", "--max-new-tokens", 0]


def serve_with_bad_tp_size(w: Work, mp):
    return ["serve", w.slim, "--tensor-parallel-size", 3, "--dry-run"]


def unsupported_architecture_with_remote_code(w: Work, mp):
    model = w.copy(w.model, "model")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "evil.py").write_text(f"open({str(w.tmp / 'pwned')!r}, 'w').write('ran')\n")
    return w.prune(model)


def gguf(w: Work, checkpoint: Path, *extra):
    return ["export", checkpoint, "--format", "gguf", "--out", w.out, *extra]


def gguf_of_word_level_tokenizer(w: Work, mp):
    return gguf(w, w.slim)  # the tiny word-level tokenizer has no byte-level BPE vocab


def gguf_unsupported_type(w: Work, mp):
    return gguf(w, w.slim, "--quantize", "int8")


def gguf_head_size_differs(w: Work, mp):
    from conftest import build_bpe_tokenizer, save_tiny_model

    model = save_tiny_model(w.tmp / "model", tokenizer=build_bpe_tokenizer(), vocab_size=320)
    config = json.loads((model / "config.json").read_text())
    config["head_dim"] = 8  # the weights hold 4 heads of 16
    (model / "config.json").write_text(json.dumps(config))
    return gguf(w, model)


def gguf_unknown_rope_scaling(w: Work, mp):
    from conftest import build_bpe_tokenizer, save_tiny_model

    rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    model = save_tiny_model(w.tmp / "model", tokenizer=build_bpe_tokenizer(), vocab_size=320, rope_parameters=rope)
    return gguf(w, model)


def gguf_runtime_without_deci(w: Work, mp):
    from conftest import build_bpe_tokenizer, save_tiny_model

    from slimgpt_deploy.serving import llamacpp_runner

    mp.setattr(llamacpp_runner, "_RUNTIME", None)
    mp.setattr(llamacpp_runner, "_has_deci", lambda library: False)
    return gguf(w, save_tiny_model(w.tmp / "model", tokenizer=build_bpe_tokenizer(), vocab_size=320))


# case -> (arguments, exit code, words in the error line, resume state expected to remain)
CASES = {
    "truncated safetensors": (truncated_safetensors, 2, "is truncated or corrupt", False),
    "corrupt safetensors header": (corrupt_safetensors_header, 2, "header is not valid JSON", False),
    "pickle checkpoint only": (pickle_checkpoint, 2, "pickle weights (pytorch_model.bin)", False),
    "slim per-layer lists disagree with the weights": (
        per_layer_lists_disagree_with_weights,
        2,
        "model.layers.2.mlp",
        False,
    ),
    "export of a slim checkpoint whose lists disagree": (export_of_inconsistent_slim_checkpoint, 2, "layer 2:", False),
    "dense weight of the wrong shape": (dense_weight_of_wrong_shape, 2, "up_proj.weight has shape [100, 64]", False),
    "non-UTF-8 calibration text": (non_utf8_calibration_text, 2, "is not valid UTF-8", False),
    "empty calibration file": (empty_calibration_file, 2, "is empty", False),
    "ratio given as 20%": (ratio_as_percentage, 2, "percentage", False),
    "nonsense --dtype": (nonsense_dtype, 2, "float7", False),
    "unknown --method": (unknown_method, 2, "obs-magic", False),
    "nonexistent model path": (nonexistent_model_path, 2, "does not exist", False),
    "existing --out without --force": (existing_out_without_force, 2, "already exists", False),
    "read-only output directory": (read_only_output_directory, 2, "cannot write", False),
    "read-only file system": (read_only_filesystem, 2, "Read-only file system", False),
    "disk full writing resume state": (disk_full_writing_resume_state, 2, "no space left", False),
    "disk full writing the checkpoint": (disk_full_writing_checkpoint, 2, "no space left", True),
    "not enough memory": (not_enough_memory, 2, "of memory", False),
    "not enough disk": (not_enough_disk, 2, "of disk", False),
    "nonsense --max-memory": (nonsense_max_memory, 2, "not a size", False),
    "--resume with other options": (resume_with_other_options, 2, "--seed 3 there, 7 now", True),
    "NaN in one layer's weights": (nan_weights, 4, "layer 3 (self_attn.k_proj.weight)", False),
    "export of a non-checkpoint directory": (export_of_non_checkpoint_dir, 2, "no config.json", False),
    "eval with nothing to do": (eval_with_nothing_to_do, 2, "nothing to evaluate", False),
    "generate --max-new-tokens 0": (generate_zero_new_tokens, 2, "--max-new-tokens must be at least 1", False),
    "serve with a bad tensor-parallel size": (serve_with_bad_tp_size, 2, "tensor-parallel size 3", False),
    "unsupported architecture shipping remote code": (unsupported_architecture_with_remote_code, 2, "'evil'", False),
    "GGUF of a word-level tokenizer": (gguf_of_word_level_tokenizer, 2, "the tokenizer is WordLevel", False),
    "GGUF of an unsupported type": (gguf_unsupported_type, 2, "GGUF type 'int8' is not supported", False),
    "GGUF of a head size that differs": (gguf_head_size_differs, 2, "one head size in every layer", False),
    "GGUF of an unknown RoPE scaling": (gguf_unknown_rope_scaling, 2, "RoPE scaling 'linear'", False),
    "GGUF with a llama.cpp lacking deci": (gguf_runtime_without_deci, 2, "no `deci` architecture", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, shared, tmp_path, monkeypatch):
    make, code, words, state_remains = CASES[case]
    root, model, slim = shared
    w = Work(root=root, model=model, slim=slim, tmp=tmp_path)
    args = [str(a) for a in make(w, monkeypatch)]
    existed = w.out.exists()
    before = sorted(p.name for p in w.out.parent.iterdir()) if w.out.parent.exists() else []

    result = CliRunner().invoke(main, args)

    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1, result.stderr
    assert words in errors[0], errors[0]
    if existed:
        assert (w.out / "mine.txt").read_text() == "keep"  # untouched
    else:
        assert not w.out.exists()
    assert not list(w.out.parent.glob(".out.partial-*"))
    state = w.out.parent / ".out.resume"
    assert state.exists() == state_remains
    if state_remains:
        assert "--resume" in errors[0]
    if args[0] != "prune":  # commands without --out write nothing next to their inputs
        assert sorted(p.name for p in w.out.parent.iterdir()) == before
    assert not (tmp_path / "pwned").exists()
