"""Calibration sources on a tiny random LLaMA and a word-level tokenizer (CPU, no network)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from slimgpt_deploy import calibration
from slimgpt_deploy.calibration import CalibrationSet, SelfPool, SelfSampling, get_calibration, sample_top_p
from slimgpt_deploy.errors import BadInputError, CalibrationError

SPECIALS = ["<s>", "</s>", "<unk>"]
WORDS = [f"w{i}" for i in range(125)]  # ids 3..127
BOS, EOS = 0, 1


def tiny_tokenizer(words=WORDS, bos: bool = True) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + list(words))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"bos_token": "<s>"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>", **kwargs)


def tiny_model(seed: int = 0, vocab_size: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def words_text(n: int) -> str:
    """n words whose token ids are 3 + i % 125: position i is recognisable."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


# ---------------------------------------------------------------------------- self


def test_self_shape_determinism_and_global_rng(model, tok, monkeypatch):
    monkeypatch.setitem(calibration.SELF_MAX_BATCH_SIZE, "cpu", 2)  # 5 samples -> batches of 2, 2, 1
    rng_before = torch.get_rng_state()
    a = get_calibration("self", model, tok, nsamples=5, seqlen=12, seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before), "self-sampling must not touch the global RNG"
    b = get_calibration("self", model, tok, nsamples=5, seqlen=12, seed=1)
    c = get_calibration("self", model, tok, nsamples=5, seqlen=12, seed=2)

    assert isinstance(a, CalibrationSet)
    assert a.input_ids.shape == (5, 12) and a.input_ids.dtype == torch.int64
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert (a.input_ids[:, 0] == BOS).all()
    assert not set(a.input_ids[:, 1].tolist()) & set(tok.all_special_ids)
    assert int(a.input_ids.max()) < 128
    d = a.describe()
    assert d == {"source": "self", "nsamples": 5, "seqlen": 12, "seed": 1, "tokens": 60}
    json.dumps(d)


def test_self_without_bos_starts_with_random_token(model):
    tok = tiny_tokenizer(bos=False)
    cal = get_calibration("self", model, tok, nsamples=6, seqlen=8, seed=0)
    assert cal.input_ids.shape == (6, 8)
    assert not set(cal.input_ids[:, 0].tolist()) & set(tok.all_special_ids)
    assert len(set(cal.input_ids[:, 0].tolist())) > 1, "seeded first tokens should make samples diverge"


def test_self_cached_sampling_matches_full_forward(model, tok):
    """With top_p = 0 sampling is greedy: each token must be the uncached argmax (specials masked) of its prefix."""
    ids = get_calibration("self", model, tok, nsamples=3, seqlen=10, seed=0, sampling=SelfSampling(top_p=0.0)).input_ids
    with torch.no_grad():
        for t in range(2, 10):
            logits = model(input_ids=ids[:, :t]).logits[:, -1]
            logits[:, tok.all_special_ids] = float("-inf")
            assert torch.equal(logits.argmax(-1), ids[:, t]), t


def tool_tokenizer() -> PreTrainedTokenizerFast:
    """Like SmolLM2's: an added special token (id 127) that is not in ``all_special_ids``."""
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS[:-1])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<tool>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert 127 not in tok.all_special_ids and len(tok) == 128
    return tok


def test_self_samples_no_special_token_after_the_prefix():
    tok, m = tool_tokenizer(), tiny_model(seed=3)
    with torch.no_grad():
        m.lm_head.weight.zero_()
        m.lm_head.weight[[0, 1, 2, 127], 0] = 1e3  # specials would win every step if allowed
    ids = get_calibration("self", m, tok, nsamples=4, seqlen=40, seed=0).input_ids
    assert (ids[:, 0] == BOS).all()
    assert not torch.isin(ids[:, 1:], torch.tensor([0, 1, 2, 127])).any(), ids
    # the old behaviour, still selectable: specials (EOS included) are sampled and do not stop sampling
    old = get_calibration("self", m, tok, nsamples=4, seqlen=40, seed=0, sampling=SelfSampling(mask_special=False))
    assert torch.isin(old.input_ids[:, 2:-1], torch.tensor([0, 1, 2, 127])).float().mean() > 0.5


def test_self_opens_with_the_named_token_and_refuses_one_the_tokenizer_lacks(model, tok):
    sampling = SelfSampling(open_with="</s>")  # a document separator instead of BOS
    ids = get_calibration("self", model, tok, nsamples=4, seqlen=8, seed=0, sampling=sampling).input_ids
    assert ids[:, 0].tolist() == [EOS] * 4 and not set(ids[:, 1].tolist()) & set(tok.all_special_ids)
    plain = get_calibration("self", model, tok, nsamples=4, seqlen=8, seed=0).input_ids
    assert plain[:, 0].tolist() == [BOS] * 4 and torch.equal(plain[:, 1], ids[:, 1])  # the same seeded random tokens
    with pytest.raises(CalibrationError, match=r"opening token '<\|endoftext\|>' is not in the tokenizer"):
        get_calibration("self", model, tok, nsamples=2, seqlen=8, sampling=SelfSampling(open_with="<|endoftext|>"))


def test_self_samples_do_not_depend_on_batch_size(model, tok, monkeypatch):
    sampling = SelfSampling(greedy_opening=2, overgenerate=1.5)
    monkeypatch.setitem(calibration.SELF_MAX_BATCH_SIZE, "cpu", 2)
    small = get_calibration("self", model, tok, nsamples=5, seqlen=16, seed=7, sampling=sampling).input_ids
    monkeypatch.setitem(calibration.SELF_MAX_BATCH_SIZE, "cpu", 8)
    whole = get_calibration("self", model, tok, nsamples=5, seqlen=16, seed=7, sampling=sampling).input_ids
    assert torch.equal(small, whole)
    sizes, real = [], calibration._sample_batch
    monkeypatch.setattr(
        calibration, "_sample_batch", lambda m, prefix, *a: sizes.append(len(prefix)) or real(m, prefix, *a)
    )
    given = get_calibration("self", model, tok, nsamples=5, seqlen=16, seed=7, sampling=sampling, self_batch=3)
    assert sizes == [3, 3, 2] and torch.equal(given.input_ids, whole)  # the caller's batch size (8 over-generated)
    # sample i depends on (seed, i) only: a larger pool starts with the smaller one
    pool = calibration.sample_self(model, tok, count=6, seqlen=16, seed=7, sampling=sampling)
    first = calibration.sample_self(model, tok, count=3, seqlen=16, seed=7, sampling=sampling)
    assert torch.equal(pool.input_ids[:3], first.input_ids)
    torch.testing.assert_close(pool.nll[:3], first.nll)  # batched float sums differ in the last bits


def test_self_logits_topk_are_the_models_next_token_topk_over_the_kept_samples(model, tok):
    """logits_topk keeps, from the sampling pass, the model's top-k next-token log-probs at every position (the
    prefill's, each step's and the one after the last token), aligned with the samples kept after over-generation:
    a full forward pass over the returned ids gives the same."""
    sampling = SelfSampling(overgenerate=1.5)  # 6 sampled, 4 kept
    calib = get_calibration("self", model, tok, nsamples=4, seqlen=16, seed=3, sampling=sampling, logits_topk=5)
    values, ids = calib.next_topk
    assert values.shape == ids.shape == (4, 16, 5) and values.dtype == torch.float32 and ids.dtype == torch.int32
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=calib.input_ids).logits.float(), dim=-1)  # [4, 16, V]
    torch.testing.assert_close(values, full.topk(5, dim=-1).values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(full.gather(-1, ids.long()), values, rtol=1e-4, atol=1e-4)  # near-ties may swap ids
    plain = get_calibration("self", model, tok, nsamples=4, seqlen=16, seed=3, sampling=sampling)
    assert plain.next_topk is None
    assert get_calibration("self", model, tok, nsamples=4, seqlen=16, seed=3, sampling=sampling).describe() == (
        calib.describe()
    )


def test_self_greedy_opening(model, tok):
    """After BOS and the random token, ``greedy_opening`` tokens are the argmax; sampling follows."""
    ids = get_calibration(
        "self",
        model,
        tok,
        nsamples=4,
        seqlen=12,
        seed=0,
        sampling=SelfSampling(greedy_opening=3, temperature=5.0, top_p=1.0),
    ).input_ids
    with torch.no_grad():
        argmax = [model(input_ids=ids[:, :t]).logits[:, -1, 3:].argmax(-1) + 3 for t in range(2, 12)]
    greedy = torch.stack(argmax, dim=1) == ids[:, 2:]  # [4, 10]
    assert greedy[:, :3].all()
    assert not greedy[:, 3:].all(), "hot sampling after the opening should leave the argmax somewhere"


def test_self_no_repeat_ngram_never_repeats_an_ngram_and_is_off_by_default(model, tok):
    """With no_repeat_ngram=n no n-gram occurs twice in a sample; the greedy model without it loops."""
    greedy = SelfSampling(top_p=0.0)  # the tiny random model's argmax falls into a loop within 60 tokens
    plain = get_calibration("self", model, tok, nsamples=3, seqlen=60, seed=0, sampling=greedy).input_ids

    def repeats(row: list[int], n: int) -> int:
        grams = [tuple(row[j : j + n]) for j in range(len(row) - n + 1)]
        return len(grams) - len(set(grams))

    assert sum(repeats(r, 3) for r in plain.tolist()) > 0
    banned = SelfSampling(top_p=0.0, no_repeat_ngram=3)
    ids = get_calibration("self", model, tok, nsamples=3, seqlen=60, seed=0, sampling=banned).input_ids
    assert all(repeats(r, 3) == 0 for r in ids.tolist()), ids
    assert torch.equal(ids[:, :2], plain[:, :2])  # the same openings
    # off by default, and then not named in the record (records from before the option stay the same)
    assert "no_repeat_ngram" not in SelfSampling().describe()
    assert banned.describe()["no_repeat_ngram"] == 3


def test_filter_drops_a_planted_degenerate_sample_and_the_worst():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (5, 40), generator=g)
    ids[2, 2:] = torch.tensor([7, 8, 9]).repeat(13)[:38]  # a loop: what a model finds most likely
    nll = torch.tensor([2.0, 2.5, 0.1, 2.2, 4.0], dtype=torch.float64)
    assert calibration.distinct_ngram_share(ids[2, 2:]) < calibration.SELF_MIN_DISTINCT
    assert calibration.distinct_ngram_share(ids[0, 2:]) == 1.0
    pool = SelfPool(input_ids=ids, nll=nll, opening=2)
    assert torch.equal(pool.select(3), ids[[0, 1, 3]])  # the loop, then the highest self-perplexity, go
    assert torch.equal(pool.select(4), ids[[0, 1, 3, 4]])
    assert torch.equal(pool.select(5), ids)
    # more degenerate samples than can be dropped: the least likely of them go first
    assert calibration.keep_best(nll, torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0]), 4).tolist() == [0, 2, 3, 4]


def test_self_batch_size_formula():
    # clamp(floor(fraction * free / seq_bytes), 1, max)
    frac = calibration.SELF_MEMORY_FRACTION
    assert calibration.self_batch_size(int(10 * 1000 / frac), 1000, 32) == 10
    assert calibration.self_batch_size(int(10 * 1000 / frac) - 1, 1000, 32) == 9
    assert calibration.self_batch_size(10**12, 1000, 32) == 32
    assert calibration.self_batch_size(10, 1000, 32) == 1


def test_self_sequence_bytes(model):
    # tiny model: 2 layers x 2 KV heads x 16 dims x (K, V) x 4 bytes = 512 bytes per token, plus one step's logits
    expect = 512 * 100 + 128 * (4 + calibration.SELF_LOGIT_COPIES * 4)
    assert calibration.self_sequence_bytes(model.config, seqlen=100, vocab=128, elem=4) == expect
    cfg = types.SimpleNamespace(
        num_key_value_heads=[1, 3], num_attention_heads=[4, 6], num_hidden_layers=2, hidden_size=64, head_dim=16
    )
    assert calibration.self_sequence_bytes(cfg, seqlen=10, vocab=0, elem=2) == 2 * 4 * 16 * 2 * 10


def test_self_batch_size_follows_free_memory(model, tok, monkeypatch):
    seq = calibration.self_sequence_bytes(model.config, seqlen=100, vocab=128, elem=4)
    monkeypatch.setitem(calibration.FREE_MEMORY, "cpu", lambda d: int(3 * seq / calibration.SELF_MEMORY_FRACTION))
    assert calibration._self_batch_size(model, 100, 128) == 3
    monkeypatch.setitem(calibration.FREE_MEMORY, "cpu", lambda d: 10**15)
    assert calibration._self_batch_size(model, 100, 128) == calibration.SELF_MAX_BATCH_SIZE["cpu"]


@pytest.mark.parametrize("fits", [True, False], ids=["moved-to-the-device", "declined"])
def test_self_samples_on_the_compute_device_when_the_model_fits(tok, monkeypatch, caplog, fits):
    """On a logical cuda:0 (tests/fake_device.py: refuses every cross-device mix CUDA refuses)."""
    from fake_device import OnDevice, fake_cuda

    m = tiny_model(seed=1)
    expect = get_calibration("self", m, tok, nsamples=3, seqlen=12, seed=0).input_ids
    need = calibration.model_bytes(m) + calibration.self_sequence_bytes(m.config, seqlen=12, vocab=128, elem=4)
    free = int(need / calibration.SELF_MEMORY_FRACTION) + (1 if fits else -1)
    where = []
    real = calibration._sample_batch
    monkeypatch.setattr(
        calibration,
        "_sample_batch",
        lambda model, *a: where.append(isinstance(next(model.parameters()), OnDevice)) or real(model, *a),
    )
    with fake_cuda(), monkeypatch.context() as patch, caplog.at_level("INFO", logger="slimgpt_deploy.calibration"):
        patch.setattr("torch.cuda.mem_get_info", lambda *a: (free, 16 * 2**30))
        got = get_calibration("self", m, tok, nsamples=3, seqlen=12, seed=0, device="cuda").input_ids
    assert where == [fits]
    assert type(got) is torch.Tensor and torch.equal(got, expect)
    assert all(type(p) is torch.nn.Parameter and not p.is_inference() for p in m.parameters()), "model back on the host"
    if not fits:
        assert "sampling on cpu, where the model is" in caplog.text


class HostBound(torch.Tensor):
    """Stands for logits on an accelerator: copying a vocabulary-wide tensor to the host raises.

    Every tensor computed from it is a HostBound too, so probabilities and top-k rows are caught
    as well; narrow results (the sampled ids, a boolean) may leave.
    """

    vocab = 128

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_host = func in (torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist)
        if func is torch.Tensor.to:
            device = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
            to_host = device is not None and device.type == "cpu"
        if to_host:
            with torch._C.DisableTorchFunctionSubclass():
                shape = tuple(args[0].shape)
            if shape and shape[-1] >= cls.vocab:
                raise AssertionError(f"{func.__name__}() of a vocabulary-wide tensor {shape}")
        return super().__torch_function__(func, types, args, kwargs)


def test_self_sampling_keeps_logits_on_the_device(tok):
    m = tiny_model(seed=1)
    expect = get_calibration("self", m, tok, nsamples=3, seqlen=12, seed=0).input_ids
    m.lm_head.register_forward_hook(lambda mod, inp, out: out.as_subclass(HostBound))
    with pytest.raises(AssertionError, match="vocabulary-wide"):  # the guard itself works
        m(input_ids=expect[:, :4]).logits.float().to("cpu")
    got = get_calibration("self", m, tok, nsamples=3, seqlen=12, seed=0, sampling=SelfSampling(overgenerate=2.0))
    assert type(got.input_ids) is torch.Tensor
    again = get_calibration("self", m, tok, nsamples=3, seqlen=12, seed=0).input_ids
    assert torch.equal(again, expect)


def test_sample_top_p_keeps_only_the_nucleus():
    probs = torch.tensor([0.6, 0.3, 0.06, 0.04])
    logits = torch.log(probs).repeat(3000, 1)
    u = torch.rand(3000, generator=torch.Generator().manual_seed(0))
    picks = sample_top_p(logits, u, top_p=0.8, temperature=1.0)
    assert set(picks.tolist()) == {0, 1}  # 0.6 < 0.8 <= 0.6 + 0.3
    assert (picks == 0).float().mean().item() == pytest.approx(2 / 3, abs=0.03)
    # inverse CDF at the edges; top_p <= 0 is greedy; top_p >= 1 keeps everything
    edge = sample_top_p(logits[:3], torch.tensor([0.0, 0.6665, 0.9999999]), top_p=0.8, temperature=1.0)
    assert edge.tolist() == [0, 0, 1]
    assert sample_top_p(logits[:2], torch.tensor([0.1, 0.99]), top_p=0.0, temperature=1.0).tolist() == [0, 0]
    assert sample_top_p(logits[:1], torch.tensor([0.999]), top_p=1.0, temperature=1.0).tolist() == [3]


def test_sample_top_p_grows_k_for_flat_distributions(monkeypatch):
    monkeypatch.setattr(calibration, "SELF_TOPK_START", 4)
    logits = torch.zeros(2, 100)  # uniform: the nucleus holds 95 tokens
    picks = sample_top_p(logits, torch.tensor([0.0, 0.999]), top_p=0.95, temperature=1.0)
    assert picks[0] < 100 and picks[1] < 100
    # the last kept token (rank 95) is reachable, rank 96+ never
    ranks = sample_top_p(
        torch.linspace(1, 0, 100).repeat(1, 1) * 1e-3, torch.tensor([0.9999]), top_p=0.95, temperature=1.0
    )
    assert 90 <= ranks.item() < 96


# ---------------------------------------------------------------------------- files


def test_text_file_non_overlapping_windows(model, tok, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(words_text(105), encoding="utf-8")  # 10 windows of 10, 5 tokens dropped
    all_ids = torch.tensor(tok(path.read_text(), add_special_tokens=False)["input_ids"])
    windows = [all_ids[j * 10 : (j + 1) * 10] for j in range(10)]

    cal = get_calibration(str(path), model, tok, nsamples=4, seqlen=10, seed=0)
    assert cal.input_ids.shape == (4, 10)
    starts = []
    for row in cal.input_ids:
        match = [j for j, w in enumerate(windows) if torch.equal(row, w)]
        assert len(match) == 1, "each sample must be one aligned window"
        starts.append(match[0])
    assert len(set(starts)) == 4, "samples must be distinct windows"
    assert cal.source == f"file:{path.resolve()}"

    again = get_calibration(f"file:{path}", model, tok, nsamples=4, seqlen=10, seed=0)
    assert torch.equal(cal.input_ids, again.input_ids)
    other = get_calibration(str(path), model, tok, nsamples=4, seqlen=10, seed=5)
    assert not torch.equal(cal.input_ids, other.input_ids)


def test_text_file_exactly_enough_tokens_uses_every_window(model, tok, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(words_text(40), encoding="utf-8")
    cal = get_calibration(str(path), model, tok, nsamples=4, seqlen=10, seed=0)
    assert sorted(int(r[0]) for r in cal.input_ids) == [3, 13, 23, 33]


def test_text_too_short_names_the_numbers(model, tok, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text(words_text(30), encoding="utf-8")
    with pytest.raises(CalibrationError) as e:
        get_calibration(str(path), model, tok, nsamples=4, seqlen=10)
    msg = str(e.value)
    assert "30 tokens" in msg and "4 x 10 = 40" in msg and "--nsamples/--seqlen" in msg
    assert "\n" not in msg
    assert isinstance(e.value, BadInputError)


def test_empty_file(model, tok, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n", encoding="utf-8")
    with pytest.raises(CalibrationError, match="empty"):
        get_calibration(str(path), model, tok, nsamples=1, seqlen=8)


def test_non_utf8_file(model, tok, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("w1 w2 café w3".encode("latin-1"))
    with pytest.raises(CalibrationError) as e:
        get_calibration(str(path), model, tok, nsamples=1, seqlen=8)
    assert "latin1.txt" in str(e.value) and "convert it to UTF-8" in str(e.value)


def test_jsonl_file(model, tok, tmp_path):
    path = tmp_path / "calib.jsonl"
    lines = [json.dumps({"text": words_text(30), "id": i}) for i in range(3)]
    path.write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n", encoding="utf-8")
    cal = get_calibration(str(path), model, tok, nsamples=9, seqlen=10, seed=0)
    assert cal.input_ids.shape == (9, 10)


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("{not json", "line 2 is not valid JSON"),
        ('{"txt": "w1"}', 'line 2 has no "text"'),
        ("[1, 2]", 'line 2 has no "text"'),
    ],
)
def test_jsonl_bad_line_is_named(model, tok, tmp_path, bad, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "w1 w2"}) + "\n" + bad + "\n", encoding="utf-8")
    with pytest.raises(CalibrationError, match=needle):
        get_calibration(str(path), model, tok, nsamples=1, seqlen=8)


@pytest.mark.parametrize("spec", ["missing.txt", "data/missing.jsonl", "./nowhere/data", "a/b/c"])
def test_nonexistent_path(model, tok, tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CalibrationError, match="does not exist"):
        get_calibration(spec, model, tok, nsamples=1, seqlen=8)


def test_unsupported_suffix(model, tok, tmp_path):
    path = tmp_path / "calib.csv"
    path.write_text("text\nw1 w2\n", encoding="utf-8")
    with pytest.raises(CalibrationError, match=r"\.txt or \.jsonl"):
        get_calibration(str(path), model, tok, nsamples=1, seqlen=8)


def test_token_ids_outside_model_vocab(tok, tmp_path):
    small = tiny_model(vocab_size=64)
    path = tmp_path / "calib.txt"
    path.write_text(words_text(100), encoding="utf-8")  # ids up to 102
    with pytest.raises(CalibrationError, match="vocabulary of 64"):
        get_calibration(str(path), small, tok, nsamples=2, seqlen=10)


# ---------------------------------------------------------------------------- validation


def test_seqlen_above_model_max(model, tok):
    with pytest.raises(CalibrationError) as e:
        get_calibration("self", model, tok, nsamples=1, seqlen=257)
    assert "256" in str(e.value)


@pytest.mark.parametrize("nsamples, seqlen, needle", [(0, 16, "nsamples"), (1, 7, ">= 8")])
def test_bad_shape(model, tok, nsamples, seqlen, needle):
    with pytest.raises(CalibrationError, match=needle):
        get_calibration("self", model, tok, nsamples=nsamples, seqlen=seqlen)


# ---------------------------------------------------------------------------- hub


def test_hub_without_datasets_package(model, tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(CalibrationError) as e:
        get_calibration("allenai/c4", model, tok, nsamples=1, seqlen=8)
    assert "pip install 'slimgpt-deploy[datasets]'" in str(e.value)


def _fake_datasets(load_dataset) -> types.ModuleType:
    mod = types.ModuleType("datasets")
    mod.load_dataset = load_dataset
    return mod


def test_hub_unreachable(model, tok, monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(load_dataset))
    with pytest.raises(CalibrationError) as e:
        get_calibration("allenai/c4", model, tok, nsamples=1, seqlen=8)
    msg = str(e.value)
    assert "unreachable" in msg and ".txt/.jsonl" in msg and "'self'" in msg and "\n" not in msg


def test_hub_streams_text_column(model, tok, monkeypatch):
    calls, served = {}, []

    def load_dataset(path, name=None, *, split, streaming):
        calls.update(path=path, name=name, split=split, streaming=streaming)

        def rows():
            for i in range(1000):
                served.append(i)
                yield {"text": words_text(20), "url": f"u{i}"}

        return rows()

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(load_dataset))
    cal = get_calibration("wikitext:wikitext-2-raw-v1", model, tok, nsamples=3, seqlen=10, seed=0)
    assert calls == {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "train", "streaming": True}
    assert cal.input_ids.shape == (3, 10) and cal.source == "hf:wikitext:wikitext-2-raw-v1"
    assert len(served) == calibration.HF_POOL_FACTOR * 3 * 10 // 20, "streaming should stop once the pool is full"


def test_hub_without_text_column(model, tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(lambda *a, **k: iter([{"content": "w1"}])))
    with pytest.raises(CalibrationError, match='no "text" column'):
        get_calibration("owner/name", model, tok, nsamples=1, seqlen=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_self_samples_on_cuda_and_returns_the_model(tok):
    m = tiny_model(seed=1)
    ids = get_calibration("self", m, tok, nsamples=3, seqlen=12, seed=0, device="cuda").input_ids
    assert ids.device.type == "cpu" and ids.shape == (3, 12)
    assert not torch.isin(ids[:, 1:], torch.tensor(tok.all_special_ids)).any()
    assert all(p.device.type == "cpu" and not p.is_inference() for p in m.parameters())
