"""The Python API: what the `optimize` command does, as functions that return reports and never print.

    from optimizer_cli import optimize, load_recipe
    report = optimize("m.onnx", load_recipe("int8"), output="o.onnx", calib="c.npz", data="d.npz", providers="cpu")
    report.to_dict()  # the document `optimize run m.onnx --recipe int8 -o o.onnx ... --json` prints

Paths are str or Path; `providers` is a list (['cpu', 'openvino']) or a comma string ('cpu,openvino'). Bad input
raises UserInputError (optimizer_cli.errors) naming the parameter; a pass that breaks its contract raises
VerificationError. A violated gate or an unmet goal is not an exception: the report's `passed` is False.
Progress goes to `listener` (a callable taking an optimizer_cli.workflows.events.Event), if given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer_cli.errors import OptimizerError
from optimizer_cli.passes import register_pass, unregister_pass
from optimizer_cli.workflows.events import BenchReport, Event, Listener, RunReport, TuneReport

if TYPE_CHECKING:
    from optimizer_cli.recipe import Recipe

__all__ = [
    "BenchReport",
    "Event",
    "Listener",
    "RunReport",
    "TuneReport",
    "benchmark",
    "load_recipe",
    "optimize",
    "register_pass",
    "tune",
    "unregister_pass",
]

# What the lower layers' messages call an input, as the Python parameter that gave it.
_FLAG_PARAMETERS = {
    "--calib-samples": "calib_samples",
    "--calib": "calib",
    "--data": "data",
    "--fail-if": "fail_if",
    "--metric": "metric",
    "--sweep": "sweep",
    "--set": "overrides",
    "--strict-ep": "strict_ep",
    "--allow-code": "allow_code",
    "--goal": "goals",
    "--study": "study",
    "--executor": "executor",
}


@contextlib.contextmanager
def _speaking_parameters() -> Iterator[None]:
    """Errors raised below the workflows (data loaders, gate and sweep parsers) were written for the CLI and
    name its flags: a library call's error names the parameter instead (`--fail-if 'x'` -> `fail_if 'x'`)."""
    import re

    pattern = re.compile("|".join(re.escape(flag) for flag in _FLAG_PARAMETERS) + r"(?![\w-])")
    try:
        yield
    except OptimizerError as exc:
        text = str(exc)
        said = pattern.sub(lambda m: _FLAG_PARAMETERS[m.group(0)], text)
        if said != text:
            exc.args = (said, *exc.args[1:])
        raise


@contextlib.contextmanager
def _quiet_stdout(listener: Listener | None) -> Iterator[Listener | None]:
    """What libraries print() during the work (onnxruntime's calibrators' progress) is dropped: a library call
    writes nothing on the caller's stdout. Yields the listener to give the workflow: it runs with the caller's
    stdout back, so a listener that prints is seen."""
    import io
    import sys

    caller = sys.stdout

    def deliver(event: Event) -> None:
        assert listener is not None
        with contextlib.redirect_stdout(caller):
            listener(event)

    with contextlib.redirect_stdout(io.StringIO()):
        yield deliver if listener is not None else None


def _path(value: str | Path | None) -> Path | None:
    return Path(value) if value is not None else None


def _data(value: str | Path | None) -> str | None:
    """A data spec: a file or folder path, 'random' or file.py:function (a spec, kept as text)."""
    return str(value) if value is not None else None


def load_recipe(path_or_preset: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe: a YAML file, else a shipped preset of that name (a file always wins, as --recipe).

    Parameters: path_or_preset: a recipe file, or a preset's name such as 'int8' (`optimize recipes` lists them);
    overrides: 'KEY=VALUE' assignments applied on top ('passes.1.mode=static').
    Returns: the validated optimizer_cli.recipe.Recipe (it remembers its file, so a run's report names it).
    Raises: UserInputError when there is no such file or preset, or the recipe is invalid.
    """
    from optimizer_cli.recipe import load_recipe as read
    from optimizer_cli.recipe import resolve_recipe
    from optimizer_cli.workflows.run import remember_source

    with _speaking_parameters():
        source = resolve_recipe(path_or_preset)[0]
        return remember_source(read(source, list(overrides)), source)


def optimize(
    model: str | Path,
    recipe: Recipe | str | Path,
    *,
    output: str | Path | None = None,
    calib: str | Path | None = None,
    data: str | Path | None = None,
    providers: str | Sequence[str] | None = None,
    threads: int | None = None,
    bench: bool = True,
    listener: Listener | None = None,
    **more: Any,
) -> RunReport:
    """Run a recipe on a model: every pass verified, the result saved, then benchmarked against the original.

    Parameters: model: the input .onnx (never modified). recipe: a Recipe (load_recipe), a recipe file or a
    preset's name. output: the optimized model (default: MODEL.opt.onnx beside it). calib / data: calibration and
    evaluation data (.npz, a folder of .npy/.npz, file.py:function; calib may be 'random'). providers: run
    targets to benchmark (default: the recipe's, else every usable one). threads: intra-op threads (default: the
    recipe's). bench: benchmark original vs optimized. listener: receives progress events.
    more: the other fields of optimizer_cli.workflows.run.RunRequest: fail_if (gate expressions), baseline,
    report_path, markdown, attribute, memory, metric, sweep, eval_samples, calib_samples, overrides, strict_ep,
    allow_code, allow_nonfinite, allow_cast, hashes.
    Returns: a RunReport; to_dict() is the `optimize run --json` document; passed is False (and the model is not
    written) when a fail_if gate was violated.
    Raises: UserInputError (bad input, before any work), VerificationError (a pass broke its contract).
    """
    from optimizer_cli.workflows.run import RunRequest, run_optimize

    request = _request(
        RunRequest,
        {
            "model": Path(model),
            "recipe": recipe,
            "output": _path(output),
            "calib": _data(calib),
            "data": _data(data),
            "providers": providers,
            "threads": threads,
            "bench": bench,
        },
        more,
        paths=("baseline", "markdown", "report_path"),
    )
    with _speaking_parameters(), _quiet_stdout(listener) as deliver:
        return run_optimize(request, deliver)


def benchmark(
    original: str | Path,
    optimized: str | Path,
    *,
    data: str | Path | None = None,
    providers: str | Sequence[str] | None = None,
    threads: int = 2,
    rounds: int = 10,
    listener: Listener | None = None,
    **more: Any,
) -> BenchReport:
    """Benchmark two existing models side by side: latency, accuracy, fidelity, memory and size.

    Parameters: original: the reference model. optimized: the model compared with it (same inputs and
    outputs). data: evaluation data (default: seeded random inputs). providers: run targets (default: every
    usable one). threads: intra-op threads of both sessions. rounds: interleaved timing rounds (at least 2).
    listener: receives progress events. more: the other fields of optimizer_cli.workflows.bench.BenchRequest:
    fail_if, baseline, report_path, markdown, memory, metric, sweep, dims ({'batch': 1}), eval_samples,
    strict_ep, allow_nonfinite, allow_cast, hashes.
    Returns: a BenchReport; to_dict() is the `optimize bench --json` document.
    Raises: UserInputError (a missing file, models whose signatures differ, bad data or parameters).
    """
    from optimizer_cli.workflows.bench import BenchRequest, run_benchmark

    request = _request(
        BenchRequest,
        {
            "original": Path(original),
            "optimized": Path(optimized),
            "data": _data(data),
            "providers": providers,
            "threads": threads,
            "rounds": rounds,
        },
        more,
        paths=("baseline", "markdown", "report_path"),
    )
    with _speaking_parameters(), _quiet_stdout(listener) as deliver:
        return run_benchmark(request, deliver)


def tune(
    model: str | Path | Sequence[str | Path],
    *,
    data: str | Path,
    goals: Sequence[str] = (),
    calib: str | Path | None = None,
    budget: float | str | None = None,
    trials: int | None = None,
    providers: str | Sequence[str] | None = None,
    output: str | Path | None = None,
    listener: Listener | None = None,
    **more: Any,
) -> TuneReport:
    """Search recipes for the fastest model that meets every goal; prove the speedup; write it and its recipe.

    Parameters: model: one model or several (one study each; output is then a folder). data: held-out evaluation
    data. goals: what must hold for the winner ('cosine>=0.99', 'accuracy_drop<=1%'); at least one. calib:
    calibration data (never overlapping data). budget: wall time per model, seconds or '90s', '15m', '1h'.
    trials: trials per model (with budget: whichever ends first; one of them is needed). providers: run targets
    to search (default: the CPU EP). output: the winner model (default: MODEL.tuned.onnx). listener: receives
    progress events ('trial' per finished trial). more: the other fields of
    optimizer_cli.workflows.tune.TuneRequest: space, threads, study, resume, report_only, sampler, seed,
    executor, eval_samples, dims, metric.
    Returns: a TuneReport; to_dict() is tune.json (`optimize tune --json`); winner is None (passed False) when
    no candidate met the goals.
    Raises: UserInputError (bad input, before any model is loaded).
    """
    from optimizer_cli.workflows.tune import TuneRequest, run_tune

    models = [str(m) for m in model] if not isinstance(model, (str, Path)) else str(model)
    fields = {
        "model": models,
        "data": str(data),
        "goals": list(goals),
        "calib": _data(calib),
        "budget": budget,
        "trials": trials,
        "providers": providers,
        "output": _path(output),
    }
    request = _request(TuneRequest, fields, more, paths=("space", "study"))
    with _speaking_parameters(), _quiet_stdout(listener) as deliver:
        return run_tune(request, deliver)


def _request(kind: Any, given: dict[str, Any], more: Mapping[str, Any], *, paths: Sequence[str]) -> Any:
    """A workflow's request from a call's arguments: `more` must name its fields (a typo is an error naming it),
    and the path fields among them accept str."""
    import dataclasses

    from optimizer_cli.errors import UserInputError

    known = {f.name for f in dataclasses.fields(kind)} - {"names", "command"}
    unknown = sorted(set(more) - known)
    if unknown:
        raise UserInputError(f"unknown parameter(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    extra = {k: (_path(v) if k in paths else v) for k, v in more.items()}
    return kind(**given, **extra)
