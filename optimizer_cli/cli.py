"""Command line: `optimize MODEL --recipe R -o OUT` plus verbs (passes, validate, inspect, bench, providers).

Only parsing and wiring here: the work is in workflows/ (each command a library call), the rendering in report/.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup
from typer.exceptions import TyperException

from optimizer_cli import SCHEMA_VERSION, __version__
from optimizer_cli.errors import DISK_ERRNOS, OptimizerError, UserInputError
from optimizer_cli.report.progress import StepProgress, TuneProgress


class _HelpGroup(TyperGroup):
    """The command list gives each command's first sentence whole, wrapped (click cuts it to one line)."""

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        commands = [(name, self.get_command(ctx, name)) for name in self.list_commands(ctx)]
        rows = [(name, cmd.get_short_help_str(limit=10**6)) for name, cmd in commands if cmd and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


app = typer.Typer(
    cls=_HelpGroup,
    add_completion=True,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Optimize ONNX models with a recipe of verified graph rewrites and benchmark the result.\n\n"
    "Main form: optimize MODEL --recipe RECIPE -o OUT (same as `optimize run ...`).",
    pretty_exceptions_enable=False,
    # click's plain help: two columns that wrap at spaces within the terminal (80 columns included); rich's
    # panels squeeze the descriptions into a narrow column and cut words with an ellipsis.
    rich_markup_mode=None,
)

SUBCOMMANDS = {
    "run",
    "tune",
    "bench",
    "passes",
    "validate",
    "recipes",
    "inspect",
    "providers",
    "schema",
    "--help",
    "-h",
    "--version",
}
SUBCOMMANDS |= {"--install-completion", "--show-completion"}
VERBOSITY_FLAGS = {"-v": 1, "--verbose": 1, "-q": -1, "--quiet": -1}
# -v / -q, read by main() before typer sees the arguments (they are accepted anywhere on the line).
_verbosity = 0


def _consoles(json_mode: bool) -> tuple[Console, Console]:
    """(human output, log): with --json, stdout carries exactly one JSON document and nothing else."""
    # Piped output keeps wide tables on one line, unless COLUMNS says how wide the reader is.
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit() else 180
    log = Console(stderr=True, width=width, quiet=_verbosity < 0)
    human = Console(stderr=True, width=width) if json_mode else Console(width=width)
    return human, log


def _emit_json(doc: dict[str, Any]) -> None:
    doc = {"schema_version": SCHEMA_VERSION, **doc}  # every document says its version first
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


DATA_FORMS = ".npz, folder of .npy or of per-sample .npz, <index>/<input> .npz, or a loader file.py:function"
ProvidersOpt = typer.Option(None, "--providers", help="Comma list: cpu,cuda,trt (default: all usable).")
AllowNonfiniteOpt = typer.Option(
    False, "--allow-nonfinite", help="Run on data holding NaN/Inf (refused otherwise; a note counts the samples)."
)
AllowCastOpt = typer.Option(
    False, "--allow-cast", help="Cast integer data for a floating input when every value is exact (refused otherwise)."
)
# Options `run` and `bench` share, declared once.
StrictEpOpt = typer.Option(False, "--strict-ep", help="Error instead of skipping unusable providers.")
SweepOpt = typer.Option([], "--sweep", help="Shape sweep, e.g. batch=1,8 (repeatable).")
EvalSamplesOpt = typer.Option(256, "--eval-samples", min=1, help="Cap on evaluation samples.")
MetricOpt = typer.Option(
    None, "--metric", help="builtin:cer, builtin:miou, or your module:function / file.py:function."
)
FailIfOpt = typer.Option([], "--fail-if", help="Exit 1 if true, e.g. 'accuracy_drop>1%', 'speedup<1.5'.")
BaselineOpt = typer.Option(None, "--baseline", help="Compare with a stored --json report.")
MarkdownOpt = typer.Option(None, "--markdown", help="Also write the report as Markdown.")
ReportOpt = typer.Option(None, "--report", help="Also write the JSON report to a file.")
MemoryOpt = typer.Option(True, "--memory/--no-memory", help="Measure peak session memory.")


# How the CLI's messages name the workflows' parameters: by the flags that gave them.
RUN_FLAGS = {
    "output": "-o",
    "recipe": "--recipe",
    "calib": "--calib",
    "data": "--data",
    "fail_if": "--fail-if",
    "baseline": "--baseline",
    "report": "--report",
    "markdown": "--markdown",
    "strict_ep": "--strict-ep",
    "allow_nonfinite": "--allow-nonfinite",
    "allow_cast": "--allow-cast",
    "bench": "remove --no-bench",
    "optimized": "the optimized model",
}


@app.command("run")
def run_cmd(
    model: Path = typer.Argument(..., help="Input .onnx model (never modified)."),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Recipe YAML, or a preset's name (optimize recipes)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output model (default: MODEL.opt.onnx)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key, e.g. passes.1.mode=static."),
    calib: str | None = typer.Option(None, "--calib", help=f"Calibration data: {DATA_FORMS}, or 'random'."),
    data: str | None = typer.Option(None, "--data", help=f"Evaluation data: {DATA_FORMS} (labels optional)."),
    calib_samples: int | None = typer.Option(
        None,
        "--calib-samples",
        min=1,
        help="Calibration samples read and used (default: the passes' own, at least 64; all of a stacked file).",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and exit without loading the model."),
    bench: bool = typer.Option(True, "--bench/--no-bench", help="Benchmark original vs optimized after the run."),
    providers: str | None = ProvidersOpt,
    strict_ep: bool = StrictEpOpt,
    threads: int | None = typer.Option(None, "--threads", min=1, help="Intra-op threads (default: recipe, 2)."),
    sweep: list[str] = SweepOpt,
    eval_samples: int = EvalSamplesOpt,
    metric: str | None = MetricOpt,
    fail_if: list[str] = FailIfOpt,
    baseline: Path | None = BaselineOpt,
    attribute: bool = typer.Option(True, "--attribute/--no-attribute", help="Find layers that cost fidelity."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout, nothing else."),
    markdown: Path | None = MarkdownOpt,
    report_path: Path | None = ReportOpt,
    memory: bool = MemoryOpt,
    allow_code: bool = typer.Option(False, "--allow-code", help="Run the code (data loaders) the recipe names."),
    allow_nonfinite: bool = AllowNonfiniteOpt,
    allow_cast: bool = AllowCastOpt,
) -> None:
    """Run a recipe on MODEL, verify every pass, save, and benchmark original vs optimized."""
    options = dict(locals())  # the options, named as RunRequest's fields
    from optimizer_cli.workflows.run import RunRequest, plan_run, run_optimize

    human, log = _consoles(json_out)
    request = _request(RunRequest, options, json_out)
    if dry_run:
        _dry_run(plan_run(request), human, json_out)
        return
    with _library_output_to_stderr(), _warnings_to(log), StepProgress(log) as progress:
        report = run_optimize(request, progress.listen)
    _render(report, json_out, human)


def _request(kind: Any, options: dict[str, Any], json_out: bool) -> Any:
    """A workflow's request from a command's options, named as its fields; and what only the CLI knows: the
    hashes are computed when something reads them, the command line as typed, messages name the flags."""
    import dataclasses

    from optimizer_cli.workflows.common import cli_command

    fields = {f.name for f in dataclasses.fields(kind)}
    given = {name: value for name, value in options.items() if name in fields}
    hashes = _hashes_read(json_out, options.get("report_path"), options.get("baseline"))
    return kind(**given, hashes=hashes, command=cli_command(), names=RUN_FLAGS)


def _render(report: Any, json_out: bool, human: Console) -> None:
    """The report of run or bench: the --json document, else the tables (-q: the result alone); a violated
    gate exits 1 after it."""
    from optimizer_cli.report.table import render_quiet, render_rich

    if json_out:
        _emit_json(report.to_dict())
    else:
        (render_quiet if _verbosity < 0 else render_rich)(report.document, human)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


def _resolve_recipe(recipe: Path) -> Path:
    """--recipe: an existing file, else a shipped preset's file (named by _say_recipe once the checks pass)."""
    from optimizer_cli.recipe import resolve_recipe

    return resolve_recipe(recipe)[0]


def _say_recipe(recipe: Path, log: Console) -> None:
    """One stderr line naming the preset used, or the file that won over a preset of the same name. Said when
    the work starts, so bad input still gets exactly one error line."""
    from optimizer_cli.recipe import describe_source, preset_of

    said = describe_source(recipe, preset_of(recipe))
    if said is not None:
        log.print(escape(said), soft_wrap=True)


@contextlib.contextmanager
def _library_output_to_stderr() -> Iterator[None]:
    """stdout carries only our report: what libraries print during the work (onnxruntime's calibrators'
    print(), native printf) is captured, and shown on stderr only with -v (report/console.py)."""
    from optimizer_cli.report.console import captured_library_output

    with captured_library_output(Console(stderr=True), show=_verbosity > 0):
        yield


def _hashes_read(json_out: bool, report_path: Path | None, baseline: Path | None) -> bool:
    """Whether anything reads the models' hashes: the JSON report (stdout or --report) and --baseline's check
    that it was measured on the same input. Hashing a 2.5 GB model takes over 2 s of a core."""
    return json_out or report_path is not None or baseline is not None


def _quiet_runtime() -> None:
    """onnxruntime's default logger (used by the sessions its quantization tools make) follows -v."""
    from optimizer_cli.workflows.common import quiet_runtime

    quiet_runtime()


@contextlib.contextmanager
def _warnings_to(log: Console) -> Iterator[None]:
    """Python warnings and our logger's warnings raised during the work (our passes' advice) print on the log
    console when it ends, each distinct one once with its count (report/console.py): enter it outside the
    progress display, so that is gone first."""
    from optimizer_cli.report.console import collected_warnings

    with collected_warnings(log):
        yield


def _dry_run(report: Any, human: Console, json_out: bool) -> None:
    """--dry-run: the plan (and every problem found) without loading the model; exit 2 when there is a problem."""
    from optimizer_cli.report.plan import render_plan

    plan = report.document
    if plan["recipe_path"] is not None:
        _say_recipe(Path(plan["recipe_path"]), Console(stderr=True, quiet=_verbosity < 0))
    if json_out:
        _emit_json(plan)
    else:
        render_plan(plan, human)
    if plan["problems"]:
        # Each problem once, as an error line on stderr (the JSON plan also lists them).
        for problem in plan["problems"]:
            sys.stderr.write(f"error: {problem}\n")
        raise typer.Exit(UserInputError.exit_code)


# How `optimize tune`'s messages name the request's parameters: by its flags.
TUNE_FLAGS = {
    "goals": "--goal",
    "budget": "--budget",
    "trials": "--trials",
    "output": "-o",
    "study": "--study",
    "resume": "--resume",
    "report_only": "--report-only",
    "providers": "--providers",
    "sampler": "--sampler",
    "executor": "--executor",
    "space": "--space",
    "data": "--data",
    "calib": "--calib",
    "dims": "--dim",
    "threads": "--threads",
    "eval_samples": "--eval-samples",
    "seed": "--seed",
}


@app.command("tune")
def tune_cmd(
    models: list[Path] = typer.Argument(..., help="Input .onnx model(s) (never modified); one study per model."),
    goal: list[str] = typer.Option(
        [], "--goal", help="Must hold for the winner, e.g. 'cosine>=0.99', 'accuracy_drop<=1%'."
    ),
    data: str = typer.Option(..., "--data", help=f"Held-out evaluation data: {DATA_FORMS}."),
    calib: str | None = typer.Option(
        None, "--calib", help=f"Calibration data (never overlapping --data): {DATA_FORMS}."
    ),
    output: Path | None = typer.Option(None, "--output", "-o", help="Winner model (several models: a folder)."),
    budget: str | None = typer.Option(
        None,
        "--budget",
        help="Wall time of the search per model: 600, 90s, 15m, 1h (a trial that would end past it is not "
        "started; the mixed-precision ranking before and the finalists' re-timing after come on top).",
    ),
    trials: int | None = typer.Option(
        None, "--trials", min=1, help="Trials per model (with --budget: whichever ends first)."
    ),
    space: Path | None = typer.Option(None, "--space", help="YAML: dimension -> value or list of values to search."),
    providers: str | None = typer.Option(
        None, "--providers", help="Run targets to search, e.g. cpu,openvino (default: cpu); see `optimize providers`."
    ),
    threads: int = typer.Option(2, "--threads", min=1, help="Intra-op threads for every session."),
    study: Path | None = typer.Option(None, "--study", help="Folder of the Optuna study (journal file): resumable."),
    resume: bool = typer.Option(False, "--resume", help="Continue the study in --study."),
    report_only: bool = typer.Option(False, "--report-only", help="Re-report a finished --study without running."),
    sampler: str = typer.Option("tpe", "--sampler", help="Optuna sampler: tpe or nsga2."),
    seed: int = typer.Option(0, "--seed", min=0, help="Sampler seed."),
    executor: str = typer.Option("local", "--executor", help="local, ray (a local Ray) or ray://HOST:PORT."),
    eval_samples: int | None = typer.Option(
        None, "--eval-samples", min=1, help="Evaluation samples fidelity is read on (default: all of --data)."
    ),
    dims: list[str] = typer.Option([], "--dim", help="Symbolic dim value for random calibration, e.g. batch=1."),
    metric: str | None = typer.Option(None, "--metric", help="builtin:cer, builtin:miou, or module:function."),
    json_out: bool = typer.Option(False, "--json", help="Print tune.json on stdout, nothing else."),
) -> None:
    """Search recipes for the fastest model meeting every --goal; prove the speedup; write it and its recipe."""
    from optimizer_cli.report.tune_table import render_tune
    from optimizer_cli.workflows.tune import TuneRequest, run_tune

    human, log = _consoles(json_out)
    if not goal:  # a repeatable option typer cannot require
        raise UserInputError("tune needs at least one --goal, e.g. --goal 'cosine>=0.99'")
    request = TuneRequest(
        model=models,
        data=data,
        goals=goal,
        calib=calib,
        output=output,
        budget=budget,
        trials=trials,
        space=space,
        providers=providers,
        threads=threads,
        study=study,
        resume=resume,
        report_only=report_only,
        sampler=sampler,
        seed=seed,
        executor=executor,
        eval_samples=eval_samples,
        dims=_parse_dims(dims),
        metric=metric,
        names=TUNE_FLAGS,
    )
    _quiet_runtime()
    progress = TuneProgress(log)
    try:
        with _library_output_to_stderr(), _warnings_to(log), progress:
            report = run_tune(request, progress.event)
    except KeyboardInterrupt:
        raise _Interrupted(progress.interrupted()) from None
    if json_out:
        _emit_json(report.to_dict())
    else:
        for doc in report.document.get("studies", [report.document]):
            render_tune(doc, human, quiet=_verbosity < 0)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


class _Interrupted(OptimizerError):
    exit_code = 130


@app.command("bench")
def bench_cmd(
    original: Path = typer.Argument(..., help="Reference model."),
    optimized: Path = typer.Argument(..., help="Model to compare against the reference."),
    data: str | None = typer.Option(None, "--data", help=f"Evaluation data: {DATA_FORMS} (labels optional)."),
    providers: str | None = ProvidersOpt,
    strict_ep: bool = StrictEpOpt,
    threads: int = typer.Option(2, "--threads", min=1, help="Intra-op threads of both sessions."),
    rounds: int = typer.Option(10, "--rounds", min=2, help="Interleaved timing rounds (paired A/B)."),
    sweep: list[str] = SweepOpt,
    dims: list[str] = typer.Option([], "--dim", help="Symbolic dim value for random inputs, e.g. seq=128."),
    eval_samples: int = EvalSamplesOpt,
    metric: str | None = MetricOpt,
    fail_if: list[str] = FailIfOpt,
    baseline: Path | None = BaselineOpt,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout, nothing else."),
    markdown: Path | None = MarkdownOpt,
    report_path: Path | None = ReportOpt,
    memory: bool = MemoryOpt,
    allow_nonfinite: bool = AllowNonfiniteOpt,
    allow_cast: bool = AllowCastOpt,
) -> None:
    """Benchmark two existing models side by side (latency, accuracy, fidelity, memory, size)."""
    options = dict(locals())  # the options, named as BenchRequest's fields
    from optimizer_cli.workflows.bench import BenchRequest, run_benchmark

    human, log = _consoles(json_out)
    request = _request(BenchRequest, {**options, "dims": _parse_dims(dims)}, json_out)
    with _library_output_to_stderr(), _warnings_to(log), StepProgress(log) as progress:
        report = run_benchmark(request, progress.listen)
    _render(report, json_out, human)


def _parse_dims(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if not value.strip().isdigit() or not name.strip():
            raise UserInputError(f"--dim '{item}': expected NAME=INT")
        if int(value) < 1:
            raise UserInputError(f"--dim '{item}': the size must be at least 1")
        out[name.strip()] = int(value)
    return out


@app.command("passes")
def passes_cmd(
    name: str | None = typer.Argument(None, help="One pass in detail (default: all)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout, nothing else."),
) -> None:
    """List passes: contract, what tune may vary, and each option's type, default, bounds and meaning."""
    from optimizer_cli.passes import PLUGIN_PROBLEMS
    from optimizer_cli.report.listing import render_passes
    from optimizer_cli.workflows.pass_catalog import pass_catalog

    doc = pass_catalog(name)
    if json_out:
        _emit_json(doc)
        return
    render_passes(doc.get("passes", [doc]), PLUGIN_PROBLEMS, Console())


@app.command("validate")
def validate_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML, or a preset's name (optimize recipes)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key, e.g. passes.1.mode=static."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout, nothing else."),
) -> None:
    """Validate a recipe (unknown keys, types, bounds, pass names): every problem with its line."""
    from optimizer_cli.recipe import RecipeProblems, code_references, load_recipe, preset_of
    from optimizer_cli.report.listing import render_valid_recipe

    recipe = _resolve_recipe(recipe)
    preset = preset_of(recipe)
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
    _say_recipe(recipe, Console(stderr=True, quiet=_verbosity < 0))
    code = code_references(rec)  # listed, never imported: validate runs nothing
    if json_out:
        doc = {"valid": True, "path": str(recipe), "preset": preset, "recipe": rec.model_dump()}
        _emit_json({**doc, "code": [c.as_dict() for c in code]})
    else:
        shown = f"preset '{preset}'" if preset else str(recipe)
        render_valid_recipe(shown, [p.type for p in rec.passes], Console())
        for c in code:
            sys.stderr.write(f"note: {c.key} names code: {c.what()}; optimize run imports it only with --allow-code\n")


@app.command("recipes")
def recipes_cmd(
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout, nothing else."),
) -> None:
    """List the shipped recipes (presets), one line each: --recipe NAME runs one from any folder."""
    from optimizer_cli.recipe import preset_list
    from optimizer_cli.report.listing import render_recipes

    items = preset_list()
    if json_out:
        _emit_json({"presets": items})
        return
    render_recipes(items)


@app.command("schema")
def schema_cmd() -> None:
    """Print the recipe JSON schema (for editors)."""
    from optimizer_cli.recipe import recipe_json_schema

    sys.stdout.write(recipe_json_schema() + "\n")


@app.command("inspect")
def inspect_cmd(
    model: Path = typer.Argument(..., help="The .onnx model."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout, nothing else."),
) -> None:
    """Inputs, outputs, opsets, op counts, parameters and size of a model."""
    from optimizer_cli.report.listing import render_inspect
    from optimizer_cli.workflows.inspect import inspect_model

    info = inspect_model(model)
    if json_out:
        _emit_json(info)
        return
    render_inspect(info, Console())


@app.command("providers")
def providers_cmd(json_out: bool = typer.Option(False, "--json", help="Print one JSON document.")) -> None:
    """Every execution provider (built in or plugin): devices, usable here or why not, target options."""
    from optimizer_cli.report.listing import render_providers
    from optimizer_cli.runtime.providers import installed_plugins, installed_runtimes, provider_catalog

    rows = provider_catalog()
    doc = {"runtimes": installed_runtimes(), "plugins": installed_plugins(), "providers": rows}
    if json_out:
        _emit_json(doc)
        return
    render_providers(doc, Console())


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


def _fail(
    message: str, exit_code: int, json_mode: bool, path: str | None = None, details: dict[str, Any] | None = None
) -> None:
    """One line on stderr; with --json also one JSON document on stdout, so pipelines always parse something."""
    sys.stderr.write(f"error: {message}\n")
    if json_mode:
        _emit_json({"error": message, "exit_code": exit_code, "file": path, **(details or {})})
    sys.exit(exit_code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: `optimize MODEL ...` is `optimize run MODEL ...`; errors are one line, exit code by kind."""
    global _verbosity
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    json_mode = "--json" in args
    _verbosity = sum(VERBOSITY_FLAGS.get(a, 0) for a in args) + (1 if debug else 0)
    args = [a for a in args if a != "--debug" and a not in VERBOSITY_FLAGS]
    if args and args[0] not in SUBCOMMANDS and not args[0].startswith("-"):
        args.insert(0, "run")
    # Other libraries' warnings (onnxruntime.quantization's advice) stay hidden; our passes' warnings show.
    logging.basicConfig(level=logging.DEBUG if debug else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        level = logging.INFO if _verbosity > 0 else logging.ERROR if _verbosity < 0 else logging.WARNING
        logging.getLogger("optimizer_cli").setLevel(level)
    try:
        with _signals_interrupt() as caught:
            rv = app(args=args, prog_name="optimize", standalone_mode=False)
        if caught:  # typer turns KeyboardInterrupt into a silent 130: say it, and keep --json's one document
            _fail(*_SIGNAL_ERRORS[caught[0]], json_mode)
        sys.exit(rv if isinstance(rv, int) else 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except TyperException as exc:  # usage errors: bad flags, missing arguments
        _suggest_one(exc)
        show = getattr(exc, "show", None)
        if show and not json_mode:
            show()
            sys.exit(2)
        _fail(exc.format_message(), 2, json_mode)
    except typer.Abort:
        _fail("aborted", 130, json_mode)
    except OptimizerError as exc:
        if debug:
            traceback.print_exc()
        _fail(str(exc), exc.exit_code, json_mode, getattr(exc, "path", None), exc.details)
    except KeyboardInterrupt:
        _fail("interrupted", 130, json_mode)
    except OSError as exc:
        if debug:
            traceback.print_exc()
        if exc.errno not in DISK_ERRNOS:
            _fail(_internal(exc), 4, json_mode)
        where = f" {exc.filename}" if exc.filename else ""
        _fail(f"cannot write{where}: {exc.strerror or exc}", 2, json_mode, exc.filename)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        _fail(_internal(exc), 4, json_mode)


def _internal(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"internal error: {type(exc).__name__}: {first} (rerun with --debug for a traceback)"


# What a signal that stops a run prints and exits with (128 + the signal's number, as shells report it).
_SIGNAL_ERRORS: dict[int, tuple[str, int]] = {
    signal.SIGINT: ("interrupted", 130),
    signal.SIGTERM: ("terminated (SIGTERM)", 143),
}


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[list[int]]:
    """SIGINT and SIGTERM raise KeyboardInterrupt, so every finally block (staging folders, temporary files)
    runs; yields the signals caught, since typer answers a KeyboardInterrupt with a bare exit code."""
    import threading

    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signal handlers live on the main thread
        yield caught
        return

    def handler(signum: int, frame: Any) -> None:
        caught.append(signum)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in _SIGNAL_ERRORS}
    try:
        yield caught
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _suggest_one(exc: Exception) -> None:
    """An unknown option gets the one closest option as 'Did you mean --recipe?', not a list of candidates."""
    import difflib

    # typer's own copy of click's NoSuchOption: matched by its fields, not by the class.
    possibilities = getattr(exc, "possibilities", None)
    name = getattr(exc, "option_name", None)
    if possibilities and isinstance(name, str):
        best = difflib.get_close_matches(name, list(possibilities), n=1, cutoff=0.0)
        exc.message = f"No such option: {name}. Did you mean {best[0]}?"  # type: ignore[attr-defined]
        exc.possibilities = None  # type: ignore[attr-defined]
