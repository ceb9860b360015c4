"""Calibration data: ``nsamples`` sequences of ``seqlen`` token ids for the pruner.

SlimGPT (Ling et al., NeurIPS 2024, Sec. 4.1) calibrates, like GPTQ and SparseGPT, on
128 random 2048-token windows of C4 (``allenai/c4``, the first training shard). That is
a download and, on CPU, hours of Hessian accumulation for a 7B model. Our defaults are
chosen for CPU and for pipelines without network: 64 samples x 512 tokens from ``self``,
text sampled from the model itself (the "data-free" calibration of LLM-Pruner, Ma et al.
2023). The CLI passes these defaults; this module has none of its own, so the Python API
caller states what it uses.

Sources (``get_calibration(spec, ...)``; :data:`SOURCES` maps a kind to its loader):

- ``self``: the model samples ``nsamples`` sequences (temperature 1.0, top-p 0.95), each
  opening with the tokenizer's BOS (if any) and one seeded random non-special token, so the
  samples diverge. Exactly ``seqlen`` tokens each; EOS does not stop sampling.
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

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from slimgpt_deploy.errors import BadInputError, CalibrationError
from slimgpt_deploy.evaluate import eval_mode, load_text, model_device, text_to_ids

logger = logging.getLogger(__name__)

MIN_SEQLEN = 8
# self-sampling: up to 32 sequences decode together (on CPU a step of 32 costs ~1.6x less per
# sequence than one of 16), fewer when their KV cache would pass the budget (e.g. 7B x 2048).
SELF_MAX_BATCH_SIZE = 32
SELF_KV_BUDGET_BYTES = 2 * 2**30
SELF_TOPK_START = 256   # first k tried when searching the top-p nucleus
SELF_TEMPERATURE = 1.0
SELF_TOP_P = 0.95
HF_POOL_FACTOR = 4      # stream this many times nsamples * seqlen tokens of a hub dataset
TEXT_JOINER = "\n\n"    # between documents of a .jsonl file or a dataset


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    input_ids: torch.Tensor  # [nsamples, seqlen] int64, on the CPU
    source: str              # "self", "file:/abs/path.txt", "hf:allenai/c4"
    seed: int

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

    def generator(self) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.seed)


# A loader turns the spec's argument into [nsamples, seqlen] int64 ids and a source description.
Loader = Callable[[str, _Request], tuple[torch.Tensor, str]]


# ---------------------------------------------------------------------------- self

def sample_top_p(logits: torch.Tensor, u: torch.Tensor, *, top_p: float, temperature: float) -> torch.Tensor:
    """Nucleus sampling. logits: ``[B, V]``, u: ``[B]`` uniforms in [0, 1) -> ``[B]`` int64 ids.

    Keeps the smallest set of most likely tokens whose mass reaches ``top_p`` (the most
    likely token always survives, so ``top_p <= 0`` is greedy) and samples within it.
    A full sort of a 49k vocabulary costs as much as a decode step on CPU, so the nucleus
    is found with ``topk``, doubling k until every row's mass reaches ``top_p``; the draw
    is an inverse-CDF lookup of one uniform per row.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    vocab = probs.shape[-1]
    k = vocab if top_p >= 1.0 else min(SELF_TOPK_START, vocab)
    while True:
        top_probs, top_ids = probs.topk(k, dim=-1)  # [B, k], descending
        if k == vocab or bool((top_probs.sum(dim=-1) >= top_p).all()):
            break
        k = min(2 * k, vocab)
    outside = (top_probs.cumsum(dim=-1) - top_probs) >= top_p  # mass before this token already enough
    outside[:, 0] = False
    kept = top_probs.masked_fill(outside, 0.0)
    cdf = kept.cumsum(dim=-1)  # [B, k]
    u = u.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]  # [B, 1]
    last_kept = (~outside).sum(dim=-1, keepdim=True) - 1  # round-off must not pick a dropped token
    pick = torch.minimum(torch.searchsorted(cdf, u, right=True), last_kept)  # [B, 1]
    return top_ids.gather(-1, pick).squeeze(-1)  # [B]


def _sample_batch(
    model, prefix: torch.Tensor, seqlen: int, vocab: int, generators: list[torch.Generator]
) -> torch.Tensor:
    """Continue ``prefix`` ``[b, k]`` to ``[b, seqlen]`` with a KV cache, one token a step.

    Sample i draws its uniforms from ``generators[i]`` alone, so the batch size (a memory
    knob) does not change what is sampled.
    """
    from transformers import DynamicCache

    device = model_device(model)
    cache = DynamicCache(config=model.config)
    pieces = [prefix]
    step = prefix  # [b, k] for the prefill, then [b, 1]
    for _ in range(seqlen - prefix.shape[1]):
        out = model(input_ids=step.to(device), past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :vocab].to("cpu", torch.float32)  # [b, vocab]
        u = torch.cat([torch.rand(1, generator=g) for g in generators])  # [b]
        step = sample_top_p(logits, u, top_p=SELF_TOP_P, temperature=SELF_TEMPERATURE)[:, None]  # [b, 1]
        pieces.append(step)
    return torch.cat(pieces, dim=1)  # [b, seqlen]


def _self_batch_size(model, seqlen: int) -> int:
    """Samples per batch: at most SELF_MAX_BATCH_SIZE, and their KV cache within SELF_KV_BUDGET_BYTES."""
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    per_layer = list(kv_heads) if isinstance(kv_heads, (list, tuple)) else [kv_heads] * cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(model.parameters()).element_size()
    kv_bytes_per_seq = 2 * sum(per_layer) * head_dim * elem * seqlen  # K and V, every layer
    return max(1, min(SELF_MAX_BATCH_SIZE, SELF_KV_BUDGET_BYTES // max(kv_bytes_per_seq, 1)))


def _from_self(_arg: str, req: _Request) -> tuple[torch.Tensor, str]:
    """Text sampled from the model itself (LLM-Pruner's data-free calibration)."""
    tok = req.tokenizer
    # ids the tokenizer can decode and the model can emit (a padded vocab has dead rows)
    vocab = min(int(req.model.config.vocab_size), len(tok))
    special = set(tok.all_special_ids)
    allowed = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.int64)
    if allowed.numel() == 0:
        raise CalibrationError("calibration source 'self' found no non-special token in the tokenizer; give a text file instead")
    generator = req.generator()
    first = allowed[torch.randint(allowed.numel(), (req.nsamples, 1), generator=generator)]  # [n, 1]
    sample_seeds = torch.randint(2**62, (req.nsamples,), generator=generator).tolist()
    bos = tok.bos_token_id
    if bos is None:
        prefix = first
    else:
        prefix = torch.cat([torch.full_like(first, bos), first], dim=1)  # [n, 2]

    out = torch.empty(req.nsamples, req.seqlen, dtype=torch.int64)
    batch = _self_batch_size(req.model, req.seqlen)
    nbatches = -(-req.nsamples // batch)
    with torch.inference_mode(), eval_mode(req.model):
        for b, start in enumerate(range(0, req.nsamples, batch)):
            stop = min(start + batch, req.nsamples)
            generators = [torch.Generator().manual_seed(x) for x in sample_seeds[start:stop]]
            out[start:stop] = _sample_batch(req.model, prefix[start:stop], req.seqlen, vocab, generators)
            logger.info("self-calibration: sampled batch %d/%d (%d x %d tokens)", b + 1, nbatches, stop - start, req.seqlen)
    return out, "self"


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


def _from_file(arg: str, req: _Request) -> tuple[torch.Tensor, str]:
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
    return _sample_windows(ids, req, str(path)), f"file:{path.resolve()}"


# ---------------------------------------------------------------------------- hub

def _from_hub(name: str, req: _Request) -> tuple[torch.Tensor, str]:
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
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise CalibrationError(
            f"could not load Hugging Face dataset '{name}' (the hub is unreachable or the name is wrong: "
            f"{type(e).__name__}: {detail}); pass a local .txt/.jsonl file or 'self'"
        ) from e
    ids = text_to_ids(req.tokenizer, TEXT_JOINER.join(texts))
    return _sample_windows(ids, req, f"from dataset '{name}'"), f"hf:{name}"


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
    spec: str, model, tokenizer, *, nsamples: int, seqlen: int, seed: int = 0
) -> CalibrationSet:
    """Build ``nsamples`` x ``seqlen`` calibration token ids from ``spec`` (see the module doc)."""
    spec = spec.strip()
    if not spec:
        raise CalibrationError("calibration source is empty; give 'self', a .txt/.jsonl file, or a Hugging Face dataset name")
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
    req = _Request(model=model, tokenizer=tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed)
    ids, source = SOURCES[kind](arg, req)
    assert ids.shape == (nsamples, seqlen) and ids.dtype == torch.int64, (ids.shape, ids.dtype)
    assert int(ids.max()) < int(model.config.vocab_size), "loaders check token ids against the vocabulary"
    return CalibrationSet(input_ids=ids, source=source, seed=seed)
