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

from optimizer_cli.data import Dataset, random_dataset, resolve_dataset
from optimizer_cli.errors import UserInputError, VerificationError, first_line
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
from optimizer_cli.passes._util import lift_constants, node_count
from optimizer_cli.recipe import Recipe
from optimizer_cli.runtime.session import SessionConfig, ort_error_message, run_model
from optimizer_cli.verify import (
    Drift,
    aggregate,
    check_model,
    check_signature,
    compare_arrays,
    signature,
    within_tolerance,
)


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
    for label, spec in (("calibration", inputs.calibration), ("evaluation", inputs.evaluation)):
        if spec and spec != "random" and not Path(spec).exists():
            problems.append(f"{label} data not found: {spec}")
    return problems


class _Reference:
    """Runs a model stage on the verification feeds (ORT, CPU).

    Graph optimizations are off by default, so a stage is checked as written. `deployed=True` turns them
    on: that is when ORT swaps QDQ pairs for its int8 kernels, whose results can differ from the float
    simulation (e.g. u8*s8 saturation on CPUs without VNNI), so approximate stages are judged that way.
    """

    def __init__(self, feeds: list[dict[str, np.ndarray]], threads: int) -> None:
        self.feeds = feeds
        self.config = SessionConfig(provider="cpu", threads=threads, opt_level="disable")
        self.deployed_config = SessionConfig(provider="cpu", threads=threads, opt_level="all")

    def outputs(self, model: ir.Model, deployed: bool = False) -> list[list[np.ndarray]]:
        return run_model(model, self.feeds, self.deployed_config if deployed else self.config)


def normalize(model: ir.Model) -> list[str]:
    """Semantics-preserving set-up every pass relies on: weights as initializers, named nodes."""
    from optimizer_cli.ir_compat import normalize_ir_version

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
    on_stage: Callable[[StageReport], None] | None = None,
    on_start: Callable[[int, str], None] | None = None,
    logger: logging.Logger | None = None,
) -> PipelineResult:
    logger = logger or logging.getLogger("optimizer_cli")
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
    dims = recipe.data.dims
    vs = recipe.verify
    calib = resolve_dataset(calibration, model, samples=64, seed=vs.seed + 1, dims=dims)
    if calib is not None and calib.is_random:
        notes.append("calibration uses seeded random inputs: accuracy on real data is unknown")
    eval_data = resolve_dataset(evaluation, model, samples=vs.samples, seed=vs.seed, dims=dims)
    if eval_data is not None and not eval_data.is_random:
        verify_data = eval_data.take(vs.samples)
    elif calib is not None and not calib.is_random:
        verify_data = calib.take(vs.samples)
    else:
        verify_data = random_dataset(model, vs.samples, vs.seed, dims)
        notes.extend(verify_data.notes)

    stages: list[StageReport] = []
    base_sig = signature(model)
    reference = _Reference(verify_data.feeds, threads)
    try:
        original_outputs = reference.outputs(model) if vs.enabled else []
    except Exception as exc:  # e.g. an IR version or op this onnxruntime does not know, or bad data shapes
        raise UserInputError(
            f"onnxruntime cannot run the input model on the verification data: {ort_error_message(exc)}", input_path
        ) from exc
    previous_outputs = original_outputs
    output_names = [v.name for v in model.graph.outputs]

    with tempfile.TemporaryDirectory(prefix="optimize-run-") as tmp:
        ctx = PassContext(
            calibration=calib,
            verify_data=verify_data,
            rng=np.random.default_rng(vs.seed),
            tmp_dir=Path(tmp),
            threads=threads,
            reference=lambda: _load_normalized(input_path),
            logger=logger,
        )
        for index, cfg in enumerate(recipe.passes):
            pass_cls = PASS_REGISTRY[cfg.type]
            instance = pass_cls(cfg, ctx)
            label = cfg.label or cfg.type
            if on_start:
                on_start(index, label)
            start = time.perf_counter()
            try:
                result = instance(model)
            except (UserInputError, VerificationError):
                raise
            except Exception as exc:
                raise VerificationError(f"pass {index} ({label}) failed: {first_line(exc)}") from exc
            model = result.model
            seconds = time.perf_counter() - start
            exactness = instance.exactness_for()
            stage = StageReport(
                name=label,
                pass_type=cfg.type,
                exactness=exactness.value,
                seconds=seconds,
                modified=result.modified,
                nodes=node_count(model),
                weight_bytes=weights_nbytes(model),
                stats=instance.stats,
            )
            vstart = time.perf_counter()
            try:
                check_model(model)
                check_signature(base_sig, model)
            except VerificationError as exc:
                raise VerificationError(f"pass {index} ({label}) produced an invalid model: {exc}") from exc
            if vs.enabled:
                try:
                    current = reference.outputs(model)
                except Exception as exc:
                    raise VerificationError(
                        f"pass {index} ({label}) produced a model onnxruntime cannot run: {ort_error_message(exc)}"
                    ) from exc
                stage.drift_vs_previous = _drift(output_names, previous_outputs, current)
                stage.drift_vs_original = _drift(output_names, original_outputs, current)
                _check_finite(index, label, stage.drift_vs_previous)
                if exactness is Exactness.EXACT:
                    _check_exact(index, label, output_names, previous_outputs, current, vs.rtol, vs.atol)
                else:
                    try:
                        deployed_outputs = reference.outputs(model, deployed=True)
                    except Exception as exc:
                        raise VerificationError(
                            f"pass {index} ({label}) produced a model onnxruntime cannot run with its graph "
                            f"optimizations on (its default): {ort_error_message(exc)}"
                        ) from exc
                    deployed = _drift(output_names, original_outputs, deployed_outputs)
                    _check_finite(index, label, deployed, " with onnxruntime's optimized kernels")
                    stage.drift_vs_original = _worse_per_output(stage.drift_vs_original, deployed)
                    worst = stage.worst_cosine()
                    if vs.min_cosine is not None and worst is not None and worst < vs.min_cosine:
                        raise VerificationError(
                            f"pass {index} ({label}): output cosine vs original {worst:.4f} < verify.min_cosine {vs.min_cosine}"
                        )
                previous_outputs = current
            stage.verify_seconds = time.perf_counter() - vstart
            stages.append(stage)
            if on_stage:
                on_stage(stage)

    output_bytes = None
    out_path = Path(output_path) if output_path is not None else None
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
        verify_data=verify_data,
        evaluation=eval_data,
        notes=notes,
    )


def _drift(names: list[str], ref: list[list[np.ndarray]], new: list[list[np.ndarray]]) -> list[Drift]:
    per_sample = [
        [compare_arrays(name, a, b) for name, a, b in zip(names, ref_s, new_s, strict=True)]
        for ref_s, new_s in zip(ref, new, strict=True)
    ]
    return aggregate(per_sample)


def _worse_per_output(a: list[Drift], b: list[Drift]) -> list[Drift]:
    """Per output, the drift with the lower cosine (the float simulation or ORT's optimized kernels)."""
    return [y if y.cosine < x.cosine else x for x, y in zip(a, b, strict=True)]


def _check_finite(index: int, label: str, drifts: list[Drift], how: str = "") -> None:
    for d in drifts:
        if d.nonfinite:
            raise VerificationError(
                f"pass {index} ({label}) made output '{d.output}' NaN/Inf{how} ({d.nonfinite} values) "
                "where it was finite"
            )


def _check_exact(index: int, label: str, names: list[str], ref, new, rtol: float, atol: float) -> None:
    for ref_s, new_s in zip(ref, new, strict=True):
        for name, a, b in zip(names, ref_s, new_s, strict=True):
            if not within_tolerance(a, b, rtol, atol):
                err = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
                raise VerificationError(
                    f"pass {index} ({label}) is declared exact but changed output '{name}' (max abs diff {err:.3g})"
                )
