"""The engine on a compute device distinct from the host, checked on this CPU-only machine.

`fake_device.fake_cuda()` makes `cuda:0` a logical device that refuses every cross-device mix
CUDA refuses. The whole pruner (self-calibration -> heads -> FFN -> shrink -> save) runs there
and must give the CPU run's result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fake_device import DeviceMixError, OnDevice, fake_cuda
from safetensors.torch import load_file

from slimgpt_deploy.api import prune_to_checkpoint
from slimgpt_deploy.config import PruneConfig
from slimgpt_deploy.errors import NumericalError
from slimgpt_deploy.guards import obs_step_peak
from slimgpt_deploy.prune import engine, obs
from slimgpt_deploy.resume import Home
from slimgpt_deploy.sources import load_model

GQA = dict(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, intermediate_size=128)


def test_the_harness_refuses_what_cuda_refuses():
    with fake_cuda():
        W = torch.randn(4, 6).to("cuda")
        assert isinstance(W, OnDevice) and W.device == torch.device("cuda:0")
        idx = torch.tensor([0, 2])  # host indices into a device tensor: CUDA allows it
        W[:, idx] = 0.0
        host = torch.zeros(6)
        with pytest.raises(DeviceMixError, match="values on cuda:0 written into a cpu tensor"):
            host[idx] = W[0, idx]  # the bug of issue 11: err[idx] = group_errors(...)
        with pytest.raises(DeviceMixError, match="indexed with indices on cuda:0"):
            host[torch.sort(W[0]).indices[:2]] = 1.0  # alive[S] = False with S sorted on the device
        with pytest.raises(DeviceMixError, match="in one op"):
            _ = host + W[0]
        assert float((W[0] + torch.tensor(1.0)).sum()) == pytest.approx(
            float(W[0].sum()) + 6
        )  # a 0-dim host scalar is fine
        assert not isinstance(W.cpu(), OnDevice) and isinstance(W.cpu().cuda(), OnDevice)


def _spy(monkeypatch, module, name, seen):
    real = getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(
            ([a.device.type for a in args if isinstance(a, torch.Tensor)], torch.get_float32_matmul_precision())
        )
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


def _prune(model, out: Path, device: str, fisher_samples: int = 0) -> dict:
    config = PruneConfig(
        ratio=0.5, nsamples=8, seqlen=32, batch_size=4, device=device, head_share=1.0, fisher_samples=fisher_samples
    )
    prune_to_checkpoint(model, out, config)
    return json.loads((out / "slimgpt.json").read_text())


@pytest.mark.parametrize(
    ("free_bytes", "fisher_samples"),
    [(8 * 2**30, 0), (2**20, 0), (8 * 2**30, 4)],
    ids=["activations-on-device", "activations-pinned-on-host", "output-fisher"],
)
def test_whole_pruner_on_a_distinct_compute_device_matches_the_cpu(
    tiny_model_dir_factory, tmp_path, monkeypatch, free_bytes, fisher_samples
):
    model_dir = tiny_model_dir_factory("llama", **GQA)
    ref = _prune(model_dir, tmp_path / "cpu", "cpu", fisher_samples)  # a Path works as a source too
    # Loaded on the host as the CLI loads it (transformers' loader is not run under the harness:
    # it leaves non-persistent buffers uninitialised when every torch call is intercepted).
    model = load_model(str(model_dir))
    seen, homes = [], []
    _spy(monkeypatch, obs, "obs_remove_", seen)
    _spy(monkeypatch, obs, "group_errors", seen)
    real_home = engine.activation_home
    monkeypatch.setattr(engine, "activation_home", lambda *a: homes.append(real_home(*a)) or homes[-1])
    torch.set_float32_matmul_precision("high")
    try:
        with fake_cuda(), monkeypatch.context() as m:
            m.setattr("torch.cuda.mem_get_info", lambda *a: (free_bytes, 16 * 2**30))
            got = _prune(model, tmp_path / "cuda", "cuda", fisher_samples)
        assert torch.get_float32_matmul_precision() == "high"  # restored after pruning
    finally:
        torch.set_float32_matmul_precision("highest")
    assert got["prune"]["device"] == "cuda"
    assert homes == [Home(torch.device("cuda")) if free_bytes > 2**20 else Home(torch.device("cpu"), pin=True)]
    # the OBS work really ran on the compute device, in full float32 precision
    assert seen and all(set(devices) == {"cuda"} and precision == "highest" for devices, precision in seen)
    kept = [(r["kept_q_heads"], r["kept_kv_heads"]) for r in got["layers"]]
    assert kept == [(r["kept_q_heads"], r["kept_kv_heads"]) for r in ref["layers"]]
    assert any(len(q) < 8 for q, _ in kept)  # heads were pruned (the greedy head loop ran)
    assert got["calibration"] == ref["calibration"]
    a, b = (
        load_file(str(tmp_path / "cpu" / "model.safetensors")),
        load_file(str(tmp_path / "cuda" / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_in_loop_factorizations_retry_only_the_failed_blocks():
    good = torch.eye(3) * 2.0
    bad = torch.eye(3)
    bad[2, 2] = -1e-9  # indefinite by rounding, as a Schur complement can become
    L = obs.cholesky_retry(torch.stack([good, bad]), "test blocks")
    torch.testing.assert_close(L[0], torch.linalg.cholesky(good))  # the good block is not damped
    assert torch.isfinite(L).all() and L[1, 2, 2] > 0
    with pytest.raises(torch.linalg.LinAlgError, match="test block is not positive definite"):
        obs.cholesky_retry(-torch.eye(3), "test block")


def test_a_factorization_that_cannot_be_fixed_names_the_layer():
    with pytest.raises(NumericalError, match=r"layer 3 \(FFN channels\).*--hessian-dtype float64"):
        with engine._naming_layer(3, "FFN channels"):
            obs.cholesky_retry(-torch.eye(3), "the inverse Hessian block")


def test_activations_stay_on_the_device_only_when_they_fit():
    cuda = torch.device("cuda:0")
    with fake_cuda():  # 8 GiB free
        assert engine.activation_home(cuda, 2**30, 4 * 2**30) == Home(cuda)
        assert engine.activation_home(cuda, 2**30, 6 * 2**30) == Home(torch.device("cpu"), pin=True)
    assert engine.activation_home(torch.device("cpu"), 2**40, 0) == Home(torch.device("cpu"))


def test_obs_peak_formula_at_70b_shapes():
    # FFN step of Llama-3-70B: hidden 8192, FFN 28672, float32 Hessians: 4 H (3.29 GB each) + 4 W (0.94 GB each)
    peak = obs_step_peak(8192, 28672, 4)
    assert peak == 4 * 28672**2 * 4 + 4 * 8192 * 28672 * 4
    assert 16.8e9 < peak < 17.0e9


def test_the_ffn_obs_step_allocates_no_more_than_the_guards_formula():
    """Allocations measured with the profiler's memory timeline (CPU), against guards.obs_step_peak.

    benchmarks/obs_memory.py measures the same: H and W (the caller's) + 3.0 H of new tensors,
    against 8.65 H before the in-place updates.
    """
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfileTimeline

    from slimgpt_deploy.prune.methods import METHODS, LayerStats

    hidden, w = 64, 512
    g = torch.Generator().manual_seed(0)
    H, _ = obs.accumulate_hessian(torch.zeros(w, w), 0, torch.randn(2048, w, generator=g))
    stats = LayerStats(W=torch.randn(hidden, w, generator=g), H=H, percdamp=0.01, unit_norms=torch.zeros(w))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        METHODS["slimgpt"].ffn(stats, w // 2, 0.25)
    live = peak = 0
    sizes = {}
    for _t, action, key, size in MemoryProfileTimeline(prof._memory_profile()).timeline:
        if action == Action.CREATE:
            live, sizes[key] = live + size, size
        elif action == Action.DESTROY:
            live -= sizes.pop(key, 0)
        peak = max(peak, live)
    caller = (w * w + hidden * w) * 4  # H and W, held by the caller throughout
    assert caller + peak <= obs_step_peak(hidden, w, 4)
    assert peak >= 2 * w * w * 4  # the measurement saw the dampened copy and the factor at least


def test_recovery_on_a_distinct_compute_device_matches_the_cpu(tiny_model_dir_factory, tmp_path, monkeypatch):
    """Distillation (LoRA and full weights, teacher cache on) trains on the device and saves from the host."""
    from dataclasses import replace

    from slimgpt_deploy import sources
    from slimgpt_deploy.recover import RecoverConfig, recover

    dense = tiny_model_dir_factory("llama", seed=3, initializer_range=0.3, **GQA)
    slim = tmp_path / "slim"
    prune_to_checkpoint(str(dense), slim, PruneConfig(ratio=0.5, nsamples=8, seqlen=32, head_share=1.0))
    # transformers' loader does not run under the harness (see above): load on the host, move inside it
    host = {}
    real_load = sources.load_model

    def load_then_move(source, *, device="cpu", **kwargs):
        m = host.pop(str(source)) if device != "cpu" else real_load(source, device=device, **kwargs)
        return replace(m, model=m.model.to(device))

    monkeypatch.setattr(sources, "load_model", load_then_move)
    for full in (False, True):
        small = dict(steps=4, batch_size=2, seqlen=16, nsamples=4, heldout=2, teacher_topk=8, full=full, lr=3e-3)
        ref = recover(slim, str(dense), RecoverConfig(**small, device="cpu", precision="fp32"))
        host.update({str(p): real_load(str(p)) for p in (dense, slim)})  # fresh: training changes the student
        with fake_cuda():
            got = recover(slim, str(dense), RecoverConfig(**small, device="cuda", precision="fp32"))
        assert got.record["recovery"]["device"] == "cuda"
        a, b = ref.model.state_dict(), got.model.state_dict()
        assert not any(isinstance(t, OnDevice) for t in b.values())  # back on the host for saving
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
        assert got.record["recovery"]["fidelity"]["after"]["kl"] == pytest.approx(
            ref.record["recovery"]["fidelity"]["after"]["kl"], rel=1e-3
        )


def test_evaluation_on_a_distinct_compute_device_matches_the_cpu(tiny_model_dir_factory, tmp_path, monkeypatch):
    """`eval --device cuda`: perplexity, and fidelity on text the reference samples there, as on the CPU."""
    from dataclasses import replace

    from conftest import TINY_WORDS

    from slimgpt_deploy import api

    model_dir = tiny_model_dir_factory("llama", seed=1, **GQA)
    reference_dir = tiny_model_dir_factory("llama", seed=2, **GQA)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(TINY_WORDS[i % 7] for i in range(300)))
    options = dict(text=text, seqlen=32, fidelity_seqlen=16, fidelity_samples=2)
    ref = api.evaluate_model(str(model_dir), reference=str(reference_dir), **options)
    # transformers' loader does not run under the harness (see above): load on the host, move inside it
    host = {str(p): load_model(str(p)) for p in (model_dir, reference_dir)}

    def load_then_move(source, *, device="cpu"):
        return replace(host[source], model=host[source].model.to(device))

    monkeypatch.setattr(api, "load_model", load_then_move)
    with fake_cuda():
        got = api.evaluate_model(str(model_dir), reference=str(reference_dir), device="cuda", **options)
    assert got["perplexity"]["ppl"] == pytest.approx(ref["perplexity"]["ppl"], rel=1e-5)
    assert got["fidelity"]["kl"] == pytest.approx(ref["fidelity"]["kl"], rel=1e-4)
    assert got["fidelity"]["top1"] == ref["fidelity"]["top1"] and got["fidelity"]["text"] == ref["fidelity"]["text"]
    assert all(isinstance(p, OnDevice) for p in host[str(model_dir)].model.parameters())  # it ran there
