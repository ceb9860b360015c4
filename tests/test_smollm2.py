"""SmolLM2-135M (the embedded model) at 20%: SlimGPT against the baselines, by fidelity to the dense model.

Calibration and held-out text are disjoint parts of the package's own sample text (bench/sample.txt),
so no dataset is needed (and no time goes into sampling text from the model).
"""

import json

import pytest
import torch

from slimgpt_deploy.bench.options import SAMPLE_TEXT
from slimgpt_deploy.config import PruneConfig
from slimgpt_deploy.evaluate import fidelity
from slimgpt_deploy.prune.engine import LayerwisePruner
from slimgpt_deploy.sources import load_model


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def kl_by_method(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    ids = torch.tensor(tok(SAMPLE_TEXT.read_text())["input_ids"])
    assert len(ids) >= 12 * 128, len(ids)
    calib, held_out = ids[: 8 * 128].reshape(8, 128), ids[8 * 128 : 12 * 128]
    kl = {}
    for method in ("slimgpt", "slimgpt-nocomp", "magnitude", "wanda-sp"):
        config = PruneConfig(ratio=0.2, method=method, nsamples=8, seqlen=128, head_share=1.0)
        slim = LayerwisePruner(model, config).run(calib).model
        kl[method] = fidelity(slim, model, held_out, seqlen=128).kl
    return kl


def test_slimgpt_is_closer_to_dense_than_baselines(kl_by_method):
    kl = kl_by_method
    assert kl["slimgpt"] < kl["magnitude"], kl
    assert kl["slimgpt"] < kl["wanda-sp"], kl


def test_compensation_helps(kl_by_method):
    assert kl_by_method["slimgpt"] < kl_by_method["slimgpt-nocomp"], kl_by_method


def _gqa_aligned(q_heads: list[int], kv_heads: list[int]) -> bool:
    return all(q % kv == 0 for q, kv in zip(q_heads, kv_heads, strict=True))


def test_smollm2_shapes_under_gqa(smollm2, smollm2_slim_dir):
    # per-group (the default): the shared 20% prune of the whole test run keeps every KV head
    config = json.loads((smollm2_slim_dir / "config.json").read_text())
    assert json.loads((smollm2_slim_dir / "slimgpt.json").read_text())["prune"]["gqa_mode"] == "per-group"
    assert _gqa_aligned(config["num_attention_heads_per_layer"], config["num_key_value_heads_per_layer"])
    assert set(config["num_key_value_heads_per_layer"]) == {3}
    # kv-group: a KV head and its query heads are cut together; every layer stays aligned
    calib = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    config = PruneConfig(ratio=0.2, gqa_mode="kv-group", nsamples=4, seqlen=32, head_share=1.0)
    c = LayerwisePruner(smollm2.model, config).run(calib).model.config
    assert _gqa_aligned(c.num_attention_heads_per_layer, c.num_key_value_heads_per_layer)
