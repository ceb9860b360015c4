"""Evaluation: perplexity on a text, and fidelity of a pruned model to its dense reference.

Perplexity follows the GPTQ / SparseGPT / SlimGPT protocol: the whole text is tokenized
once (no special tokens added), cut into fixed *non-overlapping* windows of ``seqlen``
tokens (the last partial window is dropped), and every window is scored independently
with no context carried over. Each window predicts its tokens 1..seqlen-1, so

    nll = sum_windows sum_{t=1}^{seqlen-1} -log p(x_t | x_<t) / (windows * (seqlen - 1))
    ppl = exp(nll)

which equals the protocol's exp(mean over windows of transformers' ``loss``), because
every window holds the same number of predicted tokens.

Fidelity needs no dataset: on the same windows it compares the model's next-token
distribution P_model with the reference's P_ref at every position,

    kl   = mean over positions of KL(P_ref || P_model) = sum_v P_ref(v) (log P_ref(v) - log P_model(v))  [nats]
    top1 = mean over positions of [argmax P_ref == argmax P_model]

Losses are computed from float32 log-softmaxes whatever the model dtype; each model runs
on its own device (``model.device``). The large-vocabulary softmaxes are done one window
at a time, so memory holds one batch of logits plus a window's worth of temporaries.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from slimgpt_deploy.errors import BadInputError

logger = logging.getLogger(__name__)

LOSS_DTYPE = torch.float32


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float  # exp(nll)
    nll: float  # mean negative log-likelihood per predicted token, nats
    tokens: int  # predicted tokens: windows * (seqlen - 1)
    windows: int
    seqlen: int


@dataclass(frozen=True)
class FidelityResult:
    kl: float  # mean KL(P_ref || P_model) per token position, nats
    top1: float  # share of positions where both models' argmax agree, in [0, 1]
    tokens: int  # positions compared: windows * seqlen


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's inputs go to (``model.device``, else its first parameter's)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """Put the models in eval mode (no dropout) for the block, then restore their mode."""
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(models, was_training):
            m.train(training)


def load_text(path: str | Path) -> str:
    """Read a UTF-8 text file (a leading byte-order mark is dropped)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise BadInputError(f"text file {p} does not exist; give the path of an existing UTF-8 text file")
    if not p.is_file():
        raise BadInputError(f"text file {p} is not a regular file; give the path of a UTF-8 text file")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadInputError(
            f"text file {p} is not valid UTF-8 (bad byte at offset {e.start}); "
            f"convert it to UTF-8, e.g. `iconv -t UTF-8 {p.name} > {p.stem}.utf8{p.suffix}`"
        ) from e
    if not text.strip():
        raise BadInputError(f"text file {p} is empty; give a file with text in it")
    return text


def text_to_ids(tokenizer, text: str) -> torch.Tensor:
    """Tokenize the whole text once, without special tokens; returns ``[T]`` int64."""
    # verbose=False: a text longer than model_max_length is intended here (it is windowed later).
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def _windows(input_ids: torch.Tensor, seqlen: int, batch_size: int, what: str) -> torch.Tensor:
    """Cut ``[T]`` ids into ``[n, seqlen]`` non-overlapping windows, dropping the partial tail."""
    if input_ids.dim() != 1:
        raise BadInputError(
            f"{what} expects a 1-D tensor of token ids (the whole tokenized text), got shape "
            f"{tuple(input_ids.shape)}; flatten it or tokenize with text_to_ids"
        )
    if seqlen < 2:
        raise BadInputError(f"{what} window length seqlen={seqlen} is too short; give seqlen >= 2")
    if batch_size < 1:
        raise BadInputError(f"{what} batch_size={batch_size} must be >= 1")
    total = input_ids.numel()
    n = total // seqlen
    if n == 0:
        raise BadInputError(
            f"{what} text has {total} tokens, fewer than one window of seqlen = {seqlen}; "
            f"give a longer text or lower --seqlen"
        )
    return input_ids[: n * seqlen].to(torch.int64).view(n, seqlen)  # [n, seqlen]


def _batches(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start : start + batch_size]  # [b, seqlen]


def perplexity(
    model,
    input_ids: torch.Tensor,
    *,
    seqlen: int = 2048,
    batch_size: int = 1,
    max_tokens: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on a tokenized text, in fixed non-overlapping windows.

    input_ids: ``[T]``, the whole text tokenized once (see :func:`text_to_ids`).
    max_tokens: if given, only the first ``max_tokens`` tokens of the text are used.
    """
    if max_tokens is not None:
        if max_tokens < 1:
            raise BadInputError(f"perplexity max_tokens={max_tokens} must be >= 1 (or None for the whole text)")
        input_ids = input_ids[:max_tokens]
    windows = _windows(input_ids, seqlen, batch_size, "perplexity")
    device = model_device(model)
    nll_sum = 0.0  # Python float: float64 accumulation across windows
    with torch.inference_mode(), eval_mode(model):
        for batch in _batches(windows, batch_size):
            logits = model(input_ids=batch.to(device), use_cache=False).logits  # [b, seqlen, V]
            targets = batch[:, 1:].to(logits.device)  # [b, seqlen-1]
            for i in range(batch.shape[0]):
                # position t predicts token t+1
                nll_sum += F.cross_entropy(logits[i, :-1].to(LOSS_DTYPE), targets[i], reduction="sum").item()
            del logits
    return _perplexity_result(nll_sum, windows.shape[0], seqlen)


def _perplexity_result(nll_sum: float, windows: int, seqlen: int) -> PerplexityResult:
    tokens = windows * (seqlen - 1)
    nll = nll_sum / tokens
    try:
        ppl = math.exp(nll)
    except OverflowError:  # a collapsed model: report it, do not crash
        ppl = math.inf
    logger.info("perplexity %.4f over %d windows of %d tokens", ppl, windows, seqlen)
    return PerplexityResult(ppl=ppl, nll=nll, tokens=tokens, windows=windows, seqlen=seqlen)


def fidelity(
    model,
    reference,
    input_ids: torch.Tensor,
    *,
    seqlen: int = 512,
    batch_size: int = 1,
) -> FidelityResult:
    """KL(P_ref || P_model) and top-1 agreement of ``model`` against ``reference``.

    Both models see the same ``[n, seqlen]`` windows of ``input_ids`` (``[T]``), each on
    its own device; the comparison runs on the reference's device, one window at a time.
    """
    return compare(model, reference, input_ids, seqlen=seqlen, batch_size=batch_size).fidelity


@dataclass(frozen=True)
class Comparison:
    model: PerplexityResult
    reference: PerplexityResult
    fidelity: FidelityResult


def compare(
    model,
    reference,
    input_ids: torch.Tensor,
    *,
    seqlen: int = 512,
    batch_size: int = 1,
) -> Comparison:
    """Both models' perplexities and the fidelity of ``model`` to ``reference``, from one forward pass of each.

    The same numbers as :func:`perplexity` of each model and :func:`fidelity` on the same windows (each
    window's negative log-likelihood is ``nll_loss`` of the log-softmax that fidelity takes anyway, which is
    what ``cross_entropy`` computes), at half the model passes.
    """
    windows = _windows(input_ids, seqlen, batch_size, "fidelity")
    ref_device, model_dev = model_device(reference), model_device(model)
    kl_sum = nll_model = nll_ref = 0.0  # Python floats: float64 accumulation across windows
    agree = 0
    with torch.inference_mode(), eval_mode(model, reference):
        for batch in _batches(windows, batch_size):
            ref_logits = reference(input_ids=batch.to(ref_device), use_cache=False).logits  # [b, seqlen, V]
            mod_logits = model(input_ids=batch.to(model_dev), use_cache=False).logits  # [b, seqlen, V]
            if ref_logits.shape != mod_logits.shape:
                raise BadInputError(
                    f"fidelity needs models with the same vocabulary: reference gives logits "
                    f"{tuple(ref_logits.shape)}, model {tuple(mod_logits.shape)}; "
                    "compare a model with its own dense reference"
                )
            targets = batch[:, 1:].to(ref_logits.device)  # [b, seqlen-1]: position t predicts token t+1
            for i in range(batch.shape[0]):
                log_p = F.log_softmax(ref_logits[i].to(LOSS_DTYPE), dim=-1)  # [seqlen, V]  log P_ref
                log_q = F.log_softmax(mod_logits[i].to(ref_logits.device, LOSS_DTYPE), dim=-1)  # log P_model
                # sum_v P_ref (log P_ref - log P_model), summed over positions
                kl_sum += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
                agree += (log_p.argmax(dim=-1) == log_q.argmax(dim=-1)).sum().item()
                nll_ref += F.nll_loss(log_p[:-1], targets[i], reduction="sum").item()
                nll_model += F.nll_loss(log_q[:-1], targets[i], reduction="sum").item()
                del log_p, log_q
            del ref_logits, mod_logits
    n = windows.shape[0]
    tokens = n * seqlen
    # clamp float round-off: KL >= 0
    fid = FidelityResult(kl=max(kl_sum / tokens, 0.0), top1=agree / tokens, tokens=tokens)
    logger.info("fidelity: KL %.6f nats/token, top-1 agreement %.4f over %d tokens", fid.kl, fid.top1, tokens)
    return Comparison(_perplexity_result(nll_model, n, seqlen), _perplexity_result(nll_ref, n, seqlen), fid)
