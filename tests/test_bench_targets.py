"""The benchmark per run target: the original on the CPU EP is the reference for every speedup and fidelity,
the engine alone is measured beside the optimized graph, placement and ignored precisions are said."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from optimizer_cli.bench import harness
from optimizer_cli.bench.harness import BenchSettings, ProviderRow, run_benchmark
from optimizer_cli.data import Dataset
from optimizer_cli.recipe import parse_recipe
from optimizer_cli.report.table import bench_rows
from optimizer_cli.runtime.providers import probe_provider
from optimizer_cli.runtime.session import ModelSource, SessionConfig, create_session

from .builders import mlp, random_feed

# A second engine every host has: the CPU EP with a provider option is a target other than the reference.
OTHER = "cpu:use_arena=0"


def _models(tmp_path: Path) -> tuple[Path, Path, Dataset]:
    original, changed = mlp(seed=0), mlp(seed=1)  # same signature, different weights: fidelity < 1
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(original, a)
    onnx.save(changed, b)
    feeds = [random_feed(original, seed=s, batch=1) for s in range(6)]
    return a, b, Dataset(feeds, None, "test", False)


def test_a_target_is_scored_and_timed_against_the_original_on_the_reference(tmp_path: Path) -> None:
    a, b, data = _models(tmp_path)
    settings = BenchSettings(providers=["cpu", OTHER], rounds=3, runs_per_round=3, warmup=1, memory=False)
    report = run_benchmark(a, b, settings, data)
    cpu, other = report.rows
    assert cpu.engine_alone is None and cpu.target == {
        "target": "cpu",
        "provider": "CPUExecutionProvider",
        "device": "cpu",
        "precision": None,
        "options": {},
    }
    # The optimized model on the other target is compared with the original on the CPU EP: same graph, same
    # kernels, so the same fidelity as on the reference row.
    assert other.fidelity is not None and cpu.fidelity is not None
    assert np.isclose(other.fidelity.cosine_min, cpu.fidelity.cosine_min, atol=1e-6)
    assert other.fidelity.cosine_min < 0.999  # b really differs from a
    # The engine alone: the unmodified model on the target, against the reference: identical outputs here.
    alone = other.engine_alone
    assert alone is not None and alone["fidelity"]["cosine_min"] > 0.99999
    assert alone["speedup"]["rounds"] == 3 and alone["latency"]["runs"] == other.latency_optimized.runs
    assert other.speedup is not None and other.latency_original is not None
    # Where the nodes ran, from onnxruntime's record: all on the CPU EP, nothing fell back.
    assert other.placement == {"original": {"CPUExecutionProvider": 5}, "optimized": {"CPUExecutionProvider": 5}}
    assert other.fallback_share == 0.0
    # The table shows the reference, the engine alone and the optimized model for the other target.
    _, rows = bench_rows({"benchmark": report.as_dict()})
    assert [r[1] for r in rows] == ["original", "optimized", "original (cpu)", "original", "optimized"]
    assert rows[2][0] == OTHER and rows[3][0] == "" and rows[3][9].startswith("1.0000")


def test_mostly_fallback_is_labelled_in_the_notes_and_the_table() -> None:
    row = ProviderRow(
        "openvino",
        True,
        "ok",
        placement={"optimized": {"CPUExecutionProvider": 7, "OpenVINOExecutionProvider": 3}},
        fallback_share=0.7,
    )
    from optimizer_cli.bench.latency import SpeedupEstimate

    row.speedup = SpeedupEstimate(1.2, 1.1, 1.3, None, None, 3, False, True)
    notes = harness._outcome_notes([row], BenchSettings(providers=["openvino"]))
    assert any(n.startswith("MOSTLY FALLBACK: openvino: 70%") and "7 CPUExecutionProvider" in n for n in notes)
    from optimizer_cli.report.table import _fallback_mark

    assert "mostly fallback" in _fallback_mark({"fallback_share": 0.7})
    assert _fallback_mark({"fallback_share": 0.0}) == "" and "mostly" not in _fallback_mark({"fallback_share": 0.2})


def test_an_ignored_precision_is_caught_by_identical_outputs(tmp_path: Path) -> None:
    """On a host without TensorRT, trt:fp16 and trt run on the CPU EP alike: the check finds them identical.
    (Where TensorRT runs, fp16 changes the outputs and the check says they differ.)"""
    a, _, data = _models(tmp_path)
    if probe_provider("trt").usable:
        expected_identical = False
    else:
        expected_identical = True
    settings = BenchSettings(providers=["trt:fp16"], memory=False)
    source = ModelSource(a)
    pair = harness._Sessions("trt:fp16", None, create_session(source, SessionConfig(provider="trt:fp16")), {})
    check = harness.precision_check(pair, source, settings, data.feeds)
    assert check == {"against": "trt", "identical": expected_identical}
    assert harness.precision_check(harness._Sessions("cpu", None, None, {}), source, settings, data.feeds) is None


def test_the_recipe_runtime_section_round_trips_and_joins_the_benchmark() -> None:
    rec = parse_recipe("passes: []\nruntime: {target: 'OpenVINO:FP32'}\n")
    assert rec.runtime.target == "openvino:f32"
    dumped = rec.model_dump(mode="json")
    assert parse_recipe(__import__("yaml").safe_dump(dumped)).runtime == rec.runtime
    from optimizer_cli.workflows.common import BenchOptions, bench_settings

    settings = bench_settings(rec, BenchOptions(eval_samples=None, memory=False), 2)
    assert settings.providers[0] == "cpu" and settings.providers[-1] == "openvino:f32"
    asked = BenchOptions(providers="cpu", eval_samples=None, memory=False)
    assert bench_settings(rec, asked, 2).providers == ["cpu"]  # the flag wins


def test_a_sweep_gives_every_shape_point_of_a_target_its_row(tmp_path: Path) -> None:
    a, b, data = _models(tmp_path)
    settings = BenchSettings(
        providers=[OTHER], rounds=2, runs_per_round=2, warmup=1, memory=False, sweep=[{"batch": 1}, {"batch": 3}]
    )
    rows = run_benchmark(a, b, settings, data).rows
    assert [r.shape for r in rows] == ["batch=1", "batch=3"]
    assert all(r.engine_alone is not None and r.fidelity is not None for r in rows)


def test_the_providers_not_usable_here_are_said_in_one_line() -> None:
    from optimizer_cli.report.table import unusable_lines

    rows = [
        {"provider": "cpu", "usable": True, "reason": "ok"},
        {"provider": "cuda", "usable": False, "reason": "no GPU"},
        {"provider": "openvino", "usable": False, "reason": "no CPU device on this host"},
    ]
    assert unusable_lines({"benchmark": {"rows": rows}}) == [
        "not benchmarked, not usable here: cuda (no GPU); openvino (no CPU device on this host)"
    ]
    assert unusable_lines({"benchmark": {"rows": rows[:1]}}) == []


def test_the_p99_note_quotes_the_runs_the_rounds_really_had(tmp_path: Path) -> None:
    """The plan covers every input once a round: 6 inputs make 6 runs a round although 2 were asked."""
    a, b, data = _models(tmp_path)
    settings = BenchSettings(providers=["cpu"], rounds=2, runs_per_round=2, warmup=1, memory=False)
    notes = run_benchmark(a, b, settings, data).notes
    assert any("the rounds had 6; benchmark.runs_per_round asks 2" in n for n in notes), notes


def test_the_reproduce_command_scores_on_tunes_evaluation_samples(tmp_path: Path) -> None:
    import shlex

    from optimizer_cli.search.tune import reproduce_command

    command = shlex.split(reproduce_command("m.onnx", tmp_path / "r.yaml", None, "eval.npz", 397))
    assert command[command.index("--data") + 1] == str(Path("eval.npz").resolve())
    assert command[command.index("--eval-samples") + 1] == "397" and "--allow-code" not in command
    assert "--allow-code" in reproduce_command("m.onnx", tmp_path / "r.yaml", None, "loader.py:samples", 8)


def test_a_gate_can_name_a_whole_run_target() -> None:
    from optimizer_cli.bench.gate import evaluate, parse_gate

    gate = parse_gate("OpenVINO:FP32:cosine<0.99")
    assert (gate.provider, gate.metric) == ("openvino:f32", "cosine")
    assert parse_gate("cpu:speedup<1.5").provider == "cpu"
    rows = [
        {"provider": "cpu", "usable": True, "shape": "", "fidelity": {"cosine_min": 1.0}},
        {"provider": "openvino:f32", "usable": True, "shape": "", "fidelity": {"cosine_min": 0.95}},
    ]
    (result,) = evaluate([gate], {"rows": rows})
    assert result.violated and "openvino:f32" in result.detail


OPENVINO_REFUSAL = """[ONNXRuntimeError] : 11 : EP_FAIL : Check 'false' failed at unconverted_ops_report.cpp:151:
FrontEnd API failed with OpConversionFailure:
Model wasn't fully converted. Failed operations detailed log:
-- Conv-11 with a message:
FrontEnd API failed with GeneralFailure:
The input data tensor's rank has to be known (static)
Summary:
-- Conversion is failed for: Conv-11, ReduceMean-13"""


def test_an_engine_that_refuses_the_model_is_a_row_saying_why_not_a_failed_benchmark(
    tmp_path: Path, monkeypatch
) -> None:
    """OpenVINO's converter refuses silero-vad (a Conv on a tensor of unknown rank inside an If): the CPU EP row
    stands, the other target's row names the ops and the reason, and --strict-ep makes it an error."""
    a, b, data = _models(tmp_path)
    real = harness.timed_session

    def refusing(source: ModelSource, config: SessionConfig, feed: dict) -> object:
        if config.provider == OTHER:
            raise RuntimeError(OPENVINO_REFUSAL)
        return real(source, config, feed)

    monkeypatch.setattr(harness, "timed_session", refusing)
    settings = BenchSettings(providers=["cpu", OTHER], rounds=2, runs_per_round=2, warmup=1, memory=False)
    report = run_benchmark(a, b, settings, data)
    cpu, other = report.rows
    assert cpu.usable and cpu.speedup is not None
    assert not other.usable
    assert other.reason == (
        f"'{OTHER}' cannot run this model: its converter failed on Conv-11, ReduceMean-13 "
        "(The input data tensor's rank has to be known (static))"
    )
    strict = BenchSettings(providers=["cpu", OTHER], rounds=2, runs_per_round=2, warmup=1, memory=False, strict_ep=True)
    import pytest

    from optimizer_cli.errors import UserInputError

    with pytest.raises(UserInputError, match="cannot run this model.*--strict-ep"):
        run_benchmark(a, b, strict, data)


def test_an_engine_that_refuses_only_the_original_still_measures_the_optimized_model(
    tmp_path: Path, monkeypatch
) -> None:
    """freeze_inputs folds the If that OpenVINO's converter refused in silero-vad: the optimized model runs on the
    engine, so its row is measured against the original on the CPU EP, and a note says the original could not run
    there (before, the whole target was reported unusable)."""
    a, b, data = _models(tmp_path)
    real = harness.timed_session

    def refusing_the_original(source: ModelSource, config: SessionConfig, feed: dict) -> object:
        if config.provider == OTHER and str(source.data) == str(a):
            raise RuntimeError(OPENVINO_REFUSAL)
        return real(source, config, feed)

    monkeypatch.setattr(harness, "timed_session", refusing_the_original)
    settings = BenchSettings(providers=["cpu", OTHER], rounds=2, runs_per_round=2, warmup=1, memory=False)
    report = run_benchmark(a, b, settings, data)
    cpu, other = report.rows
    assert cpu.usable and other.usable
    assert other.speedup is not None and other.fidelity is not None
    assert other.engine_alone is None  # no "engine alone" figure: the engine could not run the original
    assert any(
        f"'{OTHER}' cannot run the original" in n and "compared with the original on the CPU EP" in n
        for n in report.notes
    )
    from optimizer_cli.report.table import bench_rows

    _, lines = bench_rows({"benchmark": report.as_dict()})
    # The target's first line is the original on the CPU EP, and says so; the CPU EP's own row is plain.
    assert [(line[0], line[1]) for line in lines] == [
        ("cpu", "original"),
        ("", "optimized"),
        (OTHER, "original (cpu)"),
        ("", "optimized"),
    ]

    # Where the optimized model runs there too, its placement is still checked: all of it on another EP is a
    # fallback row, not a measurement of the engine.
    monkeypatch.setattr(harness, "node_placement", lambda sess: {"SomeOtherExecutionProvider": 3})
    report = run_benchmark(a, b, settings, data)
    other = report.rows[-1]
    assert not other.usable and other.reason == f"session for '{OTHER}' fell back to SomeOtherExecutionProvider"
