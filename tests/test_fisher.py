"""The output-space Fisher weighting of the OBS objective (prune/fisher.py), on its own and in the engine."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from slimgpt_deploy.config import PruneConfig
from slimgpt_deploy.errors import BadInputError
from slimgpt_deploy.families import layout_of
from slimgpt_deploy.prune import engine
from slimgpt_deploy.prune.engine import LayerwisePruner
from slimgpt_deploy.prune.fisher import Curvatures, OutputWeight, output_fisher
from slimgpt_deploy.prune.methods import METHODS, LayerStats
from slimgpt_deploy.prune.obs import accumulate_hessian, obs_remove

ROLES = ("down", "o")  # the projections a decision is taken on
GQA = dict(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, intermediate_size=128)


def _ids(n=6, s=24, seed=0):
    return torch.randint(3, 128, (n, s), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model(tiny_model_dir_factory):
    path = tiny_model_dir_factory("llama", **GQA)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)


def _reference_fisher(model, ids):
    """G from one ordinary backward pass of the whole model, with hooks on the projections' outputs."""
    layout = layout_of(model.config)
    sums = [{r: torch.zeros(model.config.hidden_size, model.config.hidden_size) for r in ROLES} for _ in range(3)]
    hooks = []
    for i, layer in enumerate(layout.part(model, "layers")):
        for role in ROLES:

            def hook(_m, _a, out, total=sums[i][role]):
                def accumulate(g):
                    total.add_(g.flatten(0, 1).T @ g.flatten(0, 1))

                out.register_hook(accumulate)

            hooks.append(layout.proj(layer, role).register_forward_hook(hook))
    emb = model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
    with torch.enable_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
    for h in [*hooks, emb]:
        h.remove()
    n = ids[:, 1:].numel()
    return [{r: G / n for r, G in layer.items()} for layer in sums]


def test_layer_by_layer_fisher_equals_one_whole_model_backward(model):
    ids = _ids()
    pruner = LayerwisePruner(model, PruneConfig(nsamples=6, seqlen=24))
    pos = pruner.layout.part(model, "rotary")(torch.empty(0), torch.arange(24)[None])
    mask = engine._causal_mask(24, torch.float32, "cpu")
    got, seconds = output_fisher(
        model,
        pruner.layout,
        ids,
        lambda layer, x: engine._dense_layer(pruner.layout, layer, x, pos, mask),
        [ROLES, ("down",), ()],  # layer 1 keeps its heads, layer 2 is left dense
        device=torch.device("cpu"),
        batch_size=4,  # two batches, the second a partial one
    )
    want = _reference_fisher(model, ids)
    assert seconds > 0
    assert [sorted(layer) for layer in got] == [sorted(ROLES), ["down"], []]
    for i in range(3):
        for role in got[i]:
            assert got[i][role].abs().max() > 0
            torch.testing.assert_close(got[i][role], want[i][role], rtol=1e-4, atol=1e-7)


def test_on_disk_the_fisher_is_the_same_and_leaves_nothing(model, tmp_path):
    """--max-memory: the pass's inputs and G live in files, one layer's G in memory; the prune is unchanged."""
    ids, kept = _ids(8, 32), []
    config = PruneConfig(ratio=0.4, nsamples=8, seqlen=32, head_share=1.0, fisher_samples=4, batch_size=4)
    pruner = LayerwisePruner(model, config)
    real = engine.output_fisher

    def spy(*args, directory=None, **kw):
        store, seconds = real(*args, directory=directory, **kw)
        kept.append(sorted(p.name for p in directory.iterdir()))  # the inputs are gone, G is on disk
        return store, seconds

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "output_fisher", spy)
        mp.setattr(engine.tempfile, "tempdir", str(tmp_path))
        disk = pruner.run(ids, offload=True)
    memory = LayerwisePruner(model, config).run(ids)
    assert kept == [["G-00000.safetensors", "G-00001.safetensors", "G-00002.safetensors", "complete.json"]]
    assert not list(tmp_path.iterdir()) and not pruner.fisher[0]  # dropped with the activations
    for (name, a), b in zip(memory.model.state_dict().items(), disk.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("stop", ["after-layer-0", "before-layer-0"])
def test_an_interrupted_prune_resumes_with_the_saved_fisher(tiny_model_dir_factory, tmp_path, monkeypatch, stop):
    """G waits in the resume state: the resumed prune reads it back instead of measuring it again,
    also when no layer was finished (interrupted right after the Fisher pass)."""
    from slimgpt_deploy.api import prune_to_checkpoint
    from slimgpt_deploy.errors import Interrupted
    from slimgpt_deploy.resume import default_state_dir

    source = tiny_model_dir_factory("llama", **GQA)
    config = PruneConfig(ratio=0.4, nsamples=8, seqlen=32, head_share=1.0, fisher_samples=4)
    prune_to_checkpoint(source, tmp_path / "whole", config)

    def stop_after_layer_0(i, n, rec):
        if i == 0:
            raise KeyboardInterrupt

    measure = engine.output_fisher

    def stop_after_the_pass(*a, **k):
        measure(*a, **k)
        raise KeyboardInterrupt

    out = tmp_path / "slim"
    with monkeypatch.context() as m, pytest.raises(Interrupted):
        if stop == "before-layer-0":
            m.setattr(engine, "output_fisher", stop_after_the_pass)
        prune_to_checkpoint(source, out, config, on_layer=stop_after_layer_0)
    assert json.loads((default_state_dir(out) / "state.json").read_text())["finished"] == (stop == "after-layer-0")
    saved = default_state_dir(out) / "fisher"
    assert sorted(p.name for p in saved.iterdir()) == [f"G-{i:05d}.safetensors" for i in range(3)] + ["complete.json"]
    measured_s = json.loads((saved / "complete.json").read_text())["seconds"]

    def measure_again(*a, **k):
        raise AssertionError("the Fisher was measured again")

    monkeypatch.setattr(engine, "output_fisher", measure_again)
    resumed = prune_to_checkpoint(source, out, config, resume=True)
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert resumed.record["fisher_seconds"] == round(measured_s, 3) > 0  # the interrupted run's pass
    assert not default_state_dir(out).exists()


def _problem(seed=0, out=6, width=10, n=64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(width, n, generator=g)
    H, _ = accumulate_hessian(torch.zeros(width, width), 0, X.T[None])
    W = torch.randn(out, width, generator=g)
    A = torch.randn(out, out, generator=g)
    return W, H, A @ A.T + 0.1 * torch.eye(out)


def test_compensation_does_not_depend_on_the_output_weight():
    W, H, G = _problem()
    weight = OutputWeight.of(G.double(), torch.device("cpu"))
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H.double()))
    S = torch.tensor([1, 4, 7])
    plain, _, _ = obs_remove(W.double(), Hinv, S)
    weighted, _, err = obs_remove(weight.apply(W.double()), Hinv, S)
    torch.testing.assert_close(weight.restore(weighted), plain)
    # and the weighted OBS error is tr(dW H dW^T G) under the normalised, damped G
    dW = plain - W.double()
    G_used = weight.R.mT @ weight.R
    assert err == pytest.approx(float(torch.trace(dW @ H.double() @ dW.T @ G_used)), rel=1e-7)


def test_the_output_weight_changes_which_channel_goes():
    # Two channels with equal inputs: channel 0 writes to output 0, channel 1 (with more weight) to output 1.
    # Unweighted, channel 0 is cheaper; when the loss cares ten times more about output 0, channel 1 goes.
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    H = 2 * torch.eye(2)
    stats = dict(W=W, H=H, percdamp=0.01, unit_norms=torch.zeros(2))
    plain = METHODS["slimgpt"].ffn(LayerStats(**stats), 1, 1.0)
    G = torch.diag(torch.tensor([10.0, 0.1]))
    weighted = METHODS["slimgpt"].ffn(LayerStats(**stats, output_weight=OutputWeight.of(G, torch.device("cpu"))), 1, 1)
    assert plain.removed == [0] and weighted.removed == [1]
    torch.testing.assert_close(weighted.W, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_an_identity_fisher_gives_slimgpt_decisions(model, monkeypatch):
    ids = _ids(8, 32)
    base = LayerwisePruner(model, PruneConfig(ratio=0.4, nsamples=8, seqlen=32, head_share=1.0)).run(ids)
    monkeypatch.setattr(
        engine,
        "output_fisher",
        lambda model, *a, **k: (Curvatures.of([{r: torch.eye(model.config.hidden_size) for r in ROLES}] * 3), 0.1),
    )
    config = PruneConfig(ratio=0.4, nsamples=8, seqlen=32, head_share=1.0, fisher_samples=4)
    got = LayerwisePruner(model, config).run(ids)
    for a, b in zip(base.record["layers"], got.record["layers"]):
        assert (a["kept_q_heads"], a["kept_kv_heads"]) == (b["kept_q_heads"], b["kept_kv_heads"])
    for (name, a), b in zip(base.model.state_dict().items(), got.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert got.record["fisher_seconds"] == 0.1


def test_the_fisher_changes_the_decisions_and_is_recorded(model):
    ids = _ids(8, 32)
    base = LayerwisePruner(model, PruneConfig(ratio=0.4, nsamples=8, seqlen=32, head_share=1.0)).run(ids)
    config = PruneConfig(ratio=0.4, nsamples=8, seqlen=32, head_share=1.0, fisher_samples=4)
    got = LayerwisePruner(model, config).run(ids)
    assert got.record["fisher_seconds"] > 0 and base.record["fisher_seconds"] == 0
    assert [r["ffn"] for r in got.record["layers"]] == [r["ffn"] for r in base.record["layers"]]  # same plan
    differ = lambda k: any(a[k] != b[k] for a, b in zip(base.record["layers"], got.record["layers"]))  # noqa: E731
    assert differ("mlp_error")
    assert not model.model.layers[0].mlp.down_proj.weight.requires_grad  # the model is left as it was


@pytest.mark.parametrize("method", ["magnitude", "wanda-sp"])
def test_fisher_with_a_method_that_has_no_obs_objective_is_refused(method):
    with pytest.raises(BadInputError, match=f"--fisher-samples .* --method {method}.*slimgpt or slimgpt-nocomp"):
        PruneConfig(method=method, fisher_samples=8)
    with pytest.raises(BadInputError, match="--fisher-samples -1"):
        PruneConfig(fisher_samples=-1)
    with pytest.raises(BadInputError, match="--fisher-samples 9 must be 0 .off. or at most --nsamples 8"):
        PruneConfig(nsamples=8, fisher_samples=9)
