"""Run a recipe: check requirements, load, run passes, verify after each, save.

Verification after every pass: onnx.checker + strict shape inference, an unchanged signature, and the
numeric drift of every output on seeded inputs, against the previous stage and against the original.
Exact passes must stay within the recipe's tolerance; approximate passes report drift and fail only
below verify.min_cosine.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from optimizer_cli.analysis.graph import node_count
from optimizer_cli.data import (
    DataPolicy,
    Dataset,
    data_problem,
    is_per_sample,
    random_dataset,
    resolve_dataset,
    shape_text,
)
from optimizer_cli.errors import (
    DISK_ERRNOS,
    InternalError,
    OptimizerError,
    UserInputError,
    VerificationError,
    first_line,
)
from optimizer_cli.ir_compat import normalize_ir_version
from optimizer_cli.model_io import (
    check_output_path,
    external_data_files,
    file_size,
    load_model,
    nan_weights,
    save_model,
    weights_nbytes,
)
from optimizer_cli.passes import PASS_REGISTRY, Exactness, PassContext, RunInputs
from optimizer_cli.passes._graph import lift_constants
from optimizer_cli.recipe import Recipe
from optimizer_cli.runtime.session import ort_error_message
from optimizer_cli.verify import Drift, StageVerifier, Tolerance, check_model


@dataclass
class StageReport:
    name: str
    pass_type: str
    exactness: str
    seconds: float
    modified: bool
    nodes: int
    weight_bytes: int
    drift_vs_previous: list[Drift] = field(default_factory=list)
    drift_vs_original: list[Drift] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    verify_seconds: float = 0.0

    def worst_cosine(self) -> float | None:
        cos = [d.cosine for d in self.drift_vs_original]
        return min(cos) if cos else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.pass_type,
            "exactness": self.exactness,
            "seconds": round(self.seconds, 4),
            "verify_seconds": round(self.verify_seconds, 4),
            "modified": self.modified,
            "nodes": self.nodes,
            "weight_bytes": self.weight_bytes,
            "drift_vs_previous": [d.as_dict() for d in self.drift_vs_previous],
            "drift_vs_original": [d.as_dict() for d in self.drift_vs_original],
            "stats": _jsonable(self.stats),
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


@dataclass
class PipelineResult:
    model: ir.Model
    input_path: Path
    output_path: Path | None
    stages: list[StageReport]
    input_bytes: int
    output_bytes: int | None
    verify_data: Dataset
    evaluation: Dataset | None
    notes: list[str] = field(default_factory=list)


def requirement_problems(recipe: Recipe, inputs: RunInputs) -> list[str]:
    problems = []
    for i, cfg in enumerate(recipe.passes):
        for problem in PASS_REGISTRY[cfg.type].requirement_problems(cfg, inputs):
            problems.append(f"pass {i} ({cfg.type}): {problem}")
    for label, given in (("calibration", inputs.calibration), ("evaluation", inputs.evaluation)):
        missing = data_problem(given) if given else None
        if missing is not None:
            problems.append(f"{label} {missing}")
    return problems


def normalize(model: ir.Model) -> list[str]:
    """Semantics-preserving set-up every pass relies on: weights as initializers, named nodes."""
    notes = normalize_ir_version(model)  # first: under IR < 4 every initializer a pass adds is invalid
    constants = sum(1 for n in model.graph if n.op_type == "Constant")
    if lift_constants(model):
        lifted = constants - sum(1 for n in model.graph if n.op_type == "Constant")
        notes.append(f"lifted {lifted} Constant node weights to initializers")
    common.NameFixPass()(model)
    return notes


def require_inputs(model: ir.Model, path: Path) -> None:
    if not any(v.name not in model.graph.initializers for v in model.graph.inputs):
        raise UserInputError("the model has no inputs: there is nothing to feed, verify or time", path)


def check_input_model(model: ir.Model, path: Path) -> None:
    """A model that is invalid or holds NaN weights before any pass is the user's to fix (exit 2), not a
    pass's fault."""
    require_inputs(model, path)
    try:
        check_model(model)
    except VerificationError as exc:
        raise UserInputError(f"the input model fails onnx.checker / shape inference: {exc}", path) from exc
    bad = nan_weights(model)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise UserInputError(f"the input model has NaN weights in {', '.join(bad[:3])}{more}", path)


def _load_normalized(path: Path) -> ir.Model:
    model = load_model(path)
    normalize(model)
    return model


def run_pipeline(
    input_path: str | Path,
    recipe: Recipe,
    output_path: str | Path | None,
    *,
    calibration: str | None = None,
    evaluation: str | None = None,
    threads: int = 2,
    calib_samples: int | None = None,
    eval_samples: int | None = None,
    on_stage: Callable[[StageReport], None] | None = None,
    on_start: Callable[[int, str], None] | None = None,
    logger: logging.Logger | None = None,
    on_progress: Callable[[str], None] | None = None,
    data_policy: DataPolicy | None = None,
) -> PipelineResult:
    """Check requirements, load, run every pass with a StageVerifier check after each, save.

    Reads the first `calib_samples` calibration samples (default: the recipe's data.calibration_samples,
    else all of a stacked file, `calibration_limit` of a per-sample source) and the first `eval_samples`
    evaluation samples (default: all of a stacked file, what verification uses of a per-sample source;
    never fewer than that)."""
    input_path = Path(input_path)
    calibration = calibration or recipe.data.calibration
    evaluation = evaluation or recipe.data.evaluation
    problems = requirement_problems(recipe, RunInputs(calibration=calibration, evaluation=evaluation))
    if problems:
        raise UserInputError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    model = load_model(input_path)
    if output_path is not None:
        check_output_path(Path(output_path), input_path)
    notes = normalize(model)
    check_input_model(model, input_path)
    # Stacked files are read whole, as before; a per-sample source (maybe an endless generator) up to a limit.
    calib_samples = calib_samples or recipe.data.calibration_samples  # the recipe's, or --calib-samples
    if calib_samples is None and calibration and is_per_sample(calibration):
        calib_samples = calibration_limit(recipe)
    if eval_samples is None and evaluation and is_per_sample(evaluation):
        eval_samples = recipe.verify.samples
    limits = (calib_samples, eval_samples)
    data = _datasets(model, recipe, (calibration, evaluation), limits, notes, data_policy)
    verifier = _verifier(model, recipe, data.verify, threads, input_path)
    with tempfile.TemporaryDirectory(prefix="optimize-run-") as tmp:
        ctx = PassContext(
            calibration=data.calibration,
            verify_data=data.verify,
            rng=np.random.default_rng(recipe.verify.seed),
            tmp_dir=Path(tmp),
            threads=threads,
            load_original=lambda: _load_normalized(input_path),
            logger=logger or logging.getLogger("optimizer_cli"),
            tolerance=verifier.tolerance,
            progress=on_progress,
        )
        stages = []
        for index, cfg in enumerate(recipe.passes):
            model, stage = _run_stage(index, cfg, model, ctx, verifier, on_start)
            stages.append(stage)
            if on_stage:
                on_stage(stage)
        if stages:
            verifier.check_deployed(f"pass {len(stages) - 1} ({stages[-1].name})", model)
    out_path = Path(output_path) if output_path is not None else None
    output_bytes = None
    if out_path is not None:
        # An input kept in external data gives an output kept in external data (named after the output).
        keep_external = bool(external_data_files(input_path)) or None
        save_model(model, out_path, input_path=input_path, external_data=keep_external)
        output_bytes = file_size(out_path)
    return PipelineResult(
        model=model,
        input_path=input_path,
        output_path=out_path,
        stages=stages,
        input_bytes=file_size(input_path),
        output_bytes=output_bytes,
        verify_data=data.verify,
        evaluation=data.evaluation,
        notes=notes,
    )


@dataclass
class _RunData:
    calibration: Dataset | None
    evaluation: Dataset | None
    verify: Dataset  # the feeds every stage is checked on: real data when given, else seeded random


def calibration_limit(recipe: Recipe) -> int:
    """Calibration samples a run reads by default: the most any pass asks for (its `calibration_samples` or
    `samples`), at least 64."""
    asked = [getattr(cfg, f, None) for cfg in recipe.passes for f in ("calibration_samples", "samples")]
    return max([64, *(n for n in asked if isinstance(n, int))])


def _datasets(
    model: ir.Model,
    recipe: Recipe,
    specs: tuple[str | None, str | None],
    limits: tuple[int | None, int | None],
    notes: list[str],
    policy: DataPolicy | None = None,
) -> _RunData:
    """Calibration (its first limits[0] samples), evaluation (its first limits[1], never fewer than
    verification uses) and the verification samples, read once each (checked under `policy`)."""
    (calibration, evaluation), (calib_limit, eval_limit) = specs, limits
    dims, vs = recipe.data.dims, recipe.verify
    calib = resolve_dataset(
        calibration, model, samples=calib_limit or 64, seed=vs.seed + 1, dims=dims, limit=calib_limit, policy=policy
    )
    if calib is not None and calib.is_random:
        notes.append("calibration uses seeded random inputs: accuracy on real data is unknown")
    eval_limit = None if eval_limit is None else max(eval_limit, vs.samples)
    eval_data = resolve_dataset(
        evaluation, model, samples=vs.samples, seed=vs.seed, dims=dims, limit=eval_limit, policy=policy
    )
    # What loading said (casts, NaN allowed, unused keys, odd labels) reaches the report even without a benchmark.
    if calib is not None and not calib.is_random:
        notes.extend(f"calibration data: {n}" for n in calib.notes)
    if eval_data is not None and not eval_data.is_random:
        notes.extend(n for n in eval_data.notes if n not in notes)
        verify_data = eval_data.take(vs.samples)
    elif calib is not None and not calib.is_random:
        verify_data = calib.take(vs.samples)
    else:
        verify_data = random_dataset(model, vs.samples, vs.seed, dims)
        notes.extend(verify_data.notes)
    return _RunData(calib, eval_data, verify_data)


def _verifier(model: ir.Model, recipe: Recipe, data: Dataset, threads: int, input_path: Path) -> StageVerifier:
    vs = recipe.verify
    try:
        return StageVerifier(
            model,
            data.feeds,
            threads=threads,
            tolerance=Tolerance(vs.rtol, vs.atol),
            min_cosine=vs.min_cosine,
            numeric=vs.enabled,
        )
    except Exception as exc:  # e.g. an IR version or op this onnxruntime does not know, or bad data shapes
        hint = ""
        if data.is_random:  # the usual cause: symbolic dims resolved to 1 (an audio chunk of one sample)
            hint = (
                f" (verified on seeded random inputs {shape_text({k: list(v.shape) for k, v in data.feeds[0].items()})}: "
                "give real data with "
                "--data/--calib, or set named dims with --set data.dims.NAME=N)"
            )
        raise UserInputError(
            f"onnxruntime cannot run the input model on the verification data: {ort_error_message(exc)}{hint}",
            input_path,
        ) from exc


def _internal(index: int, label: str, exc: Exception) -> InternalError:
    return InternalError(
        f"internal error: pass {index} ({label}) raised {type(exc).__name__}: {first_line(exc)} "
        "(rerun with --debug for a traceback)"
    )


def _run_stage(
    index: int,
    cfg: Any,
    model: ir.Model,
    ctx: PassContext,
    verifier: StageVerifier,
    on_start: Callable[[int, str], None] | None,
) -> tuple[ir.Model, StageReport]:
    """One pass, timed, then verified. A pass's own error keeps its exit code (UserInputError 2,
    VerificationError 3); any other exception is a bug, an InternalError naming the pass (exit 4), except a
    full or read-only disk, which stays an OSError for the command line to report as the user's (exit 2)."""
    instance = PASS_REGISTRY[cfg.type](cfg, ctx)
    label = cfg.label or cfg.type
    if on_start:
        on_start(index, label)
    start = time.perf_counter()
    try:
        result = instance(model)
    except OptimizerError:
        raise
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise
        raise _internal(index, label, exc) from exc
    except Exception as exc:
        raise _internal(index, label, exc) from exc
    model = result.model
    exactness = instance.exactness
    stage = StageReport(
        name=label,
        pass_type=cfg.type,
        exactness=exactness.value,
        seconds=time.perf_counter() - start,
        modified=result.modified,
        nodes=node_count(model),
        weight_bytes=weights_nbytes(model),
        stats=instance.stats,
    )
    vstart = time.perf_counter()
    drift = verifier.check(
        f"pass {index} ({label})", model, exact=exactness is Exactness.EXACT, removed_inputs=instance.removed_inputs
    )
    stage.drift_vs_previous, stage.drift_vs_original = drift.vs_previous, drift.vs_original
    if drift.skipped:
        stage.stats["verify"] = drift.skipped
    stage.verify_seconds = time.perf_counter() - vstart
    return model, stage
