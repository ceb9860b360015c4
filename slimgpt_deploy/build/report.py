"""The build report: DIR/report/{report.json, report.md, *.png}, and the model card's link to it.

report.json holds every number (machine, versions, options, per-layer shapes, stage times,
verification, benchmark); report.md the tables a reader takes in at a glance; the PNGs are
made with matplotlib (Agg, no display): per-layer kept heads and FFN width against depth with
the dense model as reference, latency and memory dense vs pruned per back end, quality dense
vs pruned. The slim checkpoint's README.md and slimgpt.json gain the headline numbers and a
link to the report.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..atomic import atomic_output_dir
from ..bench import machine, versions
from ..checkpoint import RECORD_FILE
from .stages import STAGE, TABLE, VERIFY_STAGES, BuildContext

REPORT_FORMAT = "slimgpt-deploy-report/1"
CARD_MARKER = "<!-- slimgpt-deploy build report -->"
DENSE_COLOR, PRUNED_COLOR = "#9aa5b1", "#2f6fdf"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def layer_table(config: dict, record: dict) -> list[dict]:
    """Per-layer kept shapes beside the dense ones, with the pruner's errors when recorded."""
    n = config["num_hidden_layers"]
    per_layer = {r["layer"]: r for r in record.get("layers", [])}
    rows = []
    for i in range(n):
        r = per_layer.get(i, {})
        rows.append(
            {
                "layer": i,
                "q_heads": config["num_attention_heads_per_layer"][i],
                "kv_heads": config["num_key_value_heads_per_layer"][i],
                "ffn": config["intermediate_size_per_layer"][i],
                "dense_q_heads": config["num_attention_heads"],
                "dense_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
                "dense_ffn": config["intermediate_size"],
                "ratio_target": r.get("ratio_target"),
                "attn_rel_error": r.get("attn_rel_error"),
                "mlp_rel_error": r.get("mlp_rel_error"),
            }
        )
    return rows


def collect(ctx: BuildContext) -> dict:
    """Every number of the build, JSON-able."""
    out, state = ctx.out, ctx.state or {"stages": {}}
    slim = ctx.checkpoint
    record = _read_json(slim / RECORD_FILE) or {}
    config = _read_json(slim / "config.json")
    stages = {
        name: {k: rec.get(k) for k in ("status", "seconds", "finished_at", "reason") if rec.get(k) is not None}
        for name, rec in state["stages"].items()
        if name != "report"
    }
    verification = {
        name.split("-", 1)[1]: _read_json(ctx.path(name)) for name in VERIFY_STAGES if ctx.path(name).exists()
    }
    artifacts = {}
    for stage in (s for s in TABLE if s.artifact and s.name != "report"):
        path, label = ctx.path(stage.name), stage.output
        if path.exists():
            artifacts[label] = {
                "path": str(path),
                "bytes": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()),
            }
    bench = _read_json(ctx.path("bench"))
    failed = [f"{name}: {rec.get('reason')}" for name, rec in state["stages"].items() if rec.get("status") == "failed"]
    gate = None
    if ctx.options.gate:
        from .gate import check_gate_file, failures

        gate = check_gate_file(ctx.options.gate, ctx.path("eval"))
        failed += [f"gate: {f}" for f in failures(gate)]
    return {
        "format": REPORT_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "out": str(out),
        "machine": machine(),
        "versions": versions(),
        "options": ctx.options.to_dict(),
        "passed": not failed,
        "failures": failed,
        "model": {
            "source": ctx.options.model,
            **{
                k: record.get(k)
                for k in (
                    "ratio_target",
                    "ratio_achieved_decoder",
                    "ratio_achieved_model",
                    "params_dense",
                    "params_slim",
                )
            },
            "calibration": record.get("calibration"),
            "prune_seconds": record.get("seconds"),
            "recovery": record.get("recovery"),
        },
        "layers": layer_table(config, record) if config and "num_attention_heads_per_layer" in config else [],
        "stages": stages,
        "artifacts": artifacts,
        "verification": verification,
        "eval": _read_json(ctx.path("eval")) if "eval" in ctx.options.stages else None,
        "gate": gate,
        "bench": bench,
    }


# --- plots ------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_shapes(layers: list[dict], path: Path) -> None:
    """Kept query/KV heads and FFN width per layer, the dense widths as dashed references."""
    plt = _pyplot()
    x = [r["layer"] for r in layers]
    fig, (ax_h, ax_f) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_h.plot(x, [r["dense_q_heads"] for r in layers], "--", color=DENSE_COLOR, label="dense query heads")
    ax_h.plot(x, [r["q_heads"] for r in layers], "o-", color=PRUNED_COLOR, ms=3, label="kept query heads")
    ax_h.plot(x, [r["dense_kv_heads"] for r in layers], ":", color=DENSE_COLOR, label="dense KV heads")
    ax_h.plot(x, [r["kv_heads"] for r in layers], "s-", color="#e07b39", ms=3, label="kept KV heads")
    ax_h.set(xlabel="layer", ylabel="heads", title="attention heads per layer", ylim=(0, None))
    ax_h.legend(fontsize=7)
    ax_f.plot(x, [r["dense_ffn"] for r in layers], "--", color=DENSE_COLOR, label="dense")
    ax_f.plot(x, [r["ffn"] for r in layers], "o-", color=PRUNED_COLOR, ms=3, label="kept")
    ax_f.set(xlabel="layer", ylabel="FFN channels", title="FFN width per layer", ylim=(0, None))
    ax_f.legend(fontsize=7)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_h, ax_f):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_h.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ok_backends(bench: dict) -> dict:
    return {name: b for name, b in bench.get("backends", {}).items() if b.get("status") == "ok"}


def _bars(ax, labels, dense, pruned, title, ylabel):
    width = 0.38
    xs = range(len(labels))
    ax.bar([x - width / 2 for x in xs], dense, width, color=DENSE_COLOR, label="dense")
    ax.bar([x + width / 2 for x in xs], pruned, width, color=PRUNED_COLOR, label="pruned")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set(title=title, ylabel=ylabel)
    ax.legend(fontsize=7)


def plot_latency(bench: dict, path: Path) -> None:
    """Per back end: prefill ms at each prompt length and decode ms/token at each batch size."""
    plt = _pyplot()
    backends = _ok_backends(bench)
    fig, axes = plt.subplots(1, len(backends), figsize=(4.6 * len(backends), 3.6), squeeze=False)
    for ax, (name, b) in zip(axes[0], backends.items()):
        labels, dense, pruned = [], [], []
        for key in b["dense"]["prefill_ms"]:
            labels.append(f"prefill {key}")
            dense.append(b["dense"]["prefill_ms"][key]["median"])
            pruned.append(b["pruned"]["prefill_ms"][key]["median"])
        for key in b["dense"]["decode_ms_per_token"]:
            labels.append(f"decode b{key}\n(per token)")
            dense.append(b["dense"]["decode_ms_per_token"][key]["median"])
            pruned.append(b["pruned"]["decode_ms_per_token"][key]["median"])
        _bars(ax, labels, dense, pruned, f"{name}: latency (median)", "ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(bench: dict, path: Path) -> None:
    """Weight bytes and KV-cache bytes per token of the models, peak RSS per back end."""
    plt = _pyplot()
    models, backends = bench["models"], _ok_backends(bench)
    fig, (ax_w, ax_r) = plt.subplots(1, 2, figsize=(10, 3.6))
    _bars(
        ax_w,
        ["weights (MB)", "KV cache (KB/token)"],
        [models["dense"]["weight_bytes"] / 1e6, models["dense"]["kv_bytes_per_token"] / 1e3],
        [models["pruned"]["weight_bytes"] / 1e6, models["pruned"]["kv_bytes_per_token"] / 1e3],
        "model size",
        "MB / KB",
    )
    peak = "peak_gpu_bytes" if any(b["dense"].get("peak_gpu_bytes") for b in backends.values()) else "peak_rss_bytes"
    _bars(
        ax_r,
        list(backends),
        [b["dense"][peak] / 2**30 for b in backends.values()],
        [b["pruned"][peak] / 2**30 for b in backends.values()],
        "peak GPU memory" if peak == "peak_gpu_bytes" else "peak RSS of the process",
        "GiB",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality(quality: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    _bars(
        ax,
        ["perplexity"],
        [quality["dense"]["perplexity"]],
        [quality["pruned"]["perplexity"]],
        "quality",
        "perplexity (lower is better)",
    )
    ax.text(
        0.02,
        0.97,
        f"KL(dense||pruned) {quality['kl']:.3f}\ntop-1 agreement {quality['top1']:.1%}",
        transform=ax.transAxes,
        va="top",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_plots(data: dict, directory: Path) -> dict[str, str]:
    plots = {}
    if data["layers"]:
        plot_shapes(data["layers"], directory / "shapes.png")
        plots["shapes"] = "shapes.png"
    bench = data.get("bench")
    if bench and _ok_backends(bench):
        plot_latency(bench, directory / "latency.png")
        plot_memory(bench, directory / "memory.png")
        plots["latency"], plots["memory"] = "latency.png", "memory.png"
    if bench and bench.get("quality"):
        plot_quality(bench["quality"], directory / "quality.png")
        plots["quality"] = "quality.png"
    return plots


# --- markdown -----------------------------------------------------------------------------


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2%}"


def markdown(data: dict) -> str:
    m, mach = data["model"], data["machine"]
    lines = [f"# Build report: {m['source']}", ""]
    verdict = "**passed**" if data["passed"] else "**FAILED**: " + "; ".join(data["failures"])
    lines += [f"Result: {verdict}", ""]
    if m.get("params_dense"):
        lines += [
            f"Pruned {_pct(m['ratio_achieved_decoder'])} of decoder parameters (target {_pct(m['ratio_target'])}), "
            f"{_pct(m['ratio_achieved_model'])} of the whole model: "
            f"{m['params_dense']:,} -> {m['params_slim']:,} parameters.",
            "",
        ]
    rec = m.get("recovery")
    if rec:
        fid = rec.get("fidelity") or {}
        kl = (
            (
                f"; held-out KL vs dense {fid['before']['kl']:.4f} -> {fid['after']['kl']:.4f}, top-1 "
                f"{fid['before']['top1']:.2%} -> {fid['after']['top1']:.2%}"
            )
            if fid.get("before") and fid.get("after")
            else ""
        )
        lines += [
            f"Recovered by distillation from the dense model ({rec['trained']}): {rec['steps']} steps, "
            f"{rec['tokens']:,} tokens of `{rec['data']['source']}` text in {rec['seconds']['total']:.0f} s{kl}.",
            "",
        ]
    lines += [
        f"Machine: {mach['platform']}, {mach['cores']} cores, {mach['ram_gib']} GiB RAM, GPU: {mach['gpu'] or 'none'}. "
        f"Versions: {', '.join(f'{k} {v}' for k, v in data['versions'].items())}.",
        "",
    ]
    lines += ["## Stages", "", "| stage | status | seconds | note |", "|---|---|---|---|"]
    for name, s in data["stages"].items():
        lines.append(f"| {name} | {s.get('status')} | {s.get('seconds', '-')} | {s.get('reason') or ''} |")
    lines.append("")
    if data["verification"]:
        lines += ["## Verification against PyTorch", "", "| export | passed | failures |", "|---|---|---|"]
        for fmt, v in data["verification"].items():
            lines.append(f"| {fmt} | {v.get('passed')} | {'; '.join(v.get('failures', [])) or '-'} |")
        lines.append("")
    if data.get("gate"):
        lines += ["## Quality gate", "", "| condition | measured | result |", "|---|---|---|"]
        for r in data["gate"]["conditions"]:
            value = "not measured" if r["value"] is None else f"{r['value']:.4g}"
            lines.append(f"| `{r['condition']}` | {value} | {'pass' if r['passed'] else '**FAIL**'} |")
        lines.append("")
    if data.get("eval"):
        lines += eval_markdown(data["eval"])
    if data["artifacts"]:
        lines += ["## Artifacts", "", "| artifact | path | MB |", "|---|---|---|"]
        for name, a in data["artifacts"].items():
            lines.append(f"| {name} | `{a['path']}` | {a['bytes'] / 1e6:.1f} |")
        lines.append("")
    bench = data.get("bench")
    if bench:
        from ..bench.tables import markdown as bench_markdown

        # bench's own headings sit under this section: "# X" -> "### X"
        body = "\n".join("##" + line if line.startswith("#") else line for line in bench_markdown(bench).splitlines())
        lines += ["## Benchmark: dense vs pruned", "", body, ""]
    plots = data.get("plots", {})
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({file})" for name, file in plots.items()] + [""]
    if data["layers"]:
        lines += [
            "## Per-layer shapes",
            "",
            "| layer | query heads | KV heads | FFN | target ratio | attn err | mlp err |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in data["layers"]:
            err = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            lines.append(
                f"| {r['layer']} | {r['q_heads']}/{r['dense_q_heads']} | {r['kv_heads']}/{r['dense_kv_heads']} | "
                f"{r['ffn']}/{r['dense_ffn']} | {_pct(r['ratio_target'])} | "
                f"{err(r['attn_rel_error'])} | {err(r['mlp_rel_error'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def eval_markdown(ev: dict) -> list[str]:
    """The eval stage's numbers: perplexity, fidelity, and per-task accuracies dense vs pruned."""
    lines = ["## Evaluation: dense vs pruned", ""]
    d, p, f = ev["dense"], ev["pruned"], ev["fidelity"]
    if "perplexity" in d:
        pd_, pp = d["perplexity"], p["perplexity"]
        lines.append(
            f"Perplexity on {pd_['text']} ({pd_['windows']} windows of {pd_['seqlen']} tokens): "
            f"dense {pd_['ppl']:.3f}, pruned {pp['ppl']:.3f} (ratio {pp['ppl'] / pd_['ppl']:.3f})."
        )
    lines += [
        f"Fidelity on {f['text']} ({f['tokens']} tokens): KL(dense || pruned) {f['kl']:.4f} nats/token, "
        f"top-1 agreement {f['top1']:.2%}.",
        "",
    ]
    if "accuracy" in d:
        a = d["accuracy"]
        limit = "" if a["limit"] is None else f", first {a['limit']} documents per task"
        lines += [
            f"Accuracy ({a['harness']} {a['harness_version']}, {a['num_fewshot']}-shot{limit}):",
            "",
            "| task | documents | dense acc | pruned acc | dense acc_norm | pruned acc_norm |",
            "|---|---|---|---|---|---|",
        ]
        for name, t in a["tasks"].items():
            q = p["accuracy"]["tasks"][name]
            lines.append(
                f"| {name} | {t['samples']} | {t['acc']:.4f} | {q['acc']:.4f} | "
                f"{t['acc_norm']:.4f} | {q['acc_norm']:.4f} |"
            )
        lines.append(
            f"| mean | | {a['mean']['acc']:.4f} | {p['accuracy']['mean']['acc']:.4f} | "
            f"{a['mean']['acc_norm']:.4f} | {p['accuracy']['mean']['acc_norm']:.4f} |"
        )
        lines.append("")
    return lines


# --- the model card --------------------------------------------------------------------


def link_model_card(slim: Path, data: dict) -> None:
    """Add the build's headline numbers and a link to the report to the checkpoint's card and record."""
    card, record_path = slim / "README.md", slim / RECORD_FILE
    if not card.exists() or not record_path.exists():
        return
    rel = os.path.relpath(Path(data["out"]) / STAGE["report"].output / "report.md", slim)
    lines = [CARD_MARKER, "## Build report", "", f"Full report: [{rel}]({rel}) (machine, versions, every number).", ""]
    for fmt, v in data["verification"].items():
        lines.append(f"- {fmt} export verified against PyTorch: {'passed' if v.get('passed') else 'FAILED'}")
    bench = data.get("bench") or {}
    for name, b in _ok_backends(bench).items():
        r = b["ratios"]
        lines.append(
            f"- {name}: decode speed-up at batch 1 {r['decode_speedup'].get('1', float('nan')):.2f}x "
            f"(weight-bytes ideal {r['ideal_decode_speedup']:.2f}x)"
        )
    gate = data.get("gate")
    if gate:
        conditions = ", ".join(
            f"{r['condition']} ({'-' if r['value'] is None else format(r['value'], '.4g')})" for r in gate["conditions"]
        )
        lines.append(f"- quality gate {'passed' if gate['passed'] else 'FAILED'}: {conditions}")
    q = bench.get("quality")
    if q:
        lines.append(
            f"- perplexity on {q['text']}: dense {q['dense']['perplexity']:.2f}, pruned {q['pruned']['perplexity']:.2f}"
        )
    text = card.read_text()
    text = text.split(CARD_MARKER)[0].rstrip() + "\n\n" + "\n".join(lines) + "\n"
    _replace_file(card, text)
    record = json.loads(record_path.read_text())
    record["verification"] = {
        fmt: {"passed": v.get("passed"), "failures": v.get("failures", [])} for fmt, v in data["verification"].items()
    }
    record["build_report"] = rel
    if gate:
        record["gate"] = gate
    _replace_file(record_path, json.dumps(record, indent=2) + "\n")


def _replace_file(path: Path, text: str) -> None:
    from ..atomic import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_report(ctx: BuildContext) -> dict:
    data = collect(ctx)
    with atomic_output_dir(ctx.path("report"), force=True) as tmp:
        data["plots"] = make_plots(data, tmp)
        (tmp / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(markdown(data))
    link_model_card(ctx.checkpoint, data)
    return {
        "report": str(ctx.path("report") / "report.md"),
        "plots": sorted(data["plots"].values()),
        "passed": data["passed"],
        **({"gate": data["gate"]} if data["gate"] else {}),
    }
