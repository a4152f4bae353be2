"""Benchmark layer: interleaved A/B timing, paired ratios, gates, provider probes."""

from __future__ import annotations

import os
import time

import numpy as np
import onnx
import pytest

from optimizer_cli.bench import latency
from optimizer_cli.bench.accuracy import fidelity, topk_accuracy
from optimizer_cli.bench.environment import cpu_label, environment
from optimizer_cli.bench.gate import evaluate, parse_gate
from optimizer_cli.bench.latency import bootstrap_ratio, measure_ab, measure_many, round_order
from optimizer_cli.errors import UserInputError
from optimizer_cli.runtime.cpu import cpu_isa, u8s8_saturates
from optimizer_cli.runtime.providers import parse_provider_list, probe_provider, silence_native_output

from .builders import mlp


def _busy(seconds: float):
    def fn() -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    return fn


def test_measure_ab_recovers_a_known_speedup() -> None:
    a_stats, b_stats, speed = measure_ab(
        _busy(0.002), _busy(0.001), warmup=1, rounds=6, runs_per_round=5, discard_after_switch=1
    )
    assert 1.6 < speed.median < 2.4
    assert speed.ci_low <= speed.median <= speed.ci_high
    assert speed.significant
    assert a_stats.runs == b_stats.runs == 30
    assert a_stats.p50_ms > b_stats.p50_ms and a_stats.p90_ms >= a_stats.p50_ms
    assert a_stats.p99_ms is None, "30 runs cannot give a p99"
    assert speed.p90 is None and speed.p99 is None, "5 runs per round give no per-round tail"


def _sleeper(seconds: float):
    return lambda: time.sleep(seconds)


def test_measure_many_ranks_candidates_against_the_reference() -> None:
    stats, speedups = measure_many(
        [_sleeper(0.003), _sleeper(0.002), _sleeper(0.001)],
        warmup=1,
        rounds=4,
        runs_per_round=3,
        discard_after_switch=1,
    )
    assert [s.runs for s in stats] == [12, 12, 12]
    assert stats[0].p50_ms > stats[1].p50_ms > stats[2].p50_ms
    assert len(speedups) == 2, "one speedup per candidate, none for the reference"
    assert 1.0 < speedups[0].median < speedups[1].median
    assert all(s.rounds == 4 and s.p90 is None and s.p99 is None for s in speedups)


class _FakeClock:
    """perf_counter for latency.py: a call of a `_ticking` callable advances it by a known amount."""

    def __init__(self) -> None:
        self.now = 0.0
        self.drift = 1.0  # every call's cost is multiplied by this (a machine that slows down over time)
        self.pauses: list[tuple[float, float]] = []  # (when, seconds) of each sleep

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append((self.now, seconds))
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> _FakeClock:
    fake = _FakeClock()
    monkeypatch.setattr(latency, "time", fake)
    return fake


def _ticking(clock: _FakeClock, seconds: float, calls: list[int] | None = None, name: int = 0):
    def fn() -> None:
        clock.now += seconds * clock.drift
        clock.drift *= 1.01
        if calls is not None:
            calls.append(name)

    return fn


def test_measure_many_pairs_rounds_so_drift_cancels(clock: _FakeClock) -> None:
    """The machine slows by 1% a call (~20x over the run): independent medians would be far off, paired
    per-round ratios stay close to the true speedups of 2x and 4x."""
    runs = [_ticking(clock, 0.004), _ticking(clock, 0.002), _ticking(clock, 0.001)]
    stats, speedups = measure_many(runs, warmup=0, rounds=12, runs_per_round=10, discard_after_switch=0)
    assert [s.runs for s in stats] == [120, 120, 120]
    assert speedups[0].median == pytest.approx(2.0, rel=0.25)
    assert speedups[1].median == pytest.approx(4.0, rel=0.25)
    assert all(s.significant for s in speedups)
    assert all(s.p90 is not None and s.p99 is None for s in speedups), "10 runs per round give a p90, no p99"


@pytest.mark.parametrize("models", [2, 3, 4, 5])
def test_round_order_is_balanced(models: int) -> None:
    """Every model goes first, and directly follows every other model, equally often over a full cycle."""
    cycle = models if models % 2 == 0 else 2 * models
    orders = [round_order(models, r) for r in range(cycle)]
    assert all(sorted(o) == list(range(models)) for o in orders)
    firsts = [o[0] for o in orders]
    assert all(firsts.count(m) == cycle // models for m in range(models))
    pairs = [(o[i], o[i + 1]) for o in orders for i in range(models - 1)]
    assert len(set(pairs)) == models * (models - 1)
    assert all(pairs.count(p) == pairs.count(pairs[0]) for p in pairs)


def test_measure_many_runs_the_models_in_round_order(clock: _FakeClock) -> None:
    calls: list[int] = []
    runs = [_ticking(clock, 0.001, calls, name) for name in range(3)]
    measure_many(runs, warmup=1, rounds=6, runs_per_round=2, discard_after_switch=1)
    assert calls[:3] == [0, 1, 2], "warm-up runs each model once"
    rounds = [calls[3 + 9 * r : 3 + 9 * (r + 1)] for r in range(6)]
    assert [r[::3] for r in rounds] == [[0, 1, 2], [2, 1, 0], [1, 2, 0], [0, 2, 1], [2, 0, 1], [1, 0, 2]]
    assert all(r[i] == r[i + 1] == r[i + 2] for r in rounds for i in (0, 3, 6)), "1 discarded + 2 timed runs"


def test_each_turn_starts_with_a_pause_outside_the_timed_runs(clock: _FakeClock) -> None:
    """The previous model's spinning threads get SETTLE_S to go idle before a model's turn; the pause is never
    part of a timed run (timed runs take exactly their cost)."""
    calls: list[int] = []
    runs = [_ticking(clock, 0.001, calls, name) for name in range(3)]
    stats, _ = measure_many(runs, warmup=1, rounds=4, runs_per_round=2, discard_after_switch=1)
    assert [seconds for _, seconds in clock.pauses] == [latency.SETTLE_S] * 12, "one pause per model per round"
    assert all(s.p50_ms < 2 for s in stats)
    clock.pauses.clear()
    measure_many(runs, warmup=1, rounds=4, runs_per_round=2, discard_after_switch=1, settle_s=0)
    assert clock.pauses == []


def test_measure_ab_is_measure_many_of_two(clock: _FakeClock) -> None:
    calls: list[int] = []
    kwargs = {"warmup": 2, "rounds": 4, "runs_per_round": 10, "discard_after_switch": 1, "batch_size": 4}
    a_stats, b_stats, speed = measure_ab(_ticking(clock, 0.002, calls, 0), _ticking(clock, 0.001, calls, 1), **kwargs)
    ab_calls, calls[:] = list(calls), []
    clock.now, clock.drift = 0.0, 1.0
    stats, (speed_many,) = measure_many([_ticking(clock, 0.002, calls, 0), _ticking(clock, 0.001, calls, 1)], **kwargs)
    assert calls == ab_calls
    assert [s.as_dict() for s in stats] == [a_stats.as_dict(), b_stats.as_dict()]
    assert speed_many == speed
    timed = ab_calls[4:]
    assert timed[::11] == [0, 1, 1, 0, 0, 1, 1, 0], "a,b / b,a / a,b / b,a"


def test_measure_many_of_the_reference_alone() -> None:
    stats, speedups = measure_many([lambda: None], warmup=0, rounds=2, runs_per_round=1, discard_after_switch=0)
    assert len(stats) == 1 and stats[0].runs == 2 and speedups == []
    with pytest.raises(ValueError):
        measure_many([])


def test_equal_variants_are_not_significant() -> None:
    rng = np.random.default_rng(0)
    a = 1.0 + 0.05 * rng.standard_normal(20)
    b = 1.0 + 0.05 * rng.standard_normal(20)
    _med, lo, hi = bootstrap_ratio(a, b)
    assert lo < 1.0 < hi


def test_fidelity_and_topk() -> None:
    ref = [[np.array([[1.0, 2.0, 3.0]])], [np.array([[3.0, 2.0, 1.0]])]]
    new = [[np.array([[1.0, 2.0, 3.1]])], [np.array([[1.0, 2.0, 3.0]])]]
    fid = fidelity(ref, new, ["y"])
    assert fid.samples == 2 and fid.top1_agreement == 0.5
    assert fid.cosine_min < fid.cosine_mean < 1.0
    assert topk_accuracy(ref, [np.array([2]), np.array([0])], 1) == 1.0
    assert topk_accuracy(ref, [np.array([1]), np.array([2])], 1) == 0.0


def _bench(speedup: float, top1_a: float, top1_b: float) -> dict:
    row = {
        "provider": "cpu",
        "usable": True,
        "shape": "",
        "speedup": {
            "median": speedup,
            "ci_low": speedup * 0.9,
            "ci_high": speedup * 1.1,
            "p90": speedup,
            "p99": speedup,
        },
        "accuracy_original": {"top1": top1_a, "top5": None, "metric": None},
        "accuracy_optimized": {"top1": top1_b, "top5": None, "metric": None},
        "fidelity": {"cosine_min": 0.99, "cosine_mean": 0.995, "top1_agreement": 0.98, "max_abs": 0.1, "rel_l2": 0.01},
        "latency_optimized": {"p50_ms": 1.0, "p90_ms": 1.2, "p99_ms": 2.0},
    }
    return {
        "rows": [row, {"provider": "cuda", "usable": False, "reason": "no GPU"}],
        "original_bytes": 100,
        "optimized_bytes": 30,
    }


def test_gates() -> None:
    gates = [
        parse_gate("accuracy_drop>1%"),
        parse_gate("p90_speedup < 1.5"),
        parse_gate("size_ratio>0.5"),
        parse_gate("cpu:cosine<0.98"),
    ]
    assert gates[0].threshold == pytest.approx(0.01)
    ok = evaluate(gates, _bench(2.0, 0.90, 0.895))
    assert [g.violated for g in ok] == [False, False, False, False]
    bad = evaluate(gates, _bench(1.2, 0.90, 0.85))
    assert [g.violated for g in bad] == [True, True, False, False]
    assert evaluate([parse_gate("cuda:speedup<2")], _bench(2.0, 0.9, 0.9))[0].violated  # no usable row: fail closed


@pytest.mark.parametrize("text", ["speed<2", "accuracy_drop>>1", "x", "cpu:speedup"])
def test_bad_gates(text: str) -> None:
    with pytest.raises(UserInputError):
        parse_gate(text)


def test_accuracy_gate_without_labels_is_an_input_error() -> None:
    bench = _bench(2.0, 0.9, 0.9)
    bench["rows"][0]["accuracy_original"] = None
    with pytest.raises(UserInputError, match="labelled"):
        evaluate([parse_gate("accuracy_drop>1%")], bench)


def test_cpu_probe_is_usable_and_unknown_aliases_fail() -> None:
    assert probe_provider("cpu").usable
    from optimizer_cli.runtime.providers import default_providers, installed_plugins

    defaults = parse_provider_list(None)
    assert defaults[:3] == ["cpu", "cuda", "trt"] and defaults == list(default_providers())
    assert ("openvino" in defaults) == any("openvino" in p for p in installed_plugins())
    with pytest.raises(UserInputError):
        parse_provider_list("cpu,tpu")


def _gpu_usable() -> bool:
    return probe_provider("cuda").usable


def test_gpu_provider_probes_say_why_or_really_run() -> None:
    import onnxruntime as ort

    from optimizer_cli.runtime.providers import _probe_model_bytes

    for alias in ("cuda", "trt"):
        status = probe_provider(alias)
        if not status.usable:
            assert status.reason and status.reason != "ok"
            continue
        # Usable means a session really runs on it (not the silent CPU fallback).
        sess = ort.InferenceSession(_probe_model_bytes(), providers=[status.name, "CPUExecutionProvider"])
        assert sess.get_providers()[0] == status.name


def test_native_output_is_silenced(capfd) -> None:
    with silence_native_output():
        os.write(1, b"banner on fd 1\n")
        os.write(2, b"banner on fd 2\n")
    os.write(1, b"after\n")
    captured = capfd.readouterr()
    assert "banner" not in captured.out and "banner" not in captured.err and "after" in captured.out


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_usable(), reason="no usable CUDA execution provider on this machine")
def test_cuda_benchmark_row(tmp_path) -> None:
    from optimizer_cli.bench.harness import BenchSettings, run_benchmark
    from optimizer_cli.data import random_dataset
    from optimizer_cli.model_io import load_model

    path = tmp_path / "m.onnx"
    onnx.save(mlp((64, 256, 10)), str(path))
    data = random_dataset(load_model(path), 4, 0, {"batch": 8})
    report = run_benchmark(path, path, BenchSettings(providers=["cuda"], rounds=3, memory=False), data)
    row = report.rows[0]
    assert row.usable and row.speedup is not None and row.fidelity.cosine_min > 0.999


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu sse2 avx2 avx512f avx512bw avx512_vnni", "AVX512-VNNI"),
        ("fpu sse2 avx2 avx512f avx512bw", "AVX512BW (no VNNI)"),
        ("fpu sse2 avx2 avx_vnni", "AVX-VNNI"),
        ("fpu sse2 avx2", "AVX2 (no VNNI)"),
        ("fpu sse2", "no AVX2/NEON"),
    ],
)
def test_cpu_isa_names_the_int8_vector_extension(flags: str, expected: str) -> None:
    cpuinfo = f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n"
    assert cpu_isa(cpuinfo) == expected


def test_environment_labels_the_cpu_with_its_isa() -> None:
    env = environment()
    assert cpu_label(env).startswith(env["cpu"])
    assert cpu_label({"cpu": "old report"}) == "old report"  # reports written before cpu_isa existed


def test_u8s8_saturates_only_on_x86_without_vnni(monkeypatch) -> None:
    import optimizer_cli.runtime.cpu as cpu

    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    assert u8s8_saturates("AVX2 (no VNNI)") and u8s8_saturates("AVX512BW (no VNNI)")
    assert not u8s8_saturates("AVX512-VNNI") and not u8s8_saturates("AVX-VNNI")
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    assert not u8s8_saturates("AVX2 (no VNNI)")


def test_latency_plan_fits_the_budget_and_keeps_two_rounds() -> None:
    from optimizer_cli.bench.latency import LatencyPlan, fit_to_budget

    asked = LatencyPlan(warmup=5, rounds=10, runs_per_round=10, discard_after_switch=3, inputs=32)
    same = fit_to_budget(asked, seconds_per_call=1e-4, budget_s=100)
    assert not same.shortened and same.rounds == 10 and same.runs_per_round == 32, "a round covers every input"
    slow = fit_to_budget(asked, seconds_per_call=5.0, budget_s=60)
    assert slow.shortened and slow.calls() * 5.0 <= 60
    assert slow.rounds >= 2 and slow.runs_per_round >= 1 and slow.runs_per_round >= slow.inputs
    hopeless = fit_to_budget(asked, seconds_per_call=100.0, budget_s=1)
    assert hopeless.rounds == 2 and hopeless.runs_per_round == 1 and hopeless.inputs == 1
    assert hopeless.warmup == 1 and hopeless.discard_after_switch == 0


def test_slow_model_benchmark_is_shortened_and_says_so(tmp_path) -> None:
    from optimizer_cli.bench.harness import BenchSettings, run_benchmark
    from optimizer_cli.data import random_dataset
    from optimizer_cli.model_io import load_model

    path = tmp_path / "m.onnx"
    onnx.save(mlp((512, 1024, 1024, 1024, 1024, 10)), str(path))
    data = random_dataset(load_model(path), 64, 0, {"batch": 256})
    start = time.perf_counter()
    # A budget far below one round of this model (~20 ms per call): the plan must shrink to its floor.
    report = run_benchmark(path, path, BenchSettings(providers=["cpu"], memory=False, max_seconds=0.01), data)
    took = time.perf_counter() - start
    row = report.rows[0]
    assert row.usable and row.speedup is not None and row.speedup.rounds == 2
    assert any("shortened" in n for n in report.notes), report.notes
    assert any("accuracy/fidelity used" in n for n in report.notes), report.notes
    assert took < 20, f"the budget was ignored ({took:.1f} s)"


def test_session_config_applies_every_session_option() -> None:
    import onnxruntime as ort

    from optimizer_cli.runtime.session import SessionConfig, create_session

    from .builders import to_ir

    model = to_ir(mlp())
    x = {"x": np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)}
    default = create_session(model, SessionConfig())
    options = default.get_session_options()
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.enable_mem_pattern and options.inter_op_num_threads == 1, "what every session had before"
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    tuned = create_session(
        model, SessionConfig(opt_level="basic", execution_mode="parallel", mem_pattern=False, inter_op_threads=3)
    )
    options = tuned.get_session_options()
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert not options.enable_mem_pattern and options.inter_op_num_threads == 3 and options.intra_op_num_threads == 2
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    parallel = create_session(model, SessionConfig(execution_mode="parallel")).get_session_options()
    assert parallel.inter_op_num_threads == 0, "onnxruntime's default: one per core"
    np.testing.assert_allclose(tuned.run(None, x)[0], default.run(None, x)[0], rtol=1e-5, atol=1e-6)


def test_optimized_model_is_benchmarked_with_its_session_options(tmp_path, monkeypatch) -> None:
    from optimizer_cli.bench import harness
    from optimizer_cli.data import random_dataset
    from optimizer_cli.model_io import load_model

    path = tmp_path / "m.onnx"
    onnx.save(mlp(), str(path))
    data = random_dataset(load_model(path), 2, 0, {"batch": 1})
    opened, measured = [], []

    def timed_session(source, config, feeds):
        opened.append(config)
        return real_timed_session(source, config, feeds)

    real_timed_session = harness.timed_session
    monkeypatch.setattr(harness, "timed_session", timed_session)
    monkeypatch.setattr(harness, "session_peak_memory", lambda *args: measured.append(args[-1]) or None)
    settings = harness.BenchSettings(
        providers=["cpu"],
        rounds=2,
        warmup=1,
        runs_per_round=2,
        optimized_session={"opt_level": "disable", "execution_mode": "parallel", "inter_op_threads": 2},
    )
    report = harness.run_benchmark(path, path, settings, data)
    assert report.rows[0].speedup is not None
    original, optimized = opened
    assert (original.opt_level, original.execution_mode, original.inter_op_threads) == ("all", "sequential", None)
    assert (optimized.opt_level, optimized.execution_mode, optimized.inter_op_threads) == ("disable", "parallel", 2)
    assert measured == [{}, settings.optimized_session], "peak memory too is measured with the options"
    note = next(n for n in report.notes if n.startswith("optimized model timed with"))
    assert "opt_level=disable (original: all)" in note and "execution_mode=parallel (original: sequential)" in note
    assert "inter_op_threads=2" in note and "mem_pattern" not in note
    plain = harness.run_benchmark(path, path, harness.BenchSettings(providers=["cpu"], rounds=2, memory=False), data)
    assert not any(n.startswith("optimized model timed with") for n in plain.notes)


def test_measure_many_hands_out_each_callables_round_medians() -> None:
    """tune pairs two finalists round by round after the fact: each callable's per-round medians, in order."""
    medians: list[list[float]] = []
    stats, _ = measure_many(
        [_busy(0.002), _busy(0.004), _busy(0.001)], warmup=1, rounds=4, runs_per_round=3, round_medians=medians
    )
    assert len(medians) == 3 and all(len(m) == 4 for m in medians)
    assert min(medians[1]) > max(medians[2])  # 4 ms above 1 ms in every round
    for rows, st in zip(medians, stats, strict=True):
        assert min(rows) * 1e3 <= st.p50_ms * 1.5 and max(rows) * 1e3 >= st.p50_ms / 1.5
