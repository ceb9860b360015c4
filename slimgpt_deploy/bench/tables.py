"""Markdown tables for a bench result (the dict `run_bench` returns).

Latency cells are "median (min-max)". Perplexity on the built-in sample text
(bench/sample.txt, ~1,500 words written for this package) is a sanity figure: it
shows the pruned model still models English and how far it moved from the dense
one, not a benchmark comparable with published numbers (use WikiText-2 for that).
"""

from __future__ import annotations

from collections.abc import Mapping

MODELS = ("dense", "pruned")


def markdown(result: Mapping) -> str:
    """The whole report: setup, models, per-back-end latency and memory, ratios, quality."""
    lines = _setup(result) + [""] + _models(result)
    ok = {name: e for name, e in result["backends"].items() if e["status"] == "ok"}
    if ok:
        lines += ["", "## Latency and memory", ""] + _latency(ok)
        lines += ["", "## Pruned / dense", ""] + _ratios(ok)
    others = {name: e for name, e in result["backends"].items() if e["status"] != "ok"}
    if others:
        lines += ["", "## Back ends not measured", ""]
        lines += [f"- {name}: {e['status']} ({e.get('reason')})" for name, e in others.items()]
    lines += ["", "## Quality", ""] + _quality(result.get("quality") or {})
    return "\n".join(lines) + "\n"


def _setup(result: Mapping) -> list[str]:
    m, v, o = result["machine"], result["versions"], result["options"]
    runtimes = ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "onnxruntime", "vllm", "llama_cpp") if k in v)
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    types = {"llamacpp": f"{o.get('gguf_type', 'f32')} GGUF", "genai": f"{o.get('genai_weights', 'fp32')} weights"}
    measured = [f"{name} {types[name]}" for name in o.get("backends", ()) if name in types]
    weights = f"float32 ({', '.join(measured)})" if measured else "float32"
    return [
        "# Dense vs pruned: latency, memory, quality",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB{gpu}; {m['platform']}. {runtimes}.",
        f"Protocol: {weights}; prefill = time to first token at batch 1; decode = ms per step after a "
        f"{min(o['prompt_lens'])}-token prompt, {o['decode_tokens']} steps; medians of {o['repeats']} runs "
        f"(min-max) after {o['warmups']} warm-up(s); threads {o['threads'] or 'all'}; each model in its own process "
        "(peak RSS is that process's). Ideal decode speed-up = dense / pruned weight bytes read per token.",
    ]


def _models(result: Mapping) -> list[str]:
    lines = [
        "| model | source | parameters | weight MB read per token | KV-cache bytes per token |",
        "|---|---|---|---|---|",
    ]
    for role in MODELS:
        info = result["models"][role]
        lines.append(
            f"| {role} | `{info['source']}` | {info['params']:,} | {info['weight_bytes'] / 1e6:.1f} | "
            f"{info['kv_bytes_per_token']:,} |"
        )
    return lines


def _s(s: Mapping, digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def _latency(entries: Mapping) -> list[str]:
    first = next(iter(entries.values()))["dense"]
    lens, batches = list(first["prefill_ms"]), list(first["decode_ms_per_token"])
    head = (
        ["back end", "model"]
        + [f"prefill {n} ms" for n in lens]
        + [f"decode b{b} ms/step" for b in batches]
        + [f"decode b{b} tok/s" for b in batches]
        + ["weight MB", "peak RSS MiB", "peak GPU MiB"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in entries.items():
        for role in MODELS:
            r = e[role]
            cells = (
                [name, role]
                + [_s(r["prefill_ms"][n]) for n in lens]
                + [_s(r["decode_ms_per_token"][b], 2) for b in batches]
                + [_s(r["decode_tokens_per_s"][b]) for b in batches]
                + [f"{r['weight_bytes'] / 1e6:.1f}", _mib(r["peak_rss_bytes"]), _mib(r.get("peak_gpu_bytes"))]
            )
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ratios(entries: Mapping) -> list[str]:
    first = next(iter(entries.values()))["ratios"]
    lens, batches = list(first["prefill_speedup"]), list(first["decode_speedup"])
    head = (
        ["back end", "ideal decode speed-up"]
        + [f"decode b{b} speed-up (of ideal)" for b in batches]
        + [f"prefill {n} speed-up" for n in lens]
        + ["weight bytes", "peak RSS", "KV bytes/token"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in entries.items():
        r = e["ratios"]
        cells = (
            [name, f"{r['ideal_decode_speedup']:.3f}x"]
            + [f"{r['decode_speedup'][b]:.3f}x ({r['of_ideal'][b]:.2f})" for b in batches]
            + [f"{r['prefill_speedup'][n]:.3f}x" for n in lens]
            + [f"{r['weight_bytes']:.3f}", f"{r['peak_rss']:.3f}", f"{r['kv_bytes_per_token']:.3f}"]
        )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _quality(q: Mapping) -> list[str]:
    if q.get("status", "ok") != "ok" or "dense" not in q:
        return [f"Not measured: {q.get('reason', 'no quality result')}."]
    sample = q["text"] == "built-in sample"
    lines = [
        f"On {'the built-in sample text' if sample else '`' + q['text'] + '`'}: "
        f"{q['tokens']:,} tokens in windows of {q['seqlen']}. "
        "KL(dense || pruned) in nats per token and top-1 agreement with the dense model, per token.",
        "",
        "| model | perplexity | KL vs dense | top-1 vs dense |",
        "|---|---|---|---|",
        f"| dense | {q['dense']['perplexity']:.3f} | 0 | 1 |",
        f"| pruned | {q['pruned']['perplexity']:.3f} | {q['kl']:.4f} | {q['top1']:.3f} |",
    ]
    if sample:
        lines += [
            "",
            (
                "The built-in sample's perplexity is a sanity figure, not a benchmark: "
                "pass --text (e.g. WikiText-2 test) for one."
            ),
        ]
    return lines
