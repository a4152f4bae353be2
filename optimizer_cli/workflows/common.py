"""What `run` and `bench` share: the checks made before any work, the benchmark settings, provenance, and the
end of a run (gates, baseline, the atomic commit of the model and its reports).

Messages name what the caller gave: a workflow's request carries `names`, the Python parameter's name by default
(`calib`), the CLI's flag (`--calib`) when the CLI made the request.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizer_cli import SCHEMA_VERSION, __version__
from optimizer_cli.errors import UserInputError
from optimizer_cli.workflows.events import Event, Listener, ignore

# How a library call's messages name its inputs: the parameters of optimize() and benchmark().
PARAMETER_NAMES: dict[str, str] = {
    "model": "model",
    "optimized": "optimized",
    "output": "output",
    "recipe": "recipe",
    "calib": "calib",
    "data": "data",
    "fail_if": "fail_if",
    "baseline": "baseline",
    "report": "report",
    "markdown": "markdown",
    "strict_ep": "strict_ep",
    "allow_nonfinite": "allow_nonfinite",
    "allow_cast": "allow_cast",
    "bench": "bench=True",
}


def label(names: Mapping[str, str], parameter: str) -> str:
    """What a message calls `parameter`: the caller's name for it, else the parameter's own name."""
    return names.get(parameter, parameter)


def provider_text(providers: str | Sequence[str] | None) -> str | None:
    """providers as a list ['cpu', 'cuda'] or a comma string 'cpu,cuda' -> the comma string (None: all usable)."""
    if providers is None or isinstance(providers, str):
        return providers or None
    return ",".join(str(p).strip() for p in providers) or None


class Progress:
    """The events a workflow sends, by kind, to its listener."""

    def __init__(self, listener: Listener | None) -> None:
        self.listener = listener or ignore

    def step(self, text: str) -> None:
        """What runs now (a spinner's text)."""
        self.listener(Event("step", text))

    def line(self, text: str) -> None:
        """A result worth a line of its own (a pass finished, a provider measured)."""
        self.listener(Event("line", text))

    def info(self, text: str) -> None:
        """A message said once, not part of the progress (the recipe picked, the files written)."""
        self.listener(Event("info", text))

    def warning(self, text: str) -> None:
        self.listener(Event("warning", text))


@dataclass
class Checked:
    """What `preflight` validated: parsed gates, the loaded baseline and metric, the output plan."""

    gates: list[Any]
    baseline: dict[str, Any] | None
    metric: Any
    plan: Any


def preflight(
    model: Path,
    output: Path | None,
    inputs: dict[str, str | Path | None],
    *,
    fail_if: Sequence[str],
    baseline: Path | None,
    metric: str | None,
    markdown: Path | None,
    report_path: Path | None,
    benchmarking: bool,
    names: Mapping[str, str],
    metrics: Any = None,
) -> Checked:
    """Validate every input and output path before the model is loaded: a mistake costs nothing and writes
    nothing. `inputs`: the files read besides the model, by the name messages give them."""
    from optimizer_cli.outputs import OutputPlan, read_paths
    from optimizer_cli.report.baseline import load_baseline

    if not model.exists():
        raise UserInputError("file not found", model)
    gates = parse_gates(fail_if, names)
    if gates and not benchmarking:
        raise UserInputError(
            f"{label(names, 'fail_if')} needs a benchmark ({label(names, 'bench')} or set benchmark.enabled=true)"
        )
    named_reports = ((label(names, "report"), report_path), (label(names, "markdown"), markdown))
    reports = {name: path for name, path in named_reports if path is not None}
    plan = OutputPlan(model=output, reports=reports, model_flag=label(names, "output"))
    plan.check(read_paths(model, {**inputs, label(names, "baseline"): baseline}))
    return Checked(
        gates=gates,
        baseline=load_baseline(baseline) if baseline is not None else None,
        metric=load_metric(metric, model, metrics),
        plan=plan,
    )


def parse_gates(expressions: Sequence[str], names: Mapping[str, str]) -> list[Any]:
    from optimizer_cli.bench.gate import parse_gate

    return [parse_gate(e, label(names, "fail_if")) for e in expressions]


def load_metric(metric: str | None, model: Path, metrics: Any) -> Any:
    """`metric`, else the recipe's metrics.task; builtin:cer reads its charset (or the model's metadata) now."""
    from optimizer_cli.bench.accuracy import load_metric as load

    spec = metric or (f"builtin:{metrics.task}" if metrics is not None and metrics.task else None)
    if spec is None:
        return None
    if metrics is None:
        return load(spec, model=model)
    return load(spec, model=model, charset=metrics.charset, map_threshold=metrics.map_threshold)


def check_providers(settings: Any, gates: list[Any], names: Mapping[str, str]) -> None:
    """Gates the benchmark cannot measure, and (strict_ep) unusable providers, fail now, not after the passes."""
    from optimizer_cli.bench.gate import check_measurable
    from optimizer_cli.runtime.providers import probe_provider

    check_measurable(gates, settings.runs_per_round, settings.rounds, settings.providers)
    if not settings.strict_ep:
        return
    for alias in settings.providers:
        status = probe_provider(alias)
        if not status.usable:
            raise UserInputError(
                f"execution provider '{alias}' is not usable: {status.reason} ({label(names, 'strict_ep')})"
            )


def quiet_runtime() -> None:
    """onnxruntime's default logger (used by the sessions its quantization tools make) follows our logger's
    level (the CLI's -v)."""
    import onnxruntime as ort

    from optimizer_cli.runtime.session import ort_log_severity

    ort.set_default_logger_severity(min(3, ort_log_severity()))


@dataclass(frozen=True)
class BenchOptions:
    """What the caller asked of the benchmark; the recipe's benchmark section fills in the rest."""

    providers: str | Sequence[str] | None = None
    strict_ep: bool = False
    sweep: Sequence[str] = ()
    eval_samples: int | None = 256
    memory: bool = True


def bench_settings(rec: Any, options: BenchOptions, threads: int) -> Any:
    """The benchmark's settings: the recipe's benchmark section by name, the caller's options and resolved
    providers winning."""
    from optimizer_cli.bench.harness import BenchSettings, sweep_points
    from optimizer_cli.runtime.providers import parse_provider_list

    b = rec.benchmark
    providers = provider_text(options.providers)
    recipe_providers = parse_provider_list(",".join(b.providers)) if b.providers else None  # typos fail now
    if providers:
        provider_list = parse_provider_list(providers)
    else:
        provider_list = recipe_providers or parse_provider_list(None)
    # The recipe's run target is measured beside the reference (the CPU EP) whichever providers are asked.
    runtime = getattr(getattr(rec, "runtime", None), "target", None)
    if runtime and not providers:
        provider_list = list(dict.fromkeys(["cpu", *provider_list, runtime]))
    shared = b.model_dump(include={f.name for f in dataclasses.fields(BenchSettings)})
    if rec.session.threads is not None and rec.session.threads > threads:
        # More cores for the optimized model than for the original: the speedup would be the cores'.
        raise UserInputError(
            f"recipe session.threads {rec.session.threads} exceeds the benchmark's {threads} threads: the optimized "
            "model may use fewer cores than the original, never more"
        )
    return BenchSettings(
        **{
            **shared,
            "providers": provider_list,
            "threads": threads,
            "strict_ep": options.strict_ep,
            "memory": options.memory,
            "sweep": sweep_points(list(options.sweep)),
            "eval_samples": options.eval_samples,
            "output_kinds": dict(rec.metrics.outputs),
            "map_threshold": rec.metrics.map_threshold,
            # Its names are SessionConfig's; null opt_level / inter_op_threads: the benchmark's / onnxruntime's.
            "optimized_session": rec.session.model_dump(exclude_none=True),
        }
    )


def benchmark_into(
    report: dict[str, Any],
    model: Path,
    output: Path,
    settings: Any,
    eval_data: Any,
    metric: Any,
    dims: dict[str, int],
    say: Callable[[str], None],
) -> None:
    """Original vs optimized on every run target, into report['benchmark'] (its notes into report['notes'])."""
    from optimizer_cli.bench.harness import run_benchmark

    bench = run_benchmark(Path(model), Path(output), settings, eval_data, metric=metric, dims=dims, log=say)
    report["benchmark"] = {**bench.as_dict(), "threads": settings.threads}  # what the sessions were given
    # The samples the source holds (None: unknown): "256 of 397 samples", where tune reads all 397.
    report["benchmark"]["eval_available"] = getattr(eval_data, "available", None)
    report["notes"].extend(n for n in bench.notes if n not in report["notes"])


def python_command(function: str, arguments: Mapping[str, Any]) -> str:
    """The call a report's `command` records for a library call: optimizer_cli.optimize('m.onnx', ...)."""
    given = ", ".join(f"{k}={v!r}" for k, v in arguments.items() if v not in (None, (), [], {}))
    return f"optimizer_cli.{function}({given})"


def cli_command() -> str:
    """The command line as the user typed it (what the CLI's reports record)."""
    return " ".join(shlex.quote(a) for a in ["optimize", *sys.argv[1:]])


def provenance(
    model: Path, output: Path, hashes: bool, command: str, input_sha256: str | None = None
) -> dict[str, Any]:
    """What identifies the run: tool, command, time, and (when `hashes`) the hashes of the input and output."""
    from datetime import datetime, timezone

    from optimizer_cli.model_io import model_sha256

    found: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": f"optimizer-cli {__version__}",
        "command": command,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": str(model),
    }
    if hashes:
        found["input_sha256"] = input_sha256 or model_sha256(model)
        found["output_sha256"] = model_sha256(output) if output.exists() else None
    return found


def finish(report: dict[str, Any], checks: Checked, progress: Progress, names: Mapping[str, str]) -> int:
    """Gates and baseline, then every output: reports are rendered in memory first, and the model (only when
    no gate failed) and the reports are committed together last. Returns the exit code (1: a gate failed)."""
    from optimizer_cli.errors import GateFailure
    from optimizer_cli.report.table import render_markdown

    if checks.baseline is not None and report.get("benchmark"):
        from optimizer_cli.report.baseline import compare, provenance_warnings

        report["baseline"] = compare(report, checks.baseline)
        found = provenance_warnings(report, checks.baseline)
        for warning in found:
            progress.warning(warning)
        report["notes"].extend(found)
    if checks.gates:
        from optimizer_cli.bench.gate import evaluate

        report["gates"] = [g.as_dict() for g in evaluate(checks.gates, report["benchmark"])]
    violated = any(g["violated"] for g in report.get("gates", []))
    plan = checks.plan
    if plan.model is not None:
        report["output_written"] = not violated
        if violated:
            report["notes"].append(f"a {label(names, 'fail_if')} gate was violated: {plan.model} was not written")
    report_name = label(names, "report")
    texts = {
        path: (json.dumps(report, indent=2, default=str) + "\n" if name == report_name else render_markdown(report))
        for name, path in plan.reports.items()
    }
    # The model and its reports are one unit: all in place, or the previous set left whole; "wrote" only after.
    plan.commit(texts, model=not violated)
    if plan.model is not None and not violated:
        progress.info(
            f"wrote {plan.model} ({report['output_bytes'] / 1e6:.2f} MB, was {report['input_bytes'] / 1e6:.2f} MB)"
        )
    return GateFailure.exit_code if violated else 0
