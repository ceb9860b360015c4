"""Peer comparison: Torch-Pruning vs SlimGPT at 20% on SmolLM2-135M, WikiText-2 perplexity.

    .venv/bin/python benchmarks/peer_torch_pruning.py                 # every run (about 20-30 min on 2 cores)
    .venv/bin/python benchmarks/peer_torch_pruning.py --only tp-taylor-ffn   # one run
    .venv/bin/python benchmarks/peer_torch_pruning.py --markdown      # rewrite the .md from the .json

Same protocol as benchmarks/quality.py (its constants are imported): perplexity on
the first 40,960 tokens of WikiText-2 test.txt in non-overlapping windows of 2048
and 128 tokens; calibration 64 x 512 tokens of WikiText-2 valid.txt, seed 0.
Each run is its own subprocess, so its time and peak RSS are its own.

The peer is Torch-Pruning (PyPI `torch-pruning`) used through its documented API,
following the approach of its `examples/LLMs/prune_llm.py`: a `tp.pruner.MetaPruner`
over the whole model with an importance criterion, `pruning_ratio`, `ignored_layers`
holding `lm_head`, `num_heads` for q/k/v (GQA), `prune_num_heads=True`,
`prune_head_dims=False` and `global_pruning=False` (the same width in every layer).
Unlike the example, the hidden size is kept (as SlimGPT keeps it) by also ignoring
the projections that write the residual stream, and no `round_to` is used so the
achieved share can match SlimGPT's. Two changes are needed for the graph to build on
this model (see docs/DESIGN.md, "Peer baseline facts"): eager attention while tracing,
and RoPE (`apply_rotary_pos_emb`) replaced by an identity during tracing only.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import inspect
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
from quality import DATA, EVAL_TOKENS, MODEL, NSAMPLES, RESULTS, SEQLEN, WINDOWS, machine  # noqa: E402

from slimgpt_deploy.prune.methods import SLIMGPT  # noqa: E402
from slimgpt_deploy.prune.schedule import PER_GROUP  # noqa: E402

SHARE = 0.2  # share of decoder parameters to remove, for every run
TIMEOUT_S = 1200  # per run (prune + both perplexities); a run cut by it is recorded as such
TRACE_TIMEOUT_S = 120  # the unpatched graph build is only shown not to finish within this
GRAD_BATCH = 4  # calibration sequences per backward pass (Taylor importance)
JSON_PATH, MD_PATH = RESULTS / "peer_torch_pruning.json", RESULTS / "peer_torch_pruning.md"


@dataclass(frozen=True)
class TPSetting:
    """One Torch-Pruning configuration (importance criterion and what it may remove)."""

    importance: str  # a key of IMPORTANCES
    prune_heads: bool  # also remove query heads (whole heads, the same number in every KV group)


def _taylor():
    import torch_pruning as tp

    return tp.importance.GroupTaylorImportance()


def _magnitude():
    # The LLM example's importance is `GroupNormImportance(p=2, group_reduction='mean')`;
    # torch-pruning 1.6 names that class GroupMagnitudeImportance.
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")


IMPORTANCES = {"taylor": _taylor, "magnitude": _magnitude}
NEEDS_GRADIENTS = {"taylor": True, "magnitude": False}

RUNS = [
    {"name": "dense", "method": "dense"},
    {"name": "slimgpt-log-pg-20", "method": SLIMGPT, "schedule": "log", "gqa_mode": PER_GROUP},
    {"name": "tp-taylor-ffn", "method": "torch-pruning", **asdict(TPSetting("taylor", prune_heads=False))},
    {"name": "tp-taylor-heads", "method": "torch-pruning", **asdict(TPSetting("taylor", prune_heads=True))},
    {"name": "tp-magnitude-ffn", "method": "torch-pruning", **asdict(TPSetting("magnitude", prune_heads=False))},
    # Checks the RoPE workaround: graph build + pruner.step() with heads but without it, cut after TRACE_TIMEOUT_S.
    {"name": "tp-without-rope-patch", "method": "tp-unpatched", "use_cache": False, "timeout_s": TRACE_TIMEOUT_S},
    {
        "name": "tp-without-rope-patch-with-cache",
        "method": "tp-unpatched",
        "use_cache": True,
        "timeout_s": TRACE_TIMEOUT_S,
    },
]


# --- pure arithmetic -------------------------------------------------------------------


def decoder_params(model) -> int:
    return sum(p.numel() for p in model.model.layers.parameters())


def model_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def unit_params(layer) -> tuple[int, int]:
    """Parameters one query head and one FFN channel own in a (dense) decoder layer: (head, channel)."""
    attn, mlp = layer.self_attn, layer.mlp
    head_dim = attn.head_dim
    q_row = attn.q_proj.in_features + (attn.q_proj.bias is not None)
    head = head_dim * (q_row + attn.o_proj.out_features)  # q_proj rows + o_proj columns
    channel = (
        mlp.gate_proj.in_features
        + (mlp.gate_proj.bias is not None)
        + mlp.up_proj.in_features
        + (mlp.up_proj.bias is not None)
        + mlp.down_proj.out_features
    )
    return head, channel


def ffn_channels_to_cut(layer_params: int, head_params: int, channel_params: int, share: float, heads_cut: int) -> int:
    """FFN channels to remove from every layer so that `share` of its parameters go, after `heads_cut` query heads."""
    return max(0, round((share * layer_params - heads_cut * head_params) / channel_params))


def tp_local_ratio(n_cut: int, n_total: int) -> float:
    """The `pruning_ratio` for which Torch-Pruning's local pruning removes exactly `n_cut` of `n_total` channels.

    It removes n_total - int(n_total * (1 - ratio)); the half-unit offset keeps float rounding off the boundary.
    """
    return 0.0 if n_cut == 0 else (n_cut - 0.5) / n_total


def tp_head_ratio(per_group: int, q_heads: int, kv_heads: int) -> float:
    """The `head_pruning_ratio` for which Torch-Pruning's local GQA rule removes `per_group` query heads per KV group.

    It removes ceil(ceil(ratio * q_heads) / kv_heads) query heads from every group.
    """
    return 0.0 if per_group == 0 else (per_group * kv_heads - 0.5) / q_heads


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


# --- Torch-Pruning ---------------------------------------------------------------------


@contextlib.contextmanager
def rope_as_identity(model):
    """Replace the model's `apply_rotary_pos_emb` by an identity while the body runs (graph tracing only)."""
    module = inspect.getmodule(type(model.model.layers[0].self_attn))
    original = module.apply_rotary_pos_emb
    module.apply_rotary_pos_emb = lambda q, k, cos, sin, *args, **kwargs: (q, k)
    try:
        yield
    finally:
        module.apply_rotary_pos_emb = original


def build_pruner(
    model, example_ids, setting: TPSetting, *, share: float = SHARE, patch_rope: bool = True, use_cache: bool = False
):
    """A Torch-Pruning MetaPruner for `setting` that removes `share` of decoder parameters; plus its plan.

    Follows the LLM example's arguments; see the module docstring for the two differences.
    """
    import torch_pruning as tp

    config = model.config
    layers = model.model.layers
    q_heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_params, channel_params = unit_params(layers[0])
    heads_per_group = 1 if setting.prune_heads else 0
    n_ffn = ffn_channels_to_cut(
        decoder_params(model) // len(layers), head_params, channel_params, share, heads_per_group * kv_heads
    )
    ffn = layers[0].mlp.gate_proj.out_features
    num_heads = {}
    for layer in layers:
        attn = layer.self_attn
        num_heads.update({attn.q_proj: q_heads, attn.k_proj: kv_heads, attn.v_proj: kv_heads})
    ignored = [model.lm_head]
    for layer in layers:  # keep the hidden size: nothing that writes the residual stream is an output to prune
        ignored += [layer.self_attn.o_proj, layer.mlp.down_proj]
        if not setting.prune_heads:
            ignored += [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
    plan = {
        "ffn_channels_cut_per_layer": n_ffn,
        "query_heads_cut_per_kv_group": heads_per_group,
        "pruning_ratio": tp_local_ratio(n_ffn, ffn),
        "head_pruning_ratio": tp_head_ratio(heads_per_group, q_heads, kv_heads),
    }
    model.set_attn_implementation("eager")  # SDPA's enable_gqa hides the query-to-KV link from the tracer
    model.requires_grad_(True)  # the tracer follows autograd's graph
    tracing = rope_as_identity(model) if patch_rope else contextlib.nullcontext()
    with tracing:
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs=example_ids,
            importance=IMPORTANCES[setting.importance](),
            global_pruning=False,
            pruning_ratio=plan["pruning_ratio"],
            ignored_layers=ignored,
            num_heads=num_heads,
            prune_num_heads=setting.prune_heads,
            prune_head_dims=False,
            head_pruning_ratio=plan["head_pruning_ratio"],
            forward_fn=lambda m, ids: (
                m(input_ids=ids, use_cache=use_cache).logits
            ),  # by default no KV cache in the graph
        )
    model.set_attn_implementation("sdpa")  # eager was for tracing only
    return pruner, plan


def accumulate_gradients(model, calib_ids, batch_size: int = GRAD_BATCH) -> None:
    """Language-model loss gradients over the calibration set, summed into `.grad` (Taylor importance)."""
    model.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    for batch in calib_ids.split(batch_size):  # batch: [b, seqlen]
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()


def sync_config(model) -> dict:
    """After Torch-Pruning cut the weights in place, make the modules and config agree with them.

    Returns the per-layer query heads, KV heads and FFN widths found in the weights.
    """
    config = model.config
    head_dim = model.model.layers[0].self_attn.head_dim
    shapes = {"heads": [], "kv_heads": [], "ffn": []}
    for layer in model.model.layers:
        attn = layer.self_attn
        q, kv = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
        attn.num_key_value_groups = q // kv
        shapes["heads"].append(q)
        shapes["kv_heads"].append(kv)
        shapes["ffn"].append(layer.mlp.gate_proj.out_features)
    uniform = all(len(set(v)) == 1 for v in shapes.values())
    if uniform:  # a plain LlamaConfig can describe the result
        config.head_dim = head_dim
        config.num_attention_heads = shapes["heads"][0]
        config.num_key_value_heads = shapes["kv_heads"][0]
        config.intermediate_size = shapes["ffn"][0]
    return {**shapes, "uniform": uniform}


def prune_torch_pruning(model, calib_ids, setting: TPSetting, *, share: float = SHARE) -> dict:
    """Prune `model` IN PLACE with Torch-Pruning (its API works in place); returns the record.

    calib_ids: [n, seqlen] calibration token ids (gradients for Taylor; the tracing example is a slice).
    """
    t0 = time.perf_counter()
    pruner, plan = build_pruner(model, calib_ids[:1, :16], setting, share=share)
    t_trace = time.perf_counter() - t0
    if NEEDS_GRADIENTS[setting.importance]:
        accumulate_gradients(model, calib_ids)
    t_grad = time.perf_counter() - t0 - t_trace
    pruner.step()
    del pruner
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    shapes = sync_config(model)
    return {
        **plan,
        **shapes,
        "trace_s": round(t_trace, 2),
        "gradients_s": round(t_grad, 2),
        "prune_s": round(time.perf_counter() - t0, 2),
    }


# --- one run (in its own process) ------------------------------------------------------


def reload_check(model, save) -> str:
    """Save with `save(dir)`, reload with from_pretrained, compare logits; 'ok ...' or the failure's first line."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.arange(64).unsqueeze(0) % model.config.vocab_size
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "model"
            save(out)
            again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            with torch.inference_mode():
                diff = (again(ids).logits - model(ids).logits).abs().max().item()
    except Exception as err:  # noqa: BLE001 - any failure is the answer here
        return first_line(err)
    return f"ok (max abs logit diff {diff:.1e})" if diff < 1e-3 else f"reloaded but logits differ by {diff:.3g}"


def one(spec: dict) -> dict:
    """Run one configuration in this process; returns its result row."""
    import torch

    import slimgpt_deploy  # noqa: F401 - registers the slim architecture for from_pretrained
    from slimgpt_deploy.api import prune
    from slimgpt_deploy.calibration import get_calibration
    from slimgpt_deploy.checkpoint import save_checkpoint
    from slimgpt_deploy.config import PruneConfig
    from slimgpt_deploy.evaluate import load_text, perplexity, text_to_ids
    from slimgpt_deploy.sources import load_model

    torch.manual_seed(0)
    loaded = load_model(MODEL)
    model = loaded.model
    row = dict(spec)
    dense_decoder, dense_model = decoder_params(model), model_params(model)
    calib_spec = str(DATA / "valid.txt")
    t0 = time.perf_counter()
    if spec["method"] == "tp-unpatched":  # each line below is reached only if the one before it finishes
        calib = get_calibration(calib_spec, model, loaded.tokenizer, nsamples=1, seqlen=SEQLEN, seed=0).input_ids
        pruner, _ = build_pruner(
            model,
            calib[:1, :16],
            TPSetting("magnitude", prune_heads=True),
            patch_rope=False,
            use_cache=spec["use_cache"],
        )
        row["trace_s"] = round(time.perf_counter() - t0, 2)
        pruner.step()
        row["prune_s"] = round(time.perf_counter() - t0, 2)
        row.update(sync_config(model), ratio_achieved_decoder=round(1 - decoder_params(model) / dense_decoder, 4))
        row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return row
    if spec["method"] == SLIMGPT:
        config = PruneConfig(
            ratio=SHARE,
            method=SLIMGPT,
            schedule=spec["schedule"],
            gqa_mode=spec["gqa_mode"],
            calib=calib_spec,
            nsamples=NSAMPLES,
            seqlen=SEQLEN,
            seed=0,
        )
        result = prune(loaded, config)
        model, rec = result.model, result.record
        row.update(
            calib_s=rec["seconds"]["calibration"],
            prune_s=rec["seconds"]["prune"],
            heads=model.config.num_attention_heads_per_layer,
            kv_heads=model.config.num_key_value_heads_per_layer,
            ffn=model.config.intermediate_size_per_layer,
        )
        row["reload"] = reload_check(model, lambda out: save_checkpoint(model, loaded.tokenizer, rec, out))
    elif spec["method"] == "torch-pruning":
        t = time.perf_counter()
        calib = get_calibration(calib_spec, model, loaded.tokenizer, nsamples=NSAMPLES, seqlen=SEQLEN, seed=0)
        row["calib_s"] = round(time.perf_counter() - t, 2)
        setting = TPSetting(importance=spec["importance"], prune_heads=spec["prune_heads"])
        try:
            row.update(prune_torch_pruning(model, calib.input_ids, setting))
        except Exception as err:  # noqa: BLE001 - a failing peer setting is a result to record
            row["error"] = first_line(err)
            row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            return row
        row["reload"] = reload_check(model, model.save_pretrained)
    if spec["method"] != "dense":
        row["ratio_achieved_decoder"] = round(1 - decoder_params(model) / dense_decoder, 4)
        row["ratio_achieved_model"] = round(1 - model_params(model) / dense_model, 4)
    row["params"] = model_params(model)
    test_ids = text_to_ids(loaded.tokenizer, load_text(DATA / "test.txt"))[:EVAL_TOKENS]
    for w in WINDOWS:
        ppl = perplexity(model, test_ids, seqlen=w, batch_size=8 if w <= 512 else 1).ppl
        row[f"ppl_{w}"] = round(ppl, 3) if math.isfinite(ppl) else None
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


# --- report ------------------------------------------------------------------------------


def versions() -> dict:
    names = ("torch", "transformers", "torch-pruning", "slimgpt-deploy")
    return {name: importlib.metadata.version(name) for name in names}


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")  # a table cell


def _num(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def standing(rows: list[dict]) -> list[str]:
    """The 'where SlimGPT stands' lines: PPL increase and prune time against the best Torch-Pruning run."""
    by = {r["name"]: r for r in rows}
    dense, slim = by.get("dense"), by.get("slimgpt-log-pg-20")
    peers = [r for r in rows if r["method"] == "torch-pruning" and r.get("ppl_2048") is not None]
    if not (dense and slim and peers and slim.get("ppl_2048")):
        return []
    best = min(peers, key=lambda r: r["ppl_2048"])
    lines = []
    for w in WINDOWS:
        inc_s, inc_p = slim[f"ppl_{w}"] - dense[f"ppl_{w}"], best[f"ppl_{w}"] - dense[f"ppl_{w}"]
        lines.append(
            f"- PPL@{w} increase over dense: SlimGPT +{inc_s:.2f} vs the best Torch-Pruning setting ({best['name']}) "
            f"+{inc_p:.2f}: ratio {inc_s / inc_p:.2f} (lower is better), at {slim['ratio_achieved_decoder']:.2%} vs "
            f"{best['ratio_achieved_decoder']:.2%} of decoder parameters removed."
        )
    lines.append(
        f"- Prune time: SlimGPT {slim['prune_s']:.0f} s vs {best['name']} {best['prune_s']:.0f} s "
        f"(ratio SlimGPT/Torch-Pruning {slim['prune_s'] / best['prune_s']:.2f}, same run and machine load)."
    )
    return lines


def markdown(results: dict) -> str:
    m, v = results["machine"], results["versions"]
    lines = [
        "# Peer comparison: Torch-Pruning vs SlimGPT at 20%, SmolLM2-135M, WikiText-2 perplexity",
        "",
        f"Machine: {m['platform']}, {m['cores']} cores, {m['torch_threads']} torch threads. Date: {results['date']}.",
        f"Versions: torch {v['torch']}, transformers {v['transformers']}, torch-pruning {v['torch-pruning']}, "
        f"slimgpt-deploy {v['slimgpt-deploy']}.",
        f"Command: `{results['command']}`.",
        f"Protocol: {results['protocol']['text']}",
        "Times were measured with other jobs running on the same 2 cores: compare the SlimGPT / Torch-Pruning "
        "ratio within this run, not absolute seconds.",
        "",
        "| run | method | importance | removes | decoder removed | model removed | PPL@2048 | PPL@128 | prune s "
        "| peak RSS MiB | save + reload | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        removes = {"dense": "—", SLIMGPT: "heads + FFN (per layer)", "tp-unpatched": "heads + FFN, no eval"}
        what = removes.get(
            r["method"], "heads + FFN (uniform)" if r.get("query_heads_cut_per_kv_group") else "FFN (uniform)"
        )
        lines.append(
            f"| {r['name']} | {r['method']} | {r.get('importance', '—')} | {what} | "
            f"{_num(r.get('ratio_achieved_decoder'), '.2%')} | {_num(r.get('ratio_achieved_model'), '.2%')} | "
            f"{_num(r.get('ppl_2048'), '.2f')} | {_num(r.get('ppl_128'), '.2f')} | {_num(r.get('prune_s'), '.0f')} | "
            f"{_num(r.get('peak_rss_mib'), '.0f')} | {_cell(r.get('reload', '—'))} | {_cell(r.get('error', ''))} |"
        )
    missing = [s["name"] for s in RUNS if s["name"] not in {r["name"] for r in results["runs"]}]
    if missing:
        lines += ["", f"Not run: {', '.join(missing)}."]
    lines += [
        "",
        "## Where SlimGPT stands",
        "",
        *(standing(results["runs"]) or ["- (needs dense, SlimGPT and a successful Torch-Pruning run)"]),
        "",
        "## Notes",
        "",
        *[f"- {n}" for n in results["notes"]],
    ]
    return "\n".join(lines) + "\n"


NOTES = [
    "Torch-Pruning is used through its API as in its `examples/LLMs/prune_llm.py` (MetaPruner, `global_pruning=False`, "
    "`ignored_layers` with `lm_head`, `num_heads` for q/k/v, `prune_num_heads`, `prune_head_dims=False`). Differences: "
    "the hidden size is kept (o_proj and down_proj outputs ignored, as SlimGPT keeps it); no `round_to`, so the "
    "FFN cut can match 20% of decoder parameters; the example's `GroupNormImportance` is `GroupMagnitudeImportance` "
    "in torch-pruning 1.6.",
    "Tracing: eager attention (docs/DESIGN.md: SDPA's `enable_gqa` hides the query-to-KV link; not re-measured "
    "here), no KV cache (`use_cache=False`) and RoPE (`apply_rotary_pos_emb`) replaced by an identity during "
    "tracing only (the real RoPE runs afterwards). Runs `tp-without-rope-patch*` do the graph build and "
    "`pruner.step()` (magnitude, heads + FFN) without that "
    f"patch, cut after {TRACE_TIMEOUT_S} s, tracing with `use_cache=False` (as every run here does) or with the "
    "model's default `use_cache=True` (a KV-cache object, whose update concatenates, in the traced graph): they check "
    "the earlier finding that the build never ends without the patch. The loop needs both RoPE and the cache in the "
    "graph: an ad-hoc check (not a run of this script) with the patch and the default cache finished in ~7 s.",
    "docs/DESIGN.md's hand run of the Taylor FFN-only setting gave 29.74 / 82.93; its exact settings (gradient "
    "batches, rounding) were not recorded; this script's numbers are the reproducible ones.",
    "Under GQA Torch-Pruning removes whole query heads, the same number from every KV group (never K/V heads); with 3 "
    "query heads per group the smallest step is 1 per group (1/3 of the attention), so `tp-taylor-heads` removes "
    "3 of 9 query heads per layer and fewer FFN channels to stay at 20%.",
    "Taylor importance uses the gradients of the language-model loss on the same 64 x 512 WikiText-2 calibration "
    f"tokens as SlimGPT (batches of {GRAD_BATCH}); its prune time includes that backward pass and the graph build.",
    "prune s: SlimGPT's `seconds.prune` (layer-wise calibration passes + pruning, excluding tokenizing the calibration "
    "text); Torch-Pruning's graph build + gradients + `pruner.step()`. Peak RSS is the whole subprocess (load, prune, "
    "evaluate); Taylor's includes the gradients.",
    "save + reload: SlimGPT via `save_checkpoint` (its slim checkpoint); Torch-Pruning via `save_pretrained`; both "
    "reloaded with `AutoModelForCausalLM.from_pretrained` and compared on 64 tokens of logits.",
]


def write(done: dict) -> dict:
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "versions": versions(),
        "command": ".venv/bin/python benchmarks/peer_torch_pruning.py",
        "protocol": {
            "eval_tokens": EVAL_TOKENS,
            "windows": list(WINDOWS),
            "calib": f"{NSAMPLES}x{SEQLEN} wikitext-2 valid",
            "seed": 0,
            "share_of_decoder_params": SHARE,
            "text": f"first {EVAL_TOKENS:,} tokens of WikiText-2 test, non-overlapping windows of "
            f"{' and '.join(map(str, WINDOWS))} tokens; calibration {NSAMPLES} x {SEQLEN} tokens of WikiText-2 "
            f"valid, seed 0; target {SHARE:.0%} of decoder parameters removed in every run.",
        },
        "notes": NOTES,
        "runs": [done[s["name"]] for s in RUNS if s["name"] in done],
    }
    JSON_PATH.write_text(json.dumps(results, indent=2) + "\n")
    MD_PATH.write_text(markdown(results))
    return results


def run_in_subprocess(spec: dict, timeout_s: float) -> dict:
    """Run `one(spec)` in a fresh interpreter; a crash or a timeout becomes the row's `error`."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"did not finish within {timeout_s:.0f} s (killed)"}
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        print(proc.stderr[-3000:], file=sys.stderr)
        return {
            **spec,
            "error": f"exit {proc.returncode}: {tail[-1] if tail else ''}",
            "wall_s": round(time.perf_counter() - t0, 1),
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="run only these names (repeatable); keeps the others' rows")
    parser.add_argument("--markdown", action="store_true", help="only rewrite the Markdown from the JSON")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per run before it is cut")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    if args.markdown:
        MD_PATH.write_text(markdown(json.loads(JSON_PATH.read_text())))
        return
    if not (DATA / "test.txt").exists():
        sys.exit(f"WikiText-2 not found at {DATA}; this benchmark needs ../shared/data/wikitext-2")
    RESULTS.mkdir(parents=True, exist_ok=True)
    done = {}
    if args.only and JSON_PATH.exists():
        done = {r["name"]: r for r in json.loads(JSON_PATH.read_text())["runs"]}
    for spec in RUNS:
        if args.only and spec["name"] not in args.only:
            continue
        print(f"== {spec['name']}", file=sys.stderr, flush=True)
        done[spec["name"]] = run_in_subprocess(spec, spec.get("timeout_s", args.timeout))
        print(json.dumps(done[spec["name"]]), file=sys.stderr, flush=True)
        write(done)


if __name__ == "__main__":
    main()
