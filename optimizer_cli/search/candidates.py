"""Candidates of `optimize tune`: a trial's parameters as a recipe, and the jobs that build, score and time it.

The jobs are top-level functions of one picklable argument returning a JSON-ready dict, so an executor can
run them in this process or as Ray tasks on other nodes (paths must then be on a filesystem every node
sees). A job reports its own failure as a result (`state: failed`, one-line reason): one bad candidate never
ends the study.

Cheap first: `build_and_score` runs the normal pipeline (every pass verified) and measures fidelity on the
evaluation data; only a candidate meeting the fidelity goals is handed to `time_candidate`, which holds the
original and the candidate in one task and times them interleaved (paired ratios, as the benchmark does).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from optimizer_cli.bench.accuracy import accuracy, fidelity, load_metric
from optimizer_cli.bench.harness import session_runner
from optimizer_cli.bench.latency import LatencyPlan, cycling, fit_to_budget, measure_ab, measure_many
from optimizer_cli.bench.output_kinds import classify_outputs
from optimizer_cli.data import Dataset, load_dataset
from optimizer_cli.errors import OptimizerError, first_line
from optimizer_cli.model_io import file_size, load_model
from optimizer_cli.passes import OptimizationPass
from optimizer_cli.passes.base import RecipeContext
from optimizer_cli.runtime.session import (
    SessionConfig,
    create_session,
    ort_error_message,
    run_session,
    session_feeds,
)
from optimizer_cli.search.space import OTHER_PASSES, ordered_passes

# --- parameters -> recipe --------------------------------------------------------------------------


# Every candidate is timed and scored against the original on onnxruntime's CPU EP.
REFERENCE = "cpu"


# The order a candidate's passes run in (OTHER_PASSES: plugins, on the plain graph before the fusions): the
# frozen inputs folded first (every later pass sees the graph without the branches they decided), the
# structural edits next, on the plain graph (pruning reads channel groups there, prune_heads the unfused
# attention), then the fusions, the precision, and static_shapes last (the passes before it may read data of
# other shapes).
RECIPE_ORDER = (
    "cleanup",
    "freeze_inputs",
    "trim_padding",
    "drop_layers",
    "prune_heads",
    "prune",
    "factorize",
    "distill",
    OTHER_PASSES,
    "fuse",
    "quantize",
    "static_shapes",
)
# A candidate's name lists its passes in recipe order, the precision last: "prune 0.3 + static int8".
SUMMARY_ORDER = (*(name for name in RECIPE_ORDER if name != "quantize"), "quantize")


def _passes_in(order: tuple[str, ...]) -> list[type[OptimizationPass]]:
    return [item for item in ordered_passes(order) if not isinstance(item, str)]


def recipe_for(params: dict[str, Any], ctx: RecipeContext, name: str = "tuned") -> dict[str, Any]:
    """A recipe (as a dict the Recipe model validates) that builds the candidate `params` describes: each
    registered pass's entries for these parameters, in RECIPE_ORDER."""
    passes = [entry for cls in _passes_in(RECIPE_ORDER) for entry in cls.recipe_entries(params, ctx)]
    session = {
        "opt_level": params.get("opt_level", "all"),
        "execution_mode": params.get("execution_mode", "sequential"),
        "mem_pattern": params.get("mem_pattern", True),
    }
    if session["execution_mode"] == "parallel":
        # Independent branches on at most the original's threads: never more cores than the original had.
        session["inter_op_threads"] = ctx.threads
    if params.get("threads") is not None:
        session["threads"] = params["threads"]
    recipe: dict[str, Any] = {
        "name": name,
        "description": "found by optimize tune: " + summary(params, ctx),
        "passes": passes,
        "data": {"calibration": ctx.calibration, "dims": dict(ctx.dims)},
        "benchmark": {"providers": [ctx.provider], "threads": ctx.threads},
        "metrics": dict(ctx.metrics),
        "session": session,
    }
    target = candidate_target(params, ctx)
    if target != REFERENCE:
        # Where the candidate runs: the recipe's benchmark measures it there beside the reference.
        recipe["runtime"] = {"target": target}
        recipe["benchmark"]["providers"] = [REFERENCE, target]
    return recipe


def candidate_target(params: dict[str, Any], ctx: RecipeContext) -> str:
    """The run target of a candidate: the `target` dimension where the space has one, else the tuned provider."""
    return str(params.get("target") or ctx.provider)


def summary(params: dict[str, Any], ctx: RecipeContext | None = None) -> str:
    """One line a person reads: 'prune 0.3 + static int8 (compute ops, 4 float)'. With the context, each pass
    names what its parameters came to (a fitted float set: the count the fit chose)."""
    passes = _passes_in(SUMMARY_ORDER)
    if ctx is not None:
        params = {**params, **{k: v for cls in passes for k, v in cls.resolved_params(params, ctx).items()}}
    parts = [part for cls in passes if (part := cls.describe_trial(params))]
    session = [
        f"{k}={params[k]}"
        for k, d in (("opt_level", "all"), ("execution_mode", "sequential"), ("threads", None))
        if params.get(k, d) != d
    ]
    text = " + ".join(parts or ["cleanup + fuse"]) + (f" [{', '.join(session)}]" if session else "")
    target = params.get("target")
    return text + (f" on {target}" if target and target != REFERENCE else "")


# --- jobs ------------------------------------------------------------------------------------------


@dataclass
class DataRef:
    """Where a job reads evaluation data (each process reads it once)."""

    model: str
    evaluation: str
    samples: int
    metric: str | None = None
    charset: str | None = None
    map_threshold: float = 0.3
    output_kinds: dict[str, str] = field(default_factory=dict)


@functools.lru_cache(maxsize=4)
def _evaluation(ref: tuple[str, str, int]) -> Dataset:
    model, spec, samples = ref
    return load_dataset(spec, load_model(model), limit=samples).take(samples)


def evaluation_data(data: DataRef) -> Dataset:
    return _evaluation((data.model, data.evaluation, data.samples))


@functools.lru_cache(maxsize=4)
def _reference_outputs(ref: tuple[str, str, int], threads: int) -> list[list[np.ndarray]]:
    """The original's outputs on the evaluation data, as the benchmark's sessions compute them."""
    feeds = _evaluation(ref).feeds
    sess = create_session(Path(ref[0]), SessionConfig(threads=threads))
    return [run_session(sess, f) for f in feeds]


@functools.lru_cache(maxsize=4)
def _output_names(model: str) -> list[str]:
    from optimizer_cli.analysis.graph import output_names

    return output_names(load_model(model))


def session_config(threads: int, provider: str, session: dict[str, Any] | None) -> SessionConfig:
    """The candidate's deployment session (its recipe's `session` section) on the tuned provider."""
    return SessionConfig(provider=provider, threads=threads).with_session(session or {})


def quality_row(
    data: DataRef, threads: int, provider: str, candidate: Path, session: dict[str, Any] | None
) -> dict[str, Any]:
    """Fidelity and accuracy of `candidate` vs the original on the evaluation data: a benchmark row's
    quality fields, so goals are read with the --fail-if metrics."""
    key = (data.model, data.evaluation, data.samples)
    dataset = _evaluation(key)
    ref = _reference_outputs(key, threads)
    sess = create_session(candidate, session_config(threads, provider, session))
    new = [run_session(sess, f) for f in dataset.feeds]
    names = _output_names(data.model)
    metric = (
        load_metric(data.metric, model=Path(data.model), charset=data.charset, map_threshold=data.map_threshold)
        if data.metric
        else None
    )
    acc_a, acc_b = accuracy(ref, dataset, metric), accuracy(new, dataset, metric)
    fid = fidelity(ref, new, names, classify_outputs(names, ref, data.output_kinds), data.map_threshold)
    return {
        "provider": provider,
        "usable": True,
        "shape": "",
        "fidelity": fid.as_dict(),
        "accuracy_original": acc_a.as_dict() if acc_a else None,
        "accuracy_optimized": acc_b.as_dict() if acc_b else None,
    }


@dataclass
class BuildJob:
    number: int
    model: str
    recipe: dict[str, Any]
    out_dir: str
    calibration: str | None
    data: DataRef
    threads: int
    provider: str


def build_and_score(job: BuildJob) -> dict[str, Any]:
    """Run the candidate's recipe through the pipeline (verified after every pass), save it, score it."""
    from optimizer_cli.pipeline import run_pipeline
    from optimizer_cli.recipe import Recipe

    start = time.perf_counter()
    out = Path(job.out_dir) / "model.onnx"
    try:
        rec = Recipe.model_validate(job.recipe)
        result = run_pipeline(
            job.model,
            rec,
            out,
            calibration=job.calibration,
            evaluation=job.data.evaluation,
            threads=job.threads,
            eval_samples=rec.verify.samples,
        )
        built = time.perf_counter() - start
        row = quality_row(job.data, job.threads, job.provider, out, job.recipe.get("session"))
    except OptimizerError as exc:
        return {
            "number": job.number,
            "state": "failed",
            "reason": first_line(exc),
            "build_s": time.perf_counter() - start,
        }
    except Exception as exc:  # onnxruntime refusing the candidate, a library bug: this candidate fails, not the study
        reason = f"{type(exc).__name__}: {ort_error_message(exc)}"
        return {"number": job.number, "state": "failed", "reason": reason, "build_s": time.perf_counter() - start}
    return {
        "number": job.number,
        "state": "built",
        "model_path": str(out),
        "bytes": file_size(out),
        "row": row,
        "stages": [
            {
                "name": s.name,
                "type": s.pass_type,
                "seconds": round(s.seconds, 3),
                "worst_cosine": s.worst_cosine(),
                "stats": {k: v for k, v in s.as_dict()["stats"].items() if isinstance(v, (int, float, str, bool))},
            }
            for s in result.stages
        ],
        "build_s": built,
        "score_s": time.perf_counter() - start - built,
    }


@dataclass
class TimeJob:
    numbers: list[int]  # trial numbers of the candidates (one for a search trial, several for the final)
    original: str
    candidates: list[str]
    sessions: list[dict[str, Any]]  # each candidate's recipe `session` section
    data: DataRef
    threads: int
    targets: list[str]  # each candidate's run target; the original always runs on the reference (the CPU EP)
    rounds: int = 6
    runs_per_round: int = 10
    max_seconds: float = 30.0
    latency_samples: int = 8


def time_candidates(job: TimeJob) -> dict[str, Any]:
    """Original and every candidate timed in one process, interleaved round by round (paired ratios): a search
    trial times one candidate, the final check its best few together, so noise hits them all alike."""
    start = time.perf_counter()
    try:
        feeds = evaluation_data(job.data).feeds[: job.latency_samples]
        sessions = [create_session(Path(job.original), SessionConfig(provider=REFERENCE, threads=job.threads))]
        sessions += [
            create_session(Path(c), session_config(job.threads, target, s))
            for c, s, target in zip(job.candidates, job.sessions, job.targets, strict=True)
        ]
        own = [session_feeds(s, feeds) for s in sessions]  # filtered once, outside the timed calls
        for sess, its_feeds in zip(sessions, own, strict=True):  # first runs build kernels and arenas: not timed
            sess.run(None, its_feeds[0])
        one = time.perf_counter()
        sessions[0].run(None, own[0][0])
        per_call = (time.perf_counter() - one) * len(sessions)
        asked = LatencyPlan(3, job.rounds, job.runs_per_round, 2, len(feeds))
        plan = fit_to_budget(asked, per_call / 2, job.max_seconds)
        runs = [
            cycling(session_runner(s), its_feeds[: plan.inputs]) for s, its_feeds in zip(sessions, own, strict=True)
        ]
        settings = dict(
            warmup=plan.warmup,
            rounds=plan.rounds,
            runs_per_round=plan.runs_per_round,
            discard_after_switch=plan.discard_after_switch,
        )
        medians: list[list[float]] = []  # per-round medians, so the winner's pick can pair two candidates
        if len(runs) == 2:
            lat_a, lat_b, speed = measure_ab(runs[0], runs[1], **settings)
            stats, speeds = [lat_a, lat_b], [speed]
        else:
            stats, speeds = measure_many(runs, **settings, round_medians=medians)
    except Exception as exc:
        return {
            "numbers": job.numbers,
            "state": "failed",
            "reason": f"timing failed: {type(exc).__name__}: {first_line(exc)}",
        }
    return {
        "numbers": job.numbers,
        "state": "timed",
        "original_p50_ms": stats[0].p50_ms,
        "results": [
            {"number": n, "speedup": s.as_dict(), "p50_ms": st.p50_ms}
            | ({"round_p50_ms": [t * 1e3 for t in medians[i + 1]]} if medians else {})
            for i, (n, s, st) in enumerate(zip(job.numbers, speeds, stats[1:], strict=True))
        ],
        "rounds": plan.rounds,
        "runs_per_round": plan.runs_per_round,
        "time_s": time.perf_counter() - start,
    }
