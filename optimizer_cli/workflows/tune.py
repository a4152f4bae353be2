"""`optimize tune` as a library call: a typed request in, the tune.json document out (`TuneReport`).

`run_tune` checks the whole request before any model is loaded, runs one study per model (search.tune: the
Optuna search, then the final re-timing), writes each model's outputs (the winner and its recipe only when there
is a winner; tune.json, the Pareto picture and the HTML page always) and returns the report whose `to_dict()` is
the document `optimize tune --json` prints.

Progress goes to the listener: a 'line' per step worth a line (the first of each model's study carries
`data["model"]`, `data["study"]`, `data["trials"]` and `data["budget_s"]`), a 'trial' per finished trial, an
'info' for the files written, a 'warning' for run targets that are not searched. Nothing here prints, and an
interrupt (KeyboardInterrupt) propagates once the scratch study folder is removed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizer_cli.bench.gate import Gate, parse_gate
from optimizer_cli.errors import GateFailure, UserInputError
from optimizer_cli.outputs import OutputPlan, read_paths
from optimizer_cli.search.tune import Progress
from optimizer_cli.search.tune import TuneRequest as StudyRequest
from optimizer_cli.workflows.events import Event, Listener, TuneReport, ignore

SAMPLERS = ("tpe", "nsga2")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


@dataclass
class TuneRequest:
    """Everything a tune is asked: the parameters of `optimize tune`, by their Python names.

    `model` is one model or several (one study each: the outputs go to the folder `output`, default 'tuned',
    and the studies to `study`/<model name>). `goals` must hold for the winner ('cosine>=0.99'); `budget` is
    the wall time of each study in seconds or as '90s', '15m', '1h'; with `trials` too, whichever ends first.
    `names` says how error messages name each parameter (the CLI passes its flags: {"goals": "--goal", ...});
    by default they name the parameters.
    """

    model: Path | str | Sequence[Path | str]
    data: str  # held-out evaluation data (never overlapping `calib`)
    goals: Sequence[str | Gate]
    calib: str | None = None
    output: Path | str | None = None  # the winner model (several models: a folder)
    budget: float | str | None = None
    trials: int | None = None
    space: Path | str | None = None  # YAML: dimension -> value or list of values to search
    providers: str | Sequence[str] | None = None  # run targets to search (default: the CPU EP alone)
    threads: int = 2
    study: Path | str | None = None  # folder of the Optuna study (resumable); a scratch folder otherwise
    resume: bool = False
    report_only: bool = False  # re-report a finished `study` without running anything
    sampler: str = "tpe"
    seed: int = 0
    executor: str = "local"  # local, ray (a local Ray) or ray://HOST:PORT
    eval_samples: int | None = None  # all of `data` by default: fewer make per-sample goals coarser
    dims: Mapping[str, int] = field(default_factory=dict)  # symbolic dim values for random calibration
    metric: str | None = None  # builtin:cer, builtin:miou, or module:function
    names: Mapping[str, str] = field(default_factory=dict)

    def models(self) -> list[Path]:
        return [Path(self.model)] if isinstance(self.model, str | Path) else [Path(m) for m in self.model]

    def name(self, parameter: str) -> str:
        """How messages name `parameter`: the caller's spelling (a CLI flag) or the parameter itself."""
        return self.names.get(parameter, parameter)


@dataclass
class _Study:
    """One model's study: where its winner goes and its study folder (None: a scratch folder of its own)."""

    model: Path
    output: Path
    study_dir: Path | None


@dataclass
class _Checked:
    goals: list[Gate]
    budget_s: float | None
    run_targets: tuple[str, ...]  # usable run targets to search (the CPU EP alone by default)
    studies: list[_Study]


def parse_duration(value: float | str | None, label: str = "budget") -> float | None:
    """600, '600', '90s', '15m', '1h' -> seconds; `label` names the parameter in messages."""
    if value is None:
        return None
    text = str(value).strip()
    body, unit = (text[:-1], text[-1]) if text and text[-1] in DURATION_UNITS else (text, "s")
    try:
        seconds = float(body) * DURATION_UNITS[unit]
    except ValueError:
        raise UserInputError(f"{label} '{value}': expected a duration like 600, 90s, 15m or 1h") from None
    if not seconds > 0:  # also refuses nan
        raise UserInputError(f"{label} '{value}': must be more than 0")
    return seconds


def sidecar_paths(output: Path) -> dict[str, Path]:
    """best.onnx -> best.recipe.yaml, best.tune.json, best.pareto.png, best.report.html beside it."""
    stem = output.with_suffix("")
    return {
        "recipe": stem.with_name(stem.name + ".recipe.yaml"),
        "json": stem.with_name(stem.name + ".tune.json"),
        "png": stem.with_name(stem.name + ".pareto.png"),
        "html": stem.with_name(stem.name + ".report.html"),
    }


def run_tune(request: TuneRequest, listener: Listener | None = None) -> TuneReport:
    """Check the request, tune each model, write its outputs; the report is what `optimize tune --json` prints
    (several models: {"kind": "tune-many", "studies": [...]}). Its exit_code is 1 when a model has no winner."""
    from optimizer_cli.search.executors import make_executor

    emit = listener or ignore
    checked = _check_request(request, emit)
    pool = make_executor(request.executor) if not request.report_only else None
    documents: list[dict[str, Any]] = []
    try:
        for study in checked.studies:
            documents.append(_tune_model(request, checked, study, pool, emit))
    finally:
        if pool is not None:
            pool.close()
    exit_code = GateFailure.exit_code if any(d["winner"] is None for d in documents) else 0
    document = documents[0] if len(documents) == 1 else {"kind": "tune-many", "studies": documents}
    return TuneReport(document, exit_code)


def _check_request(request: TuneRequest, emit: Listener = ignore) -> _Checked:
    """Every parameter and path checked before any model is loaded; unusable run targets are told (a warning)
    and skipped, unless none is left."""
    from optimizer_cli.runtime.providers import parse_provider_list, search_targets

    name = request.name
    goals = [g if isinstance(g, Gate) else parse_gate(g, name("goals")) for g in request.goals]
    if not goals:
        raise UserInputError(f"{name('goals')}: tune needs at least one goal, e.g. 'cosine>=0.99'")
    budget_s = parse_duration(request.budget, name("budget"))
    if budget_s is None and request.trials is None:
        raise UserInputError(f"tune needs {name('budget')} (e.g. 15m) or {name('trials')} (a number of trials)")
    _check_numbers(request)
    providers = request.providers
    listed = providers if providers is None or isinstance(providers, str) else ",".join(providers)
    run_targets, unusable = search_targets(parse_provider_list(listed or "cpu"))
    if unusable:  # said in one line; the search goes on with what is usable
        emit(Event("warning", f"tune: not searching {'; '.join(unusable)}"))
    if not run_targets:
        raise UserInputError(f"{name('providers')} '{listed}': no usable run target on this host")
    if request.sampler not in SAMPLERS:
        raise UserInputError(f"{name('sampler')} '{request.sampler}': expected tpe or nsga2")
    if (request.resume or request.report_only) and request.study is None:
        raise UserInputError(
            f"{name('resume')} and {name('report_only')} need {name('study')} (the folder of the study)"
        )
    executor = request.executor
    if executor not in ("local", "ray") and not executor.startswith("ray://"):
        raise UserInputError(f"{name('executor')} '{executor}': expected local, ray or ray://HOST:PORT")
    space = Path(request.space) if request.space is not None else None
    if space is not None and not space.is_file():
        raise UserInputError(f"{name('space')}: file not found", space)
    studies = _studies(request)
    inputs: dict[str, str | Path | None] = {name("data"): request.data, name("calib"): request.calib}
    inputs[name("space")] = space
    for study in studies:
        if not study.model.exists():
            raise UserInputError("file not found", study.model)
        reports = {f"{name('output')} ({k})": p for k, p in sidecar_paths(study.output).items()}
        plan = OutputPlan(model=study.output, reports=reports, model_flag=name("output"))
        plan.check(read_paths(study.model, inputs))
    if request.study is not None:
        _check_study(request, studies, inputs)
    return _Checked(goals, budget_s, tuple(run_targets), studies)


def _check_numbers(request: TuneRequest) -> None:
    """The counts a CLI's option types already bound (the Python API checks them here)."""
    counts = {"trials": request.trials, "threads": request.threads, "eval_samples": request.eval_samples}
    for parameter, value in counts.items():
        if value is not None and value < 1:
            raise UserInputError(f"{request.name(parameter)}: must be at least 1, not {value}")
    if request.seed < 0:
        raise UserInputError(f"{request.name('seed')}: must be 0 or more, not {request.seed}")
    for dim, size in request.dims.items():
        if size < 1:
            raise UserInputError(f"{request.name('dims')} '{dim}={size}': the size must be at least 1")


def _studies(request: TuneRequest) -> list[_Study]:
    """Each model's winner path and study folder: one model writes to `output` (default MODEL.tuned.onnx) and
    studies in `study`; several write to the folder `output` (default 'tuned') and study in `study`/NAME."""
    models = request.models()
    study_root = Path(request.study) if request.study is not None else None
    if len(models) == 1:
        model = models[0]
        output = Path(request.output) if request.output is not None else model.with_name(model.stem + ".tuned.onnx")
        return [_Study(model, output, study_root)]
    if len({m.stem for m in models}) != len(models):
        raise UserInputError("several models share a file name: tune them one at a time")
    folder = Path(request.output) if request.output is not None else Path("tuned")
    if folder.suffix == ".onnx":
        raise UserInputError(f"{request.name('output')} must name a folder when several models are tuned", folder)
    return [
        _Study(m, folder / f"{m.stem}.onnx", study_root / m.stem if study_root is not None else None) for m in models
    ]


def _check_study(request: TuneRequest, studies: list[_Study], inputs: dict[str, str | Path | None]) -> None:
    """Each model's study folder: a study to resume, or new or empty; never the model, the outputs or the data."""
    from optimizer_cli.search.study_folder import check_study_folder

    name = request.name
    for study in studies:
        assert study.study_dir is not None  # request.study is set: every model has its folder
        clashes = {"the input model": study.model, name("output"): study.output}
        clashes |= {f"{name('output')} ({k})": p for k, p in sidecar_paths(study.output).items()}
        clashes |= {label: Path(value) for label, value in inputs.items() if value is not None}
        check_study_folder(study.study_dir, request.resume or request.report_only, clashes)
    root = Path(str(request.study))
    if root.exists() and not root.is_dir():  # several models: the studies' parent folder
        raise UserInputError(f"{name('study')} must be a folder, and this is a file", root)


def _study_request(request: TuneRequest, checked: _Checked, study: _Study) -> StudyRequest:
    from optimizer_cli.search.tune import portable_data

    study_dir = study.study_dir or Path(tempfile.mkdtemp(prefix="optimize-tune-"))
    return StudyRequest(
        scratch=study.study_dir is None,
        model=study.model,
        goals=checked.goals,
        # Absolute: the winner's recipe names its calibration data, and must name it from any folder.
        evaluation=portable_data(request.data) or request.data,
        calibration=portable_data(request.calib),
        study_dir=study_dir,
        targets=checked.run_targets,
        threads=request.threads,
        budget_s=checked.budget_s,
        trials=request.trials,
        resume=request.resume or request.report_only,
        sampler=request.sampler,
        seed=request.seed,
        space_file=Path(request.space) if request.space is not None else None,
        dims=dict(request.dims),
        eval_samples=request.eval_samples,
        metric=request.metric,
    )


def _tune_model(request: TuneRequest, checked: _Checked, study: _Study, pool: Any, emit: Listener) -> dict[str, Any]:
    """One model's study, then its outputs; a scratch study folder is removed whatever happens."""
    from optimizer_cli.search.tune import prepare, report_again
    from optimizer_cli.search.tune import run_tune as run_study

    settings_request = _study_request(request, checked, study)
    # Only the folder this run made for itself is scratch; a `study` folder is the user's, whatever its name.
    scratch = settings_request.scratch

    def line(text: str) -> None:
        emit(Event("line", text))

    try:
        goals = ", ".join(g.expression for g in checked.goals)
        # What a display needs for this study: its bar's length, and the folder to resume after an interrupt.
        started = {
            "model": str(study.model),
            "study": None if scratch else str(settings_request.study_dir),
            "trials": request.trials,
            "budget_s": checked.budget_s,
        }
        emit(Event("line", f"tuning {study.model} for {goals}", started))
        settings = prepare(settings_request, line)
        if request.report_only:
            document, winner = report_again(settings)
        else:
            document, winner = run_study(settings, pool, on_progress=lambda p: emit(trial_event(p)), log=line)
        if scratch:
            document["study"] = None  # removed after this run: the report names no folder that will not exist
        write_tune_outputs(document, winner, study.output, emit, request.name("output"))
        return document
    finally:
        if scratch:
            shutil.rmtree(settings_request.study_dir, ignore_errors=True)


def trial_event(progress: Progress) -> Event:
    """A finished trial: the text says the trial, `data["status"]` the search so far (trials, best, time left);
    `data` also carries the trial entry (`last`), the best so far, `done`, `total` and `seconds_left`."""
    last, best = progress.last, progress.best
    text = f"trial {last['number']}: {last['recipe_summary']}: {last['state']}"
    if last.get("speedup"):
        text += f" {last['speedup']['median']:.2f}x"
    if last.get("fidelity"):
        text += f", cosine {last['fidelity']['cosine']:.4f}"
    if last.get("reason") and last["state"] != "timed":
        text += f" ({last['reason']})"
    best_text = (
        f"best {best['speedup']['median']:.2f}x @ cosine {best['fidelity']['cosine']:.4f}"
        if best
        else "no timed candidate yet"
    )
    left = f", {progress.seconds_left / 60:.1f} min left" if progress.seconds_left is not None else ""
    data = {
        "last": last,
        "best": best,
        "done": progress.done,
        "total": progress.total,
        "seconds_left": progress.seconds_left,
        "status": f"{progress.done} trials, {best_text}{left}",
    }
    return Event("trial", text, data)


def write_tune_outputs(
    document: dict[str, Any], winner: Path | None, output: Path, emit: Listener = ignore, output_name: str = "output"
) -> None:
    """Pictures and documents always; the winner and its recipe only when there is one (each written atomically).
    Adds the paths written to `document["outputs"]` and the deployment snippet naming `output`."""
    from optimizer_cli.outputs import write_bytes_atomic, write_text_atomic
    from optimizer_cli.report.html import tune_html
    from optimizer_cli.report.plot import attribution_png, pareto_png

    paths = sidecar_paths(output)
    document["outputs"] = {k: str(v) for k, v in paths.items()} | {"model": str(output) if winner else None}
    if winner is None:
        del document["outputs"]["recipe"]
    elif document["winner"].get("deploy"):  # the session snippet names the model where it is written
        from optimizer_cli.runtime.targets import deployment_snippet, parse_target

        deploy = document["winner"]["deploy"]
        deploy["python"] = deployment_snippet(
            parse_target(deploy["target"]), str(output.resolve()), deploy["threads"], deploy["session"]
        )
    pareto = pareto_png(document)
    attribution = attribution_png(document["winner"]) if document["winner"] else None
    if winner is not None:
        _write_winner(document, winner, output, paths["recipe"], output_name)
        emit(Event("info", f"wrote {output} and {paths['recipe']}"))
    write_bytes_atomic(paths["png"], pareto)
    write_text_atomic(paths["html"], tune_html(document, pareto, attribution))
    write_text_atomic(paths["json"], json.dumps(document, indent=2, default=str) + "\n")


def _write_winner(document: dict[str, Any], winner: Path, output: Path, recipe_path: Path, output_name: str) -> None:
    """The winner model (and its external data) moved into place at once, then its recipe with a header that
    says how to reproduce it."""
    import yaml

    from optimizer_cli.model_io import data_file_of
    from optimizer_cli.outputs import write_text_atomic
    from optimizer_cli.search.tune import reproduce_command

    plan = OutputPlan(model=output, model_flag=output_name)
    try:
        staged = plan.staged_model()
        shutil.copyfile(winner, staged)
        if data_file_of(winner).exists():
            shutil.copyfile(data_file_of(winner), data_file_of(staged))
        plan.commit_model()
    finally:
        plan.discard()
    recipe = document["winner"]["recipe"]
    command = reproduce_command(
        document["model"],
        recipe_path,
        (recipe.get("data") or {}).get("calibration"),
        document.get("evaluation"),
        document.get("evaluation_samples"),
    )
    header = (
        f"# Found by optimize tune for {document['model']} (goals: {', '.join(document['goals'])}).\n"
        f"# Reproduce: {command}\n"
    )
    write_text_atomic(recipe_path, header + yaml.safe_dump(recipe, sort_keys=False))
