"""Calibration data: ``nsamples`` sequences of ``seqlen`` token ids for the pruner.

SlimGPT (Ling et al., NeurIPS 2024, Sec. 4.1) calibrates, like GPTQ and SparseGPT, on
128 random 2048-token windows of C4 (``allenai/c4``, the first training shard). That is
a download and, on CPU, hours of Hessian accumulation for a 7B model. Our defaults are
chosen for CPU and for pipelines without network: 64 samples x 512 tokens from ``self``,
text sampled from the model itself (the "data-free" calibration of LLM-Pruner, Ma et al.
2023). The CLI passes these defaults; this module has none of its own, so the Python API
caller states what it uses.

Sources (``get_calibration(spec, ...)``; :data:`SOURCES` maps a kind to its loader):

- ``self``: the model samples its own calibration text (:class:`SelfSampling`;
  :data:`SELF_SAMPLING` is the default). Each sample opens with the tokenizer's BOS (if any)
  and one random non-special token, then ``greedy_opening`` greedy tokens (default 0), then
  nucleus sampling (temperature 1.0, top-p 0.95). Special tokens (``all_special_ids`` and
  added tokens marked special, e.g. SmolLM2's ``<|im_start|>``/``<|im_end|>``/``<file_sep>``)
  are never sampled. ``overgenerate`` x ``nsamples`` are sampled (default 1.0: no more) and
  the worst dropped: degenerate repeats (fewer than :data:`SELF_MIN_DISTINCT` distinct
  4-grams), then the highest self-perplexity. Exactly ``seqlen`` tokens each; EOS does not
  stop sampling. Sampling runs on ``device`` (the prune's compute device; the model is moved
  there and back if it fits in its free memory, else sampling stays where the model is,
  logged); the logits never leave that device; batches are sized from its free memory
  (:func:`self_batch_size`, at most ``self_batch_size`` or :data:`SELF_MAX_BATCH_SIZE`). Sample i
  draws its random numbers from (seed, i) alone, whatever the batch size or the number of
  samples; the batch size changes only the rounding of the model's matmuls, which can tip a
  near-tie (SmolLM2, 32 x 128 tokens: 1-2 of the 32 samples differ between batches of 8, 16,
  32 and 128). The KV cache is written in place (:func:`preallocated_cache`); under bfloat16 on CPU (recover's
  sampling) attention reads it without expanding it per query head (grouped_attention.py: 1.65x ``sdpa``).

  Defaults: masking special tokens is on because the chat model otherwise opens new chat
  turns mid-text. The other knobs (no BOS, a greedy opening, over-generation, temperature
  and top-p, no repeated n-grams) are off / unchanged until measured: benchmarks/self_calibration.py compares them
  (SmolLM2-135M, SlimGPT 20%, 64 x 512, WikiText-2 and Python-docs perplexity), but one
  64 x 512 variant did not finish on the shared 2-core machine (one batch of 32 x 512 took
  35 min to sample), so no variant is measured yet (before this change: 32.62 on WikiText-2,
  dense 18.51, benchmarks/results/quality.md).
- a local file (or ``file:PATH``): ``.txt`` (UTF-8) or ``.jsonl`` (one JSON object per line
  with a ``"text"`` field). The whole text is tokenized once without special tokens, cut
  into ``T // seqlen`` non-overlapping windows, and ``nsamples`` of them are drawn at random.
- a Hugging Face dataset (or ``hf:NAME``): ``owner/name`` or ``name:config``, e.g.
  ``allenai/c4:en`` or ``wikitext:wikitext-2-raw-v1``. The ``"text"`` column of the train
  split is streamed until the pool holds :data:`HF_POOL_FACTOR` times the tokens needed,
  joined, then treated as a file. Needs ``pip install 'slimgpt-deploy[datasets]'`` and network.

Every random choice uses a ``torch.Generator`` seeded with ``seed`` (never the global RNG):
the same spec, model, tokenizer and seed give an identical tensor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, DynamicLayer

from slimgpt_deploy.errors import BadInputError, CalibrationError, first_line
from slimgpt_deploy.evaluate import eval_mode, load_text, model_device, text_to_ids
from slimgpt_deploy.grouped_attention import grouped_attention
from slimgpt_deploy.guards import FREE_MEMORY, free_memory  # noqa: F401  (FREE_MEMORY: the probes, by device type)

logger = logging.getLogger(__name__)

MIN_SEQLEN = 8
# self-sampling: up to 32 sequences decode together on CPU (a step of 32 costs ~1.6x less per
# sequence than one of 16), more on CUDA; fewer when the device's free memory is short.
SELF_MAX_BATCH_SIZE = {"cpu": 32, "cuda": 256}
SELF_MEMORY_FRACTION = 0.5  # of the sampling device's free memory, for KV caches and logits
SELF_LOGIT_COPIES = 4  # float32 [vocab] temporaries per sequence and step (see self_sequence_bytes)
SELF_TOPK_START = 256  # first k tried when searching the top-p nucleus
SELF_MIN_DISTINCT = 0.5  # a sample with fewer distinct 4-grams than this share is a degenerate repeat
HF_POOL_FACTOR = 4  # stream this many times nsamples * seqlen tokens of a hub dataset
TEXT_JOINER = "\n\n"  # between documents of a .jsonl file or a dataset


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    input_ids: torch.Tensor  # [nsamples, seqlen] int64, on the CPU
    source: str  # "self", "file:/abs/path.txt", "hf:allenai/c4"
    seed: int
    # `self` with logits_topk=k only: the sampling model's k most likely next tokens at every position, their
    # log-probabilities ([nsamples, seqlen, k] float32, at temperature 1, normalised over the whole vocabulary)
    # and ids ([nsamples, seqlen, k] int32), from the sampling pass itself (see sample_self); None otherwise
    next_topk: tuple[torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        assert self.input_ids.dim() == 2 and self.input_ids.dtype == torch.int64, self.input_ids.shape

    @property
    def nsamples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.input_ids.shape[1]

    def describe(self) -> dict:
        """JSON-able record of what the model was calibrated on (for ``slimgpt.json``)."""
        return {
            "source": self.source,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "seed": self.seed,
            "tokens": self.nsamples * self.seqlen,
        }


@dataclass(frozen=True)
class _Request:
    """What every loader gets: the model, its tokenizer and the shape wanted."""

    model: torch.nn.Module
    tokenizer: object
    nsamples: int
    seqlen: int
    seed: int
    device: torch.device | None = None  # where `self` samples (the prune's compute device)
    sampling: SelfSampling | None = None  # `self` only; None: SELF_SAMPLING
    self_batch: int | None = None  # `self` only: most sequences decoded together; None: SELF_MAX_BATCH_SIZE
    logits_topk: int = 0  # `self` only: keep the sampler's top-k next-token log-probs (CalibrationSet.next_topk)

    def generator(self) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.seed)


class Loaded(NamedTuple):
    """What a loader returns: ``[nsamples, seqlen]`` int64 ids, a source description, and (``self`` only,
    when asked) the sampler's top-k next-token log-probs (:attr:`CalibrationSet.next_topk`)."""

    ids: torch.Tensor
    source: str
    next_topk: tuple[torch.Tensor, torch.Tensor] | None = None


# A loader turns the spec's argument into what it read or sampled.
Loader = Callable[[str, _Request], Loaded]


# ---------------------------------------------------------------------------- self


@dataclass(frozen=True)
class SelfSampling:
    """How ``self`` samples its calibration text (the defaults are the measured best, see the module doc).

    ``greedy_opening`` greedy tokens follow the seeded random one; ``overgenerate`` x
    ``nsamples`` sequences are sampled and the ``nsamples`` best kept (:func:`keep_best`);
    ``bos`` opens each sample with the tokenizer's BOS, or ``open_with`` names the token that opens
    it instead (e.g. a document separator such as SmolLM2's ``<|endoftext|>``, after which the model
    writes a new document rather than the chat turn its BOS ``<|im_start|>`` begins).
    ``no_repeat_ngram`` = n > 0 never samples a token that would repeat an n-gram the sample already
    holds (the loops a small model falls into over long samples); 0: off.
    """

    temperature: float = 1.0
    top_p: float = 0.95
    greedy_opening: int = 0
    overgenerate: float = 1.0
    mask_special: bool = True
    bos: bool = True
    open_with: str | None = None
    no_repeat_ngram: int = 0

    def __post_init__(self) -> None:
        assert self.temperature > 0 and 0.0 <= self.top_p <= 1.0, (self.temperature, self.top_p)
        assert self.greedy_opening >= 0 and self.overgenerate >= 1.0, (self.greedy_opening, self.overgenerate)
        assert self.no_repeat_ngram == 0 or self.no_repeat_ngram >= 2, self.no_repeat_ngram

    def describe(self) -> dict:
        # no_repeat_ngram is named only when on: records (and fingerprints) from before it existed stay the same.
        fields = dataclasses.asdict(self)
        if not self.no_repeat_ngram:
            del fields["no_repeat_ngram"]
        return fields


SELF_SAMPLING = SelfSampling()


def sample_top_p(logits: torch.Tensor, u: torch.Tensor, *, top_p: float, temperature: float) -> torch.Tensor:
    """Nucleus sampling. logits: ``[B, V]``, u: ``[B]`` uniforms in [0, 1) -> ``[B]`` int64 ids.

    Keeps the smallest set of most likely tokens whose mass reaches ``top_p`` (the most
    likely token always survives, so ``top_p <= 0`` is greedy) and samples within it; the
    draw is an inverse-CDF lookup of one uniform per row. A full sort of a 49k vocabulary
    costs more than a decode step on CPU, so each row's nucleus is found with ``topk``: all
    rows start at k = SELF_TOPK_START, and only the rows whose top-k mass (their running
    sum) falls short of ``top_p`` go on, k doubling (a flat row no longer drags a batch of 128
    through a top-16k). A row's result does not depend on the other rows. Everything stays on
    ``logits.device``.
    """
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    probs = torch.softmax(scaled, dim=-1)  # [B, V]
    vocab, device = probs.shape[-1], probs.device
    u = u.to(device, probs.dtype)
    picks = torch.empty(probs.shape[0], dtype=torch.int64, device=device)  # [B]
    rows = torch.arange(probs.shape[0], device=device)  # rows whose nucleus is not found yet
    k = vocab if top_p >= 1.0 else min(SELF_TOPK_START, vocab)
    while rows.numel():
        rest = probs if rows.numel() == probs.shape[0] else probs[rows]  # no [B, V] copy while every row is left
        top_probs, top_ids = rest.topk(k, dim=-1)  # [r, k], descending
        before = top_probs.cumsum(dim=-1) - top_probs  # [r, k]: mass of the more likely tokens
        done = before[:, -1] + top_probs[:, -1] >= top_p if k < vocab else torch.ones_like(rows, dtype=torch.bool)
        picks[rows[done]] = _draw(top_probs[done], top_ids[done], before[done], u[rows[done]], top_p)
        rows, k = rows[~done], min(2 * k, vocab)
    return picks


def _draw(top_probs, top_ids, before, u, top_p: float) -> torch.Tensor:
    """The inverse-CDF draw within each row's nucleus: ``[r, k]`` sorted probs, ids and the mass before each."""
    outside = before >= top_p  # mass before this token already enough
    outside[:, 0] = False
    kept = top_probs.masked_fill(outside, 0.0)
    cdf = kept.cumsum(dim=-1)  # [r, k]
    u = u[:, None] * cdf[:, -1:]  # [r, 1]
    last_kept = (~outside).sum(dim=-1, keepdim=True) - 1  # round-off must not pick a dropped token
    pick = torch.minimum(torch.searchsorted(cdf, u, right=True), last_kept)  # [r, 1]
    return top_ids.gather(-1, pick).squeeze(-1)  # [r]


def self_batch_size(free_bytes: int, seq_bytes: int, max_batch: int) -> int:
    """Sequences sampled together: ``clamp(floor(SELF_MEMORY_FRACTION * free_bytes / seq_bytes), 1, max_batch)``.

    ``seq_bytes`` is one sequence's share (:func:`self_sequence_bytes`), ``free_bytes`` what the
    sampling device has free now; the rest of ``free_bytes`` is left to the allocator and others.
    """
    return max(1, min(max_batch, int(SELF_MEMORY_FRACTION * free_bytes) // max(seq_bytes, 1)))


def self_sequence_bytes(config, *, seqlen: int, vocab: int, elem: int) -> int:
    """Memory one sampled sequence holds: its KV cache plus one step's logits and their float32 copies.

    ``2 * sum_l kv_heads_l * head_dim * elem * seqlen`` (K and V of every layer, model dtype)
    ``+ vocab * (elem + SELF_LOGIT_COPIES * 4)`` (the logits row, then float32 probabilities,
    masked logits and the log-sum-exp temporaries of :func:`_sample_batch`).
    """
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_layer = list(kv_heads) if isinstance(kv_heads, (list, tuple)) else [kv_heads] * config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * sum(per_layer) * head_dim * elem * seqlen
    return kv + vocab * (elem + SELF_LOGIT_COPIES * 4)


def _self_batch_size(model, seqlen: int, vocab: int, max_batch: int | None = None) -> int:
    device = model_device(model)
    seq_bytes = self_sequence_bytes(
        model.config, seqlen=seqlen, vocab=vocab, elem=next(model.parameters()).element_size()
    )
    limit = max_batch if max_batch is not None else SELF_MAX_BATCH_SIZE.get(device.type, 1)
    return self_batch_size(free_memory(device), seq_bytes, limit)


def distinct_ngram_share(ids: torch.Tensor, n: int = 4) -> float:
    """Distinct ``n``-grams over all ``n``-grams of ``ids`` ``[T]``: near 0 for a loop, near 1 for prose."""
    grams = ids.unfold(0, n, 1)  # [T-n+1, n]
    return torch.unique(grams, dim=0).shape[0] / max(grams.shape[0], 1)


def keep_best(nll: torch.Tensor, distinct: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of the ``keep`` samples to use, of ``nll.numel()`` sampled.

    nll: ``[m]`` mean negative log-likelihood per token under the model (self-perplexity =
    ``exp(nll)``); distinct: ``[m]`` :func:`distinct_ngram_share`. Degenerate repeats
    (``distinct < SELF_MIN_DISTINCT``) go first, then the highest self-perplexity.
    """
    by_nll = torch.sort(nll, stable=True).indices  # [m]
    degenerate = (distinct < SELF_MIN_DISTINCT)[by_nll].to(torch.uint8)
    order = by_nll[torch.sort(degenerate, stable=True).indices]  # degenerate last, each group by nll
    return order[:keep].sort().values


def _sample_batch(
    model,
    prefix: torch.Tensor,
    seqlen: int,
    vocab: int,
    generators: list[torch.Generator],
    sampling: SelfSampling,
    banned: torch.Tensor,
    topk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Continue ``prefix`` ``[b, k]`` to ``[b, seqlen]`` with a KV cache, one token a step, on the model's device.

    Returns the ids ``[b, seqlen]`` (moved to the host once, at the end), each sample's mean
    negative log-likelihood of its sampled tokens ``[b]`` under the untempered model, and, when
    ``topk`` > 0, the model's ``topk`` most likely next tokens at every position: their
    log-probabilities (``[b, seqlen, topk]`` float32, at temperature 1 over the whole vocabulary,
    before any ban or mask) and ids (int32). The prefill keeps the logits of every prefix position,
    each step the new one's, and one more step after the last sampled token gives the last
    position's. Sample i
    draws its uniforms from ``generators[i]`` alone (on the host, moved as one ``[b]`` tensor a
    step), so the batch size (a memory knob) changes what is sampled only through the rounding of the
    model's matmuls (see the module doc). ``banned`` ids
    (special tokens) are never sampled; the first ``sampling.greedy_opening`` steps are greedy.
    """
    device = model_device(model)
    banned = banned.to(device)
    cache = preallocated_cache(model.config, seqlen)
    pieces = [prefix.to(device)]
    step = pieces[0]  # [b, k] for the prefill, then [b, 1]
    nll = torch.zeros(prefix.shape[0], dtype=torch.float64, device=device)  # [b]
    ngrams = _NgramBan(sampling.no_repeat_ngram, prefix) if sampling.no_repeat_ngram else None
    top = _NextTopk(prefix.shape[0], seqlen, topk, device) if topk else None
    for t in range(seqlen - prefix.shape[1]):
        keep = step.shape[1] if top is not None else 1  # the prefill's every position when the top-k is kept
        out = model(input_ids=step, past_key_values=cache, use_cache=True, logits_to_keep=keep)
        if top is not None:
            top.add(out.logits)
        logits = out.logits[:, -1, :vocab].float()  # [b, vocab], on the device
        logits[:, banned] = float("-inf")
        scored = logits  # the sample's NLL is the model's, before any n-gram ban
        if ngrams is not None:
            logits = ngrams.apply(logits.clone())
        u = torch.cat([torch.rand(1, generator=g) for g in generators])  # [b], host
        top_p = 0.0 if t < sampling.greedy_opening else sampling.top_p
        step = sample_top_p(logits, u, top_p=top_p, temperature=sampling.temperature)[:, None]  # [b, 1]
        nll -= (scored.gather(-1, step) - torch.logsumexp(scored, dim=-1, keepdim=True))[:, 0]
        if ngrams is not None:
            ngrams.append(step[:, 0].tolist())
        pieces.append(step)
    if top is not None:  # the distribution after the last sampled token
        top.add(model(input_ids=step, past_key_values=cache, use_cache=True, logits_to_keep=1).logits)
    ids = torch.cat(pieces, dim=1).cpu()  # [b, seqlen]
    return ids, (nll / max(seqlen - prefix.shape[1], 1)).cpu(), None if top is None else top.result()


def topk_logprobs(logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., V]`` logits -> the ``k`` largest log-probs at ``temperature`` ``[..., k]`` float32 (normalised over
    the whole vocabulary) and their ids ``[..., k]`` int32: a teacher's targets for recover's top-k loss."""
    x = logits.float()
    values, ids = torch.log_softmax(x if temperature == 1.0 else x / temperature, dim=-1).topk(k, dim=-1)
    return values, ids.to(torch.int32)


class _NextTopk:
    """The top-k next-token log-probs of :func:`_sample_batch`, filled position by position on the sampling device."""

    def __init__(self, batch: int, seqlen: int, k: int, device: torch.device):
        self.k, self.filled = k, 0
        self.values = torch.empty(batch, seqlen, k, dtype=torch.float32, device=device)
        self.ids = torch.empty(batch, seqlen, k, dtype=torch.int32, device=device)

    def add(self, logits: torch.Tensor) -> None:
        """logits ``[b, n, V]``: the next positions' (``n`` of them)."""
        values, ids = topk_logprobs(logits, self.k)  # k <= V: sample_self
        stop = self.filled + logits.shape[1]
        self.values[:, self.filled : stop], self.ids[:, self.filled : stop] = values, ids
        self.filled = stop

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.filled == self.values.shape[1], (self.filled, self.values.shape)
        return self.values.cpu(), self.ids.cpu()


class _NgramBan:
    """The tokens that would repeat one of its n-grams, per sample (``SelfSampling.no_repeat_ngram``), on the host."""

    def __init__(self, n: int, prefix: torch.Tensor):
        self.n = n
        self.seqs = prefix.tolist()  # [b][k]
        self.next: list[dict[tuple[int, ...], set[int]]] = [{} for _ in self.seqs]  # (n-1)-gram -> next tokens
        for seq, table in zip(self.seqs, self.next):
            for j in range(len(seq) - n + 1):
                table.setdefault(tuple(seq[j : j + n - 1]), set()).add(seq[j + n - 1])

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """-inf on each row's banned tokens, unless that would leave the row nothing to sample."""
        for i, (seq, table) in enumerate(zip(self.seqs, self.next)):
            ban = table.get(tuple(seq[len(seq) - self.n + 1 :]))
            if ban:
                idx = torch.tensor(sorted(ban), device=logits.device)
                row = logits[i].index_fill(0, idx, float("-inf"))
                if bool(torch.isfinite(row).any()):
                    logits[i] = row
        return logits

    def append(self, tokens: list[int]) -> None:
        for seq, table, tok in zip(self.seqs, self.next, tokens):
            seq.append(tok)
            if len(seq) >= self.n:
                table.setdefault(tuple(seq[-self.n : -1]), set()).add(tok)


class _PreallocatedLayer(DynamicLayer):
    """One layer of :func:`preallocated_cache`: keys/values ``[B, kv, max_len, d]``, filled to ``length``."""

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len, self.length = max_len, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, kv, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_buf = key_states.new_empty(b, kv, self.max_len, d)
        self.value_buf = value_states.new_empty(b, kv, self.max_len, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, self.length = self.length, self.length + key_states.shape[-2]
        assert self.length <= self.max_len, (self.length, self.max_len)
        self.key_buf[:, :, start : self.length] = key_states
        self.value_buf[:, :, start : self.length] = value_states
        self.keys, self.values = self.key_buf[:, :, : self.length], self.value_buf[:, :, : self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


def preallocated_cache(config, max_len: int) -> Cache:
    """A KV cache whose layers write into buffers of ``max_len`` positions and return views of the filled part.

    transformers' DynamicCache concatenates every layer's keys and values at every decode step,
    copying the whole cache each time (on CPU a fifth of a step at 200 tokens); here a step writes
    one position. Attention sees the same keys and values, so the logits are the same bit for bit.
    """
    return Cache(layers=[_PreallocatedLayer(max_len) for _ in range(config.num_hidden_layers)])


def _opening_id(tok, token: str) -> int:
    """The id of the token that opens every sample; CalibrationError when the tokenizer has no such token."""
    tid = tok.convert_tokens_to_ids(token)
    if tid is None or tok.convert_ids_to_tokens(tid) != token:  # an unknown token maps to <unk>, not back
        raise CalibrationError(f"self-calibration opening token {token!r} is not in the tokenizer; name one it has")
    return tid


def _special_ids(tok, vocab: int) -> list[int]:
    """Every special token id below ``vocab``: ``all_special_ids`` and added tokens marked special."""
    special = set(tok.all_special_ids)
    added = getattr(tok, "added_tokens_decoder", None) or {}
    special |= {i for i, t in added.items() if getattr(t, "special", False)}
    return sorted(i for i in special if 0 <= i < vocab)


def _sampling_device(model, device: torch.device | None, seqlen: int, vocab: int) -> torch.device | None:
    """Where to sample: ``device`` if the model (and one sequence) fits in its free memory, else None (stay)."""
    here = model_device(model)
    if device is None or (device.type == here.type and device.index in (None, here.index)):
        return None
    elem = next(model.parameters()).element_size()
    need = model_bytes(model) + self_sequence_bytes(model.config, seqlen=seqlen, vocab=vocab, elem=elem)
    free = free_memory(device)
    if need > SELF_MEMORY_FRACTION * free:
        logger.info(
            "self-calibration: sampling on %s, where the model is: it needs %.2f GiB on %s, which has %.2f GiB free "
            "(%.0f%% usable)",
            here,
            need / 2**30,
            device,
            free / 2**30,
            100 * SELF_MEMORY_FRACTION,
        )
        return None
    return device


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers (tied weights counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@dataclass(frozen=True, eq=False)
class SelfPool:
    """Sampled sequences before selection: sample i depends only on (seed, i), so a pool of m
    holds the first m of any larger pool."""

    input_ids: torch.Tensor  # [m, seqlen] int64, host
    nll: torch.Tensor  # [m] float64: mean -log p of each sample's sampled tokens (self-perplexity = exp)
    opening: int  # tokens before the sampled ones (BOS + random + greedy), left out of the repeat check
    # when asked (sample_self's logits_topk): the model's top-k next-token log-probs and ids, [m, seqlen, k] each
    next_topk: tuple[torch.Tensor, torch.Tensor] | None = None

    def select(self, nsamples: int) -> torch.Tensor:
        """The ``nsamples`` best (:func:`keep_best`) in pool order -> ``[nsamples, seqlen]``."""
        return self.input_ids[self.keep(nsamples)]

    def keep(self, nsamples: int) -> torch.Tensor:
        """Indices (ascending) of the ``nsamples`` best samples: :func:`keep_best`, or the first ones when the pool
        holds no more."""
        if nsamples >= self.input_ids.shape[0]:
            return torch.arange(self.input_ids.shape[0])  # host, like the ids it indexes
        distinct = torch.tensor(
            [distinct_ngram_share(row[self.opening :]) for row in self.input_ids]
        )  # [m], host like the ids
        keep = keep_best(self.nll, distinct, nsamples)
        logger.info(
            "self-calibration: kept %d of %d samples (%d degenerate repeats; self-perplexity of the kept %.1f-%.1f)",
            nsamples,
            self.nll.numel(),
            int((distinct < SELF_MIN_DISTINCT).sum()),
            float(self.nll[keep].min().exp()),
            float(self.nll[keep].max().exp()),
        )
        return keep


def sample_self(
    model,
    tok,
    *,
    count: int,
    seqlen: int,
    seed: int,
    sampling: SelfSampling,
    device: torch.device | None = None,
    max_batch: int | None = None,
    logits_topk: int = 0,
) -> SelfPool:
    """Sample ``count`` sequences of ``seqlen`` tokens from ``model`` (on ``device`` when it fits there).

    ``logits_topk`` = k > 0 also keeps, from the same pass, the model's k most likely next tokens and
    their log-probabilities at every position of every sample (:attr:`SelfPool.next_topk`): what a
    distillation from this model on this text needs of the teacher (recover.py), without running it
    again. The prefill then keeps
    every prefix position's logits, which may change a sample's first draw by rounding, as the batch
    size can.

    Sample i opens with BOS (when ``sampling.bos`` and the tokenizer has one) and a random
    non-special token drawn from its own generator, seeded from ``seed`` and i; that generator
    then draws its uniforms, so samples do not depend on ``count``, and on the batch size (at
    most ``max_batch``, default :data:`SELF_MAX_BATCH_SIZE`) only through rounding.
    """
    # ids the tokenizer can decode and the model can emit (a padded vocab has dead rows)
    vocab = min(int(model.config.vocab_size), len(tok))
    # bookkeeping on the host: `banned` goes to the sampling device once per batch, `allowed` picks the
    # seeded first tokens with host generators
    banned = torch.tensor(_special_ids(tok, vocab), dtype=torch.int64)
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[banned] = False
    allowed = allowed.nonzero()[:, 0]
    if allowed.numel() == 0:
        raise CalibrationError(
            "calibration source 'self' found no non-special token in the tokenizer; give a text file instead"
        )
    if not sampling.mask_special:
        banned = banned[:0]
    sample_seeds = torch.randint(2**62, (count,), generator=torch.Generator().manual_seed(seed)).tolist()
    generators = [torch.Generator().manual_seed(x) for x in sample_seeds]
    first = torch.stack([allowed[torch.randint(allowed.numel(), (1,), generator=g)] for g in generators])  # [m, 1]
    bos = _opening_id(tok, sampling.open_with) if sampling.open_with else tok.bos_token_id if sampling.bos else None
    prefix = first if bos is None else torch.cat([torch.full_like(first, bos), first], dim=1)  # [m, 1 or 2]
    opening = min(prefix.shape[1] + sampling.greedy_opening, seqlen)

    target = _sampling_device(model, device, seqlen, vocab)
    home = model_device(model)
    ids = torch.empty(count, seqlen, dtype=torch.int64)
    nll = torch.empty(count, dtype=torch.float64)
    k = min(logits_topk, int(model.config.vocab_size))
    # on the host, like ids and nll: each batch's top-k arrive there from the sampling device
    next_topk = (torch.empty(count, seqlen, k), torch.empty(count, seqlen, k, dtype=torch.int32)) if k else None
    if target is not None:  # outside inference mode: moved weights must stay ordinary tensors
        model.to(target)
    try:
        with torch.inference_mode(), eval_mode(model), grouped_attention(model):
            batch = _self_batch_size(model, seqlen, vocab, max_batch)
            nbatches = -(-count // batch)
            for b, start in enumerate(range(0, count, batch)):
                stop = min(start + batch, count)
                ids[start:stop], nll[start:stop], top = _sample_batch(
                    model, prefix[start:stop], seqlen, vocab, generators[start:stop], sampling, banned, k
                )
                if top is not None:
                    next_topk[0][start:stop], next_topk[1][start:stop] = top
                logger.info(
                    "self-calibration: sampled batch %d/%d (%d x %d tokens on %s)",
                    b + 1,
                    nbatches,
                    stop - start,
                    seqlen,
                    model_device(model),
                )
    finally:
        if target is not None:
            model.to(home)
    return SelfPool(input_ids=ids, nll=nll, opening=opening, next_topk=next_topk)


def _from_self(_arg: str, req: _Request) -> Loaded:
    """Text sampled from the model itself (LLM-Pruner's data-free calibration), the worst of an
    over-generated pool dropped."""
    sampling = req.sampling or SELF_SAMPLING
    pool = sample_self(
        req.model,
        req.tokenizer,
        count=math.ceil(req.nsamples * sampling.overgenerate),
        seqlen=req.seqlen,
        seed=req.seed,
        sampling=sampling,
        device=req.device,
        max_batch=req.self_batch,
        logits_topk=req.logits_topk,
    )
    keep = pool.keep(req.nsamples)
    next_topk = None if pool.next_topk is None else (pool.next_topk[0][keep], pool.next_topk[1][keep])
    return Loaded(pool.input_ids[keep], "self", next_topk)


# ---------------------------------------------------------------------------- text


def _read_txt(path: Path) -> str:
    try:
        return load_text(path)
    except BadInputError as e:
        raise CalibrationError(f"calibration {e}") from e


def _read_jsonl(path: Path) -> str:
    texts = []
    # split on "\n" only: str.splitlines would also cut at U+2028 inside JSON strings
    for lineno, line in enumerate(_read_txt(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(
                f"calibration file {path} line {lineno} is not valid JSON ({e.msg}); "
                f'give one JSON object per line with a "text" field'
            ) from e
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise CalibrationError(
                f'calibration file {path} line {lineno} has no "text" string field; '
                f'give one JSON object per line with a "text" field'
            )
        texts.append(obj["text"])
    text = TEXT_JOINER.join(texts)
    if not text.strip():
        raise CalibrationError(f"calibration file {path} holds no text; give a file with text in it")
    return text


FILE_READERS: dict[str, Callable[[Path], str]] = {".txt": _read_txt, ".jsonl": _read_jsonl}


def _sample_windows(ids: torch.Tensor, req: _Request, what: str) -> torch.Tensor:
    """Draw ``nsamples`` of the ``T // seqlen`` non-overlapping windows of ``ids`` ``[T]``."""
    total, need = ids.numel(), req.nsamples * req.seqlen
    if total < need:
        raise CalibrationError(
            f"calibration text {what} has {total} tokens, fewer than nsamples x seqlen = "
            f"{req.nsamples} x {req.seqlen} = {need}; give a longer text or lower --nsamples/--seqlen"
        )
    vocab = int(req.model.config.vocab_size)
    if total and int(ids.max()) >= vocab:
        raise CalibrationError(
            f"calibration text {what} has token id {int(ids.max())}, outside the model's vocabulary "
            f"of {vocab}; tokenize with the model's own tokenizer"
        )
    n = total // req.seqlen
    windows = ids[: n * req.seqlen].view(n, req.seqlen)  # [n, seqlen]
    pick = torch.randperm(n, generator=req.generator())[: req.nsamples]
    logger.info("calibration: %d of %d windows of %d tokens from %s", req.nsamples, n, req.seqlen, what)
    return windows[pick].clone()  # [nsamples, seqlen]


def _from_file(arg: str, req: _Request) -> Loaded:
    path = Path(arg).expanduser()
    if not path.exists():
        raise CalibrationError(
            f"calibration file {path} does not exist; give an existing .txt/.jsonl file, "
            f"a Hugging Face dataset name, or 'self'"
        )
    reader = FILE_READERS.get(path.suffix.lower())
    if reader is None or not path.is_file():
        raise CalibrationError(
            f"calibration file {path} is not a .txt or .jsonl file; give UTF-8 text (.txt) "
            f'or one {{"text": ...}} object per line (.jsonl)'
        )
    ids = text_to_ids(req.tokenizer, reader(path))
    return Loaded(_sample_windows(ids, req, str(path)), f"file:{path.resolve()}")


# ---------------------------------------------------------------------------- hub


def _from_hub(name: str, req: _Request) -> Loaded:
    try:
        import datasets
    except ImportError as e:
        raise CalibrationError(
            f"calibration source '{name}' is a Hugging Face dataset, but the `datasets` package is "
            f"not installed; run pip install 'slimgpt-deploy[datasets]', or give a local .txt/.jsonl file or 'self'"
        ) from e
    path, _, config = name.partition(":")
    want = HF_POOL_FACTOR * req.nsamples * req.seqlen
    texts, count = [], 0
    try:
        rows = datasets.load_dataset(path, config or None, split="train", streaming=True)
        for row in rows:
            if "text" not in row:
                raise CalibrationError(
                    f"Hugging Face dataset '{name}' has no \"text\" column (columns: {', '.join(row)}); "
                    f"give a dataset with a text column, a local .txt/.jsonl file, or 'self'"
                )
            texts.append(row["text"])
            count += len(req.tokenizer(row["text"], add_special_tokens=False, verbose=False)["input_ids"])
            if count >= want:
                break
    except CalibrationError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the hub client ends here, explained
        detail = first_line(str(e))[:200]
        raise CalibrationError(
            f"could not load Hugging Face dataset '{name}' (the hub is unreachable or the name is wrong: "
            f"{type(e).__name__}: {detail}); pass a local .txt/.jsonl file or 'self'"
        ) from e
    ids = text_to_ids(req.tokenizer, TEXT_JOINER.join(texts))
    return Loaded(_sample_windows(ids, req, f"from dataset '{name}'"), f"hf:{name}")


# ---------------------------------------------------------------------------- entry

SOURCES: dict[str, Loader] = {"self": _from_self, "file": _from_file, "hf": _from_hub}


def _looks_like_path(spec: str) -> bool:
    """A hub id is ``name`` or ``owner/name`` (optionally ``:config``); anything else path-like is a path."""
    return (
        spec.startswith(("/", "./", "../", "~", "."))
        or Path(spec).suffix.lower() in FILE_READERS
        or spec.partition(":")[0].count("/") > 1
        or "\\" in spec
    )


def _resolve(spec: str) -> tuple[str, str]:
    """Map a user spec to ``(kind, argument)`` for :data:`SOURCES`."""
    kind, sep, arg = spec.partition(":")
    if sep and kind in SOURCES and kind != "self":  # explicit "file:PATH" / "hf:NAME"
        return kind, arg
    if spec == "self":
        return "self", ""
    if Path(spec).expanduser().exists() or _looks_like_path(spec):
        return "file", spec
    return "hf", spec


def get_calibration(
    spec: str,
    model,
    tokenizer,
    *,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    device: str | torch.device | None = None,
    sampling: SelfSampling | None = None,
    self_batch: int | None = None,
    logits_topk: int = 0,
) -> CalibrationSet:
    """Build ``nsamples`` x ``seqlen`` calibration token ids from ``spec`` (see the module doc).

    ``device``: the prune's compute device; ``self`` samples there (the model moved there and
    back) when the model fits in its free memory, else where the model is. ``sampling``
    overrides :data:`SELF_SAMPLING` for ``self``, and ``self_batch`` the most sequences it decodes
    together (:data:`SELF_MAX_BATCH_SIZE`; fewer when the device's free memory is short).
    ``logits_topk`` = k > 0: ``self`` also returns the sampling model's top-k next-token log-probs
    (:attr:`CalibrationSet.next_topk`, from the sampling pass); other sources ignore it (None).
    """
    spec = spec.strip()
    if not spec:
        raise CalibrationError(
            "calibration source is empty; give 'self', a .txt/.jsonl file, or a Hugging Face dataset name"
        )
    if nsamples < 1:
        raise CalibrationError(f"calibration nsamples={nsamples} must be >= 1; raise --nsamples")
    if seqlen < MIN_SEQLEN:
        raise CalibrationError(f"calibration seqlen={seqlen} is too short; give --seqlen >= {MIN_SEQLEN}")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seqlen > max_pos:
        raise CalibrationError(
            f"calibration seqlen={seqlen} exceeds the model's maximum of {max_pos} positions "
            f"(max_position_embeddings); give --seqlen <= {max_pos}"
        )

    kind, arg = _resolve(spec)
    req = _Request(
        model=model,
        tokenizer=tokenizer,
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
        device=None if device is None else torch.device(device),
        sampling=sampling,
        self_batch=self_batch,
        logits_topk=logits_topk,
    )
    ids, source, next_topk = SOURCES[kind](arg, req)
    assert ids.shape == (nsamples, seqlen) and ids.dtype == torch.int64, (ids.shape, ids.dtype)
    assert int(ids.max()) < int(model.config.vocab_size), "loaders check token ids against the vocabulary"
    return CalibrationSet(input_ids=ids, source=source, seed=seed, next_topk=next_topk)
