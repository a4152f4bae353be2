"""Command line: `optimize MODEL --recipe R -o OUT` plus verbs (passes, validate, inspect, bench, providers).

Only parsing and wiring here; the work is in pipeline, bench and report.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import typer
from rich.console import Console
from typer.exceptions import TyperException

from optimizer_cli import __version__
from optimizer_cli.errors import GateFailure, OptimizerError, UserInputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Optimize ONNX models with a recipe of verified graph rewrites and benchmark the result.\n\n"
    "Main form: optimize MODEL --recipe RECIPE -o OUT (same as `optimize run ...`).",
    pretty_exceptions_enable=False,
)

SUBCOMMANDS = {"run", "bench", "passes", "validate", "inspect", "providers", "schema", "--help", "-h", "--version"}


def _consoles(json_mode: bool) -> tuple[Console, Console]:
    """(human output, log): with --json, stdout carries exactly one JSON document and nothing else."""
    # Piped output keeps wide tables on one line instead of folding them at 80 columns.
    width = None if sys.stdout.isatty() else 180
    log = Console(stderr=True, width=width)
    human = Console(stderr=True, width=width) if json_mode else Console(width=width)
    return human, log


def _emit_json(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _gates_and_exit(report: dict[str, Any]) -> None:
    if any(g["violated"] for g in report.get("gates", [])):
        raise typer.Exit(GateFailure.exit_code)


ProvidersOpt = typer.Option(None, "--providers", help="Comma list: cpu,cuda,trt (default: all usable).")


@app.command("run")
def run_cmd(
    model: Path = typer.Argument(..., help="Input .onnx model (never modified)."),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Recipe YAML."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output model (default: MODEL.opt.onnx)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key, e.g. passes.1.mode=static."),
    calib: str | None = typer.Option(None, "--calib", help="Calibration data: .npz, folder of .npy, or 'random'."),
    data: str | None = typer.Option(None, "--data", help="Evaluation data (.npz/.npy folder, labels optional)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and exit without loading the model."),
    bench: bool = typer.Option(True, "--bench/--no-bench", help="Benchmark original vs optimized after the run."),
    providers: str | None = ProvidersOpt,
    strict_ep: bool = typer.Option(False, "--strict-ep", help="Error instead of skipping unusable providers."),
    threads: int | None = typer.Option(None, "--threads", help="Intra-op threads (default: recipe, 2)."),
    sweep: list[str] = typer.Option([], "--sweep", help="Shape sweep, e.g. batch=1,8 (repeatable)."),
    eval_samples: int | None = typer.Option(256, "--eval-samples", help="Cap on evaluation samples."),
    metric: str | None = typer.Option(None, "--metric", help="User metric module:function(outputs, labels)."),
    fail_if: list[str] = typer.Option([], "--fail-if", help="Exit 1 if true, e.g. 'accuracy_drop>1%', 'speedup<1.5'."),
    baseline: Path | None = typer.Option(None, "--baseline", help="Compare with a stored --json report."),
    attribute: bool = typer.Option(True, "--attribute/--no-attribute", help="Find layers that cost fidelity."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout, nothing else."),
    markdown: Path | None = typer.Option(None, "--markdown", help="Also write the report as Markdown."),
    report_path: Path | None = typer.Option(None, "--report", help="Also write the JSON report to a file."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure peak session memory."),
) -> None:
    """Run a recipe on MODEL, verify every pass, save, and benchmark original vs optimized."""
    from optimizer_cli.recipe import load_recipe

    human, log = _consoles(json_out)
    rec = load_recipe(recipe, overrides)
    gates = _parse_gates(fail_if)
    output = output or model.with_name(model.stem + ".opt.onnx")
    if dry_run:
        _dry_run(model, rec, output, calib, data, human, json_out)
        return
    from optimizer_cli.pipeline import run_pipeline

    threads = threads or rec.benchmark.threads
    _capture_warnings(log)
    if providers:
        from optimizer_cli.runtime.providers import parse_provider_list

        parse_provider_list(providers)  # a typo fails now, not after the passes ran

    def on_stage(stage: Any) -> None:
        cos = stage.worst_cosine()
        log.print(
            f"  {stage.name}: {stage.seconds:.2f}s, {stage.nodes} nodes"
            + (f", cosine vs original {cos:.5f}" if cos is not None else "")
        )

    result = run_pipeline(
        model,
        rec,
        output,
        calibration=calib,
        evaluation=data,
        threads=threads,
        on_stage=on_stage,
        logger=logging.getLogger("optimizer_cli"),
    )
    report: dict[str, Any] = {
        "tool": f"optimizer-cli {__version__}",
        "input": str(model),
        "output": str(output),
        "recipe": {"path": str(recipe), "name": rec.name, "passes": [p.model_dump() for p in rec.passes]},
        "input_bytes": result.input_bytes,
        "output_bytes": result.output_bytes,
        "stages": [s.as_dict() for s in result.stages],
        "notes": list(result.notes),
    }
    log.print(f"wrote {output} ({result.output_bytes / 1e6:.2f} MB, was {result.input_bytes / 1e6:.2f} MB)")
    if bench and rec.benchmark.enabled:
        eval_data = result.evaluation if result.evaluation is not None else result.verify_data
        settings = _bench_settings(rec, providers, strict_ep, threads, sweep, eval_samples, memory)
        _benchmark_into(report, model, output, settings, eval_data, metric, rec.data.dims, log)
        if attribute:
            _attribution_into(report, model, output, rec, eval_data, calib, data, threads, log)
    _finish(report, gates, baseline, json_out, markdown, report_path, human)


def _parse_gates(exprs: list[str]) -> list[Any]:
    from optimizer_cli.report.gate import parse_gate

    return [parse_gate(e) for e in exprs]


def _capture_warnings(log: Console) -> None:
    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        log.print(f"[yellow]warning:[/yellow] {message}")

    warnings.showwarning = show


def _bench_settings(
    rec: Any,
    providers: str | None,
    strict_ep: bool,
    threads: int,
    sweep: list[str],
    eval_samples: int | None,
    memory: bool,
) -> Any:
    from optimizer_cli.bench.harness import BenchSettings, sweep_points
    from optimizer_cli.runtime.providers import parse_provider_list

    b = rec.benchmark
    provider_list = parse_provider_list(providers) if providers else (b.providers or parse_provider_list(None))
    return BenchSettings(
        providers=provider_list,
        threads=threads,
        warmup=b.warmup,
        rounds=b.rounds,
        runs_per_round=b.runs_per_round,
        discard_after_switch=b.discard_after_switch,
        opt_level=b.opt_level,
        trt_fp16=b.trt_fp16,
        trt_int8=b.trt_int8,
        trt_cache_dir=b.trt_cache_dir,
        strict_ep=strict_ep,
        memory=memory,
        sweep=sweep_points(sweep),
        eval_samples=eval_samples,
    )


def _benchmark_into(
    report: dict[str, Any],
    model: Path,
    output: Path,
    settings: Any,
    eval_data: Any,
    metric: str | None,
    dims: dict[str, int],
    log: Console,
) -> None:
    from optimizer_cli.bench.accuracy import load_metric
    from optimizer_cli.bench.harness import run_benchmark

    bench = run_benchmark(
        Path(model),
        Path(output),
        settings,
        eval_data,
        metric=load_metric(metric) if metric else None,
        dims=dims,
        log=lambda m: log.print(f"  {m}"),
    )
    report["benchmark"] = bench.as_dict()
    report["notes"].extend(n for n in bench.notes if n not in report["notes"])


def _attribution_into(
    report: dict[str, Any],
    model: Path,
    output: Path,
    rec: Any,
    eval_data: Any,
    calib: str | None,
    data: str | None,
    threads: int,
    log: Console,
) -> None:
    from optimizer_cli.bench.attribution import attribute_if_needed

    found = attribute_if_needed(
        report, Path(model), Path(output), rec, eval_data, calib, data, threads, log=lambda m: log.print(f"  {m}")
    )
    if found:
        report["attribution"] = found


def _finish(
    report: dict[str, Any],
    gates: list[Any],
    baseline: Path | None,
    json_out: bool,
    markdown: Path | None,
    report_path: Path | None,
    human: Console,
) -> None:
    from optimizer_cli.report.table import render_markdown, render_rich

    if baseline is not None and report.get("benchmark"):
        from optimizer_cli.report.baseline import compare, load_baseline

        report["baseline"] = compare(report, load_baseline(baseline))
    if gates:
        if not report.get("benchmark"):
            raise UserInputError("--fail-if needs a benchmark (remove --no-bench)")
        from optimizer_cli.report.gate import evaluate

        report["gates"] = [g.as_dict() for g in evaluate(gates, report["benchmark"])]
    if report_path:
        report_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if markdown:
        markdown.write_text(render_markdown(report))
    if json_out:
        _emit_json(report)
    else:
        render_rich(report, human)
    _gates_and_exit(report)


def _dry_run(
    model: Path, rec: Any, output: Path, calib: str | None, data: str | None, human: Console, json_out: bool
) -> None:
    from optimizer_cli.passes import PASS_REGISTRY, RunInputs
    from optimizer_cli.pipeline import requirement_problems

    calib = calib or rec.data.calibration
    data = data or rec.data.evaluation
    problems = requirement_problems(rec, RunInputs(calibration=calib, evaluation=data))
    if not model.exists():
        problems.insert(0, f"{model}: file not found")
    plan = {
        "input": str(model),
        "output": str(output),
        "recipe": rec.name,
        "passes": [
            {"index": i, "type": p.type, "exactness": PASS_REGISTRY[p.type].exactness.value, "config": p.model_dump()}
            for i, p in enumerate(rec.passes)
        ],
        "calibration": calib,
        "evaluation": data,
        "verify": rec.verify.model_dump(),
        "benchmark": rec.benchmark.model_dump(),
        "problems": problems,
    }
    if json_out:
        _emit_json(plan)
    else:
        human.print(f"[bold]Plan[/bold]: {model} -> {output} with recipe '{rec.name}'")
        for p in plan["passes"]:
            cfg = {k: v for k, v in p["config"].items() if k not in ("type", "label")}
            human.print(f"  {p['index']}. {p['type']} ({p['exactness']}) {cfg}")
        human.print(f"  calibration: {calib or '-'}; evaluation: {data or 'seeded random'}")
        for problem in problems:
            human.print(f"[red]problem:[/red] {problem}")
    if problems:
        raise UserInputError(problems[0])


@app.command("bench")
def bench_cmd(
    original: Path = typer.Argument(..., help="Reference model."),
    optimized: Path = typer.Argument(..., help="Model to compare against the reference."),
    data: str | None = typer.Option(None, "--data", help="Evaluation data (.npz/.npy folder, labels optional)."),
    providers: str | None = ProvidersOpt,
    strict_ep: bool = typer.Option(False, "--strict-ep"),
    threads: int = typer.Option(2, "--threads"),
    rounds: int = typer.Option(10, "--rounds"),
    sweep: list[str] = typer.Option([], "--sweep"),
    dims: list[str] = typer.Option([], "--dim", help="Symbolic dim value for random inputs, e.g. seq=128."),
    eval_samples: int | None = typer.Option(256, "--eval-samples"),
    metric: str | None = typer.Option(None, "--metric"),
    fail_if: list[str] = typer.Option([], "--fail-if"),
    baseline: Path | None = typer.Option(None, "--baseline"),
    json_out: bool = typer.Option(False, "--json"),
    markdown: Path | None = typer.Option(None, "--markdown"),
    report_path: Path | None = typer.Option(None, "--report"),
    memory: bool = typer.Option(True, "--memory/--no-memory"),
) -> None:
    """Benchmark two existing models side by side (latency, accuracy, fidelity, memory, size)."""
    from optimizer_cli.data import random_dataset, resolve_dataset
    from optimizer_cli.model_io import load_model
    from optimizer_cli.recipe import empty_recipe
    from optimizer_cli.verify import signature

    human, log = _consoles(json_out)
    gates = _parse_gates(fail_if)
    _capture_warnings(log)
    a = load_model(original)
    b = load_model(optimized)
    if signature(a) != signature(b):
        raise UserInputError(f"models have different inputs/outputs: {signature(a)} vs {signature(b)}", optimized)
    dim_values = _parse_dims(dims)
    rec = empty_recipe([f"benchmark.threads={threads}", f"benchmark.rounds={rounds}"])
    rec.data.dims = dim_values
    eval_data = resolve_dataset(data, a, samples=8, seed=0, dims=dim_values) or random_dataset(a, 8, 0, dim_values)
    report: dict[str, Any] = {
        "tool": f"optimizer-cli {__version__}",
        "input": str(original),
        "output": str(optimized),
        "notes": [],
    }
    settings = _bench_settings(rec, providers, strict_ep, threads, sweep, eval_samples, memory)
    _benchmark_into(report, original, optimized, settings, eval_data, metric, dim_values, log)
    _finish(report, gates, baseline, json_out, markdown, report_path, human)


def _parse_dims(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if not value.strip().isdigit():
            raise UserInputError(f"--dim '{item}': expected NAME=INT")
        out[name.strip()] = int(value)
    return out


@app.command("passes")
def passes_cmd(
    name: str | None = typer.Argument(None, help="One pass in detail (default: all)."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """List passes: contract, and each option's type, default, bounds and meaning."""
    from rich.markup import escape
    from rich.table import Table

    from optimizer_cli.passes import PASS_REGISTRY
    from optimizer_cli.recipe import pass_info

    items = [pass_info(name)] if name is not None else [pass_info(n) for n in sorted(PASS_REGISTRY)]
    if json_out:
        _emit_json(items[0] if name is not None else {"passes": items})
        return
    console = Console()
    for item in items:
        console.print(f"[bold]{item['type']}[/bold] ({item['exactness']}): {escape(item['contract'])}")
        table = Table(box=None, pad_edge=False, show_edge=False)
        table.add_column("option", no_wrap=True)
        table.add_column("type", overflow="fold", max_width=16)
        table.add_column("default", overflow="fold", max_width=14)
        table.add_column("bounds", no_wrap=True)
        table.add_column("description", overflow="fold")
        for key, opt in item["options"].items():
            default = opt["default"]
            # YAML spelling (true, null, [..]) rather than Python's True/None.
            shown = default if isinstance(default, str) else json.dumps(default)
            # Types like list[str] and descriptions are text, not rich markup.
            table.add_row(key, escape(opt["type"]), escape(shown), opt["bounds"] or "", escape(opt["description"]))
        console.print(table)
        console.print()


@app.command("validate")
def validate_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    overrides: list[str] = typer.Option([], "--set"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Validate a recipe (unknown keys, types, bounds, pass names): every problem with its line."""
    from optimizer_cli.recipe import RecipeProblems, load_recipe

    try:
        rec = load_recipe(recipe, overrides)
    except RecipeProblems as exc:
        # Unlike `run`, which stops at the first problem, list them all so one edit fixes the file.
        if json_out:
            _emit_json({"valid": False, "problems": exc.problems})
        else:
            for problem in exc.problems:
                sys.stderr.write(f"error: {problem}\n")
            sys.stderr.write(f"{len(exc.problems)} problem{'s' if len(exc.problems) > 1 else ''} in {recipe}\n")
        raise typer.Exit(exc.exit_code) from None
    if json_out:
        _emit_json({"valid": True, "recipe": rec.model_dump()})
    else:
        Console().print(
            f"[green]ok[/green] {recipe}: {len(rec.passes)} passes: " + " -> ".join(p.type for p in rec.passes)
        )


@app.command("schema")
def schema_cmd() -> None:
    """Print the recipe JSON schema (for editors)."""
    from optimizer_cli.recipe import recipe_json_schema

    sys.stdout.write(recipe_json_schema() + "\n")


@app.command("inspect")
def inspect_cmd(model: Path = typer.Argument(...), json_out: bool = typer.Option(False, "--json")) -> None:
    """Inputs, outputs, opsets, op counts, parameters and size of a model."""
    from optimizer_cli.data import input_specs
    from optimizer_cli.model_io import file_size, load_model, weights_nbytes
    from optimizer_cli.passes._util import op_counts

    m = load_model(model)
    params = sum(v.const_value.size for v in m.graph.initializers.values() if v.const_value is not None)
    info = {
        "path": str(model),
        "file_bytes": file_size(model),
        "weight_bytes": weights_nbytes(m),
        "parameters": int(params),
        "ir_version": m.ir_version,
        "opsets": dict(m.opset_imports),
        "producer": m.producer_name,
        "inputs": [
            {"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape) if s.shape else None} for s in input_specs(m)
        ],
        "outputs": [
            {"name": v.name, "dtype": str(v.dtype), "shape": [str(d) for d in v.shape.dims] if v.shape else None}
            for v in m.graph.outputs
        ],
        "ops": dict(op_counts(m).most_common()),
    }
    if json_out:
        _emit_json(info)
        return
    c = Console()
    c.print(
        f"[bold]{model}[/bold]: {info['file_bytes'] / 1e6:.2f} MB, {params:,} parameters, IR {m.ir_version}, opsets {info['opsets']}"
    )
    for i in info["inputs"]:
        c.print(f"  input  {i['name']}: {i['dtype']} {i['shape']}")
    for o in info["outputs"]:
        c.print(f"  output {o['name']}: {o['dtype']} {o['shape']}")
    c.print("  ops: " + ", ".join(f"{k}={v}" for k, v in info["ops"].items()))


@app.command("providers")
def providers_cmd(json_out: bool = typer.Option(False, "--json")) -> None:
    """Probe each execution provider with a real session and say which are usable."""
    from optimizer_cli.runtime.providers import PROVIDER_ALIASES, installed_runtimes, probe_provider

    seen, rows = set(), []
    for alias, name in PROVIDER_ALIASES.items():
        if name in seen:
            continue
        seen.add(name)
        st = probe_provider(alias)
        rows.append({"alias": alias, "provider": name, "usable": st.usable, "reason": st.reason})
    runtimes = installed_runtimes()
    if json_out:
        _emit_json({"runtimes": runtimes, "providers": rows})
        return
    c = Console()
    c.print(f"onnxruntime packages: {', '.join(runtimes) or 'none'}")
    if len(runtimes) > 1:
        c.print("[yellow]warning:[/yellow] more than one onnxruntime package is installed; the last installed one wins")
    for r in rows:
        c.print(f"  {r['alias']:9} {'[green]usable[/green]' if r['usable'] else '[red]unusable[/red]'}  {r['reason']}")


def _version_callback(value: bool) -> None:
    if value:
        print(f"optimizer-cli {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    pass


def main(argv: list[str] | None = None) -> None:
    """Entry point: `optimize MODEL ...` is `optimize run MODEL ...`; errors are one line, exit code by kind."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if args and args[0] not in SUBCOMMANDS and not args[0].startswith("-"):
        args.insert(0, "run")
    # Other libraries' warnings (onnxruntime.quantization's advice) stay hidden; our passes' warnings show.
    logging.basicConfig(level=logging.DEBUG if debug else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        logging.getLogger("optimizer_cli").setLevel(logging.WARNING)
    try:
        rv = app(args=args, prog_name="optimize", standalone_mode=False)
        sys.exit(rv if isinstance(rv, int) else 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except TyperException as exc:  # usage errors: bad flags, missing arguments
        show = getattr(exc, "show", None)
        if show:
            show()
        else:
            sys.stderr.write(f"error: {exc.format_message()}\n")
        sys.exit(2)
    except typer.Abort:
        sys.stderr.write("aborted\n")
        sys.exit(130)
    except OptimizerError as exc:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        sys.stderr.write(f"error: internal error: {type(exc).__name__}: {first} (rerun with --debug for a traceback)\n")
        sys.exit(4)
