"""The quality gate: conditions such as `ppl_ratio<=1.30` checked against the eval stage's numbers.

A condition is METRIC OP THRESHOLD. Metrics (measured by the eval stage, DIR/eval/eval.json):

    ppl                pruned perplexity on eval.text                       needs eval.text
    ppl_ratio          pruned perplexity / dense perplexity on eval.text    needs eval.text
    kl                 mean KL(P_dense || P_pruned) per token, nats          always measured
    top1               share of tokens where both models' argmax agree       always measured
    accuracy           pruned mean `acc` over the eval tasks                 needs eval.tasks
    accuracy_retained  pruned mean `acc` / dense mean `acc`, same tasks      needs eval.tasks

Conditions are parsed strictly and checked for measurability before any work; a missed
condition keeps every artifact and makes the build exit with code 3.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInputError


@dataclass(frozen=True)
class Metric:
    description: str
    needs: str | None  # the eval option that must be set for it to be measured ("text", "tasks"), or None


METRICS: dict[str, Metric] = {
    "ppl": Metric("pruned perplexity on eval.text", "text"),
    "ppl_ratio": Metric("pruned / dense perplexity on eval.text", "text"),
    "kl": Metric("mean KL(dense || pruned) per token, nats", None),
    "top1": Metric("top-1 agreement with the dense model", None),
    "accuracy": Metric("pruned mean acc over eval.tasks", "tasks"),
    "accuracy_retained": Metric("pruned mean acc / dense mean acc over eval.tasks", "tasks"),
}
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
NEEDS_FLAG = {"text": "--eval-text FILE (eval.text)", "tasks": "--tasks T1,T2 (eval.tasks)"}
_CONDITION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|!=|=<|=>|<|>|=)\s*(\S+)\s*$")


@dataclass(frozen=True)
class Condition:
    metric: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"

    def holds(self, value: float) -> bool:
        return OPERATORS[self.op](value, self.threshold)


def _valid() -> str:
    return f"metrics: {', '.join(METRICS)}; operators: {', '.join(OPERATORS)}"


def parse_condition(text: str) -> Condition:
    """`kl<=0.25` -> Condition("kl", "<=", 0.25); BadInputError naming the valid metrics and operators."""
    m = _CONDITION.match(str(text))
    if not m:
        raise BadInputError(f"gate condition {text!r} is not METRIC OP NUMBER, e.g. ppl_ratio<=1.30 ({_valid()})")
    metric, op, number = m.groups()
    if metric not in METRICS:
        raise BadInputError(f"gate condition {text!r}: unknown metric {metric!r} ({_valid()})")
    if op not in OPERATORS:
        raise BadInputError(f"gate condition {text!r}: unsupported operator {op!r} ({_valid()})")
    try:
        threshold = float(number)
    except ValueError:
        raise BadInputError(f"gate condition {text!r}: {number!r} is not a number") from None
    if threshold != threshold or threshold in (float("inf"), float("-inf")):
        raise BadInputError(f"gate condition {text!r}: the threshold must be a finite number")
    return Condition(metric, op, threshold)


def parse_gate(items: str | Iterable[str] | None) -> tuple[Condition, ...]:
    """Repeatable and/or comma-separated conditions -> parsed, duplicates dropped, order kept."""
    if items is None:
        return ()
    parts = [items] if isinstance(items, str) else list(items)
    texts = [t.strip() for part in parts for t in str(part).split(",") if t.strip()]
    return tuple(dict.fromkeys(parse_condition(t) for t in texts))


def check_measurable(conditions: Iterable[Condition], measured: set[str]) -> None:
    """Refuse a condition on a metric the eval will not measure (`measured`: "text", "tasks" set by the user)."""
    for c in conditions:
        need = METRICS[c.metric].needs
        if need is not None and need not in measured:
            raise BadInputError(
                f"gate condition {c} needs {METRICS[c.metric].description}, which the eval does not measure; "
                f"give {NEEDS_FLAG[need]} or drop the condition"
            )


def measured_metrics(dense: dict, pruned: dict, fidelity: dict | None) -> dict[str, float | None]:
    """The gate's metrics from the eval stage's per-model results (None where not measured)."""
    ppl_d, ppl_p = (m.get("perplexity", {}).get("ppl") for m in (dense, pruned))
    acc_d, acc_p = (m.get("accuracy", {}).get("mean", {}).get("acc") for m in (dense, pruned))
    return {
        "ppl": ppl_p,
        "ppl_ratio": ppl_p / ppl_d if ppl_p is not None and ppl_d else None,
        "kl": fidelity["kl"] if fidelity else None,
        "top1": fidelity["top1"] if fidelity else None,
        "accuracy": acc_p,
        "accuracy_retained": acc_p / acc_d if acc_p is not None and acc_d else None,
    }


def check_gate(conditions: Iterable[Condition], metrics: dict[str, float | None]) -> dict:
    """{"passed", "conditions": [{condition, metric, op, threshold, value, passed}]}; an unmeasured value fails."""
    rows = []
    for c in conditions:
        value = metrics.get(c.metric)
        rows.append(
            {
                "condition": str(c),
                "metric": c.metric,
                "op": c.op,
                "threshold": c.threshold,
                "value": value,
                "passed": value is not None and c.holds(value),
            }
        )
    return {"passed": all(r["passed"] for r in rows), "conditions": rows}


def check_gate_file(conditions: Iterable[Condition], eval_json: Path) -> dict:
    """check_gate against the eval stage's file; a missing or unreadable file leaves every metric unmeasured."""
    try:
        metrics = json.loads(Path(eval_json).read_text()).get("metrics", {})
    except (OSError, json.JSONDecodeError):
        metrics = {}
    return check_gate(conditions, metrics)


def failures(gate: dict) -> list[str]:
    """One phrase per missed condition: `kl<=0.25 (measured 0.4132)`."""
    return [
        f"{r['condition']} (measured {'nothing' if r['value'] is None else format(r['value'], '.4g')})"
        for r in gate["conditions"]
        if not r["passed"]
    ]
