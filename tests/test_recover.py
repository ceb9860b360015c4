"""Recovery by distillation (slimgpt_deploy/recover.py) on tiny random models, and the `recover` command.

The tiny teacher has sharp next-token distributions (a large initializer range), so pruning
half of it visibly changes its outputs and distillation has something to win back.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import TINY_WORDS
from helpers import assert_refused
from safetensors.torch import load_file

from slimgpt_deploy import recover as recover_module
from slimgpt_deploy.api import prune_to_checkpoint
from slimgpt_deploy.checkpoint import read_config, read_record, validate_checkpoint
from slimgpt_deploy.cli import main
from slimgpt_deploy.config import PruneConfig
from slimgpt_deploy.errors import BadInputError, Interrupted
from slimgpt_deploy.recover import (
    RecoverConfig,
    batch_order,
    default_state_dir,
    distill_loss,
    fast_bf16,
    hidden_loss,
    lr_at,
    recover,
    recover_to_checkpoint,
    teacher_topk,
)

pytest.importorskip("peft")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine two spinning threads cost 5x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SHAPE_KEYS = ("num_attention_heads_per_layer", "num_key_value_heads_per_layer", "intermediate_size_per_layer")
SMALL = dict(steps=30, batch_size=4, seqlen=32, nsamples=16, heldout=4, save_every=10)


@pytest.fixture(scope="module")
def pair(tiny_model_dir_factory, tmp_path_factory):
    """(dense teacher dir, its 50% slim checkpoint)."""
    dense = tiny_model_dir_factory("llama", seed=3, initializer_range=0.3)
    slim = tmp_path_factory.mktemp("recover") / "slim"
    prune_to_checkpoint(str(dense), slim, PruneConfig(ratio=0.5, nsamples=8, seqlen=32, head_share=1.0))
    return dense, slim


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """Seeded random sentences over a few words: a training distribution a tiny model can learn."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(" ".join(rng.choice(TINY_WORDS[:8]) for _ in range(4000)))
    return path


# --- the math ------------------------------------------------------------------------------


def test_distill_loss_is_the_kl_of_the_tempered_distributions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    ids = torch.randint(11, (2, 5), generator=g)
    for T in (1.0, 2.0):
        p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
        expected = T**2 * (p * (p.log() - q.log())).sum(-1).mean()
        loss, parts = distill_loss(s, t, ids, temperature=T)
        assert torch.allclose(loss, expected, atol=1e-6) and math.isclose(parts["kl"], float(expected), rel_tol=1e-5)
    # the cached top-k form with k = V is the same KL; with k < V it is zero for a student that matches the
    # k probabilities and the tail's mass (not only the k's ratios); with the LM term the CE is added
    loss_k, _ = distill_loss(s, teacher_topk(t, 11, 1.0), ids)
    loss_full, _ = distill_loss(s, t, ids)
    assert torch.allclose(loss_k, loss_full, atol=1e-6)
    top = teacher_topk(t, 4, 1.0)
    same_head = t.clone().scatter_(-1, top[1].long(), top[0].exp().log() + torch.logsumexp(t, -1, keepdim=True))
    tail = torch.ones_like(t, dtype=torch.bool).scatter_(-1, top[1].long(), False)
    reshaped = torch.where(tail, same_head + torch.randn(t.shape, generator=g), same_head)  # tail reshuffled
    rescale = torch.logsumexp(t.masked_fill(~tail, -torch.inf), -1, keepdim=True) - torch.logsumexp(
        reshaped.masked_fill(~tail, -torch.inf), -1, keepdim=True
    )
    student = torch.where(tail, reshaped + rescale, same_head)  # the tail's shape changed, its mass kept
    assert float(distill_loss(student, top, ids)[0]) == pytest.approx(0.0, abs=1e-5)
    assert float(distill_loss(student * 1.5, top, ids)[0]) > 1e-3
    assert float(distill_loss(torch.softmax(t, -1).log().scatter(-1, top[1].long(), top[0]), top, ids)[0]) < 1e-5
    lm = F.cross_entropy(s[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    loss_lm, parts = distill_loss(s, t, ids, lm_weight=0.5)
    assert torch.allclose(loss_lm, loss_full + 0.5 * lm, atol=1e-6) and "lm" in parts
    assert float(distill_loss(t, t, ids)[0]) == pytest.approx(0.0, abs=1e-6)  # a perfect student


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("rows", [3, 16], ids=["chunks-of-3", "one-chunk"])
@pytest.mark.parametrize("sharp", [1.0, 25.0], ids=["soft", "sharp"])
def test_the_chunked_kl_gradient_is_autograds_of_the_plain_formula(monkeypatch, T, rows, sharp):
    """kl_and_grad forms the gradient T (Q - P) / N itself: it must be autograd's of the plain formula. A sharp
    student leaves a tail mass too small for 1 - sum(top-k) (the exact log-sum-exp branch)."""
    monkeypatch.setattr(recover_module, "KL_CHUNK_ROWS", rows)
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 11, generator=g, dtype=torch.float64), torch.randn(2, 5, 11, generator=g)
    s = sharp * s
    ids = torch.randint(11, (2, 5), generator=g)
    top = teacher_topk(t, 4, T)  # a real truncation: the other 7 tokens are the tail, one outcome
    for teacher in (t, top):
        a = s.clone().requires_grad_(True)
        loss, _ = distill_loss(a, teacher, ids, temperature=T)
        (0.5 * loss).backward()
        b = s.clone().requires_grad_(True)
        log_q = F.log_softmax(b / T, -1)
        if isinstance(teacher, tuple):  # KL over the k tokens and the tail merged into one outcome
            log_p, ids_k = teacher[0].double(), teacher[1].long()
            rest_p = 1 - log_p.exp().sum(-1)
            log_rest_q = torch.logsumexp(log_q.scatter(-1, ids_k, -torch.inf), -1)
            tail = rest_p * (rest_p.log() - log_rest_q)
            plain = ((log_p.exp() * (log_p - log_q.gather(-1, ids_k))).sum(-1) + tail).mean()
        else:
            log_p = F.log_softmax(t.double() / T, -1)
            plain = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        (0.5 * T**2 * plain).backward()
        assert float(loss.detach()) == pytest.approx(float(T**2 * plain.detach()), rel=1e-5)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    if sharp > 1:  # the exact branch ran
        q_top = F.softmax(s / T, -1).gather(-1, top[1].long())
        assert (1 - q_top.sum(-1) < recover_module.TAIL_EXACT_BELOW).any()


def test_hidden_loss_is_the_per_position_normalised_error_of_each_layer():
    g = torch.Generator().manual_seed(2)
    teacher = tuple(torch.randn(2, 3, 4, generator=g) * (10.0 if i == 2 else 1.0) for i in range(3))
    student = (teacher[0] + 5.0, teacher[1] + 0.1, teacher[2] * 1.5)  # the embeddings (first) do not count
    by_hand = [
        ((student[1] - teacher[1]) ** 2).sum(-1) / (teacher[1] ** 2).sum(-1),
        torch.full((2, 3), 0.25),  # 1.5 h: |0.5 h|^2 / |h|^2, whatever the layer's scale
    ]
    expected = torch.stack([t.mean() for t in by_hand]).mean()
    assert float(hidden_loss(student, teacher)) == pytest.approx(float(expected), rel=1e-6)
    assert float(hidden_loss(teacher, teacher)) == 0.0
    with pytest.raises(ValueError):
        hidden_loss(student[:2], teacher)


def test_hidden_weight_adds_the_layer_term_and_trains(pair, text, tmp_path):
    """--hidden-weight: the history logs the layer term, the loss is KL + weight x term, and it falls."""
    dense, slim = pair
    config = RecoverConfig(**SMALL, data=str(text), full=True, lr=3e-3, hidden_weight=2.0)
    rec = recover(slim, str(dense), config).record["recovery"]
    first, last = rec["loss"]["mean_first_tenth"], rec["loss"]["mean_last_tenth"]
    assert first["loss"] == pytest.approx(first["kl"] + 2.0 * first["hidden"], rel=1e-4)
    assert last["hidden"] < 0.8 * first["hidden"] and last["kl"] < first["kl"], rec["loss"]
    assert rec["options"]["hidden_weight"] == 2.0
    with pytest.raises(BadInputError, match="--hidden-weight"):
        RecoverConfig(hidden_weight=1.0, teacher_topk=8)


def test_self_data_takes_the_teacher_topk_from_its_sampling_pass(pair, text, monkeypatch):
    """With `self` data the teacher's top-k comes from the logits it sampled the text from: the teacher does not
    run again, the loss is the one a teacher pass over the sampled ids gives, and the record says which."""
    from slimgpt_deploy.calibration import get_calibration
    from slimgpt_deploy.recover import kl_and_grad
    from slimgpt_deploy.sources import load_model

    dense, slim = pair
    config = RecoverConfig(**{**SMALL, "steps": 2}, teacher_topk=8, precision="fp32")  # both passes in float32
    teacher = load_model(str(dense))
    calib = get_calibration("self", teacher.model, teacher.tokenizer, nsamples=6, seqlen=32, seed=0, logits_topk=8)
    sampled = {"logprobs": calib.next_topk[0], "ids": calib.next_topk[1]}
    forward = recover_module._teacher_cache(teacher.model, calib.input_ids, config)
    z = torch.randn(6 * 32, teacher.model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    as_rows = [(c["logprobs"].flatten(0, 1), c["ids"].flatten(0, 1)) for c in (sampled, forward)]
    (kl_s, grad_s), (kl_f, grad_f) = (kl_and_grad(z, c, config.temperature) for c in as_rows)
    torch.testing.assert_close(kl_s, kl_f, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_s, grad_f, rtol=1e-3, atol=1e-7)

    monkeypatch.setattr(recover_module, "_teacher_cache", lambda *a: pytest.fail("the teacher ran a second pass"))
    rec = recover(slim, str(dense), config).record["recovery"]
    assert rec["teacher_topk_from"] == "the sampling pass" and rec["seconds"]["teacher_cache"] < 1.0
    monkeypatch.undo()
    rec = recover(slim, str(dense), RecoverConfig(**{**SMALL, "steps": 2}, teacher_topk=8, data=str(text)))
    assert rec.record["recovery"]["teacher_topk_from"] == "a teacher forward pass"


def test_the_default_teacher_topk_is_decided_by_the_vocabulary_and_the_layer_term():
    """Unset: TEACHER_TOPK, at most the vocabulary, and 0 (the full logits) with --hidden-weight, whose layer term
    needs the teacher at every step; a given value is kept, and one above the vocabulary refused."""
    assert RecoverConfig().for_vocabulary(49152).teacher_topk == recover_module.TEACHER_TOPK == 128
    assert RecoverConfig().for_vocabulary(100).teacher_topk == 100
    assert RecoverConfig(hidden_weight=1.0).for_vocabulary(49152).teacher_topk == 0
    assert RecoverConfig(teacher_topk=0).for_vocabulary(49152).teacher_topk == 0
    assert RecoverConfig(teacher_topk=32).for_vocabulary(49152).teacher_topk == 32
    with pytest.raises(BadInputError, match="--teacher-topk 200 exceeds the teacher's vocabulary of 100"):
        RecoverConfig(teacher_topk=200).for_vocabulary(100)


def test_schedule_and_batch_order():
    lrs = [lr_at(i, 100, 1.0) for i in range(100)]
    assert lrs[0] < lrs[4] == pytest.approx(1.0) and lrs[-1] < 0.01 and max(lrs) <= 1.0
    order = batch_order(10, 7, 4, seed=5)
    assert order.shape == (7, 4)
    flat = order.flatten().tolist()
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # whole epochs
    assert torch.equal(order, batch_order(10, 7, 4, seed=5)) and not torch.equal(order, batch_order(10, 7, 4, seed=6))


# --- recovery on a tiny model --------------------------------------------------------------


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_recovery_lowers_the_loss_improves_fidelity_and_keeps_every_shape(pair, text, tmp_path, full):
    dense, slim = pair
    out = tmp_path / "rec"
    # LoRA with the default teacher top-k (here the whole vocabulary of 128, cached once); full weights with the
    # teacher's logits at every step (--teacher-topk 0)
    options = {**SMALL, "nsamples": 32, "teacher_topk": 0 if full else None}
    config = RecoverConfig(**options, data=str(text), full=full, lr=3e-3 if full else 1e-2)
    result = recover_to_checkpoint(slim, str(dense), out, config)
    rec = result.record["recovery"]
    assert rec["loss"]["mean_last_tenth"]["kl"] < 0.8 * rec["loss"]["mean_first_tenth"]["kl"], rec["loss"]
    assert rec["fidelity"]["after"]["kl"] < 0.7 * rec["fidelity"]["before"]["kl"], rec["fidelity"]
    assert rec["fidelity"]["after"]["top1"] >= rec["fidelity"]["before"]["top1"]
    # merged: the same per-layer shapes, no adapter tensors, a valid slim checkpoint
    for key in SHAPE_KEYS:
        assert read_config(out)[key] == read_config(slim)[key]
    validate_checkpoint(out)
    names = set().union(*(load_file(str(f)).keys() for f in out.glob("*.safetensors")))
    assert not any("lora" in n for n in names)
    record = read_record(out)
    assert record["ratio_target"] == read_record(slim)["ratio_target"]  # the prune record is kept
    assert record["recovery"]["tokens"] == 30 * 4 * 32 and record["recovery"]["data"]["source"] == f"file:{text}"
    assert "Recovery" in (out / "README.md").read_text()
    assert not default_state_dir(out).exists()  # state removed once saved


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_recovery_is_deterministic_and_resume_gives_the_uninterrupted_result(pair, tmp_path, precision):
    dense, slim = pair
    config = RecoverConfig(**{**SMALL, "steps": 7, "save_every": 2}, teacher_topk=16, precision=precision)
    whole = recover(slim, str(dense), config).model.state_dict()
    again = recover(slim, str(dense), config).model.state_dict()
    assert all(torch.equal(whole[k], again[k]) for k in whole)

    state = tmp_path / "state"

    def stop_after_5(step, steps, parts):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match=r"step 4/7.*--resume"):
        recover(slim, str(dense), config, state_dir=state, on_step=stop_after_5)
    assert json.loads((state / "state.json").read_text())["step"] == 4
    resumed = recover(slim, str(dense), config, state_dir=state, resume=True)
    assert resumed.record["recovery"]["seconds"]["train_resumed_from_step"] == 4
    got = resumed.model.state_dict()
    assert all(torch.equal(whole[k], got[k]) for k in whole)
    with pytest.raises(BadInputError, match="does not match this run.*--steps 7 there, 8 now"):
        recover(
            slim,
            str(dense),
            RecoverConfig(**{**SMALL, "steps": 8, "save_every": 2}, teacher_topk=16, precision=precision),
            state_dir=state,
            resume=True,
        )


def test_precision_auto_takes_bf16_only_where_the_hardware_multiplies_it(monkeypatch):
    # AMX tiles or AVX512-BF16, read from the kernel's CPU flags where there are any (independent of torch's probes)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = set(next((x for x in cpuinfo.read_text().splitlines() if x.startswith("flags")), "").split())
        hardware = bool(flags & {"amx_tile", "avx512_bf16"})
    else:
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        hardware = any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    assert fast_bf16(torch.device("cpu")) == hardware
    assert RecoverConfig().precision == ("bf16" if hardware else "fp32") and RecoverConfig().device == "cpu"
    monkeypatch.setattr(recover_module, "fast_bf16", lambda device: True)
    assert RecoverConfig().precision == "bf16" and RecoverConfig(precision="fp32").precision == "fp32"
    monkeypatch.setattr(recover_module, "fast_bf16", lambda device: False)
    assert RecoverConfig().precision == "fp32" and RecoverConfig(precision="bf16").precision == "bf16"
    with pytest.raises(BadInputError, match="unknown recover precision 'fp8'; choose one of: auto, bf16, fp32"):
        RecoverConfig(precision="fp8")
    with pytest.raises(BadInputError, match="unknown device 'tpu'"):
        RecoverConfig(device="tpu")


def test_bf16_trains_under_autocast_and_evaluates_in_float32(pair, text):
    """bf16 changes the trained weights (the matmuls really ran in bfloat16), not the float32 evaluation."""
    dense, slim = pair
    small = {**SMALL, "steps": 6}
    runs = {
        p: recover(slim, str(dense), RecoverConfig(**small, data=str(text), full=True, lr=3e-3, precision=p))
        for p in ("fp32", "bf16")
    }
    rec = {p: r.record["recovery"] for p, r in runs.items()}
    assert rec["bf16"]["precision"] == "bf16" and rec["fp32"]["precision"] == "fp32"
    assert rec["bf16"]["fidelity"]["before"] == rec["fp32"]["fidelity"]["before"]  # float32 either way
    a, b = runs["fp32"].model.state_dict(), runs["bf16"].model.state_dict()
    assert all(v.dtype == torch.float32 for v in b.values())  # master weights stay float32
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    assert moved and all(torch.allclose(a[k], b[k], atol=0.05) for k in a), moved


# --- the command line ----------------------------------------------------------------------


def _cli(*args):
    return CliRunner().invoke(main, ["recover", *map(str, args)])


def test_cli_recovers_and_prints_json(pair, tmp_path):
    dense, slim = pair
    out = tmp_path / "rec"
    result = CliRunner().invoke(
        main,
        [
            "recover",
            str(slim),
            "--teacher",
            str(dense),
            "--out",
            str(out),
            "--steps",
            "4",
            "--nsamples",
            "8",
            "--seqlen",
            "32",
            "--heldout",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    rec = json.loads(result.stdout)
    assert rec["steps"] == 4 and rec["fidelity"]["after"]["tokens"] == 64
    assert_refused(_cli(slim, "--teacher", dense, "--out", out, "--steps", "4"), "already exists", "--force")


def test_bad_input_is_refused_with_one_line_and_nothing_written(pair, tiny_model_dir_factory, tmp_path):
    dense, slim = pair
    out = tmp_path / "rec"
    other_vocab = tiny_model_dir_factory("llama", vocab_size=96)
    assert_refused(_cli(slim, "--teacher", other_vocab, "--out", out), "vocabulary of 96", "--teacher")
    other_hidden = tiny_model_dir_factory("llama", hidden_size=32)
    assert_refused(_cli(slim, "--teacher", other_hidden, "--out", out), "hidden size 32", "--teacher")
    assert_refused(_cli(tmp_path / "nowhere", "--teacher", dense, "--out", out), "does not exist")
    assert_refused(_cli(slim, "--teacher", tmp_path / "no-teacher", "--out", out), "no-teacher")
    assert_refused(_cli(dense, "--teacher", dense, "--out", out), "not a slim checkpoint")
    assert_refused(_cli(slim, "--teacher", dense, "--out", out, "--steps", "0"), "steps")
    assert_refused(_cli(slim, "--teacher", dense, "--out", out, "--hidden-weight", "-1"), "--hidden-weight")
    assert_refused(
        _cli(slim, "--teacher", dense, "--out", out, "--hidden-weight", "1", "--teacher-topk", "8"),
        "--hidden-weight",
        "--teacher-topk 0",
    )
    assert_refused(  # before any work (with file data topk failed in the teacher pass, after sampling and evaluation)
        _cli(slim, "--teacher", dense, "--out", out, "--teacher-topk", "100000"),
        "--teacher-topk 100000 exceeds",
        "vocabulary",
    )
    assert_refused(
        _cli(slim, "--teacher", dense, "--out", out, "--data", tmp_path / "missing.txt"),
        "missing.txt",
        "does not exist",
    )
    assert not out.exists() and not default_state_dir(out).exists()


# --- the build stage -----------------------------------------------------------------------


def test_build_options_switch_the_recover_stage():
    from slimgpt_deploy.build import DEFAULT_STAGES, STAGES, build_options
    from slimgpt_deploy.build.stages import stage_inputs

    off = build_options({}, {})
    assert "recover" not in off.stages and off.stages == DEFAULT_STAGES and not off.recover.enabled
    assert stage_inputs("export-onnx", off) == (("prune",), ())
    for on in (
        build_options({"recover.enabled": True}, {}),
        build_options({}, {"preset": "release"}),
        build_options({"preset": "release", "recover.steps": 5}, {}),
    ):
        assert on.stages == tuple(s for s in STAGES if s != "eval") and on.recover.enabled  # eval: off unless asked
        assert stage_inputs("export-onnx", on) == (("recover",), ()) and stage_inputs("bench", on) == (
            ("recover",),
            ("export-onnx", "export-gguf", "export-genai"),
        )
    assert (
        build_options({"recover.steps": 5, "recover.full": True}, {"recover.enabled": True}).recover.config.steps == 5
    )
    both = build_options({"recover.enabled": True, "gate": ["kl<=0.25"]}, {})
    assert both.stages == STAGES  # recovery and the gate's eval stage together
    assert (
        build_options({"preset": "release"}, {"recover.enabled": False}).recover.enabled is False
    )  # flags over presets
    with pytest.raises(BadInputError, match="stage recover is off; pass --recover"):
        build_options({}, {"stages": ["prune", "recover"]})
    with pytest.raises(BadInputError, match="unknown build option 'recover.stpes'.*recover.steps"):
        build_options({}, {"recover.stpes": 5})
    with pytest.raises(BadInputError, match="'recover.full'.* must be true or false"):
        build_options({}, {"recover.full": "yes"})
    with pytest.raises(BadInputError, match="unknown preset 'fast'"):
        build_options({}, {"preset": "fast"})


def test_build_with_recover_ships_the_recovered_checkpoint(pair, tmp_path):
    dense, _ = pair
    cfg = tmp_path / "build.yaml"
    cfg.write_text(
        "prune: {ratio: 0.5, nsamples: 4, seqlen: 32}\n"
        "recover: {steps: 3, nsamples: 4, seqlen: 32, heldout: 2, batch_size: 2}\n"
    )
    out = tmp_path / "b"
    argv = [
        "build",
        str(dense),
        "--out",
        str(out),
        "--config",
        str(cfg),
        "--stages",
        "prune,recover,report",
        "--recover",
        "--json",
    ]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert list(summary["stages"]) == ["prune", "recover", "report"] and summary["artifacts"]["recover"] == str(
        out / "recovered"
    )
    assert read_record(out / "recovered")["recovery"]["steps"] == 3
    report = json.loads((out / "report" / "report.json").read_text())
    assert (
        report["model"]["recovery"]["steps"] == 3
        and "Recovered by distillation" in (out / "report" / "report.md").read_text()
    )
    assert "build_report" in read_record(out / "recovered")  # the shipped checkpoint links the report
    # a rerun skips it; the exports now need the recovered checkpoint, not the pruned one
    again = json.loads(CliRunner().invoke(main, argv).stdout)
    assert again["stages"]["recover"]["status"] == "cached"
    shutil.rmtree(out / "recovered")
    result = CliRunner().invoke(
        main, ["build", str(dense), "--out", str(out), "--config", str(cfg), "--stages", "export-onnx", "--recover"]
    )
    assert_refused(result, "stage export-onnx needs the output of stage recover")
