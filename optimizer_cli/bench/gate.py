"""Conditions on benchmark rows, `[provider:]metric OP value[%]` (e.g. "accuracy_drop>1%", "cpu:speedup<1.5"):
--fail-if gates and tune goals."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from optimizer_cli.bench.latency import PERCENTILE_MIN_RUNS
from optimizer_cli.bench.output_kinds import KIND_FIGURES
from optimizer_cli.errors import UserInputError
from optimizer_cli.runtime.targets import parse_target

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
_PATTERN = re.compile(
    r"^\s*(?:(?P<prov>[a-zA-Z][\w@.=:/-]*?)\s*:\s*)?(?P<metric>[a-z_0-9]+)\s*(?P<op><=|>=|==|!=|<|>)\s*"
    r"(?P<value>-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<pct>%)?\s*$"
)
# Metrics that are fractions in [0, 1]: "accuracy_drop>1" (no %) would mean 100 points and never fire.
FRACTION_METRICS = {
    "accuracy_drop",
    "accuracy",
    "cosine",
    "cosine_mean",
    "top1_agreement",
    "top5_agreement",
    "position_agreement",
    "map_iou",
    "nn_agreement",
    "cer",
    "miou",
}

# Fractions every output shows in percent: the run's table ('top-1 agree 98.44%'), tune's page and plot, gate
# details, as goals write them ('accuracy_drop<=1%'); similarities (cosine) stay plain numbers.
PERCENT_METRICS = {
    "accuracy",
    "accuracy_drop",
    "top1_agreement",
    "top5_agreement",
    "position_agreement",
    "nn_agreement",
}


def show_value(metric: str, value: float, percent: bool | None = None) -> str:
    """A metric's value as reports show it: '0.3906%' for accuracy_drop, '0.9816' for cosine; `percent` overrides
    (a gate's value is shown in the unit the gate was written in: 'accuracy_drop>1%', 'top1_agreement<0.98')."""
    if math.isnan(value):
        return "nan"
    percent = metric in PERCENT_METRICS if percent is None else percent
    return f"{100 * value:.4g}%" if percent else f"{value:.4g}"


# The benchmark reports a percentile only with enough runs for it (bench.latency): a gate on one it cannot
# report is refused before the work. Speedup percentiles are per round; latency percentiles over all runs.
PERCENTILE_RUNS = {f"p{q}_speedup": n for q, n in PERCENTILE_MIN_RUNS.items()}  # runs per round
PERCENTILE_TOTAL_RUNS = {f"p{q}_ms": n for q, n in PERCENTILE_MIN_RUNS.items()}  # runs in all


def _get(row: dict[str, Any], section: str, key: str) -> float | None:
    part = row.get(section)
    return None if not part else part.get(key)


def _worst_output(row: dict[str, Any], key: str) -> float | None:
    """The lowest value of a kind-specific figure over the outputs that have it (NaN if any is undefined:
    min() over a NaN depends on the order)."""
    values = [p[key] for p in (row.get("fidelity") or {}).get("per_output", []) if p.get(key) is not None]
    if any(math.isnan(v) for v in values):
        return float("nan")
    return min(values) if values else None


def _worst_output_metric(key: str) -> Callable[[dict[str, Any], dict[str, Any]], float | None]:
    return lambda row, _: _worst_output(row, key)


def _not_measured(gate: Gate, row: dict[str, Any]) -> str:
    outputs = (row.get("fidelity") or {}).get("per_output", [])
    if gate.metric in KIND_FIGURES and any(p["kind"] == KIND_FIGURES[gate.metric] for p in outputs):
        return (
            f"--fail-if '{gate.expression}': {gate.metric} was not measured on {row['provider']}: top5_agreement "
            "needs more than 5 classes, nn_agreement at least 3 evaluation rows"
        )
    if gate.metric in KIND_FIGURES:
        kinds = ", ".join(f"{p['name']}={p['kind']}" for p in (row.get("fidelity") or {}).get("per_output", []))
        return (
            f"--fail-if '{gate.expression}': no output is of kind {KIND_FIGURES[gate.metric]} (outputs: {kinds or 'none'}); "
            "set the kind in the recipe's metrics.outputs if the guess is wrong"
        )
    need = "a measurement"
    if gate.metric in ("cer", "miou"):
        need = f"--metric builtin:{gate.metric} (or the recipe's metrics.task) and labelled evaluation data"
    elif "accuracy" in gate.metric:
        need = "labelled evaluation data (--data with labels)"
    return f"--fail-if '{gate.expression}': {gate.metric} was not measured on {row['provider']}; it needs {need}"


def _accuracy_drop(row: dict[str, Any]) -> float | None:
    for key in ("top1", "metric"):
        a, b = _get(row, "accuracy_original", key), _get(row, "accuracy_optimized", key)
        if a is not None and b is not None:
            return b - a if key == "metric" and _get(row, "accuracy_optimized", "lower_is_better") else a - b
    return None


def _task_metric(row: dict[str, Any], name: str) -> float | None:
    """The optimized model's built-in task metric (builtin:cer, builtin:miou) when that one was measured."""
    return _get(row, "accuracy_optimized", "metric") if _get(row, "accuracy_optimized", "metric_name") == name else None


def _size_ratio(bench: dict[str, Any]) -> float | None:
    return bench["optimized_bytes"] / bench["original_bytes"] if bench.get("original_bytes") else None


METRICS: dict[str, Callable[[dict[str, Any], dict[str, Any]], float | None]] = {
    "speedup": lambda r, _: _get(r, "speedup", "median"),
    "speedup_ci_low": lambda r, _: _get(r, "speedup", "ci_low"),
    "speedup_ci_high": lambda r, _: _get(r, "speedup", "ci_high"),
    "p90_speedup": lambda r, _: _get(r, "speedup", "p90"),
    "p99_speedup": lambda r, _: _get(r, "speedup", "p99"),
    "accuracy_drop": lambda r, _: _accuracy_drop(r),
    "accuracy": lambda r, _: _get(r, "accuracy_optimized", "top1"),
    "cer": lambda r, _: _task_metric(r, "cer"),
    "miou": lambda r, _: _task_metric(r, "miou"),
    "cosine": lambda r, _: _get(r, "fidelity", "cosine_min"),
    "cosine_mean": lambda r, _: _get(r, "fidelity", "cosine_mean"),
    "top1_agreement": lambda r, _: _get(r, "fidelity", "top1_agreement"),
    **{key: _worst_output_metric(key) for key in KIND_FIGURES},
    "max_abs": lambda r, _: _get(r, "fidelity", "max_abs"),
    "rel_l2": lambda r, _: _get(r, "fidelity", "rel_l2"),
    "nonfinite": lambda r, _: _get(r, "fidelity", "nonfinite"),
    "p50_ms": lambda r, _: _get(r, "latency_optimized", "p50_ms"),
    "p90_ms": lambda r, _: _get(r, "latency_optimized", "p90_ms"),
    "p99_ms": lambda r, _: _get(r, "latency_optimized", "p99_ms"),
    "size_ratio": lambda _, bench: _size_ratio(bench),
}


@dataclass
class Gate:
    expression: str
    provider: str | None
    metric: str
    op: str
    threshold: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GateResult:
    expression: str
    violated: bool
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


def parse_gate(text: str, flag: str = "--fail-if") -> Gate:
    """`flag` names the option in messages: tune's goals share this grammar under --goal."""
    m = _PATTERN.match(text)
    if not m:
        raise UserInputError(f"{flag} '{text}': expected [provider:]METRIC OP VALUE[%], e.g. 'accuracy_drop>1%'")
    metric = m["metric"]
    if metric not in METRICS:
        raise UserInputError(f"{flag} '{text}': unknown metric '{metric}' (known: {', '.join(sorted(METRICS))})")
    value = float(m["value"]) / (100.0 if m["pct"] else 1.0)
    # accuracy_drop>1 can never fire (a drop is at most 1); the writer meant 1%.
    out_of_range = abs(value) > 1 or (metric == "accuracy_drop" and abs(value) >= 1)
    if metric in FRACTION_METRICS and not m["pct"] and out_of_range:
        raise UserInputError(
            f"{flag} '{text}': {metric} is a fraction between 0 and 1; write {m['value']}% "
            f"or {value / 100:g} (a value over 1 could never be reached)"
        )
    provider = None
    if m["prov"]:  # a provider alias or a whole run target: 'cpu:speedup<1.5', 'openvino:f32:cosine<0.99'
        try:
            provider = parse_target(m["prov"]).label
        except UserInputError as exc:
            raise UserInputError(f"{flag} '{text}': {str(exc).replace('execution provider', 'provider')}") from None
    return Gate(text.strip(), provider, metric, m["op"], value)


def check_measurable(gates: list[Gate], runs_per_round: int, rounds: int, providers: list[str]) -> None:
    """Refuse, before any work, gates the benchmark as configured cannot measure."""
    for gate in gates:
        total = PERCENTILE_TOTAL_RUNS.get(gate.metric)
        if total and rounds * runs_per_round < total:
            raise UserInputError(
                f"--fail-if '{gate.expression}': {gate.metric} needs at least {total} timed runs "
                f"(benchmark.rounds x runs_per_round is {rounds * runs_per_round})"
            )
        need = PERCENTILE_RUNS.get(gate.metric)
        if need and runs_per_round < need:
            raise UserInputError(
                f"--fail-if '{gate.expression}': {gate.metric} needs at least {need} runs per round to be measured "
                f"(benchmark.runs_per_round is {runs_per_round}; add --set benchmark.runs_per_round={need})"
            )
        if gate.provider is not None and gate.provider not in providers:
            raise UserInputError(
                f"--fail-if '{gate.expression}': provider '{gate.provider}' is not benchmarked "
                f"(benchmarked: {', '.join(providers)})"
            )


def check_declared_kinds(gates: list[Gate], declared: dict[str, str], names: list[str]) -> None:
    """Before the work: when the recipe's metrics.outputs gives every output's kind, a gate on a figure of a
    kind no output has is refused now (otherwise kinds are read from the outputs, and it fails after)."""
    if not names or not set(names) <= set(declared):
        return
    for gate in gates:
        kind = KIND_FIGURES.get(gate.metric)
        if kind is not None and kind not in declared.values():
            listed = ", ".join(f"{n}={declared[n]}" for n in names)
            raise UserInputError(
                f"--fail-if '{gate.expression}': no output is of kind {kind} (recipe metrics.outputs: {listed})"
            )


def evaluate(gates: list[Gate], bench: dict[str, Any]) -> list[GateResult]:
    """A gate is violated when its condition holds on any measured provider row it applies to."""
    results = []
    for gate in gates:
        rows = [r for r in bench["rows"] if r["usable"] and (gate.provider is None or r["provider"] == gate.provider)]
        if not rows:
            results.append(GateResult(gate.expression, True, "no usable provider row to evaluate it on"))
            continue
        hits, values = [], []
        for row in rows:
            value = METRICS[gate.metric](row, bench)
            if value is None:
                raise UserInputError(_not_measured(gate, row))
            shown = show_value(gate.metric, value, percent=gate.expression.endswith("%"))  # as the gate writes it
            label = f"{row['provider']}{'[' + row['shape'] + ']' if row['shape'] else ''}={shown}"
            values.append(label)
            if math.isnan(value):  # no comparison holds on NaN, so it would pass every gate: it fails them all
                hits.append(f"{label} (undefined: nothing finite to compare)")
            elif _OPS[gate.op](value, gate.threshold):
                hits.append(label)
        violated = bool(hits)
        results.append(
            GateResult(gate.expression, violated, ("violated by " if violated else "ok: ") + ", ".join(hits or values))
        )
    return results


def metric_value(metric: str, row: dict[str, Any], bench: dict[str, Any] | None = None) -> float | None:
    """A --fail-if metric's value on one row (None where it was not measured)."""
    return METRICS[metric](row, bench if bench is not None else {"rows": [row]})


def goal_holds(gate: Gate, row: dict[str, Any], bench: dict[str, Any]) -> tuple[bool, float]:
    """Whether a tune goal (a condition that must hold, in the --fail-if vocabulary) holds on `row`, and the
    value it was read at; a goal the row cannot measure is the user's error (exit 2)."""
    value = METRICS[gate.metric](row, bench)
    if value is None:
        raise UserInputError(_not_measured(gate, row).replace("--fail-if", "--goal", 1))
    return not math.isnan(value) and _OPS[gate.op](value, gate.threshold), value  # an undefined value meets no goal
