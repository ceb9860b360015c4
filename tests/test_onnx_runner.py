"""The ONNX Runtime runner: sampling, batching with left padding, streaming, and bad export dirs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402

from slimgpt_deploy.cli import main  # noqa: E402
from slimgpt_deploy.errors import CheckpointError  # noqa: E402
from slimgpt_deploy.exporters import onnx as onnx_export  # noqa: E402
from slimgpt_deploy.serving import get_backend  # noqa: E402
from slimgpt_deploy.serving.onnx_runner import (  # noqa: E402
    SPEC_FILE,
    OnnxDecoder,
    generate,
    left_pad,
    next_tokens,
    positions,
)

PROMPTS = ["the cat sat on the mat", "a dog ran", "big red"]


@pytest.fixture(scope="module")
def onnx_dir(uneven_slim_dir, tmp_path_factory) -> Path:
    """The uneven tiny checkpoint exported to ONNX (verification skipped: test_onnx_export covers it)."""
    out = tmp_path_factory.mktemp("runner") / "onnx"
    onnx_export.export(uneven_slim_dir, out, verify=False)
    return out


@pytest.fixture(scope="module")
def decoder(onnx_dir) -> OnnxDecoder:
    return OnnxDecoder(onnx_dir)


# --- pure functions -----------------------------------------------------------------------------


def test_left_pad_and_positions():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [0, 0, 8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(positions(mask), [[0, 1, 2], [0, 0, 0]])


def test_next_tokens_greedy_top_p_and_seeding():
    logits = np.log(np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], dtype=np.float32))
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(next_tokens(logits, 0.0, 1.0, rng), [1, 0])
    # top_p below the largest (tempered) probability keeps only the argmax
    for _ in range(20):
        np.testing.assert_array_equal(next_tokens(logits, 5.0, 0.3, rng), [1, 0])
    a = [next_tokens(logits, 1.0, 1.0, np.random.default_rng(7)) for _ in range(3)]
    b = [next_tokens(logits, 1.0, 1.0, np.random.default_rng(7)) for _ in range(3)]
    np.testing.assert_array_equal(a, b)
    # sampling at temperature 1 follows the distribution
    draws = np.concatenate([next_tokens(logits[:1].repeat(1000, 0), 1.0, 1.0, rng)])
    assert abs(np.mean(draws == 1) - 0.6) < 0.06
    # top_p = 0.85 on row 0 keeps {1, 2} (0.6 + 0.3 >= 0.85) and never draws token 0
    draws = next_tokens(logits[:1].repeat(2000, 0), 1.0, 0.85, rng)
    assert set(draws.tolist()) == {1, 2}


# --- generation on a real export -----------------------------------------------------------------


def test_batch_with_left_padding_equals_single_runs(decoder):
    prompts = [[1, 3, 4, 5, 6, 7, 8], [1, 9], [12, 13, 14, 15]]
    batch = decoder.generate_ids(prompts, max_new_tokens=24, eos_token_ids=())
    singles = [decoder.generate_ids([p], max_new_tokens=24, eos_token_ids=())[0] for p in prompts]
    assert batch == singles
    assert all(len(row) == 24 for row in batch)


def test_the_in_place_cache_generates_what_the_concatenated_cache_does(onnx_dir, decoder, monkeypatch):
    """The fused export's GroupQueryAttention reads and writes one full-length buffer per cache tensor; the same
    graph run with a fresh past/present pair per step (what --no-fuse graphs need) gives the same tokens."""
    from slimgpt_deploy.serving import onnx_runner

    prompts = [[1, 3, 4, 5, 6, 7, 8], [1, 9], [12, 13, 14, 15]]
    want = OnnxDecoder(onnx_dir, in_place=False).generate_ids(prompts, max_new_tokens=24, eos_token_ids=())
    assert decoder.spec.in_place_cache and decoder.in_place

    def refuse(*args):
        raise AssertionError("the in-place export was run with the ping-pong cache")

    monkeypatch.setattr(onnx_runner._PingPongCache, "__init__", refuse)
    assert decoder.generate_ids(prompts, max_new_tokens=24, eos_token_ids=()) == want


def test_generation_stops_at_eos_per_row(decoder):
    prompts = [[1, 3, 4], [1, 9, 10]]
    sample = dict(max_new_tokens=12, temperature=1.5, seed=1)  # sampled: varied tokens; same seed, same draws
    free = decoder.generate_ids(prompts, eos_token_ids=(), **sample)
    # pretend the first token that row 1 produces late (not among its first two) is EOS
    stop = next((t for j, t in enumerate(free[1]) if j >= 2 and t not in free[1][:j]), None)
    if stop is None:
        pytest.skip("row 1 repeats one token; no late first occurrence to stop at")
    got = decoder.generate_ids(prompts, eos_token_ids=(stop,), **sample)
    for row in range(2):
        want = free[row][: free[row].index(stop)] if stop in free[row] else free[row]
        assert got[row] == want
    assert len(got[1]) >= 2


def test_sampling_is_seeded(decoder):
    def run(seed):
        return decoder.generate_ids(
            [[1, 3, 4], [5]], max_new_tokens=16, temperature=1.5, top_p=0.9, seed=seed, eos_token_ids=()
        )

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_generate_streams_the_returned_text(onnx_dir):
    deltas: dict[int, list[str]] = {}
    texts = generate(
        onnx_dir,
        PROMPTS,
        max_new_tokens=10,
        temperature=0.0,
        top_p=1.0,
        seed=0,
        on_text=lambda i, d: deltas.setdefault(i, []).append(d),
    )
    assert len(texts) == len(PROMPTS)
    for i, text in enumerate(texts):
        assert "".join(deltas.get(i, [])) == text
    assert get_backend("onnx") is generate


def test_cli_generate_with_onnx_backend(onnx_dir):
    result = CliRunner().invoke(
        main,
        [
            "generate",
            str(onnx_dir),
            "--backend",
            "onnx",
            "--prompt",
            PROMPTS[0],
            "--prompt",
            PROMPTS[1],
            "--max-new-tokens",
            "8",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    body = result.output[result.output.index("[") :]
    rows = json.loads(body[: body.rindex("]") + 1])
    assert [r["prompt"] for r in rows] == PROMPTS[:2]
    assert rows == [
        {"prompt": p, "completion": c}
        for p, c in zip(
            PROMPTS[:2],
            generate(onnx_dir, PROMPTS[:2], max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0, on_text=None),
        )
    ]


def test_runner_accepts_the_model_file_path(onnx_dir):
    assert OnnxDecoder(onnx_dir / "model.onnx").directory == onnx_dir


# --- bad export directories ----------------------------------------------------------------------


def _copy(onnx_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(onnx_dir, dst)
    return dst


def _edit_spec(directory: Path, edit) -> None:
    spec = json.loads((directory / SPEC_FILE).read_text())
    edit(spec)
    (directory / SPEC_FILE).write_text(json.dumps(spec))


def _set_kv(spec, layer, kv):
    spec["cache"]["layers"][layer]["num_key_value_heads"] = kv


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda d: (d / SPEC_FILE).unlink(), f"no {SPEC_FILE}"),
        (lambda d: (d / SPEC_FILE).write_text("{not json"), "malformed"),
        (lambda d: _edit_spec(d, lambda s: _set_kv(s, 1, 2)), "past_key_values.1.key has shape"),
        (lambda d: _edit_spec(d, lambda s: s.update(head_dim=8)), "JSON says"),
        (lambda d: _edit_spec(d, lambda s: s["cache"]["layers"].pop() and s.update(num_layers=2)), "unexpected"),
        (lambda d: _edit_spec(d, lambda s: s["cache"]["layers"][0].update(inputs=["k", "v"])), "I/O names"),
        (lambda d: _edit_spec(d, lambda s: s.update(dtype="float16")), "cache dtype"),
        (lambda d: _edit_spec(d, lambda s: s["cache"].update(in_place="yes")), "cache.in_place is 'yes'"),
    ],
)
def test_runner_refuses_missing_or_inconsistent_json(damage, words, onnx_dir, tmp_path):
    bad = _copy(onnx_dir, tmp_path)
    damage(bad)
    with pytest.raises(CheckpointError, match=words):
        OnnxDecoder(bad)
    result = CliRunner().invoke(main, ["generate", str(bad), "--backend", "onnx", "--prompt", "the cat"])
    assert result.exit_code == 2, result.output
    assert "re-export" in result.output


def test_runner_missing_dir_or_model_file(onnx_dir, tmp_path):
    result = CliRunner().invoke(main, ["generate", str(tmp_path / "nope"), "--backend", "onnx", "--prompt", "x"])
    assert result.exit_code == 2 and "does not exist" in result.output
    bad = _copy(onnx_dir, tmp_path)
    (bad / "model.onnx").unlink()
    with pytest.raises(CheckpointError, match="has no model.onnx"):
        OnnxDecoder(bad)
