"""Interleaved A/B latency with paired ratios and a bootstrap confidence interval.

Machines here drift ~1.4x between phases and the first runs after switching sessions are ~2x slow
(ORT's spinning threads), so: variants alternate round by round (ABBA order), a few runs after each
switch are discarded, and the speedup is the median of per-round paired ratios, not a ratio of
independent medians.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

# Runs needed before a percentile means something: the tail beyond it must hold ~1 run (10 for p90, 100 for p99).
PERCENTILE_MIN_RUNS = {90: 10, 99: 100}


@dataclass
class LatencyStats:
    runs: int
    mean_ms: float
    p50_ms: float
    p90_ms: float | None  # None with fewer than 10 runs (a p90 needs a tail to stand on)
    p99_ms: float | None  # None with fewer than 100 runs
    min_ms: float
    throughput: float  # samples per second at the measured batch size, from the median (outliers do not rule it)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SpeedupEstimate:
    """Speedup of B over A (A time / B time): paired median and its 95% bootstrap interval."""

    median: float
    ci_low: float
    ci_high: float
    p90: float | None  # median over rounds of the per-round p90 ratio; None with < 10 runs per round
    p99: float | None  # likewise p99; None with < 100 runs per round (it would be the round's maximum)
    rounds: int
    noisy: bool
    significant: bool

    def as_dict(self) -> dict:
        return asdict(self)


def cycling(run: Callable[[dict], object], feeds: list[dict]) -> Callable[[], object]:
    """A runner that takes the next input on every call.

    Latency then reflects the whole evaluation set (inputs of different lengths or padding, which
    data-dependent rewrites such as trim_padding respond to), and two runners called equally often
    (as measure_ab does) see the same inputs in the same rounds, so per-round ratios stay paired.
    With runs_per_round >= len(feeds), every round covers every input once.
    """
    inputs = itertools.cycle(feeds)
    return lambda: run(next(inputs))


def summarize(times_s: np.ndarray, batch_size: int) -> LatencyStats:
    ms = np.asarray(times_s) * 1e3
    p50 = float(np.percentile(ms, 50))
    return LatencyStats(
        runs=len(ms),
        mean_ms=float(ms.mean()),
        p50_ms=p50,
        p90_ms=float(np.percentile(ms, 90)) if len(ms) >= PERCENTILE_MIN_RUNS[90] else None,
        p99_ms=float(np.percentile(ms, 99)) if len(ms) >= PERCENTILE_MIN_RUNS[99] else None,
        min_ms=float(ms.min()),
        throughput=float(batch_size * 1e3 / p50) if p50 > 0 else float("inf"),
    )


def bootstrap_ratio(
    a_rounds: np.ndarray, b_rounds: np.ndarray, seed: int = 0, n_boot: int = 2000
) -> tuple[float, float, float]:
    """Median of paired per-round ratios a/b with a percentile bootstrap over rounds."""
    ratios = np.asarray(a_rounds) / np.asarray(b_rounds)
    est = float(np.median(ratios))
    if len(ratios) < 2:
        return est, est, est
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ratios), size=(n_boot, len(ratios)))
    boots = np.median(ratios[idx], axis=1)
    return est, float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def measure_ab(
    run_a: Callable[[], object],
    run_b: Callable[[], object],
    *,
    warmup: int = 5,
    rounds: int = 10,
    runs_per_round: int = 10,
    discard_after_switch: int = 3,
    batch_size: int = 1,
    noise_threshold: float = 0.15,
) -> tuple[LatencyStats, LatencyStats, SpeedupEstimate]:
    """Time two callables interleaved; returns stats for each and the paired speedup of B over A."""
    for _ in range(warmup):
        run_a()
        run_b()
    samples: dict[str, list[float]] = {"a": [], "b": []}
    round_medians: dict[str, list[float]] = {"a": [], "b": []}
    round_p90: dict[str, list[float]] = {"a": [], "b": []}
    round_p99: dict[str, list[float]] = {"a": [], "b": []}
    fns = {"a": run_a, "b": run_b}
    for r in range(rounds):
        order = ("a", "b") if r % 2 == 0 else ("b", "a")
        for key in order:
            fn = fns[key]
            for _ in range(discard_after_switch):
                fn()
            times = []
            for _ in range(runs_per_round):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            samples[key].extend(times)
            round_medians[key].append(float(np.median(times)))
            round_p90[key].append(float(np.percentile(times, 90)))
            round_p99[key].append(float(np.percentile(times, 99)))
    a_stats = summarize(np.array(samples["a"]), batch_size)
    b_stats = summarize(np.array(samples["b"]), batch_size)
    med, lo, hi = bootstrap_ratio(np.array(round_medians["a"]), np.array(round_medians["b"]))
    p90 = p99 = None
    if runs_per_round >= PERCENTILE_MIN_RUNS[90]:
        p90 = float(np.median(np.array(round_p90["a"]) / np.array(round_p90["b"])))
    if runs_per_round >= PERCENTILE_MIN_RUNS[99]:
        p99 = float(np.median(np.array(round_p99["a"]) / np.array(round_p99["b"])))
    noisy = (hi - lo) / med > noise_threshold if med > 0 else True
    significant = lo > 1.0 or hi < 1.0
    return a_stats, b_stats, SpeedupEstimate(med, lo, hi, p90, p99, rounds, noisy, significant)


@dataclass
class LatencyPlan:
    """How much timing to do: what was asked, or less when one inference is slow (see fit_to_budget)."""

    warmup: int
    rounds: int
    runs_per_round: int
    discard_after_switch: int
    inputs: int  # distinct inputs the rounds cycle through
    shortened: bool = False

    def calls(self) -> int:
        """Inferences the plan runs, both models together."""
        return 2 * self.warmup + 2 * self.rounds * (self.discard_after_switch + self.runs_per_round)


def fit_to_budget(asked: LatencyPlan, seconds_per_call: float, budget_s: float) -> LatencyPlan:
    """Shrink a latency plan until it fits `budget_s` at `seconds_per_call`, like trtexec's --duration.

    What carries least information goes first: discarded runs and warm-up down to 1, then runs per round
    (a round still covers every input), then distinct inputs, then rounds, never below 2 rounds of 1 run:
    a paired ratio needs two rounds. The result may still exceed the budget when even that does not fit.
    """
    plan = LatencyPlan(**{**asked.__dict__, "shortened": False})
    plan.runs_per_round = max(plan.runs_per_round, plan.inputs)

    def fits() -> bool:
        return plan.calls() * seconds_per_call <= budget_s

    steps = [
        ("discard_after_switch", 1),
        ("warmup", 1),
        ("runs_per_round", None),  # down to `inputs`, then together with inputs
        ("inputs", 1),
        ("rounds", 2),
        ("discard_after_switch", 0),
    ]
    for name, floor in steps:
        while not fits():
            value = getattr(plan, name)
            low = plan.inputs if name == "runs_per_round" else floor
            if value <= low:
                break
            setattr(plan, name, max(low, value // 2 if name in ("runs_per_round", "rounds", "inputs") else value - 1))
            if name == "inputs":
                plan.runs_per_round = min(plan.runs_per_round, max(plan.inputs, 1))
            plan.shortened = True
    return plan
