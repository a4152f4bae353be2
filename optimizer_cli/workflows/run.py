"""`optimize run` as a library call: a recipe's passes on a model, verified, saved, benchmarked and gated.

`run_optimize(RunRequest(...), listener)` checks everything it can before loading the model, runs the pipeline
into a staging folder, benchmarks original vs optimized, attributes lost fidelity to layers, evaluates the gates
and commits the model and its reports together. It never prints: progress goes to the listener, the result is a
RunReport whose to_dict() is the `--json` document.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer_cli.errors import UserInputError, VerificationError
from optimizer_cli.workflows.common import (
    PARAMETER_NAMES,
    BenchOptions,
    Checked,
    Progress,
    bench_settings,
    benchmark_into,
    check_providers,
    finish,
    label,
    parse_gates,
    preflight,
    provider_text,
    python_command,
    quiet_runtime,
)
from optimizer_cli.workflows.events import Listener, RunReport

if TYPE_CHECKING:
    from optimizer_cli.recipe import Recipe

# Where load_recipe() records the file a Recipe object was read from (its path and preset go in the report).
_SOURCE_ATTRIBUTE = "_optimizer_cli_source"


@dataclass
class RunRequest:
    """Everything `optimize run` takes, as data.

    model: the input .onnx (never modified). recipe: a Recipe object, a recipe file, or a preset's name (a file
    wins). output: the optimized model (default: MODEL.opt.onnx beside the model). calib / data: calibration and
    evaluation data specs (.npz, a folder, file.py:function; 'random' for calib). providers: run targets to
    benchmark, a list or a comma string (default: the recipe's, else every usable one). threads: intra-op
    threads (default: the recipe's benchmark.threads). bench: benchmark original vs optimized. fail_if: gate
    expressions ('speedup<1.5'); a violated one keeps the model unwritten and exit_code 1. baseline: a stored
    JSON report to compare with. report_path / markdown: also write the JSON / Markdown report. attribute: find
    the layers that cost fidelity. memory: measure peak session memory. overrides: recipe KEY=VALUE overrides.
    calib_samples: calibration samples read and used. allow_code: run the loaders the recipe names.
    allow_nonfinite / allow_cast: accept data with NaN/Inf / exactly castable integers. hashes: record the
    models' SHA-256 in the report. command: what the report's `command` says (default: the Python call).
    names: how messages name the parameters (the CLI passes its flags).
    """

    model: Path
    recipe: Recipe | str | Path
    output: Path | None = None
    calib: str | None = None
    data: str | None = None
    providers: str | Sequence[str] | None = None
    strict_ep: bool = False
    threads: int | None = None
    bench: bool = True
    sweep: Sequence[str] = ()
    eval_samples: int = 256
    metric: str | None = None
    fail_if: Sequence[str] = ()
    baseline: Path | None = None
    attribute: bool = True
    memory: bool = True
    markdown: Path | None = None
    report_path: Path | None = None
    overrides: Sequence[str] = ()
    calib_samples: int | None = None
    allow_code: bool = False
    allow_nonfinite: bool = False
    allow_cast: bool = False
    hashes: bool = True
    command: str | None = None
    names: Mapping[str, str] = field(default_factory=lambda: dict(PARAMETER_NAMES))


def remember_source(recipe: Recipe, source: Path) -> Recipe:
    """Record on a Recipe object the file it was read from, so a run's report names its path and preset."""
    setattr(recipe, _SOURCE_ATTRIBUTE, source)
    return recipe


def recipe_source(request: RunRequest) -> Path | None:
    """The recipe's file: the one named (a file, else the preset of that name) or the one a Recipe came from."""
    from optimizer_cli.recipe import resolve_recipe

    if isinstance(request.recipe, (str, Path)):
        return resolve_recipe(request.recipe)[0]
    return getattr(request.recipe, _SOURCE_ATTRIBUTE, None)


def resolved_recipe(request: RunRequest, source: Path | None) -> Recipe:
    """The recipe with the overrides applied; threads is its benchmark.threads (so the report records what was
    asked); calib_samples N makes the run read N samples and every pass that calibrates use them all."""
    from optimizer_cli.recipe import Recipe, load_recipe, parse_recipe

    def load(overrides: list[str]) -> Recipe:
        if isinstance(request.recipe, (str, Path)):
            return load_recipe(source or Path(request.recipe), overrides)
        if not isinstance(request.recipe, Recipe):
            raise UserInputError(
                f"{label(request.names, 'recipe')}: expected a Recipe, a recipe file or a preset's name, "
                f"got {type(request.recipe).__name__}"
            )
        # Validated again as a file would be, so an override or an edit made in code is checked the same way.
        text = json.dumps(request.recipe.model_dump(mode="json"))
        return parse_recipe(text, str(source or "<recipe>"), overrides)

    threads = request.threads
    overrides = [*request.overrides, *([f"benchmark.threads={threads}"] if threads is not None else [])]
    rec = load(overrides)
    if request.calib_samples is None:
        return rec
    fields = ["data.calibration_samples"] + [
        f"passes.{i}.calibration_samples"
        for i, p in enumerate(rec.passes)
        if "calibration_samples" in type(p).model_fields
    ]
    return load([*overrides, *(f"{f}={request.calib_samples}" for f in fields)])


def output_for(model: Path, output: Path | None) -> Path:
    """`output`, else MODEL.opt.onnx beside the model (a folder has no name to derive one from)."""
    if model.name in ("", ".", "..") or model.is_dir():
        raise UserInputError("is a directory, expected an .onnx file", model)
    return output or model.with_name(model.stem + ".opt.onnx")


def code_consent(rec: Any, request: RunRequest, source: Path | None, *, refuse: bool) -> str | None:
    """Code the recipe names that nobody consented to (None: none); with `refuse`, a UserInputError naming it.
    A shared recipe's loader is code: it runs only with allow_code or the same loader given as calib / data."""
    from optimizer_cli.recipe import code_consent_problem, set_values, unconsented_code

    refs = unconsented_code(
        rec,
        allow_code=request.allow_code,
        calibration=request.calib,
        evaluation=request.data,
        providers=provider_text(request.providers),
        command_line=set_values(list(request.overrides)),
    )
    problem = code_consent_problem(refs) if refs else None
    if problem is not None and refuse:
        raise UserInputError(problem, source)
    return problem


def plan_run(request: RunRequest) -> RunReport:
    """What a run would do, without loading the model (the CLI's --dry-run): the passes, data, settings and every
    problem found (exit_code 2 when there is one)."""
    from optimizer_cli.passes import PASS_REGISTRY, RunInputs
    from optimizer_cli.pipeline import requirement_problems
    from optimizer_cli.recipe import preset_of

    source = recipe_source(request)
    rec = resolved_recipe(request, source)
    output = output_for(request.model, request.output)
    code = code_consent(rec, request, source, refuse=False)
    parse_gates(request.fail_if, request.names)
    calib = request.calib or rec.data.calibration
    data = request.data or rec.data.evaluation
    problems = requirement_problems(rec, RunInputs(calibration=calib, evaluation=data))
    if code is not None:  # said, never run: a plan imports nothing
        problems.append(code)
    if not request.model.exists():
        problems.insert(0, f"{request.model}: file not found")
    plan = {
        "input": str(request.model),
        "output": str(output),
        "recipe": rec.name,
        "recipe_path": str(source) if source is not None else None,
        "preset": preset_of(source) if source is not None else None,
        "passes": [
            {"index": i, "type": p.type, "exactness": PASS_REGISTRY[p.type].exactness.value, "config": p.model_dump()}
            for i, p in enumerate(rec.passes)
        ],
        "calibration": calib,
        "evaluation": data,
        "verify": rec.verify.model_dump(),
        "benchmark": rec.benchmark.model_dump(),
        "session": rec.session.model_dump(),
        "problems": problems,
    }
    return RunReport(plan, exit_code=UserInputError.exit_code if problems else 0)


@dataclass
class _Prepared:
    """A request checked and resolved: what the work needs."""

    source: Path | None
    rec: Any
    output: Path
    checks: Checked
    settings: Any
    benchmarking: bool


def _prepare(request: RunRequest) -> _Prepared:
    """Everything that can be checked without loading the model is checked now, before any work or any write."""
    names = request.names
    source = recipe_source(request)
    rec = resolved_recipe(request, source)
    output = output_for(request.model, request.output)
    code_consent(rec, request, source, refuse=True)
    benchmarking = request.bench and rec.benchmark.enabled
    inputs = {
        label(names, "recipe"): source,
        label(names, "calib"): request.calib or rec.data.calibration,
        label(names, "data"): request.data or rec.data.evaluation,
    }
    checks = preflight(
        request.model,
        output,
        inputs,
        fail_if=request.fail_if,
        baseline=request.baseline,
        metric=request.metric,
        markdown=request.markdown,
        report_path=request.report_path,
        benchmarking=benchmarking,
        names=names,
        metrics=rec.metrics,
    )
    options = BenchOptions(request.providers, request.strict_ep, request.sweep, request.eval_samples, request.memory)
    settings = bench_settings(rec, options, rec.benchmark.threads)
    check_providers(settings, checks.gates, names)
    _check_declared_kinds(request.model, rec, checks.gates)
    _check_sweep(request.model, settings, benchmarking)
    return _Prepared(source, rec, output, checks, settings, benchmarking)


def run_optimize(request: RunRequest, listener: Listener | None = None) -> RunReport:
    """Run the request's recipe on its model: verify every pass, benchmark, gate, and commit the model and reports.

    Returns a RunReport (exit_code 1 when a fail_if gate was violated: the model is then not written).
    Raises UserInputError for bad input (before any work), VerificationError when a pass breaks its contract
    (its details carry a verified recipe patch when attribution finds one).
    """
    from optimizer_cli.data import DataPolicy

    progress = Progress(listener)
    prepared = _prepare(request)
    quiet_runtime()
    plan = prepared.checks.plan
    policy = DataPolicy(allow_nonfinite=request.allow_nonfinite, allow_cast=request.allow_cast)
    try:
        staged = plan.staged_model()
        with _disk_errors(label(request.names, "output"), prepared.output):
            try:
                document = _optimize_and_measure(request, prepared, staged, policy, progress)
            except VerificationError as exc:
                if request.attribute and not (request.allow_nonfinite or request.allow_cast):
                    _attribute_failure(exc, request, prepared.rec, progress)  # re-reads the data, strictly
                raise
        exit_code = finish(document, prepared.checks, progress, request.names)
    finally:
        plan.discard()
    return RunReport(document, exit_code=exit_code)


def _disk_errors(name: str, path: Path | None) -> Any:
    from optimizer_cli.outputs import disk_errors

    return disk_errors(name, path)


def _optimize_and_measure(
    request: RunRequest, prepared: _Prepared, staged: Path, policy: Any, progress: Progress
) -> dict[str, Any]:
    """The work of `run`: passes (saved to the staging path), then benchmark and attribution."""
    from concurrent.futures import ThreadPoolExecutor

    from optimizer_cli.model_io import model_sha256
    from optimizer_cli.pipeline import run_pipeline

    rec, model = prepared.rec, request.model

    def on_stage(stage: Any) -> None:
        cos = stage.worst_cosine()
        progress.line(
            f"{stage.name}: {stage.seconds:.2f}s, {stage.nodes} nodes"
            + (f", cosine vs original {cos:.5f}" if cos is not None else "")
        )

    _say_recipe(prepared.source, progress)
    progress.step("loading and checking the model")
    # The input's hash reads the whole file (seconds for a model over 2 GB): on the second core, meanwhile.
    input_hash = None
    if request.hashes:
        hashing = ThreadPoolExecutor(max_workers=1)
        input_hash = hashing.submit(model_sha256, model)
        hashing.shutdown(wait=False)
    result = run_pipeline(
        model,
        rec,
        staged,
        calibration=request.calib,
        evaluation=request.data,
        threads=rec.benchmark.threads,
        eval_samples=prepared.settings.eval_samples,
        on_stage=on_stage,
        on_start=lambda i, text: progress.step(f"pass {i + 1} of {len(rec.passes)}: {text}"),
        logger=logging.getLogger("optimizer_cli"),
        on_progress=progress.step,
        data_policy=policy,
    )
    document = _run_document(request, prepared, staged, result, input_hash.result() if input_hash else None)
    if prepared.benchmarking:
        _measure(document, request, prepared, staged, result, progress)
    return document


def _run_document(
    request: RunRequest, prepared: _Prepared, staged: Path, result: Any, input_hash: str | None
) -> dict[str, Any]:
    """The report of the passes: provenance, recipe, sizes, stages, the verification samples, notes."""
    from optimizer_cli.recipe import preset_of
    from optimizer_cli.workflows.common import provenance

    source = prepared.source
    command = request.command or _python_call(request)
    return {
        **provenance(request.model, staged, request.hashes, command, input_hash),
        "output": str(prepared.output),
        "recipe": {
            "path": str(source) if source is not None else None,
            "preset": preset_of(source) if source is not None else None,
            **prepared.rec.model_dump(mode="json"),
        },
        "input_bytes": result.input_bytes,
        "output_bytes": result.output_bytes,
        "stages": [s.as_dict() for s in result.stages],
        # The samples every stage's drift (the stage table's cosine) was read on: fewer than the benchmark's.
        "verification": {"samples": len(result.verify_data), "source": result.verify_data.source},
        "notes": list(result.notes),
    }


def _python_call(request: RunRequest) -> str:
    recipe = request.recipe if isinstance(request.recipe, (str, Path)) else getattr(request.recipe, "name", None)
    return python_command(
        "optimize",
        {
            "model": str(request.model),
            "recipe": str(recipe),
            "output": str(request.output) if request.output else None,
            "calib": request.calib,
            "data": request.data,
            "providers": provider_text(request.providers),
            "threads": request.threads,
            "overrides": list(request.overrides),
        },
    )


def _measure(
    document: dict[str, Any], request: RunRequest, prepared: _Prepared, staged: Path, result: Any, progress: Progress
) -> None:
    """Benchmark original vs optimized, then (unless asked not to) attribute lost fidelity to layers."""
    names = request.names
    eval_data = result.evaluation if result.evaluation is not None else result.verify_data
    if result.evaluation is None and not eval_data.is_random:
        document["notes"].append(_calibration_eval_note(eval_data, label(names, "data")))
    timed = _runnable_original(request.model, staged.parent / "original", document["notes"])
    rec = prepared.rec
    metric = prepared.checks.metric
    benchmark_into(document, timed, staged, prepared.settings, eval_data, metric, rec.data.dims, progress.line)
    if request.attribute and (request.allow_nonfinite or request.allow_cast):
        # Attribution re-runs the pipeline from the data specs under the default (strict) load checks.
        allowed = f"{label(names, 'allow_nonfinite')} or {label(names, 'allow_cast')}"
        document["notes"].append(f"attribution skipped: it does not run with {allowed}")
    elif request.attribute:
        _attribution_into(document, request, rec, staged, eval_data, progress)


def _calibration_eval_note(eval_data: Any, data_name: str) -> str:
    """Without evaluation data the benchmark scores the verification samples, drawn from the calibration data: a
    top-1 there is not the model's accuracy on held-out data."""
    return (
        f"no {data_name}: accuracy and fidelity were read on the {len(eval_data)} verification samples of the "
        f"calibration data ({eval_data.source}), which the model was calibrated on; give {data_name} for held-out "
        "figures"
    )


def _runnable_original(model: Path, folder: Path, notes: list[str]) -> Path:
    """The original as onnxruntime can load it: the file itself, or (IR newer than onnxruntime reads, two nodes
    of one name) a copy with the pipeline's own normalization in `folder`, the staging folder's, said in a note."""
    import onnx_ir as ir

    from optimizer_cli.model_io import external_data_files, load_model, runtime_problem, save_model
    from optimizer_cli.pipeline import normalize

    problem = runtime_problem(ir.load(model))  # memory-maps external data: cheap
    if problem is None:
        return model
    normalized = load_model(model)
    normalize(normalized)
    copy = folder / model.name
    save_model(normalized, copy, external_data=bool(external_data_files(model)) or None)
    notes.append(f"the original was timed as normalized the way the passes see it: {problem.split(';')[0]}")
    return copy


def _attribution_into(
    document: dict[str, Any], request: RunRequest, rec: Any, staged: Path, eval_data: Any, progress: Progress
) -> None:
    from optimizer_cli.search.attribution import MAX_SAMPLES, attribute_if_needed

    found = attribute_if_needed(
        document,
        request.model,
        staged,
        rec,
        eval_data,
        request.calib,
        request.data,
        rec.benchmark.threads,
        log=progress.line,
    )
    if found:
        if found.get("nodes"):  # ranked by the mean cosine over the first few samples, not the benchmark's min
            found["ranked_samples"] = min(MAX_SAMPLES, len(eval_data))
        document["attribution"] = found


def _attribute_failure(exc: VerificationError, request: RunRequest, rec: Any, progress: Progress) -> None:
    """A quantize pass stopped below verify.min_cosine: find (and verify) the exclusion patch that passes, so the
    next call works. It rides on the error: said as an info event, and in the error's details."""
    from optimizer_cli.search.attribution import on_verification_failure

    threads = rec.benchmark.threads
    found = on_verification_failure(exc, request.model, rec, request.calib, request.data, threads, log=progress.line)
    if found:
        progress.info(found["message"])
        exc.details["attribution"] = found


def _say_recipe(source: Path | None, progress: Progress) -> None:
    """The preset used, or the file that won over a preset of the same name. Said when the work starts, so bad
    input still gets exactly one error line."""
    from optimizer_cli.recipe import describe_source, preset_of

    said = describe_source(source, preset_of(source)) if source is not None else None
    if said is not None:
        progress.info(said)


def _check_declared_kinds(model: Path, rec: Any, gates: list[Any]) -> None:
    """The recipe's metrics.outputs names real outputs, and kind gates it rules out fail now."""
    if not rec.metrics.outputs:
        return
    import onnx_ir as ir

    from optimizer_cli.analysis.graph import output_names
    from optimizer_cli.bench.gate import check_declared_kinds
    from optimizer_cli.bench.output_kinds import check_declared

    outputs = output_names(ir.load(model))  # memory-maps external data: cheap
    check_declared(outputs, rec.metrics.outputs)
    check_declared_kinds(gates, dict(rec.metrics.outputs), outputs)


def _check_sweep(model: Path, settings: Any, benchmarking: bool) -> None:
    """The sweep names dims the model has (a dim it lacks would time the same shape under another label)."""
    if not settings.sweep or not benchmarking:
        return
    import onnx_ir as ir

    from optimizer_cli.bench.harness import check_sweep_dims

    check_sweep_dims(settings.sweep, ir.load(model))  # memory-maps external data: cheap
