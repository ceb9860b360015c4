"""The committed-results convention of the benchmarks: run, or reload the committed JSON; write JSON and Markdown.

result = results_io.load_or_run("name", markdown_only, run)   # benchmarks/results/name.json
results_io.publish("name", result, markdown)                   # benchmarks/results/name.{json,md}, printed
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load_or_run(stem: str, markdown_only: bool, run: Callable[[], dict]) -> dict:
    """The committed ``results/STEM.json`` when ``markdown_only`` (a rewrite of the prose), else a fresh ``run()``."""
    return json.loads((RESULTS / f"{stem}.json").read_text()) if markdown_only else run()


def publish(stem: str, result: dict, markdown: Callable[[dict], str], *, save: bool = True) -> None:
    """Write ``results/STEM.json`` and ``results/STEM.md`` (unless ``save`` is False: a probe); print the Markdown."""
    text = markdown(result)
    if save:
        (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / f"{stem}.md").write_text(text)
    print(text)
