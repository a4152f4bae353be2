"""Benchmark an original and an optimized model side by side on every usable execution provider."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from optimizer_cli.analysis.graph import output_names
from optimizer_cli.analysis.int8 import saturation_note
from optimizer_cli.bench.accuracy import Accuracy, Fidelity, Metric, accuracy, fidelity
from optimizer_cli.bench.environment import environment
from optimizer_cli.bench.latency import (
    PERCENTILE_MIN_RUNS,
    LatencyPlan,
    LatencyStats,
    SpeedupEstimate,
    cycling,
    fit_to_budget,
    measure_many,
)
from optimizer_cli.bench.memory import session_peak_memory
from optimizer_cli.bench.output_kinds import classify_outputs
from optimizer_cli.data import Dataset, input_specs, random_feed, shape_mix, shape_text
from optimizer_cli.errors import UserInputError, first_line
from optimizer_cli.model_io import file_size
from optimizer_cli.runtime.cpu import cpu_isa, u8s8_saturates
from optimizer_cli.runtime.providers import engine_failure, node_placement, probe_provider, resolve_provider
from optimizer_cli.runtime.session import (
    ModelSource,
    SessionConfig,
    create_session,
    run_session,
    session_feeds,
    timed_session,
)
from optimizer_cli.runtime.targets import parse_target


@dataclass
class BenchSettings:
    providers: list[str]
    threads: int = 2
    warmup: int = 5
    rounds: int = 10
    runs_per_round: int = 10
    discard_after_switch: int = 3
    opt_level: str = "all"
    trt_fp16: bool = False
    trt_int8: bool = False
    trt_cache_dir: str | None = None
    strict_ep: bool = False
    memory: bool = True
    sweep: list[dict[str, int]] = field(default_factory=list)  # symbolic dim values per shape point
    eval_samples: int | None = None
    latency_samples: int = 32  # evaluation inputs the latency rounds cycle through
    max_seconds: float = 300.0  # per provider, accuracy and latency together; slow models get fewer runs
    output_kinds: dict[str, str] = field(default_factory=dict)  # recipe metrics.outputs: kind by output name
    map_threshold: float = 0.3  # recipe metrics.map_threshold
    # SessionConfig fields the optimized model's sessions take instead of the above (the recipe's `session`
    # section: how it is meant to be deployed); the original keeps the benchmark's.
    optimized_session: dict[str, Any] = field(default_factory=dict)

    def session_config(self, alias: str, optimized: bool = False) -> SessionConfig:
        """The session options of one model on one provider."""
        config = SessionConfig(
            provider=alias,
            threads=self.threads,
            opt_level=self.opt_level,
            trt_fp16=self.trt_fp16,
            trt_int8=self.trt_int8,
            trt_cache_dir=self.trt_cache_dir,
        )
        return config.with_session(self.optimized_session) if optimized else config


@dataclass
class ProviderRow:
    provider: str
    usable: bool
    reason: str
    shape: str = ""
    setup_s_original: float | None = None
    setup_s_optimized: float | None = None
    latency_original: LatencyStats | None = None
    latency_optimized: LatencyStats | None = None
    speedup: SpeedupEstimate | None = None
    accuracy_original: Accuracy | None = None
    accuracy_optimized: Accuracy | None = None
    fidelity: Fidelity | None = None
    memory_original_mb: float | None = None
    memory_optimized_mb: float | None = None
    # The run target (provider, device, precision, options) this row measured.
    target: dict[str, Any] | None = None
    # Nodes each execution provider took in the original's and the optimized model's sessions (onnxruntime's
    # own record), and the share of the optimized model's nodes that fell back to another provider.
    placement: dict[str, dict[str, int]] | None = None
    fallback_share: float | None = None
    # A target other than the reference (the CPU EP as shipped): the original and latency_original above are the
    # original *on the reference*, every speedup and fidelity is against it, and this is the unmodified model on
    # the target (what the engine alone gives): latency, speedup, accuracy and fidelity against the reference.
    engine_alone: dict[str, Any] | None = None
    # A target naming a precision: the contrasting precision its outputs were compared with, and whether they
    # were identical (the precision was ignored).
    precision_check: dict[str, Any] | None = None

    @property
    def verdict(self) -> str | None:
        """'faster' / 'slower' when the speedup's 95% interval lies wholly above / below 1, else no change."""
        if self.speedup is None:
            return None
        return verdict_of(self.speedup.ci_low, self.speedup.ci_high)

    def as_dict(self) -> dict[str, Any]:
        def d(x: Any) -> Any:
            return x.as_dict() if hasattr(x, "as_dict") else x

        return {**{k: d(v) for k, v in self.__dict__.items()}, "verdict": self.verdict}


def verdict_of(ci_low: float, ci_high: float) -> str:
    if ci_low > 1.0:
        return "faster"
    if ci_high < 1.0:
        return "slower"
    return "no significant change"


def overall_verdict(rows: list[ProviderRow]) -> str:
    """One word for the run: slower if the optimized model is significantly slower on every measured row,
    faster if significantly faster on every one, else mixed / no significant change / not measured."""
    verdicts = {r.verdict for r in rows if r.verdict is not None}
    if not verdicts:
        return "not measured"
    if len(verdicts) == 1:
        return verdicts.pop()
    return "mixed"


@dataclass
class BenchReport:
    rows: list[ProviderRow]
    original_bytes: int
    optimized_bytes: int
    eval_source: str
    eval_samples: int
    labelled: bool
    environment: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    latency_shapes: list[dict[str, Any]] | None = None  # [{shape: {input: dims}, count}] the rounds cycle through

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": overall_verdict(self.rows),
            "original_bytes": self.original_bytes,
            "optimized_bytes": self.optimized_bytes,
            "size_ratio": self.optimized_bytes / self.original_bytes if self.original_bytes else None,
            "eval_source": self.eval_source,
            "eval_samples": self.eval_samples,
            "labelled": self.labelled,
            "latency_shapes": self.latency_shapes,
            "rows": [r.as_dict() for r in self.rows],
            "environment": self.environment,
            "notes": self.notes,
        }


def _seconds_per_call(sess_a: Any, sess_b: Any, feed: dict[str, np.ndarray]) -> float:
    """Mean seconds of one inference of either model (one warm run each), to size the benchmark."""
    start = time.perf_counter()
    run_session(sess_a, feed)
    run_session(sess_b, feed)
    return (time.perf_counter() - start) / 2


def _eval_within_budget(data: Dataset, seconds_per_call: float, budget_s: float) -> Dataset:
    """As many evaluation samples as both models can run within `budget_s` (at least one)."""
    affordable = int(budget_s / max(2 * seconds_per_call, 1e-9))
    return data if affordable >= len(data) else data.take(max(1, affordable))


def _outcome_notes(rows: list[ProviderRow], settings: BenchSettings) -> list[str]:
    """Say plainly what the numbers mean when they are bad news or missing."""
    notes = []
    measured = [r for r in rows if r.speedup is not None]
    if not measured:
        notes.append(
            "no provider could be measured ("
            + "; ".join(f"{r.provider}: {r.reason}" for r in rows if not r.usable)
            + "): there is no latency, accuracy or fidelity to report"
        )
        return notes
    slower = [r for r in measured if r.verdict == "slower"]
    if slower and len(slower) == len(measured):
        worst = min(r.speedup.median for r in slower if r.speedup is not None)
        notes.append(
            f"SLOWER: the optimized model is significantly slower than the original on every measured provider "
            f"(speedup {worst:.2f}x); gate pipelines with --fail-if 'speedup_ci_high<1'"
        )
    elif slower:
        notes.append("slower on " + ", ".join(r.provider + (f"[{r.shape}]" if r.shape else "") for r in slower))
    broken = [r for r in measured if r.fidelity is not None and r.fidelity.nonfinite]
    for r in broken:
        assert r.fidelity is not None
        notes.append(
            f"{r.provider}: the optimized model produced {r.fidelity.nonfinite} NaN/Inf values where the original's "
            "outputs were finite (fidelity counts them as failures)"
        )
    for r in measured:
        if r.fallback_share and r.placement:
            taken = ", ".join(f"{n} {k}" for k, n in r.placement.get("optimized", {}).items())
            label = "MOSTLY FALLBACK: " if r.fallback_share >= 0.5 else ""
            notes.append(
                f"{label}{r.provider}: {r.fallback_share:.0%} of the optimized model's nodes ran on another "
                f"provider than the one asked for ({taken}); its speed is theirs as much as {r.provider}'s"
            )
    need = PERCENTILE_MIN_RUNS[99]
    # The runs a round really had: the plan covers every input once a round, which can exceed what was asked.
    timed = [r.latency_optimized.runs // r.speedup.rounds for r in measured if r.latency_optimized and r.speedup]
    runs = min(timed) if timed else settings.runs_per_round
    if runs < need:
        notes.append(
            f"p99 speedup needs >= {need} runs per round (the rounds had {runs}; benchmark.runs_per_round "
            f"asks {settings.runs_per_round}): not reported"
        )
    return notes


def _batch_size(feed: dict[str, np.ndarray]) -> int:
    first = next(iter(feed.values()))
    return int(first.shape[0]) if first.ndim else 1


def _shape_label(dims: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in dims.items())


def sweep_points(spec: list[str]) -> list[dict[str, int]]:
    """['batch=1,8', 'seq=128,256'] -> the cartesian product as dicts; every size at least 1."""
    axes: list[tuple[str, list[int]]] = []
    for item in spec:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise UserInputError(f"--sweep '{item}': expected DIM=V1,V2,...")
        name, values = item.split("=", 1)
        try:
            sizes = [int(v) for v in values.split(",") if v.strip()]
        except ValueError as exc:
            raise UserInputError(f"--sweep '{item}': values must be integers") from exc
        if not sizes:
            raise UserInputError(f"--sweep '{item}': expected DIM=V1,V2,... (no sizes given)")
        if min(sizes) < 1:
            raise UserInputError(f"--sweep '{item}': sizes must be at least 1 (got {min(sizes)})")
        axes.append((name.strip(), sizes))
    if not axes:
        return []
    return [dict(zip([a for a, _ in axes], combo, strict=True)) for combo in itertools.product(*(v for _, v in axes))]


def check_sweep_dims(points: list[dict[str, int]], model: ir.Model) -> None:
    """Every swept dim is a symbolic dim of the model's inputs: another name would change no shape, and the
    rows would time one shape under several labels."""
    known = {d for spec in input_specs(model) for d in (spec.shape or ()) if isinstance(d, str)}
    for name in dict.fromkeys(k for point in points for k in point):
        if name not in known:
            have = ", ".join(sorted(known)) if known else "none: every input dim is fixed"
            raise UserInputError(f"--sweep '{name}': the model has no symbolic dim '{name}' (its dims: {have})")


def run_benchmark(
    original: Path,
    optimized: Path,
    settings: BenchSettings,
    data: Dataset,
    *,
    metric: Metric | None = None,
    dims: dict[str, int] | None = None,
    log: Any = None,
) -> BenchReport:
    """Latency (interleaved A/B), accuracy and fidelity per provider; unusable providers become rows saying why."""
    log = log or (lambda _m: None)
    model_for_specs = ir.load(original)
    eval_data = data if settings.eval_samples is None else data.take(settings.eval_samples)
    notes: list[str] = list(data.notes)
    rows: list[ProviderRow] = []
    src_a, src_b = ModelSource(original), ModelSource(optimized)
    points = settings.sweep or [dict(dims or {})]
    references: list[Any] = []  # the original on the CPU EP, made once for every target that needs it

    def reference(source: ModelSource) -> Any:
        if not references:
            references.append(timed_session(source, settings.session_config("cpu"), eval_data.feeds[0])[0])
        return references[0]

    try:
        for alias in settings.providers:
            pair = _open_sessions(alias, src_a, src_b, settings, eval_data.feeds[0], rows, reference, notes)
            if pair is None:
                continue
            quality = _quality(pair, (original, optimized), settings, eval_data, model_for_specs, metric, notes, log)
            for point in points:
                feeds = _latency_feeds(settings, eval_data, input_specs(model_for_specs), {**(dims or {}), **point})
                rows.append(
                    _row(
                        pair,
                        quality,
                        _latency(pair, feeds, settings, _shape_label(point), len(points), notes, log),
                        point,
                    )
                )
            del pair
    finally:
        src_a.close()
        src_b.close()
    notes.extend(_closing_notes(optimized, settings, eval_data, rows))
    return BenchReport(
        rows=rows,
        original_bytes=file_size(original),
        optimized_bytes=file_size(optimized),
        eval_source=eval_data.source,
        eval_samples=len(eval_data),
        labelled=eval_data.labels is not None,
        environment=environment(),
        notes=notes,
        latency_shapes=None
        if settings.sweep
        else [{"shape": sh, "count": n} for sh, n in shape_mix(_cycled(settings, eval_data))],
    )


@dataclass
class _Sessions:
    """Both models' sessions on one provider."""

    alias: str
    a: Any
    b: Any
    setup: dict[str, Any]  # session creation + first run, where TensorRT builds its engine
    # The original on the reference (the CPU EP), for a target that is not the reference: what a and b are
    # timed and scored against.
    ref: Any = None
    placement: dict[str, dict[str, int]] = field(default_factory=dict)
    _timed: list[tuple[dict[str, np.ndarray], float]] = field(default_factory=list)

    def seconds_per_call(self, feed: dict[str, np.ndarray]) -> float:
        """Seconds of one inference on `feed`, measured once per feed object (the budgets of accuracy and of
        latency both need it for the first evaluation sample; on a slow model each measurement costs seconds).
        The feeds are kept, so a freed feed's id can never answer for another."""
        for timed, seconds in self._timed:
            if timed is feed:
                return seconds
        seconds = _seconds_per_call(self.a, self.b, feed)
        self._timed.append((feed, seconds))
        return seconds


def _open_sessions(
    alias: str,
    src_a: ModelSource,
    src_b: ModelSource,
    settings: BenchSettings,
    first_feed: dict[str, np.ndarray],
    rows: list[ProviderRow],
    reference: Callable[[ModelSource], Any],
    notes: list[str],
) -> _Sessions | None:
    """Sessions for both models, or None with a row saying why the provider is unusable (--strict-ep: raise)."""
    status = probe_provider(alias)
    if not status.usable:
        if settings.strict_ep:
            raise UserInputError(f"execution provider '{alias}' is not usable: {status.reason} (--strict-ep)")
        rows.append(ProviderRow(alias, False, status.reason))
        return None
    refused: str | None = None  # why the engine refused the original (the optimized model may still run)
    try:
        try:
            sess_a, setup_a = timed_session(src_a, settings.session_config(alias), first_feed)
        except Exception as exc:
            if parse_target(alias).is_reference:
                raise  # the CPU EP is the reference: a model it cannot run is the run's error, not a row
            # The optimized graph may be one this engine accepts (freeze_inputs folded the If that OpenVINO's
            # converter refused): it is then measured against the original on the reference, as every other
            # target is, and the row says the engine alone could not run the original.
            refused, sess_a, setup_a = engine_failure(exc), None, None
        sess_b, setup_b = timed_session(src_b, settings.session_config(alias, optimized=True), first_feed)
    except Exception as exc:
        # Another engine may refuse a model the CPU EP runs (OpenVINO's converter on a tensor of unknown rank):
        # a row saying so, not a failed benchmark.
        msg = f"'{alias}' cannot run this model: {engine_failure(exc)}"
        if settings.strict_ep:
            raise UserInputError(msg + " (--strict-ep)") from exc
        rows.append(ProviderRow(alias, False, msg, target=parse_target(alias).as_dict()))
        return None
    placement = {"original": node_placement(sess_a) if sess_a is not None else {}, "optimized": node_placement(sess_b)}
    active = sess_b.get_providers()[0]
    took = placement["optimized"].get(resolve_provider(alias), 0) if placement["optimized"] else None
    if active != resolve_provider(alias) or took == 0:
        msg = f"session for '{alias}' fell back to {', '.join(placement['optimized']) or active}"
        if settings.strict_ep:
            raise UserInputError(msg + " (--strict-ep)")
        rows.append(ProviderRow(alias, False, msg, target=parse_target(alias).as_dict(), placement=placement))
        return None
    if sess_a is None:  # timed and scored against the original on the reference, like any other target
        notes.append(
            f"'{alias}' cannot run the original ({refused}); the optimized model runs there and is compared with "
            "the original on the CPU EP"
        )
        pair = _Sessions(alias, reference(src_a), sess_b, {"setup_s_original": None, "setup_s_optimized": setup_b})
    else:
        pair = _Sessions(alias, sess_a, sess_b, {"setup_s_original": setup_a, "setup_s_optimized": setup_b})
        if not parse_target(alias).is_reference:
            pair.ref = reference(src_a)
    pair.placement = placement
    return pair


# The precision a target's outputs are compared with to show that its own was applied.
CONTRAST_PRECISION = {"f32": "bf16", "bf16": "f32", "f16": "f32", "fp16": None, "int8": "fp16"}


def precision_check(
    pair: _Sessions, source: ModelSource, settings: BenchSettings, feeds: list[dict[str, np.ndarray]]
) -> dict[str, Any] | None:
    """Whether the target's precision changed anything: the optimized model is run with a contrasting precision
    of the same provider on a few samples; identical outputs mean the engine ignored the option (the OpenVINO
    EP's own `precision` option did nothing on an AMX host). None when the target names no precision."""
    target = parse_target(pair.alias)
    if target.precision is None:
        return None
    other = dataclasses.replace(target, precision=CONTRAST_PRECISION.get(target.precision))
    config = dataclasses.replace(settings.session_config(pair.alias, optimized=True), provider=other.label)
    try:
        sess = create_session(source, config)
        same = all(
            all(
                np.array_equal(x, y, equal_nan=True)
                for x, y in zip(run_session(pair.b, f), run_session(sess, f), strict=True)
            )
            for f in feeds[:2]
        )
    except Exception as exc:  # the contrast cannot run here (e.g. no bf16 device): say so, do not fail the run
        return {"against": other.label, "identical": None, "reason": first_line(exc, 200)}
    return {"against": other.label, "identical": same}


def _row(pair: _Sessions, quality: dict[str, Any], timing: dict[str, Any], point: dict[str, int]) -> ProviderRow:
    """One measured row: quality (per target) and timing (per shape point), with where the nodes ran."""
    timing, quality = dict(timing), dict(quality)  # the quality is shared by every shape point of the target
    alone = timing.pop("_alone", None)
    engine_alone = quality.pop("engine_alone")
    if engine_alone is not None and alone is not None:
        engine_alone = {
            **alone,
            "accuracy": engine_alone["accuracy"].as_dict() if engine_alone["accuracy"] else None,
            "fidelity": engine_alone["fidelity"].as_dict(),
        }
    target = parse_target(pair.alias)
    return ProviderRow(
        provider=pair.alias,
        usable=True,
        reason="ok",
        shape=_shape_label(point),
        **pair.setup,
        **quality,
        **timing,
        target=target.as_dict(),
        placement=pair.placement,
        fallback_share=fallback_share(pair.placement.get("optimized", {}), target.ep_name),
        engine_alone=engine_alone,
    )


def fallback_share(placement: dict[str, int], provider: str) -> float | None:
    """The share of nodes another provider (the CPU EP) ran instead of `provider`; None without a record."""
    total = sum(placement.values())
    return None if not total else 1.0 - placement.get(provider, 0) / total


def _quality(
    pair: _Sessions,
    paths: tuple[Path, Path],
    settings: BenchSettings,
    eval_data: Dataset,
    model: ir.Model,
    metric: Metric | None,
    notes: list[str],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Accuracy, fidelity and peak memory on one provider (ProviderRow fields), within half the time budget."""
    first_feed = eval_data.feeds[0]
    per_call = pair.seconds_per_call(first_feed)
    data = _eval_within_budget(eval_data, per_call, settings.max_seconds / 2)
    if len(data) < len(eval_data):
        notes.append(
            f"{pair.alias}: one inference takes {per_call:.2f}s, so accuracy/fidelity used {len(data)} of "
            f"{len(eval_data)} samples to stay within benchmark.max_seconds={settings.max_seconds:g}"
        )
    log(f"benchmarking on {pair.alias}: accuracy/fidelity over {len(data)} samples")
    outs_a = [run_session(pair.a, f) for f in data.feeds]
    outs_b = [run_session(pair.b, f) for f in data.feeds]
    names = output_names(model)
    outs_ref = [run_session(pair.ref, f) for f in data.feeds] if pair.ref is not None else outs_a
    kinds = classify_outputs(names, outs_ref, settings.output_kinds)
    engine_alone = None
    if pair.ref is not None:  # every figure against the original on the reference, the engine's own included
        engine_alone = {
            "accuracy": accuracy(outs_a, data, metric),
            "fidelity": fidelity(outs_ref, outs_a, names, kinds, settings.map_threshold),
        }
    memory: dict[str, float | None] = {"memory_original_mb": None, "memory_optimized_mb": None}
    if settings.memory and paths[1].exists():
        # Each model with the session options it was timed with (mem_pattern changes the peak).
        sessions: tuple[dict[str, Any], ...] = ({}, settings.optimized_session)
        for key, path, session in zip(memory, paths, sessions, strict=True):
            peak = session_peak_memory(path, first_feed, pair.alias, settings.threads, session)
            memory[key] = peak["delta_mb"] if peak else None
    check = precision_check(pair, ModelSource(paths[1]), settings, data.feeds)
    if check and check["identical"]:
        notes.append(
            f"PRECISION IGNORED: {pair.alias} gave the same outputs, bit for bit, as {check['against']}: the engine "
            "did not apply the precision asked for (its figures are those of its default precision)"
        )
    return {
        "precision_check": check,
        "accuracy_original": accuracy(outs_ref, data, metric),
        "accuracy_optimized": accuracy(outs_b, data, metric),
        "fidelity": fidelity(outs_ref, outs_b, names, kinds, settings.map_threshold),
        "engine_alone": engine_alone,
        **memory,
    }


def _latency_feeds(
    settings: BenchSettings, eval_data: Dataset, specs: list[Any], dims: dict[str, int]
) -> list[dict[str, np.ndarray]]:
    """A sweep point times one random full-size input; otherwise the rounds cycle through evaluation inputs."""
    if settings.sweep:
        return [random_feed(specs, np.random.default_rng(0), dims)]
    return _cycled(settings, eval_data)


def _cycled(settings: BenchSettings, eval_data: Dataset) -> list[dict[str, np.ndarray]]:
    """The evaluation samples the latency rounds cycle through (each as it is: shapes may differ)."""
    return eval_data.feeds[: max(1, settings.latency_samples)]


def _latency(
    pair: _Sessions,
    feeds: list[dict[str, np.ndarray]],
    settings: BenchSettings,
    shape: str,
    n_points: int,
    notes: list[str],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Interleaved A/B timing of one shape point within its share of the time budget (ProviderRow fields)."""
    asked = LatencyPlan(
        settings.warmup, settings.rounds, settings.runs_per_round, settings.discard_after_switch, len(feeds)
    )
    budget = settings.max_seconds / (2 * n_points)
    plan = fit_to_budget(asked, pair.seconds_per_call(feeds[0]), budget)
    feeds = feeds[: plan.inputs]
    if plan.shortened:
        notes.append(
            f"{pair.alias}{' ' + shape if shape else ''}: latency shortened to {plan.rounds} rounds x "
            f"{plan.runs_per_round} runs over {plan.inputs} input(s) (asked {asked.rounds} x "
            f"{max(asked.runs_per_round, asked.inputs)} over {asked.inputs}) to stay within "
            f"benchmark.max_seconds={settings.max_seconds:g}"
        )
    log(f"latency on {pair.alias} {shape}: {plan.rounds} interleaved rounds")
    # A target other than the reference is timed in the same rounds as the original on the reference: both
    # of its speedups (the engine alone, the engine with the optimized graph) are paired against it.
    sessions = [pair.a, pair.b] if pair.ref is None else [pair.ref, pair.a, pair.b]
    stats, speedups = measure_many(
        [cycling(session_runner(s), session_feeds(s, feeds)) for s in sessions],
        warmup=plan.warmup,
        rounds=plan.rounds,
        # Every round covers all the inputs, so rounds (and their paired ratios) compare the same mix.
        runs_per_round=plan.runs_per_round,
        discard_after_switch=plan.discard_after_switch,
        batch_size=_batch_size(feeds[0]),
    )
    if pair.ref is None:
        return {"latency_original": stats[0], "latency_optimized": stats[1], "speedup": speedups[0]}
    alone = {"latency": stats[1].as_dict(), "speedup": speedups[0].as_dict()}
    return {"latency_original": stats[0], "latency_optimized": stats[2], "speedup": speedups[1], "_alone": alone}


def session_runner(sess: Any) -> Callable[[dict[str, np.ndarray]], object]:
    """A bare session.run for timing (no per-call input filtering: give it session_feeds(sess, ...))."""
    return lambda feed: sess.run(None, feed)


def _closing_notes(optimized: Path, settings: BenchSettings, eval_data: Dataset, rows: list[ProviderRow]) -> list[str]:
    notes = []
    if not settings.sweep and len(eval_data) > 1:
        cycled = _cycled(settings, eval_data)
        mix = shape_mix(cycled)
        notes.append(
            f"latency cycled through {len(cycled)} samples of {len(mix)} shape{'s' if len(mix) > 1 else ''}: "
            + ", ".join(f"{shape_text(shape)} x{n}" for shape, n in mix)
        )
    if eval_data.is_random:
        notes.append("evaluated on seeded random inputs: fidelity only, accuracy on real data is unknown")
    notes.extend(_outcome_notes(rows, settings))
    session_note = _optimized_session_note(settings)
    if session_note:
        notes.append(session_note)
    if "cpu" in settings.providers and u8s8_saturates():
        note = saturation_note(ir.load(optimized), cpu_isa())  # ir.load maps external data, reads only int8
        if note:
            notes.append(note)
    return notes


def _optimized_session_note(settings: BenchSettings) -> str | None:
    """Say when the optimized model ran with other session options than the original: part of its speedup
    (or of its memory) may come from them rather than from the passes."""
    original, optimized = settings.session_config("cpu"), settings.session_config("cpu", optimized=True)
    changed = [
        f"{f.name}={getattr(optimized, f.name)} (original: {getattr(original, f.name)})"
        for f in dataclasses.fields(SessionConfig)
        if getattr(optimized, f.name) != getattr(original, f.name)
    ]
    if not changed:
        return None
    return "optimized model timed with the recipe's session options: " + ", ".join(changed)
