"""Interleaved latency of several models with paired ratios and a bootstrap confidence interval.

Machines here drift ~1.4x between phases and the first runs after switching sessions are ~2x slow
(ORT's spinning threads), so: the models take turns round by round in an order that changes every round
(ABBA for two; a balanced Latin square for more, see round_order), a few runs after each switch are
discarded, and a speedup is the median of per-round paired ratios, not a ratio of independent medians.
Before each model's turn the timer pauses briefly (SETTLE_S) so the previous model's idle threads go to sleep
instead of competing for the cores with the one being timed.
Timing candidates together with the original in one session lets noise hit them all alike, so the
fastest one is not just the luckiest (the winner's curse of timing each alone).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

# Runs needed before a percentile means something: the tail beyond it must hold ~1 run (10 for p90, 100 for p99).
PERCENTILE_MIN_RUNS = {90: 10, 99: 100}

# After its last run a session's worker threads keep spinning for a few milliseconds (onnxruntime's intra-op
# pool, OpenVINO's TBB workers) and take a core from whatever runs next; discarded runs do not stop them, a
# pause does. Measured (2-core Xeon with AMX, OpenVINO EP vs CPU EP, 16 rounds): 95% intervals 0.31-0.54 of
# the ratio wide without a pause, 0.04-0.06 with 20 ms; a deployed model runs alone, as it is then timed.
SETTLE_S = 0.02


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
    (as measure_many does) see the same inputs in the same rounds, so per-round ratios stay paired.
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


def round_order(models: int, r: int) -> list[int]:
    """The order in which `models` callables run in round `r` (0-based indices).

    A Williams design (a balanced Latin square): every model goes first equally often and, within rounds,
    every model directly follows every other one equally often (after `models` rounds when their number is
    even, 2 * `models` when odd: odd rounds then run the previous round's sequence reversed), so neither a
    slot nor a predecessor's cache and thread state favours one model. Two models alternate a,b / b,a.
    """
    base = [0]
    low, high = 1, models - 1
    while low <= high:
        base.append(low)
        low += 1
        if low <= high:
            base.append(high)
            high -= 1
    shift = r if models % 2 == 0 else r // 2
    order = [(m + shift) % models for m in base]
    return order[::-1] if models % 2 and r % 2 else order


def _time_round(fn: Callable[[], object], discard: int, runs: int, settle_s: float) -> list[float]:
    """Seconds of `runs` calls of `fn`, after a `settle_s` pause and `discard` untimed calls (the switch from
    another model)."""
    if settle_s > 0:
        time.sleep(settle_s)
    for _ in range(discard):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _speedup(
    ref_rounds: np.ndarray, rounds_b: np.ndarray, runs_per_round: int, noise_threshold: float
) -> SpeedupEstimate:
    """Speedup of B over the reference from per-round (p50, p90, p99) rows of seconds, paired by round."""
    med, lo, hi = bootstrap_ratio(ref_rounds[:, 0], rounds_b[:, 0])
    tails: dict[int, float | None] = {}
    for column, pct in ((1, 90), (2, 99)):
        tails[pct] = None
        if runs_per_round >= PERCENTILE_MIN_RUNS[pct]:
            tails[pct] = float(np.median(ref_rounds[:, column] / rounds_b[:, column]))
    noisy = (hi - lo) / med > noise_threshold if med > 0 else True
    significant = lo > 1.0 or hi < 1.0
    return SpeedupEstimate(med, lo, hi, tails[90], tails[99], len(ref_rounds), noisy, significant)


def measure_many(
    runs: Sequence[Callable[[], object]],
    *,
    warmup: int = 5,
    rounds: int = 10,
    runs_per_round: int = 10,
    discard_after_switch: int = 3,
    batch_size: int = 1,
    noise_threshold: float = 0.15,
    round_medians: list[list[float]] | None = None,
    settle_s: float = SETTLE_S,
) -> tuple[list[LatencyStats], list[SpeedupEstimate]]:
    """Time several callables interleaved in one session; runs[0] is the reference (the original model).

    Each round runs every callable in round_order (a `settle_s` pause and `discard_after_switch` untimed runs
    after each switch, then `runs_per_round` timed ones). Returns stats for each callable and, for each of runs[1:], its
    paired speedup over runs[0] (reference time / its time, per round). `round_medians`, when given, receives
    each callable's per-round median seconds (to pair any two of them afterwards).
    """
    if not runs:
        raise ValueError("measure_many needs at least one callable")
    for _ in range(warmup):
        for fn in runs:
            fn()
    samples: list[list[float]] = [[] for _ in runs]
    per_round: list[list[list[float]]] = [[] for _ in runs]  # per model: [p50, p90, p99] of each round
    for r in range(rounds):
        for i in round_order(len(runs), r):
            times = _time_round(runs[i], discard_after_switch, runs_per_round, settle_s)
            samples[i].extend(times)
            per_round[i].append([float(np.median(times)), *(float(np.percentile(times, q)) for q in (90, 99))])
    stats = [summarize(np.array(s), batch_size) for s in samples]
    if round_medians is not None:
        round_medians.extend([row[0] for row in rows] for rows in per_round)
    ref = np.array(per_round[0])
    speedups = [_speedup(ref, np.array(b), runs_per_round, noise_threshold) for b in per_round[1:]]
    return stats, speedups


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
    settle_s: float = SETTLE_S,
) -> tuple[LatencyStats, LatencyStats, SpeedupEstimate]:
    """Time two callables interleaved (a,b / b,a); returns stats for each and the paired speedup of B over A."""
    (a_stats, b_stats), (speed,) = measure_many(
        [run_a, run_b],
        warmup=warmup,
        rounds=rounds,
        runs_per_round=runs_per_round,
        discard_after_switch=discard_after_switch,
        batch_size=batch_size,
        noise_threshold=noise_threshold,
        settle_s=settle_s,
    )
    return a_stats, b_stats, speed


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
