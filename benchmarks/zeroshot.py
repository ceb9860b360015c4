"""Zero-shot multiple-choice accuracy, dense vs pruned SmolLM2-135M, through lm-evaluation-harness, offline.

    .venv/bin/python benchmarks/zeroshot.py                      # dense + SlimGPT 20% (self calibration)
    .venv/bin/python benchmarks/zeroshot.py --docs 100           # fewer documents per task
    .venv/bin/python benchmarks/zeroshot.py --model recovered=DIR --model pruned=DIR   # any checkpoints

The standard zero-shot tasks of the pruning papers (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e,
ARC-c, OBQA) need their datasets from the Hugging Face Hub, which this machine cannot reach.
This script therefore builds two multiple-choice tasks from local text, WikiText-2 *test*
(../shared/data/wikitext-2), and runs them through the same harness code path as
`slimgpt-deploy eval --tasks` (lm-eval's HFLM on the loaded model, acc and acc_norm).
THEY ARE NOT STANDARD BENCHMARKS and their numbers are not comparable with any paper:

  wiki_next_sentence  context: one sentence of a Wikipedia article; choices: the sentence that
                      really follows it, or one of 3 sentences of similar length drawn from other
                      articles. Measures whether the model follows topic and discourse (HellaSwag-like
                      ending selection, with random rather than adversarial distractors: easier).
  wiki_word_order     context: the first half of a sentence; choices: its real second half, or the
                      same words in 3 other random orders. Measures grammar / word order (BLiMP-like);
                      all choices have the same length, so acc and acc_norm agree.

Documents are drawn with a fixed seed; the JSONL files are written to a temporary directory and
their SHA-256 is recorded. Results: benchmarks/results/zeroshot.json and zeroshot.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "smollm2-135m"
SEED = 0

YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def detokenize(line: str) -> str:
    """WikiText's word-level spacing back to plain text (`a @-@ b` -> `a-b`, `word , word` -> `word, word`)."""
    line = re.sub(r" @(.)@ ", r"\1", line)
    line = re.sub(r" ([.,;:!?')\]])", r"\1", line)
    line = re.sub(r"([(\[]) ", r"\1", line)
    return line.replace(" 's", "'s").replace(" n't", "n't").strip()


def articles(path: Path) -> list[list[list[str]]]:
    """Articles -> paragraphs -> sentences (plain text), skipping headings and sentences with <unk>."""
    out: list[list[list[str]]] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line:
            continue
        if re.fullmatch(r"= [^=].* =", line):
            out.append([])
            continue
        if line.startswith("="):
            continue
        if not out:
            out.append([])
        pieces = [p.strip().removesuffix(" .").strip() for p in line.split(" . ")]
        out[-1].append([detokenize(p + " .") for p in pieces if p and "<unk>" not in p])
    return [a for a in out if a]


def next_sentence_docs(arts, n: int, rng: random.Random) -> list[dict]:
    pairs, pool = [], []
    for ai, art in enumerate(arts):
        for para in art:
            ok = [s for s in para if 8 <= len(s.split()) <= 40]
            pool += [(ai, s) for s in ok]
            pairs += [
                (ai, a, b) for a, b in zip(para, para[1:]) if 8 <= len(a.split()) <= 40 and 8 <= len(b.split()) <= 40
            ]
    docs = []
    for ai, context, right in rng.sample(pairs, min(n, len(pairs))):
        length = len(right.split())
        candidates = [s for aj, s in pool if aj != ai and abs(len(s.split()) - length) <= max(2, length // 4)]
        wrong = rng.sample(candidates, 3)
        choices = wrong + [right]
        rng.shuffle(choices)
        docs.append({"context": context, "choices": choices, "label": choices.index(right)})
    return docs


def word_order_docs(arts, n: int, rng: random.Random) -> list[dict]:
    sentences = [s for art in arts for para in art for s in para if 10 <= len(s.split()) <= 30]
    docs = []
    for s in rng.sample(sentences, min(n, len(sentences))):
        words = s.removesuffix(".").split()  # the final period stays last in every choice
        cut = len(words) // 2
        head, tail = " ".join(words[:cut]), words[cut:]
        right = " ".join(tail) + "."
        wrong: list[str] = []
        while len(wrong) < 3:
            perm = tail[:]
            rng.shuffle(perm)
            text = " ".join(perm) + "."
            if text != right and text not in wrong:
                wrong.append(text)
        choices = wrong + [right]
        rng.shuffle(choices)
        docs.append({"context": head, "choices": choices, "label": choices.index(right)})
    return docs


TASKS = {"wiki_next_sentence": next_sentence_docs, "wiki_word_order": word_order_docs}


def write_tasks(directory: Path, n: int) -> dict:
    arts = articles(DATA)
    info = {}
    for i, (name, make) in enumerate(TASKS.items()):
        docs = make(arts, n, random.Random(SEED + i))
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (directory / f"{name}.yaml").write_text(YAML.format(name=name, data=data))
        info[name] = {
            "documents": len(docs),
            "choices": 4,
            "chance": 0.25,
            "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
            "example": docs[0],
        }
    return info


def prune(work: Path, nsamples: int, seqlen: int) -> Path:
    from slimgpt_deploy.api import prune_to_checkpoint
    from slimgpt_deploy.config import PruneConfig

    out = work / f"slimgpt-20-self-{nsamples}x{seqlen}"
    if not (out / "config.json").exists():  # the defaults otherwise: log schedule, `self` calibration, seed 0
        prune_to_checkpoint(MODEL, out, PruneConfig(ratio=0.2, nsamples=nsamples, seqlen=seqlen), force=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=300, help="documents per task")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="extra checkpoints to evaluate")
    ap.add_argument(
        "--work", type=Path, default=ROOT / "build" / "zeroshot", help="where the pruned checkpoint is kept"
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--nsamples", type=int, default=64, help="self-calibration samples of the pruned model")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sample")
    ap.add_argument("--out", type=Path, default=RESULTS / "zeroshot.json")
    ap.add_argument("--note", default="", help="a sentence about the models, recorded with the results")
    args = ap.parse_args()
    if not DATA.exists():
        sys.exit(
            f"error: {DATA} not found; this benchmark needs WikiText-2 (../shared/data/wikitext-2 beside the repo)"
        )

    import torch

    from slimgpt_deploy.bench.environment import machine as where
    from slimgpt_deploy.sources import load_model
    from slimgpt_deploy.tasks import TaskOptions, prepare_tasks, run_tasks

    models = {"dense": MODEL}
    extra = dict(m.split("=", 1) for m in args.model)
    if "pruned" not in extra:
        t0 = time.perf_counter()
        models[f"slimgpt-20-self-{args.nsamples}x{args.seqlen}"] = str(prune(args.work, args.nsamples, args.seqlen))
        print(f"pruned in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    models.update(extra)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="zeroshot-tasks-") as tmp:
        tasks_info = write_tasks(Path(tmp), args.docs)
        prepared = prepare_tasks(TaskOptions(tasks=tuple(TASKS), include_path=Path(tmp), batch_size=args.batch_size))
        for name, source in models.items():
            t0 = time.perf_counter()
            loaded = load_model(source)
            acc = run_tasks(loaded.model, loaded.tokenizer, prepared)
            results[name] = {"source": source, "seconds": round(time.perf_counter() - t0, 1), **acc}
            print(f"{name}: mean acc {acc['mean']['acc']:.4f}, acc_norm {acc['mean']['acc_norm']:.4f}", file=sys.stderr)
            del loaded
    record = {
        "benchmark": "zeroshot (local multiple-choice tasks from WikiText-2 test; NOT standard benchmarks)",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            **where(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_avg_1min": round(os.getloadavg()[0], 2),
        },
        "command": "python benchmarks/zeroshot.py " + " ".join(sys.argv[1:]),
        "note": args.note,
        "tasks": tasks_info,
        "models": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))


def markdown(r: dict) -> str:
    names = list(r["tasks"])
    m = r["machine"]
    load = m.get("note") or f"load average {m.get('load_avg_1min')} at the end"
    lines = [
        "# Zero-shot accuracy: dense vs pruned SmolLM2-135M (local tasks, not standard benchmarks)",
        "",
        f"Machine: {m.get('cpu', '?')}, {m['platform']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads); {load}. "
        f"Date: {r['date']}. Command: `{r['command'].strip()}`.",
        "",
        "The standard tasks (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA) need downloads this machine "
        "cannot make. These two tasks are built from WikiText-2 test and run through lm-evaluation-harness "
        f"{next(iter(r['models'].values()))['harness_version']} exactly like `slimgpt-deploy eval --tasks` "
        "(0-shot, 4 choices, chance 25%):",
        "",
        (
            "- `wiki_next_sentence`: which of 4 sentences (the real next one, 3 of similar length from other articles) "
            "follows a sentence."
        ),
        (
            "- `wiki_word_order`: which of 4 orderings of a sentence's second half (the real one, 3 random shuffles) "
            "follows its first half."
        ),
        "",
        "| model | " + " | ".join(f"{t} acc | {t} acc_norm" for t in names) + " | mean acc | mean acc_norm | s |",
        "|---|" + "---|---|" * len(names) + "---|---|---|",
    ]
    pm = lambda v, e: f"{v:.3f} ± {e:.3f}" if e is not None else f"{v:.3f}"  # noqa: E731
    for name, res in r["models"].items():
        cells = [
            f"{pm(res['tasks'][t]['acc'], res['tasks'][t]['acc_stderr'])} | "
            f"{pm(res['tasks'][t]['acc_norm'], res['tasks'][t]['acc_norm_stderr'])}"
            for t in names
        ]
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {res['mean']['acc']:.3f} | {res['mean']['acc_norm']:.3f} | {res['seconds']} |"
        )
    lines += ["", "Models: " + "; ".join(f"`{name}` = `{res['source']}`" for name, res in r["models"].items()) + "."]
    if r.get("note"):
        lines += ["", r["note"]]
    dense = r["models"].get("dense")
    if dense:
        lines += [
            "",
            "Accuracy retained (mean acc of the model / mean acc of dense): "
            + ", ".join(
                f"{name} {res['mean']['acc'] / dense['mean']['acc']:.3f}"
                for name, res in r["models"].items()
                if name != "dense"
            )
            + ".",
        ]
    counts = ", ".join(f"{t} {i['documents']}" for t, i in r["tasks"].items())
    lines += ["", f"Documents per task: {counts}; ± is the standard error.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
