"""Resource guards: the estimate's formula (pure), size parsing, and refusals with numbers."""

import dataclasses

import pytest

from slimgpt_deploy.config import PruneConfig
from slimgpt_deploy.errors import BadInputError, ResourceError
from slimgpt_deploy.guards import (
    ACTIVATION_COPIES,
    FISHER_ROLES,
    HESSIAN_COPIES,
    MLP_TEMPORARIES,
    JobSize,
    check_fits,
    estimate_prune,
    job_size,
    parse_size,
)

JOB = JobSize(
    params=1000,
    decoder_params=800,
    dtype_bytes=4,
    hessian_bytes=4,
    nsamples=10,
    seqlen=20,
    batch_size=5,
    hidden=8,
    max_attn_width=8,
    max_ffn=16,
    ratio=0.25,
)


def test_estimate_formula():
    e = estimate_prune(JOB)
    acts = 10 * 20 * 8 * 4
    assert e.activation_bytes == acts and not e.activations_on_disk
    assert e.parts == {
        "weights": 4000,
        "slim copy": 600 * 4,
        "activations": ACTIVATION_COPIES * acts,
        "Hessians": HESSIAN_COPIES * (8 * 8 + 16 * 16) * 4,
        "MLP temporaries": MLP_TEMPORARIES * 5 * 20 * 16 * 4,
    }
    assert e.ram_bytes == sum(e.parts.values())
    assert e.disk_bytes == (1000 - 200) * 4 + 600 * 4 + 2 * acts + 10 * 20 * 8


def test_loaded_weights_are_not_counted_again():
    assert estimate_prune(JOB, weights_loaded=True).ram_bytes == estimate_prune(JOB).ram_bytes - 4000


def test_max_memory_moves_activations_to_disk():
    acts = 10 * 20 * 8 * 4
    roomy = estimate_prune(JOB, max_memory=ACTIVATION_COPIES * acts)
    assert not roomy.activations_on_disk
    tight = estimate_prune(JOB, max_memory=ACTIVATION_COPIES * acts - 1)
    assert tight.activations_on_disk
    assert tight.parts["activations"] == ACTIVATION_COPIES * 2 * 5 * 20 * 8 * 4  # two batches
    assert tight.disk_bytes == roomy.disk_bytes + acts  # the post-attention copy on disk too


def test_the_fisher_pass_is_estimated_and_moves_to_disk_with_the_activations():
    job = dataclasses.replace(JOB, layers=32, fisher_samples=6)
    e, base = estimate_prune(job), estimate_prune(dataclasses.replace(job, fisher_samples=0))
    G = 32 * FISHER_ROLES * 8 * 8 * 4  # every layer's, in float32, kept through the prune
    inputs = 32 * 6 * 20 * 8 * 4  # every layer's dense inputs in the pass, which ends before the prune starts
    assert e.parts["Fisher curvatures"] == G
    assert e.parts["Fisher inputs"] == inputs - (base.ram_bytes - base.parts["weights"]) > 0  # beyond the prune's
    assert e.ram_bytes == base.ram_bytes + G + e.parts["Fisher inputs"] and e.disk_bytes == base.disk_bytes
    # with resume state, G waits there for a resumed prune: one layer's in memory
    resumable = estimate_prune(job, resumable=True)
    assert resumable.parts["Fisher curvatures"] == FISHER_ROLES * 8 * 8 * 4
    assert resumable.disk_bytes == e.disk_bytes + G
    # under --max-memory they go to disk with the activations: two batches and one layer's G in memory
    acts = 10 * 20 * 8 * 4
    assert not estimate_prune(job, max_memory=ACTIVATION_COPIES * acts + G + inputs).activations_on_disk
    tight = estimate_prune(job, max_memory=ACTIVATION_COPIES * acts + G + inputs - 1)
    assert tight.activations_on_disk
    assert tight.parts["Fisher curvatures"] == FISHER_ROLES * 8 * 8 * 4 and tight.parts["Fisher inputs"] == 0
    no_fisher = estimate_prune(dataclasses.replace(job, fisher_samples=0), max_memory=1)
    assert tight.disk_bytes == no_fisher.disk_bytes + G + inputs


def test_job_size_from_a_config(tiny_model_dir_factory):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir_factory("llama", tie_word_embeddings=False))
    job = job_size(config, PruneConfig(ratio=0.3, nsamples=4, seqlen=16, dtype="bfloat16"))
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128  # q, o, k, v, gate/up/down (norms are negligible)
    assert job.decoder_params == 2 * per_layer
    assert job.params == job.decoder_params + 2 * 128 * 64 + 64
    assert (job.dtype_bytes, job.hessian_bytes, job.hidden, job.max_ffn, job.max_attn_width) == (2, 4, 64, 128, 64)


def test_refusals_give_the_estimate_the_available_amount_and_what_to_lower(tmp_path):
    e = estimate_prune(JOB)
    check_fits(e, available_ram=e.ram_bytes, free_disk=e.disk_bytes, where=tmp_path)
    with pytest.raises(ResourceError, match=r"needs about .* of memory .* but 1\.0 KiB is available; lower --nsamples"):
        check_fits(e, available_ram=1024, free_disk=None)
    with pytest.raises(ResourceError, match=r"of disk in .* but 10 B is free"):
        check_fits(e, available_ram=e.ram_bytes, free_disk=10, where=tmp_path)


@pytest.mark.parametrize(
    "text, size",
    [("8GiB", 8 * 2**30), ("512MB", 512 * 10**6), ("1.5G", 1_500_000_000), ("1000", 1000), ("64 kib", 65536)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "8 GiBs", "-1G", "0", ""])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(BadInputError):
        parse_size(text)
