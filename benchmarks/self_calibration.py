"""Data-free (`self`) calibration variants: SmolLM2-135M pruned 20% by SlimGPT, perplexity on two corpora.

    .venv/bin/python benchmarks/self_calibration.py                      # every variant, 64 x 512
    .venv/bin/python benchmarks/self_calibration.py --only nospecial     # one variant
    .venv/bin/python benchmarks/self_calibration.py --nsamples 16 --only t0.8-p0.95   # a cheap screen
    .venv/bin/python benchmarks/self_calibration.py --markdown           # rewrite the .md from the .json

Protocol: calibration `self` (the sampler of slimgpt_deploy/calibration.py with the variant's
SelfSampling), nsamples x 512 tokens, seed 0; SlimGPT, ratio 0.2, schedule log, per-group GQA.
Perplexity at non-overlapping 2048-token windows on (1) the first 40,960 tokens of WikiText-2
test.txt (../shared/data/wikitext-2; the protocol of benchmarks/quality.py) and (2) the first
40,960 tokens of Python's own documentation text (`pydoc_data.topics`, shipped with CPython,
topics joined in sorted order): a second corpus that is neither WikiText nor model samples.
Sampled pools are cached in .cache/self_calibration/ (safetensors): sample i depends only on
(seed, i), so one pool of 96 serves both "the first 64" and "the best 64 of 96".
Each run is its own subprocess (its own peak RSS). Results: benchmarks/results/self_calibration.{json,md}.
Cost: a 64 x 512 variant samples 64-80 sequences (2-3 batches of 32 x 511 decode steps), then
prunes and evaluates. On the shared 2-core machine at load average ~10 (2026-11-29) one batch of
32 took 35 min; screen with --nsamples 16 first, and run the full size on an idle machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from slimgpt_deploy.prune.methods import SLIMGPT
from slimgpt_deploy.prune.schedule import PER_GROUP

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / ".cache" / "self_calibration"
MODEL = "smollm2-135m"
EVAL_TOKENS, WINDOW, SEQLEN, RATIO = 40960, 2048, 512, 0.2

# name -> (what changes, SelfSampling fields). Cumulative: each row adds one change to the one above,
# then temperature / top-p are varied around the best. Two keys are not sampler fields: "prune" (PruneConfig
# fields of the prune, e.g. the damping) and "file" (calibrate on windows of that text instead of sampling:
# the real-data reference row).
BASE = {"temperature": 1.0, "top_p": 0.95, "greedy_opening": 0, "overgenerate": 1.0, "mask_special": False, "bos": True}
NOT_SAMPLING = ("prune", "file", "seqlen", "seed")
# The prune every row starts from. head_share is pinned to 1.0 (heads cut at the layer ratio, the split the sampler
# rows were measured with), so a rerun of a row measures what the row says; the head-share rows set their own.
PRUNE_BASE = {
    "ratio": RATIO,
    "method": SLIMGPT,
    "schedule": "log",
    "gqa_mode": PER_GROUP,
    "calib": "self",
    "head_share": 1.0,
    "dense_last": 0,
}
VARIANTS: dict[str, tuple[str, dict]] = {}


def _variant(name: str, what: str, parent: str | None = None, **changes) -> None:
    fields = dict(VARIANTS[parent][1] if parent else BASE) | changes
    VARIANTS[name] = (what, fields)


_variant("baseline", "the sampler before this change: T 1.0, top-p 0.95, BOS + random token, special tokens allowed")
_variant("nospecial", "(1) special tokens never sampled", "baseline", mask_special=True)
_variant("nobos", "no BOS (`<|im_start|>` here) before the random token", "nospecial", bos=False)
_variant("greedy4", "(2) 4 greedy tokens after the random one", "nobos", greedy_opening=4)
_variant(
    "filter1.25",
    "(3) 1.25x over-generation, degenerate repeats and worst self-perplexity dropped",
    "greedy4",
    overgenerate=1.25,
)
for t, p in ((0.9, 0.95), (0.8, 0.95), (1.0, 1.0), (0.9, 0.9)):
    _variant(f"t{t}-p{p}", f"(4) temperature {t}, top-p {p}", "filter1.25", temperature=t, top_p=p)
_variant("nospecial-t0.8", "(4') temperature 0.8 on the default sampler", "nospecial", temperature=0.8)
for damp in (0.001, 0.1):
    _variant(
        f"nospecial-damp{damp}",
        f"(5) the default sampler, OBS damping {damp} of the mean Hessian diagonal (default 0.01)",
        "nospecial",
        prune={"percdamp": damp},
    )
_variant(
    "wikitext-valid",
    "real data for reference: windows of WikiText-2 *valid* (in-domain for the first corpus)",
    "nospecial",
    file=str(DATA / "valid.txt"),
)
# How a layer's budget is split: heads at head_share x the layer's ratio, the FFN takes the rest. SmolLM2's per-group
# unit is a third of the query heads, so any head_share below ~0.6 keeps every head at 20%.
_variant(
    "nospecial-heads0",
    "(6) the default sampler, heads kept (head_share 0: the FFN takes each layer's whole budget)",
    "nospecial",
    prune={"head_share": 0.0},
)
_variant(
    "heads0-p1.0", "(7) heads kept, and top-p 1.0 (plain sampling at temperature 1)", "nospecial-heads0", top_p=1.0
)
_variant(
    "heads0-damp0.001",
    "(7') heads kept, and OBS damping 0.001",
    "nospecial-heads0",
    prune={"head_share": 0.0, "percdamp": 0.001},
)
for share in (1.0, 0.5, 0.0):  # at 50% a share of 0.5 cuts one query head per group in the deepest layers
    _variant(
        f"r0.5-heads{share}",
        f"(8) 50% instead of 20%, head_share {share}",
        "nospecial",
        prune={"ratio": 0.5, "head_share": share},
    )
# The sampler changes (2) and (3) again on the heads-kept prune (the default split for SmolLM2 at 20%).
_variant(
    "heads0-greedy4",
    "(9) heads kept, no BOS, 4 greedy tokens after the random one",
    "nospecial-heads0",
    bos=False,
    greedy_opening=4,
)
_variant(
    "heads0-filter1.25",
    "(9) heads kept, no BOS, 4 greedy tokens, 1.25x over-generation with repeats and worst self-perplexity dropped",
    "heads0-greedy4",
    overgenerate=1.25,
)
_variant(
    "wikitext-valid-heads0",
    "real data (WikiText-2 valid), heads kept (head_share 0)",
    "wikitext-valid",
    prune={"head_share": 0.0},
)

# (11) The pruner's own choices on the best row so far (heads kept, damping 0.001): smaller FFN groups (Dynamic
# Group Size starts at a quarter of the channels to remove; a sixteenth means four times the OBS updates), and the
# depth schedule.
_variant(
    "heads0-damp0.001-ffng1/16",
    "(11) heads kept, damping 0.001, FFN groups start at 1/16 of the channels to remove (default 1/4)",
    "nospecial-heads0",
    prune={"head_share": 0.0, "percdamp": 0.001, "ffn_group_fraction": 0.0625},
)
for schedule in ("linear", "uniform"):
    _variant(
        f"heads0-damp0.001-{schedule}",
        f"(11) heads kept, damping 0.001, {schedule} schedule across depth (default log)",
        "nospecial-heads0",
        prune={"head_share": 0.0, "percdamp": 0.001, "schedule": schedule},
    )

# (12) Longer calibration sequences for the same number of tokens: the evaluation windows are 2048 tokens, and a
# Hessian gathered on positions < 512 never sees the attention of later positions.
for seqlen in (1024, 2048):
    _variant(
        f"heads0-damp0.001-{seqlen}",
        f"(12) heads kept, damping 0.001, sequences of {seqlen} tokens (the same tokens: N x 512 / {seqlen} of them)",
        "nospecial-heads0",
        prune={"head_share": 0.0, "percdamp": 0.001},
        seqlen=seqlen,
    )

# (21) Shorter calibration sequences for the same number of tokens: more openings (each sets its own genre), the
# opposite direction of (12), on the default prune (heads kept, damping 0.01).
_variant("heads0-512", "(21) the default prune (as nospecial-heads0), rerun beside the rows below", "nospecial-heads0")
for seqlen in (256, 128):
    _variant(
        f"heads0-{seqlen}",
        f"(21) heads kept, sequences of {seqlen} tokens (the same tokens: N x 512 / {seqlen} of them)",
        "nospecial-heads0",
        seqlen=seqlen,
    )

# (22) The levers that each helped a little, together: heads kept, damping 0.001 (7'), the last 2 layers dense (18)
# and the output-space Fisher of 16 samples (19), against the default prune on the same samples and machine
# (`heads0-512`, rerun in (21)). Does what each gave add up?
_variant(
    "heads0-levers",
    "(22) heads kept, damping 0.001, the last 2 layers dense, the output-space Fisher of 16 samples",
    "nospecial-heads0",
    prune={"head_share": 0.0, "percdamp": 0.001, "dense_last": 2, "fisher_samples": 16},
)

# (23) Long samples without loops: (12) found 1024-token samples worse (distinct 4-grams 0.89 against 0.94 at 512,
# self-perplexity 15 against 18: the small model falls into loops late in a sample), while the evaluation windows
# are 2048 tokens. Never repeating a 4-gram the sample already holds (calibration.SelfSampling.no_repeat_ngram)
# keeps long samples varied; the same tokens as N x 512, on the default prune (heads kept, damping 0.01).
_variant(
    "heads0-norepeat4",
    "(23) heads kept, no 4-gram repeated within a sample",
    "nospecial-heads0",
    no_repeat_ngram=4,
)
_variant(
    "heads0-1024",
    "(23) heads kept, sequences of 1024 tokens (the same tokens: N x 512 / 1024 of them)",
    "nospecial-heads0",
    seqlen=1024,
)
_variant(
    "heads0-norepeat4-1024",
    "(23) heads kept, no 4-gram repeated within a sample, sequences of 1024 tokens (N x 512 / 1024)",
    "nospecial-heads0",
    no_repeat_ngram=4,
    seqlen=1024,
)

# (13) Open each sample with the document separator instead of BOS: SmolLM2-Instruct's BOS is `<|im_start|>`, which
# opens a chat turn; after `<|endoftext|>` (how pretraining documents are packed) it writes a new document.
_variant(
    "heads0-damp0.001-endoftext",
    "(13) heads kept, damping 0.001, samples open with `<|endoftext|>` instead of BOS `<|im_start|>`",
    "nospecial-heads0",
    prune={"head_share": 0.0, "percdamp": 0.001},
    open_with="<|endoftext|>",
)


# (14) Where in depth the budget goes: the log schedule over a span of layers, the others left dense (LLM-Pruner
# prunes layers 4-29 of LLaMA-7B's 32 and keeps the first and the last ones). SmolLM2's 30 layers are the same
# size, so the span's mean ratio is 20% x 30 / (span length).
def _span_ratios(first: int, last: int, layers: int = 30, ratio: float = 0.2) -> list[float]:
    from slimgpt_deploy.prune.schedule import layer_ratios

    span = last - first + 1
    inner = layer_ratios("log", ratio * layers / span, [1] * span)
    return [0.0] * first + inner + [0.0] * (layers - 1 - last)


for first, last, what in (
    (0, 27, "the last 2 layers"),
    (4, 27, "the first 4 and the last 2 layers"),
    (0, 28, "the last layer"),
    (0, 25, "the last 4 layers"),
):
    _variant(
        f"heads0-damp0.001-span{first}-{last}",
        f"(14) heads kept, damping 0.001, {what} left dense (log schedule over layers {first}-{last})",
        "nospecial-heads0",
        prune={"head_share": 0.0, "percdamp": 0.001, "layer_ratios": _span_ratios(first, last)},
    )


# (18) Is (14) more than one seed's luck? The default prune (damping 0.01) with and without the last 2 layers dense
# (`--dense-last 2`: the plans of `_span_ratios(0, 27)`, which these rows were first measured with), on the samples of
# seeds 0, 1 and 2 (the sampler's seed: other random first tokens, other continuations); seed 0's default row is
# `nospecial-heads0`.
for seed in (0, 1, 2):
    if seed:
        _variant(
            f"heads0-seed{seed}",
            f"(18) heads kept (the default prune), samples of seed {seed}",
            "nospecial-heads0",
            seed=seed,
        )
    _variant(
        f"heads0-span0-27-seed{seed}",
        f"(18) heads kept, the last 2 layers left dense (log schedule over layers 0-27), samples of seed {seed}",
        "nospecial-heads0",
        prune={"head_share": 0.0, "dense_last": 2},
        seed=seed,
    )


# ... and at 30% and 50% with the default split (head_share 0.5), against the same prune over every layer.
_variant(
    "r0.3-heads0.5", "(18) 30% instead of 20%, head_share 0.5", "nospecial", prune={"ratio": 0.3, "head_share": 0.5}
)
for r in (0.3, 0.5):
    _variant(
        f"r{r}-span0-27",
        f"(18) {r:.0%}, head_share 0.5, the last 2 layers left dense (log schedule over layers 0-27)",
        "nospecial",
        prune={"ratio": r, "head_share": 0.5, "dense_last": 2},
    )


# (19) The output-space Fisher (`prune --fisher-samples N`, prune/fisher.py): each OBS choice weighed by the loss's
# curvature in the projection's output space, measured on the first N calibration samples. Against the default prune
# (`nospecial-heads0` and `heads0-seed1/2`: the same samples), with 16 and 64 samples, with the last 2 layers dense,
# and at 30% and 50% (against `r0.3-heads0.5`, `r0.5-heads0.5`).
for n in (16, 64):
    _variant(
        f"heads0-fisher{n}",
        f"(19) heads kept, OBS choices weighed by the output-space Fisher of the first {n} samples",
        "nospecial-heads0",
        prune={"head_share": 0.0, "fisher_samples": n},
    )
for seed in (1, 2):
    _variant(
        f"heads0-fisher16-seed{seed}",
        f"(19) heads kept, the output-space Fisher of 16 samples, samples of seed {seed}",
        "nospecial-heads0",
        prune={"head_share": 0.0, "fisher_samples": 16},
        seed=seed,
    )
_variant(
    "heads0-fisher16-span0-27",
    "(19) heads kept, the output-space Fisher of 16 samples, and the last 2 layers left dense",
    "nospecial-heads0",
    prune={"head_share": 0.0, "fisher_samples": 16, "dense_last": 2},
)
for r in (0.3, 0.5):
    _variant(
        f"r{r}-fisher16",
        f"(19) {r:.0%}, head_share 0.5, the output-space Fisher of 16 samples",
        "nospecial",
        prune={"ratio": r, "head_share": 0.5, "fisher_samples": 16},
    )
_variant(
    "r0.3-seed1",
    "(19) 30%, head_share 0.5, samples of seed 1",
    "nospecial",
    prune={"ratio": 0.3, "head_share": 0.5},
    seed=1,
)
_variant(
    "r0.3-fisher16-seed1",
    "(19) 30%, head_share 0.5, the output-space Fisher of 16 samples, samples of seed 1",
    "nospecial",
    prune={"ratio": 0.3, "head_share": 0.5, "fisher_samples": 16},
    seed=1,
)


# (20) The same Fisher with real text: WikiText-2 *valid* calibration (in-domain for the first corpus), does a loss
# measured on data change the picture? Against `wikitext-valid-heads0` and its 30% row.
for name, what, prune in (
    ("heads0-fisher16", "heads kept, the output-space Fisher of 16 samples", {"head_share": 0.0, "fisher_samples": 16}),
    ("r0.3", "30%, head_share 0.5", {"ratio": 0.3, "head_share": 0.5}),
    (
        "r0.3-fisher16",
        "30%, head_share 0.5, the output-space Fisher of 16 samples",
        {"ratio": 0.3, "head_share": 0.5, "fisher_samples": 16},
    ),
):
    _variant(f"wikitext-valid-{name}", f"(20) real data (WikiText-2 valid), {what}", "wikitext-valid", prune=prune)


# (15) rows heads0-rms, heads0-damp0.001-rms, wikitext-valid-heads0-rms: Hessians weighted per position by 1 / rms^2
# of the dense block's output stream, measured with the prototype PruneConfig.position_weight of commit c5a0127,
# removed in the next commit (no gain): their rows stay in the results.


# (16) Where in depth the budget goes, by measurement: each layer's FFN pruned alone (25% and 50% of its channels,
# SlimGPT's OBS on 16 self samples, every other layer dense), the KL to the dense model on 4 other samples; the layer
# ratios from those sensitivities: the plans of benchmarks/layer_sensitivity.py (results/layer_sensitivity.json).
SENSITIVITY_PLANS = {
    "inv1": [
        0.033,
        0.0635,
        0.0922,
        0.1064,
        0.1207,
        0.1442,
        0.1645,
        0.1577,
        0.165,
        0.1754,
        0.1929,
        0.1471,
        0.2168,
        0.2381,
        0.2859,
        0.3298,
        0.3554,
        0.3154,
        0.3286,
        0.296,
        0.2127,
        0.2939,
        0.266,
        0.2703,
        0.2267,
        0.2349,
        0.2009,
        0.2132,
        0.069,
        0.084,
    ],
    "opt0.45": [
        0.009,
        0.0016,
        0.0001,
        0.0,
        0.0047,
        0.0069,
        0.1315,
        0.1089,
        0.1566,
        0.1808,
        0.2191,
        0.0207,
        0.3375,
        0.3375,
        0.3375,
        0.3375,
        0.3375,
        0.3375,
        0.3375,
        0.3375,
        0.2941,
        0.3375,
        0.3375,
        0.3375,
        0.25,
        0.319,
        0.2467,
        0.3375,
        0.0,
        0.0005,
    ],
}
_variant(
    "heads0-sens-inv1",
    "(16) heads kept, layer ratios inversely proportional to each layer's measured sensitivity",
    "nospecial-heads0",
    prune={"head_share": 0.0, "layer_ratios": SENSITIVITY_PLANS["inv1"]},
)
_variant(
    "heads0-sens-opt0.45",
    "(16) heads kept, layer ratios minimising the summed per-layer KL (power law fitted per layer, cap 0.34)",
    "nospecial-heads0",
    prune={"head_share": 0.0, "layer_ratios": SENSITIVITY_PLANS["opt0.45"]},
)


# (17) rows heads0-endoftext-modelfirst, heads0-bos-modelfirst: no random first token (the model draws it), measured
# with the prototype SelfSampling.random_first of commit c5a0127, removed in the next commit: their rows stay.


# (10) rows heads0-dense and heads0-dense-residual were measured with commit 893cc86's prototype PruneConfig.target
# (a least-squares refit to the dense model's outputs before OBS), removed after: their rows stay in the results.


# What the table says, kept with the script so that rewriting the .md keeps it (update it with the rows).
READING = """
Reading it (2026-12-01, one seed each; the same run moves by ~0.4 between machines of this kind:
the `nospecial` row gave 34.57 on 2026-11-29 and 34.21 today):

- **The split of a layer's budget is the largest lever found.** Keeping every head and taking the
  layer's whole budget from the FFN (`head_share` 0; the default 0.5 is the same plan for SmolLM2
  at 20%) lowers WikiText-2 perplexity from 34.21 to 28.63 with self-calibration and from 23.90 to
  22.57 with WikiText-2 calibration, and Python-docs perplexity with both (22.23 -> 17.95,
  38.96 -> 35.19). A per-group unit of SmolLM2 is 3 of its 9 query heads: too coarse a step.
- **WikiText-2 calibration fits WikiText-2.** It wins on WikiText-2 (22.57 vs 28.63) and loses badly
  on the Python docs (35.19 vs 17.95, dense 11.77), where self-calibration stays within 1.5x of dense.
- **Temperature 0.8 collapses the samples** (self-perplexity 2.6, 64% distinct 4-grams: loops) and
  the prune with them (47.06); temperature 1.0 stays.
- **Top-p 1.0** (plain sampling) with the heads kept: 29.17 / 18.22 against 28.63 / 17.95 at 0.95;
  0.95 stays.
- **More samples help a little**: 128 instead of 64 gives 32.78 vs 34.21 (heads cut; twice the
  sampling and pruning time).
- **Damping 0.001 instead of 0.01** is a little better in all four comparisons (heads cut 33.89 /
  22.06 vs 34.21 / 22.23; heads kept 28.16 / 17.79 vs 28.63 / 17.95), by about the spread between
  machines; 0.01 stays the default (the usual GPTQ/SparseGPT value, safer on small calibration sets).
- **At 50%** (`r0.5-heads*`, self-calibration) heads cut at the layer ratio give 86.18 / 68.57;
  head_share 0.5 (one query head per group goes in the deepest layers) 62.13 / 51.65 (64.91 / 52.79 in the
  table: rerun on the machine of (18)); heads kept
  65.37 / 41.60. 0.5 is best on WikiText-2, 0 on the Python docs; both far ahead of 1.0.
- **With the heads kept (the default split at 20%), the sampler changes (2) and (3) do not help**
  (2026-12-02): no BOS and 4 greedy tokens after the random one (`heads0-greedy4`) give 30.05 /
  17.63 against 28.63 / 17.95; adding 1.25x over-generation with repeats and the worst
  self-perplexity samples dropped (`heads0-filter1.25`) 31.12 / 17.99. The samples read more like
  prose (see the openings) and the Python-docs perplexity moves by less than the machine spread,
  but WikiText-2 gets worse. 128 samples instead of 64 with damping 0.001 (`heads0-damp0.001` x 128)
  give 28.18 / 17.76: no gain over 64 (28.16 / 17.79).
- **Fitting each pruned projection to the dense model's output does not help** (2026-12-02,
  `heads0-dense`, `heads0-dense-residual`; measured with the prototype `PruneConfig.target` of commit
  893cc86, removed in the next commit). SlimGPT fits a pruned layer to the
  *dense layer's* output on the pruned model's inputs. Refitting o_proj / down_proj by least squares
  to the dense model's own outputs (its inputs from the dense stream) before OBS, i.e. asking each
  layer to undo the error of the layers before it, gives 35.41 / 21.21; adding the residual stream's
  drift to the target gives 32.03 / 20.06; against 28.63 / 17.95 for SlimGPT's objective. With 64 x 512
  self-generated tokens the correction fits the calibration text, not the model.
- **The pruner's own defaults stay** (2026-12-02, on `heads0-damp0.001`, 28.16 / 17.79): FFN groups
  starting at 1/16 of the channels to remove instead of 1/4 (four times the OBS updates) give
  28.20 / 17.95; a linear schedule across depth 28.69 / 18.20, a uniform one 28.56 / 18.38. Log
  schedule and 1/4 groups are as good as anything measured here.
- **Longer samples and a document-separator opening do not help** (2026-12-05, on `heads0-damp0.001`,
  28.16 / 17.79): the same 32k tokens as 32 x 1024 give 28.98 / 18.10 (half the openings; the later
  tokens repeat more: 89% distinct 4-grams, self-perplexity 15.0 vs 18.5); opening each sample with
  `<|endoftext|>` (how pretraining documents are packed) instead of the chat BOS `<|im_start|>` gives
  30.49 / 17.24: better on the Python docs, worse on WikiText-2. The seeded random first token still
  sets the genre (the first sample is code after either opening).
- **Leaving the last layers dense helps a little** (2026-12-06, `heads0-damp0.001-span*`, one machine,
  the same samples for every row, the base row rerun beside them: the table's `heads0-damp0.001` x 64 row
  is now 28.45 / 17.92; the bullets above cite its 2026-12-02 value on another machine, 28.16 / 17.79).
  The log schedule over layers 0-27 at 20% x 30/28, the last 2 layers dense: 28.00 / 17.39; the last
  layer dense: 28.10 / 17.63; the last 4: 27.98 / 17.62; the first 4 and the last 2 (LLM-Pruner's span
  for LLaMA-7B): 28.28 / 17.44. About -0.4 on WikiText-2 and -0.3 to
  -0.5 on the Python docs with the same parameters removed: the deepest layers cost more per removed
  parameter than the log schedule's rising ratio assumes. One seed, and smaller than the other levers;
  the schedule is unchanged (`--layer-ratios` gives any such plan).
- **Three more levers, none of them a general gain** (2026-12-06, an AMD EPYC 2-core machine; the base row
  `nospecial-heads0` rerun there on the same samples: 29.43 / 17.80, where it gave 28.63 / 17.95 on the machine
  of 2026-12-01 — sampling and pruning move with the CPU):
  (15) weighing each calibration position in the Hessians by 1 / rms^2 of the dense block's output stream (the
  error the next RMSNorm sees; the first token's massive activation holds 98% of the stream's squared norm in
  the middle layers, benchmarks/results/layer_errors.md), `heads0-rms`: 29.34 / 17.71, no change;
  (16) layer ratios from each layer's measured sensitivity (benchmarks/layer_sensitivity.py: layer 0 and the last
  two layers cost 4-6x a middle layer per removed channel), `heads0-sens-inv1` 29.07 / 17.65 and
  `heads0-sens-opt0.45` 29.35 / 17.75: the -0.4 of leaving the last layers dense, no more;
  (17) no random first token, the model drawing its own first token after the opening: after `<|endoftext|>`
  (educational prose, as pretraining documents read) 31.07 / 16.94, after BOS 28.87 / 20.47 — each corpus
  improves only at the other's expense. The code of (15) and (17) (`PruneConfig.position_weight`,
  `SelfSampling.random_first`) was measured at commit c5a0127 and removed in the
  next commit; the rows stay.
- **(18) The last 2 layers dense, across seeds and at 50%** (2026-12-06, a 2-core AMD EPYC without AVX-512, every
  row of the comparison run there; damping 0.01, heads kept). At 20%, for each of three sampler seeds, the last 2
  layers dense (log schedule over layers 0-27, same share removed) lower both perplexities: seed 0 29.43 / 17.80 ->
  28.70 / 17.10 (`nospecial-heads0` -> `heads0-span0-27-seed0`), seed 1 28.76 / 17.31 -> 27.83 / 16.93, seed 2
  29.46 / 18.68 -> 28.63 / 17.95: 0.83 / 0.61 lower on average, larger than with damping 0.001 in (14). At 50%
  (head share 0.5) the same plan raises them: 64.91 / 52.79 -> 70.07 / 55.69 (`r0.5-heads0.5` -> `r0.5-span0-27`);
  the other 28 layers then lose 54% on average, up to 67%. At 30% it is a trade: 40.25 / 23.20 -> 38.18 / 24.54
  (`r0.3-heads0.5` -> `r0.3-span0-27`). Shipped as `prune --dense-last N` (off by default,
  recommended around 20%). The seeds alone move the default prune by 0.7 on WikiText-2 and 1.4 on the Python docs.
- **(19) The output-space Fisher (`prune --fisher-samples N`) is no general gain** (2026-12-06, the 2-core AMD EPYC
  of (18), every base row rerun or reproduced there: `nospecial-heads0` gave 29.43 / 17.80 again). Each OBS choice
  weighed by the loss's curvature in the projection's output space (K-FAC: `tr(dW H dW^T G)`, G measured on the
  dense model; docs/DESIGN.md "The output-space Fisher"), Fisher on 16 samples unless said:
  20%, seeds 0 / 1 / 2: 29.43 / 17.80 -> 28.69 / 17.69, 28.76 / 17.31 -> 28.62 / 16.58, 29.46 / 18.68 -> 29.61 /
  17.82 (WikiText-2 -0.25, Python docs -0.57 on average); 30%, seeds 0 / 1: 40.25 / 23.20 -> 44.29 / 24.44,
  38.43 / 22.21 -> 39.41 / 22.02 (worse on WikiText-2 both times); 50%: 64.91 / 52.79 -> 64.28 / 50.22.
  The Python docs improve in 5 of 6 settings, WikiText-2 in 3 of 6, by up to 0.75, and get 4.0 worse once. With the
  last 2 layers dense it adds nothing (28.70 / 17.10 -> 28.69 / 17.12); 64 Fisher samples instead of 16: 28.62 /
  17.55; damping 0.1 instead of 0.01: 28.75 / 17.46; the Fisher's diagonal alone (one weight per output
  dimension): 29.36 / 17.83, no gain — what helps is the coupling between output dimensions. The Fisher of 16
  samples costs 60-73 s of a 200-220 s prune here. Shipped off by default (`--fisher-samples 0`); the rows marked
  "prototype" ran this change's first version (G from one whole-model backward pass, which tests/test_fisher.py
  checks the shipped layer-by-layer pass against; 16-sample seed 0: 28.68 / 17.67 there, 28.69 / 17.69 shipped).
- **(20) With real calibration text the Fisher keeps the rest of the model** (2026-12-06, the same AMD EPYC):
  calibrated on WikiText-2 *valid*, the in-domain perplexity stays where SlimGPT's objective puts it and the
  out-of-domain one (Python docs) improves by 4-6: 20% with heads kept 22.57 / 35.19 -> 22.53 / 28.87; 30% with
  head share 0.5 26.04 / 50.74 -> 26.35 / 46.43. The loss's curvature, measured on the calibration text, keeps
  output directions that the layer objective on that text alone would trade away; pruning for a domain with
  data of it, `--fisher-samples 16` costs a minute (60-63 s here) and keeps more of what lies outside it.
- **(21) Shorter samples do not help either** (2026-12-07, a 2-core AMD EPYC with AVX-512, the three rows run one
  after another on the same machine; the base row `heads0-512` is the default prune, `nospecial-heads0`, rerun there:
  28.63 / 17.95, as on the 2026-12-01 machine). The same 32,768 sampled tokens as 128 x 256 give
  29.56 / 18.19 and as 256 x 128 30.24 / 18.73: more openings (each sets its own genre) cost the positions past
  128 or 256 that the evaluation windows are made of, and both corpora get worse as the samples get shorter. With
  (12) (32 x 1024: 28.98 / 18.10 with damping 0.001) this puts the sampler's default length, 512, at the best
  measured. Sampling took 191-211 s and pruning 114-126 s per row on this machine.
- **(22) The small levers do not add up** (2026-12-07, the AVX-512 AMD EPYC of (21), the same cached samples as
  `heads0-512`). Heads kept, damping 0.001, the last 2 layers dense and the output-space Fisher of 16 samples
  together (`heads0-levers`): 28.07 / 17.30 against 28.63 / 17.95 for the default prune, -0.56 / -0.65: about what
  the last 2 layers dense gave alone on the machine of (18) (-0.73 / -0.70 on seed 0), not the sum of the four
  (alone, each moved WikiText-2 by +0.15 to -0.98 against its own base row, on other machines and seeds). Why they
  overlap was not measured. The prune took 176 s, 51 s of it the Fisher.
- **(23) Long samples lose, loops or not** (2026-12-07, the AVX-512 AMD EPYC of (21) and (22)). (12) had left
  open whether 1024-token samples lose because the small model falls into loops late in a sample (distinct 4-grams
  0.89 against 0.94 at 512). On the default prune (heads kept, damping 0.01), the same 32,768 tokens as 32 x 1024
  give 29.93 / 18.48 (`heads0-1024`) against 28.63 / 17.95 for 64 x 512 (`heads0-512`), and with no 4-gram ever
  repeated within a sample (`SelfSampling.no_repeat_ngram=4`: distinct 4-grams 1.0, self-perplexity 24.9 instead
  of 14.9) the same 29.91 / 18.49: the loops were not what cost. At 512 the ban costs 0.9 (29.57 / 18.12,
  `heads0-norepeat4`): natural text repeats 4-grams, and samples that never do are not like it. What 1024 costs
  instead was not measured (half as many openings, each setting its own genre, is one candidate; (21) traded the
  other way and lost too), so 512 stays the best measured length for this budget. The ban stays in the sampler,
  off by default. Sampling took 250-281 s and pruning 129-166 s per row.
- **A bias column in OBS (FLAP's bias compensation) does not help either**: benchmarks/results/bias_compensation.md.
- **The target (<= 26.0 on WikiText-2 with no data) is not met**: the best data-free row is 27.83 (`--dense-last 2`,
  seed 1); with seed 0, 28.07 with every small lever together (22), 28.70 with the last 2 layers dense on the
  machine of (18) (27.98 with the last 4 dense and damping 0.001 on the machine of 2026-12-06 morning). No lever
  measured moves WikiText-2 perplexity by more than 0.9 without a cost on the Python docs.
"""


def machine() -> dict:
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_avg": os.getloadavg(),
    }


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _pool(loaded, fields: dict, count: int, seqlen: int = SEQLEN):
    """A cached pool of at least ``count`` samples (sampled and saved when missing), cut to ``count``."""
    from safetensors.torch import load_file, save_file

    from slimgpt_deploy.calibration import SelfPool, SelfSampling, sample_self

    sampling = SelfSampling(**({k: v for k, v in fields.items() if k not in NOT_SAMPLING} | {"overgenerate": 1.0}))
    seed = fields.get("seed", 0)
    key = hashlib.sha256(json.dumps([sampling.describe(), seqlen, seed], sort_keys=True).encode()).hexdigest()[:16]
    CACHE.mkdir(parents=True, exist_ok=True)
    cached = sorted(CACHE.glob(f"{key}-*.safetensors"), key=lambda p: int(p.stem.split("-")[1]))
    for path in reversed(cached):
        if int(path.stem.split("-")[1]) >= count:
            t = load_file(path)
            opening = int(t["opening"])
            return SelfPool(input_ids=t["input_ids"][:count], nll=t["nll"][:count], opening=opening), 0.0
    t0 = time.perf_counter()
    pool = sample_self(loaded.model, loaded.tokenizer, count=count, seqlen=seqlen, seed=seed, sampling=sampling)
    seconds = time.perf_counter() - t0
    import torch

    tmp = CACHE / f".{key}-{count}.tmp"
    save_file({"input_ids": pool.input_ids, "nll": pool.nll, "opening": torch.tensor(pool.opening)}, tmp)
    tmp.rename(CACHE / f"{key}-{count}.safetensors")
    return pool, seconds


def one(name: str, nsamples: int) -> dict:
    """Sample (or reuse), prune and evaluate one variant in this process; returns its row."""
    import torch

    from slimgpt_deploy.calibration import _special_ids, distinct_ngram_share, get_calibration
    from slimgpt_deploy.config import PruneConfig
    from slimgpt_deploy.evaluate import load_text, perplexity, text_to_ids
    from slimgpt_deploy.prune.engine import LayerwisePruner
    from slimgpt_deploy.sources import load_model

    torch.manual_seed(0)
    loaded = load_model(MODEL)
    tok = loaded.tokenizer
    corpora = {
        "wikitext2": text_to_ids(tok, load_text(DATA / "test.txt"))[:EVAL_TOKENS],
        "pydoc": text_to_ids(tok, pydoc_text())[:EVAL_TOKENS],
    }
    row: dict = {"name": name, "nsamples": nsamples, "seqlen": SEQLEN}
    if name == "dense":
        model = loaded.model
    else:
        what, fields = VARIANTS[name]
        seqlen = fields.get("seqlen", SEQLEN)
        nsamples = nsamples * SEQLEN // seqlen  # the same number of tokens
        row |= {"nsamples": nsamples, "seqlen": seqlen}
        row |= {"what": what, "sampling": fields}
        special = torch.tensor(_special_ids(tok, int(loaded.model.config.vocab_size)))
        if "file" in fields:
            ids = get_calibration(fields["file"], loaded.model, tok, nsamples=nsamples, seqlen=seqlen, seed=0).input_ids
            self_ppl, opening = float("nan"), 0
        else:
            pool, row["sample_s"] = _pool(loaded, fields, math.ceil(nsamples * fields["overgenerate"]), seqlen)
            ids = pool.select(nsamples)
            kept = torch.isin(pool.input_ids, ids).all(dim=1)  # rows of the pool that were kept
            self_ppl, opening = float(pool.nll[kept].mean().exp()), pool.opening
        body = ids[:, opening:]
        row["calib"] = {
            "special_share": round(float(torch.isin(body, special).float().mean()), 5),
            "self_ppl_kept": round(self_ppl, 2),
            "distinct4_kept": round(sum(distinct_ngram_share(r) for r in body) / len(body), 3),
            "sample_head": tok.decode(ids[0, :48]),
        }
        config = PruneConfig(**{**PRUNE_BASE, "nsamples": nsamples, "seqlen": seqlen, **fields.get("prune", {})})
        t0 = time.perf_counter()
        result = LayerwisePruner(loaded.model, config).run(ids)
        model = result.model
        row["prune_s"] = round(time.perf_counter() - t0, 1)
        row["fisher_s"] = round(result.record["fisher_seconds"], 1)
    for corpus, test_ids in corpora.items():
        row[f"ppl_{corpus}"] = round(perplexity(model, test_ids, seqlen=WINDOW).ppl, 3)
    row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def special_share(count: int = 8, seqlen: int = 128) -> None:
    """How often the sampler emits special tokens, before (specials allowed) and now (masked)."""
    import torch

    from slimgpt_deploy.calibration import SelfSampling, _special_ids, sample_self
    from slimgpt_deploy.sources import load_model

    loaded = load_model(MODEL)
    special = torch.tensor(_special_ids(loaded.tokenizer, int(loaded.model.config.vocab_size)))
    for name, sampling in (
        ("specials allowed (before)", SelfSampling(mask_special=False)),
        ("default (masked)", SelfSampling()),
    ):
        pool = sample_self(loaded.model, loaded.tokenizer, count=count, seqlen=seqlen, seed=0, sampling=sampling)
        hit = torch.isin(pool.input_ids[:, pool.opening :], special)
        print(
            f"{name}: {float(hit.float().mean()):.2%} of sampled tokens special, in {int(hit.any(1).sum())} of "
            f"{count} samples of {seqlen} tokens; self-perplexity {float(pool.nll.mean().exp()):.2f}"
        )


def _n(row: dict) -> str:
    """The N column: samples, with their length when it is not the protocol's."""
    if row["name"] == "dense":
        return "-"
    return str(row["nsamples"]) if row.get("seqlen", SEQLEN) == SEQLEN else f"{row['nsamples']} x {row['seqlen']}"


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Data-free (`self`) calibration: SmolLM2-135M at 20%",
        "",
        f"Machine: {m['platform']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads); "
        f"load average {m['load_avg'][0]:.1f} when the last row ended (its own threads count), so seconds are noisy; "
        "perplexities are deterministic. "
        f"Date: {results['date']}. (The machine of the latest run; earlier rows ran on other 2-core machines of "
        "this kind, where the same row moves by up to ~0.4.)",
        f"Protocol: SlimGPT, ratio {RATIO}, schedule log, per-group GQA, heads cut at the layer ratio (head_share 1.0) "
        f"unless the row says otherwise; calibration `self`, N x {SEQLEN} tokens, seed 0 (unless the row says "
        "otherwise). "
        f"Perplexity at non-overlapping {WINDOW}-token windows on the first {EVAL_TOKENS:,} tokens of WikiText-2 test "
        f"(the protocol of benchmarks/quality.py) and of Python's documentation text (`pydoc_data.topics`).",
        "Command: `.venv/bin/python benchmarks/self_calibration.py` (`--nsamples 16` for the screens).",
        "",
        "| variant | N | change | WikiText-2 PPL | pydoc PPL | specials in samples | self-PPL of samples "
        "| distinct 4-grams | prune s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results["runs"].values(), key=lambda r: (r["name"] != "dense", -r["nsamples"])):
        c = r.get("calib", {})
        lines.append(
            f"| {r['name']} | {_n(r)} | {r.get('what', 'dense model')} | "
            f"{r['ppl_wikitext2']:.2f} | {r['ppl_pydoc']:.2f} | {c.get('special_share', 0):.2%} | "
            f"{c.get('self_ppl_kept', float('nan')):.2f} | {c.get('distinct4_kept', float('nan')):.3f} | "
            f"{r.get('prune_s', 0):.0f} |"
        )
    lines += ["", "A sample's opening (first 48 tokens, decoded; variants that share a pool share it too):", ""]
    seen = set()
    for r in results["runs"].values():
        if "calib" in r and r["nsamples"] == 64 and r["calib"]["sample_head"] not in seen:
            seen.add(r["calib"]["sample_head"])
            lines.append(f"- {r['name']}: `{r['calib']['sample_head']!r}`")
    return "\n".join(lines + ["", READING.strip(), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", action="append", help="run only these variants (repeatable; 'dense' for the dense model)"
    )
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--markdown", action="store_true", help="only rewrite the .md from the .json")
    parser.add_argument("--special-share", action="store_true", help="only count special tokens in 8 x 128 samples")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.special_share:
        special_share()
        return
    if args.one:
        print(json.dumps(one(args.one, args.nsamples)))
        return
    path = RESULTS / "self_calibration.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    if args.markdown:
        (RESULTS / "self_calibration.md").write_text(markdown(results))
        return
    if not (DATA / "test.txt").exists():
        sys.exit(f"WikiText-2 not found at {DATA}; this benchmark needs ../shared/data/wikitext-2")
    for name in args.only or ["dense", *VARIANTS]:
        if name != "dense" and name not in VARIANTS:
            sys.exit(f"unknown variant {name!r}; choose from dense, {', '.join(VARIANTS)}")
        print(f"== {name} x {args.nsamples}", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name, "--nsamples", str(args.nsamples)],
            capture_output=True,
            text=True,
            env=os.environ | {"HF_HUB_OFFLINE": "1"},
        )
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            sys.exit(f"run {name} failed")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(row), file=sys.stderr, flush=True)
        results["runs"][f"{name}@{args.nsamples}" if name != "dense" else "dense"] = row
        results |= {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "protocol": {"eval_tokens": EVAL_TOKENS, "window": WINDOW, "seqlen": SEQLEN, "ratio": RATIO, "seed": 0},
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(path)
        (RESULTS / "self_calibration.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
