"""`optimize bench` as a library call: two existing models side by side (latency, accuracy, fidelity, memory,
size) on every run target, gated and reported like a run's benchmark."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizer_cli.errors import UserInputError
from optimizer_cli.workflows.common import (
    PARAMETER_NAMES,
    BenchOptions,
    Progress,
    bench_settings,
    benchmark_into,
    check_providers,
    finish,
    label,
    preflight,
    provenance,
    provider_text,
    python_command,
    quiet_runtime,
)
from optimizer_cli.workflows.events import BenchReport, Listener


@dataclass
class BenchRequest:
    """Everything `optimize bench` takes, as data.

    original / optimized: the reference model and the one compared with it (same inputs and outputs). data:
    evaluation data spec (default: seeded random inputs). providers: run targets, a list or a comma string
    (default: every usable one). threads: intra-op threads of both sessions. rounds: interleaved timing rounds.
    sweep: shape sweeps ('batch=1,8'). dims: symbolic dim values for random inputs. eval_samples: cap on
    evaluation samples. metric: builtin:NAME or module:function. fail_if: gate expressions (a violated one makes
    exit_code 1). baseline: a stored JSON report to compare with. report_path / markdown: also write the JSON /
    Markdown report. memory: measure peak session memory. allow_nonfinite / allow_cast: accept data with NaN/Inf
    / exactly castable integers. hashes: record the models' SHA-256. command: what the report's `command` says
    (default: the Python call). names: how messages name the parameters (the CLI passes its flags).
    """

    original: Path
    optimized: Path
    data: str | None = None
    providers: str | Sequence[str] | None = None
    strict_ep: bool = False
    threads: int = 2
    rounds: int = 10
    sweep: Sequence[str] = ()
    dims: Mapping[str, int] = field(default_factory=dict)
    eval_samples: int = 256
    metric: str | None = None
    fail_if: Sequence[str] = ()
    baseline: Path | None = None
    markdown: Path | None = None
    report_path: Path | None = None
    memory: bool = True
    allow_nonfinite: bool = False
    allow_cast: bool = False
    hashes: bool = True
    command: str | None = None
    names: Mapping[str, str] = field(default_factory=lambda: dict(PARAMETER_NAMES))


def run_benchmark(request: BenchRequest, listener: Listener | None = None) -> BenchReport:
    """Benchmark `request.optimized` against `request.original` on every run target.

    Returns a BenchReport (exit_code 1 when a fail_if gate was violated). Raises UserInputError for bad input
    (a missing file, models whose inputs or outputs differ, a model onnxruntime cannot load, bad data).
    """
    from optimizer_cli.recipe import empty_recipe

    names = request.names
    if not request.optimized.exists():
        raise UserInputError("file not found", request.optimized)
    checks = preflight(
        request.original,
        None,
        {label(names, "optimized"): request.optimized, label(names, "data"): request.data},
        fail_if=request.fail_if,
        baseline=request.baseline,
        metric=request.metric,
        markdown=request.markdown,
        report_path=request.report_path,
        benchmarking=True,
        names=names,
    )
    if request.threads < 1 or request.rounds < 2:
        raise UserInputError(
            f"threads must be at least 1 and rounds at least 2 (got {request.threads}, {request.rounds})"
        )
    rec = empty_recipe([f"benchmark.threads={request.threads}", f"benchmark.rounds={request.rounds}"])
    rec.data.dims = dict(request.dims)
    options = BenchOptions(request.providers, request.strict_ep, request.sweep, request.eval_samples, request.memory)
    settings = bench_settings(rec, options, request.threads)
    check_providers(settings, checks.gates, names)
    quiet_runtime()
    eval_data = _checked_data(request, settings)
    command = request.command or _python_call(request)
    report: dict[str, Any] = {
        **provenance(request.original, request.optimized, request.hashes, command),
        "output": str(request.optimized),
        "notes": [],
    }
    progress = Progress(listener)
    benchmark_into(
        report,
        request.original,
        request.optimized,
        settings,
        eval_data,
        checks.metric,
        dict(request.dims),
        progress.line,
    )
    return BenchReport(report, exit_code=finish(report, checks, progress, names))


def _checked_data(request: BenchRequest, settings: Any) -> Any:
    """Both models loadable by onnxruntime with the same signature, and the evaluation data for them."""
    from optimizer_cli.bench.harness import check_sweep_dims
    from optimizer_cli.data import DataPolicy, random_dataset, resolve_dataset
    from optimizer_cli.model_io import check_runtime_loadable, load_model
    from optimizer_cli.pipeline import require_inputs
    from optimizer_cli.verify import signature

    original, optimized = request.original, request.optimized
    a = load_model(original)
    b = load_model(optimized)
    require_inputs(a, original)
    # Both are timed as they are on disk: what onnxruntime would refuse is the caller's to fix, said now.
    check_runtime_loadable(a, original)
    check_runtime_loadable(b, optimized)
    if settings.sweep:
        check_sweep_dims(settings.sweep, a)
    (ins_a, outs_a), (ins_b, outs_b) = signature(a), signature(b)
    # The optimized model may take fewer inputs (freeze_inputs made them constants): never other or more.
    if outs_a != outs_b or not set(ins_b) <= set(ins_a):
        raise UserInputError(f"models have different inputs/outputs: {signature(a)} vs {signature(b)}", optimized)
    policy = DataPolicy(request.allow_nonfinite, request.allow_cast)
    dims = dict(request.dims)
    eval_data = resolve_dataset(
        request.data, a, samples=8, seed=0, dims=dims, limit=request.eval_samples, policy=policy
    )
    return eval_data or random_dataset(a, 8, 0, dims)


def _python_call(request: BenchRequest) -> str:
    return python_command(
        "benchmark",
        {
            "original": str(request.original),
            "optimized": str(request.optimized),
            "data": request.data,
            "providers": provider_text(request.providers),
            "threads": request.threads,
        },
    )
