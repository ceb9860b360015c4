"""The PyTorch reference the exports are verified against (reference.py): one decode per build."""

import os

import torch

from slimgpt_deploy.reference import greedy_reference, load_reference, shared_references

PROMPTS = [[5, 6, 7], [8, 9]]


class _Counter:
    """Counts the model's forward calls (a prefill or one decode step each)."""

    def __init__(self, model):
        self.calls = 0
        model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1


def test_shared_references_decode_each_prompt_once_per_checkpoint(tiny_model_dir_factory):
    path = tiny_model_dir_factory("llama", seed=5)
    first, _ = load_reference(path, torch.float32)
    second, _ = load_reference(path, torch.float32)  # a second verifier loads the checkpoint again
    a, b = _Counter(first), _Counter(second)
    plain = greedy_reference(first, PROMPTS, 4)
    assert a.calls == 2 * (1 + 4)  # prefill + 4 steps a prompt

    with shared_references():
        got = greedy_reference(first, PROMPTS, 4)
        again = greedy_reference(second, [PROMPTS[1], PROMPTS[0]], 4)  # another loader, another order
        longer = greedy_reference(second, PROMPTS[:1], 6)  # another length: decoded
        float64 = greedy_reference(second.to(torch.float64), PROMPTS[:1], 4)  # another dtype: decoded
    assert a.calls == 2 * 2 * (1 + 4)
    assert b.calls == (1 + 6) + (1 + 4)
    for g, p in zip(got, plain, strict=True):
        assert g.token_ids == p.token_ids and torch.equal(g.logprobs, p.logprobs)
    assert again[0] is got[1] and again[1] is got[0]
    assert longer[0].token_ids[:4] == got[0].token_ids and float64[0] is not got[0]

    with shared_references():
        greedy_reference(first, PROMPTS, 4)
    assert a.calls == 3 * 2 * (1 + 4)  # nothing kept from an earlier block
    greedy_reference(first, PROMPTS, 4)
    assert a.calls == 4 * 2 * (1 + 4)  # nothing shared outside a block


def test_a_rewritten_checkpoint_is_decoded_again(tiny_model_dir_factory):
    path = tiny_model_dir_factory("llama", seed=6)
    model, _ = load_reference(path, torch.float32)
    calls = _Counter(model)
    with shared_references():
        greedy_reference(model, PROMPTS[:1], 3)
        weights = path / "model.safetensors"
        stat = weights.stat()
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # e.g. recover rewrote it
        greedy_reference(model, PROMPTS[:1], 3)
    assert calls.calls == 2 * (1 + 3)


def test_models_not_loaded_from_a_directory_are_never_shared(tiny_model_dir_factory):
    model, _ = load_reference(tiny_model_dir_factory("llama", seed=7), torch.float32)
    model.config._name_or_path = ""  # built in memory
    calls = _Counter(model)
    with shared_references():
        greedy_reference(model, PROMPTS[:1], 3)
        greedy_reference(model, PROMPTS[:1], 3)
    assert calls.calls == 2 * (1 + 3)


def test_a_store_keeps_references_across_blocks(tiny_model_dir_factory):
    model, _ = load_reference(tiny_model_dir_factory("llama", seed=8), torch.float32)
    calls, store = _Counter(model), {}
    with shared_references(store):
        first = greedy_reference(model, PROMPTS[:1], 3)
    with shared_references():
        greedy_reference(model, PROMPTS[:1], 3)  # a block without the store decodes again
    with shared_references(store):
        again = greedy_reference(model, PROMPTS[:1], 3)
    assert calls.calls == 2 * (1 + 3) and again[0] is first[0] and len(store) == 1
