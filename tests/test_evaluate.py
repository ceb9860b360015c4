"""Perplexity and fidelity on tiny random LLaMA models, checked against hand computations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from slimgpt_deploy.errors import BadInputError
from slimgpt_deploy.evaluate import (
    FidelityResult,
    PerplexityResult,
    compare,
    fidelity,
    load_text,
    perplexity,
    text_to_ids,
)

VOCAB = 128
WIKITEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2" / "test.txt"


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


@pytest.fixture(scope="module")
def other():
    return tiny_model(1)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (100,), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------- perplexity


def test_perplexity_matches_transformers_loss(model, ids):
    seqlen = 16  # 6 windows; the last 4 tokens are dropped
    losses = []
    with torch.no_grad():
        for j in range(6):
            w = ids[j * seqlen : (j + 1) * seqlen][None]
            losses.append(model(input_ids=w, labels=w).loss.item())
    expect_nll = sum(losses) / len(losses)

    res = perplexity(model, ids, seqlen=seqlen)
    assert isinstance(res, PerplexityResult)
    assert (res.windows, res.seqlen, res.tokens) == (6, 16, 6 * 15)
    assert res.nll == pytest.approx(expect_nll, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(expect_nll), rel=1e-5)

    batched = perplexity(model, ids, seqlen=seqlen, batch_size=4)  # batches of 4 and 2
    assert batched.nll == pytest.approx(res.nll, rel=1e-5)


def test_perplexity_max_tokens_truncates_first(model, ids):
    res = perplexity(model, ids, seqlen=16, max_tokens=40)  # 40 tokens -> 2 windows
    assert res.windows == 2
    assert res.nll == pytest.approx(perplexity(model, ids[:32], seqlen=16).nll, rel=1e-6)


def test_perplexity_needs_one_window(model, ids):
    with pytest.raises(BadInputError, match="fewer than one window"):
        perplexity(model, ids[:10], seqlen=16)
    with pytest.raises(BadInputError, match="1-D"):
        perplexity(model, ids[None], seqlen=16)


def test_evaluation_restores_training_mode(ids):
    m = tiny_model(2).train()
    perplexity(m, ids, seqlen=16)
    assert m.training


# ---------------------------------------------------------------------------- fidelity


def test_fidelity_of_a_model_with_itself(model, ids):
    res = fidelity(model, model, ids, seqlen=16, batch_size=2)
    assert isinstance(res, FidelityResult)
    assert res.kl == 0.0 and res.top1 == 1.0 and res.tokens == 6 * 16


def test_fidelity_of_two_models_differs(model, other, ids):
    res = fidelity(other, model, ids, seqlen=16)
    assert res.kl > 0.0 and 0.0 <= res.top1 < 1.0


def test_fidelity_matches_hand_computation(model, other, ids):
    w = ids[:32]  # one window
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=w[None]).logits[0].double(), -1)  # reference
        log_q = torch.log_softmax(other(input_ids=w[None]).logits[0].double(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    top1 = (log_p.argmax(-1) == log_q.argmax(-1)).double().mean().item()

    res = fidelity(other, model, w, seqlen=32)
    assert res.tokens == 32
    assert res.kl == pytest.approx(kl, rel=1e-4)
    assert res.top1 == pytest.approx(top1)


def test_compare_gives_what_perplexity_and_fidelity_give_from_one_pass_of_each_model(model, other, ids):
    calls = {"model": 0, "other": 0}
    hooks = [
        m.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, m in (("model", model), ("other", other))
    ]
    try:
        both = compare(other, model, ids, seqlen=16, batch_size=2)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"model": 3, "other": 3}  # 6 windows of 16 in batches of 2, each model once per batch
    assert both.fidelity == fidelity(other, model, ids, seqlen=16, batch_size=2)
    assert both.model == perplexity(other, ids, seqlen=16, batch_size=2)  # the same floats, not approximately
    assert both.reference == perplexity(model, ids, seqlen=16, batch_size=2)


# ---------------------------------------------------------------------------- text


def _tokenizer_with_bos() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["<s>", "</s>", "<unk>", "a", "b", "c"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=4
    )


def test_text_to_ids_adds_no_special_tokens():
    tok = _tokenizer_with_bos()
    assert tok("a b")["input_ids"][0] == 0  # the tokenizer would add BOS ...
    ids = text_to_ids(tok, "a b c a b c a")  # ... text_to_ids does not; longer than model_max_length is fine
    assert ids.dtype == torch.int64 and ids.dim() == 1
    assert ids.tolist() == [3, 4, 5, 3, 4, 5, 3]


def test_load_text(tmp_path):
    good = tmp_path / "good.txt"
    good.write_bytes("\ufeffhello wörld".encode("utf-8"))
    assert load_text(good) == "hello wörld"

    bad = tmp_path / "bad.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(BadInputError, match="bad.txt is not valid UTF-8.*convert it to UTF-8"):
        load_text(bad)
    with pytest.raises(BadInputError, match="does not exist"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(BadInputError, match="empty"):
        load_text(tmp_path / "empty.txt")


@pytest.mark.skipif(not WIKITEXT.exists(), reason="../shared/data/wikitext-2 not present")
def test_load_wikitext_when_present():
    assert len(load_text(WIKITEXT)) > 100_000
