"""The Python API (issue 23): optimize / benchmark / tune / load_recipe return the documents the commands print
with --json, report progress only to a listener, print nothing, and name parameters (not flags) in errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from optimizer_cli.errors import UserInputError
from optimizer_cli.workflows.events import Event
from tests.conftest import run_cli

# Few samples, one thread, no memory probe: the figures compared here do not depend on timing.
QUICK = {"threads": 1, "eval_samples": 32, "memory": False}
QUICK_FLAGS = ["--threads", "1", "--eval-samples", "32", "--no-memory"]
# Fields that differ between two runs of the same work: when, how long, and who asked.
TIMING_KEYS = {"timestamp", "command", "seconds", "verify_seconds", "setup_s_original", "setup_s_optimized"}


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _fidelity_by_provider(document: dict[str, Any]) -> dict[str, Any]:
    """Each benchmark row's deterministic figures: accuracy and fidelity (not latency)."""
    return {
        row["provider"]: {
            "fidelity": row.get("fidelity"),
            "accuracy": {k: v for k, v in row.items() if "accuracy" in k or "top" in k},
        }
        for row in document["benchmark"]["rows"]
    }


def test_import_is_light_and_the_api_loads_on_first_use() -> None:
    code = (
        "import sys, optimizer_cli\n"
        "heavy = [m for m in ('optimizer_cli.api', 'numpy', 'onnxruntime', 'onnx_ir') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from optimizer_cli import optimize, RunReport, load_recipe\n"
        "import optimizer_cli.api as api\n"
        "assert optimize is api.optimize and RunReport is api.RunReport and load_recipe is api.load_recipe\n"
        "assert set(optimizer_cli.__all__) <= set(dir(optimizer_cli))\n"
        "try:\n"
        "    optimizer_cli.no_such_name\n"
        "except AttributeError as exc:\n"
        "    assert 'no_such_name' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('an unknown name must raise AttributeError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_load_recipe_resolves_a_preset_and_a_file_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from optimizer_cli import load_recipe
    from optimizer_cli.recipe import preset_path

    rec = load_recipe("int8")
    assert rec.name == "int8" and [p.type for p in rec.passes] == [
        p.type for p in load_recipe(preset_path("int8")).passes
    ]
    assert load_recipe("int8", ["benchmark.threads=3"]).benchmark.threads == 3
    monkeypatch.chdir(tmp_path)
    Path("int8").write_text("name: mine\npasses: [{type: cleanup}]\n")
    assert load_recipe("int8").name == "mine", "a file named like a preset wins, as --recipe"
    with pytest.raises(UserInputError, match="no such file or preset 'nope'"):
        load_recipe("nope")


def test_optimize_returns_the_run_document_of_the_cli(
    examples_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The acceptance check: same keys and the same stage, pass and fidelity values as `optimize run --json`;
    events reach the listener; nothing reaches stdout or stderr."""
    from optimizer_cli import RunReport, load_recipe, optimize

    model, calib, data = (examples_dir / n for n in ("digits_cnn.onnx", "digits_calib.npz", "digits_eval.npz"))
    done = run_cli(
        str(model), "--recipe", "int8", "-o", str(tmp_path / "cli.onnx"), "--calib", str(calib), "--data", str(data),
        "--providers", "cpu", *QUICK_FLAGS, "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    expected = json.loads(done.stdout)
    capfd.readouterr()

    events: list[Event] = []
    report = optimize(
        model, load_recipe("int8"), output=tmp_path / "api.onnx", calib=str(calib), data=data,
        providers=["cpu"], listener=events.append, **QUICK,
    )  # fmt: skip
    out, err = capfd.readouterr()
    assert (out, err) == ("", ""), "a library call prints nothing"
    assert isinstance(report, RunReport) and report.passed and report.exit_code == 0
    got = report.to_dict()
    assert list(got) == list(expected), "the same document, key for key and in order"
    assert got["schema_version"] == expected["schema_version"]
    assert got["recipe"] == expected["recipe"] and got["recipe"]["preset"] == "int8"
    stages = _without_timings(got["stages"])
    assert [s["name"] for s in stages] == [s["name"] for s in expected["stages"]]
    for mine, theirs in zip(stages, _without_timings(expected["stages"]), strict=True):
        assert mine.keys() == theirs.keys()
        assert (mine["modified"], mine["nodes"], mine["weight_bytes"]) == (
            theirs["modified"],
            theirs["nodes"],
            theirs["weight_bytes"],
        )
        assert json.dumps(mine, sort_keys=True) == json.dumps(theirs, sort_keys=True)
    assert got["verification"]["samples"] == expected["verification"]["samples"]
    assert got["benchmark"].keys() == expected["benchmark"].keys()
    assert _fidelity_by_provider(got) == _fidelity_by_provider(expected)
    assert got["input_sha256"] == expected["input_sha256"] and got["output_sha256"] == expected["output_sha256"]
    assert got["command"].startswith("optimizer_cli.optimize(") and (tmp_path / "api.onnx").exists()
    assert json.loads(report.to_json()) == got

    kinds = {e.kind for e in events}
    assert {"step", "line", "info"} <= kinds, kinds
    assert any(e.kind == "line" and e.text.startswith("quantize:") for e in events), "a pass's line"
    assert any(e.kind == "info" and "preset 'int8'" in e.text for e in events), "the recipe picked"
    assert any(e.kind == "info" and e.text.startswith(f"wrote {tmp_path / 'api.onnx'}") for e in events)


def test_optimize_errors_name_parameters_not_flags(examples_dir: Path, tmp_path: Path) -> None:
    from optimizer_cli import optimize

    model = examples_dir / "digits_cnn.onnx"
    with pytest.raises(UserInputError) as caught:
        optimize(model, "int8", output=tmp_path / "o.onnx", bench=False, fail_if=["speedup<1.5"])
    assert str(caught.value).startswith("fail_if needs a benchmark (bench=True"), caught.value
    with pytest.raises(UserInputError) as caught:
        optimize(model, "int8", output=tmp_path / "o.onnx", fail_if=["speed<1"])
    assert str(caught.value).startswith("fail_if 'speed<1': unknown metric"), caught.value
    with pytest.raises(UserInputError) as caught:
        optimize(model, "int8", output=examples_dir / "digits_eval.npz", data=examples_dir / "digits_eval.npz")
    assert "refusing to overwrite data with output" in str(caught.value), caught.value
    with pytest.raises(UserInputError, match="unknown parameter.s. colour"):
        optimize(model, "int8", colour="red")
    with pytest.raises(UserInputError, match="recipe: expected a Recipe, a recipe file or a preset's name"):
        optimize(model, 42, output=tmp_path / "o.onnx")
    assert not list(tmp_path.iterdir()), "a refused call writes nothing"


def test_a_violated_gate_is_a_report_not_an_exception(examples_dir: Path, tmp_path: Path) -> None:
    """And the model stays unwritten, as with the CLI's exit 1."""
    from optimizer_cli import optimize

    report = optimize(
        examples_dir / "digits_cnn.onnx", "int8", output=tmp_path / "o.onnx", providers="cpu",
        fail_if=["speedup>0"], attribute=False, **QUICK,
    )  # fmt: skip
    assert not report.passed and report.exit_code == 1
    assert report.to_dict()["output_written"] is False and not (tmp_path / "o.onnx").exists()
    assert any("fail_if gate was violated" in n for n in report.notes), report.notes


def test_benchmark_returns_the_bench_document_of_the_cli(
    examples_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from optimizer_cli import BenchReport, benchmark

    original, data = examples_dir / "digits_cnn.onnx", examples_dir / "digits_eval.npz"
    done = run_cli(
        "bench", str(original), str(original), "--data", str(data), "--providers", "cpu", "--rounds", "2",
        *QUICK_FLAGS, "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    expected = json.loads(done.stdout)
    capfd.readouterr()
    events: list[Event] = []

    def listener(event: Event) -> None:  # a listener that prints is seen: the work's own prints are not
        events.append(event)
        print(f"event: {event.kind}")

    report = benchmark(str(original), original, data=str(data), providers="cpu", rounds=2, listener=listener, **QUICK)
    out, err = capfd.readouterr()
    assert out.splitlines() == [f"event: {e.kind}" for e in events] and events and err == ""
    assert isinstance(report, BenchReport) and report.passed
    got = report.to_dict()
    assert list(got) == list(expected)
    assert got["benchmark"].keys() == expected["benchmark"].keys()
    assert _fidelity_by_provider(got) == _fidelity_by_provider(expected)
    assert got["command"].startswith("optimizer_cli.benchmark(")
    assert any(e.kind == "line" and "cpu" in e.text for e in events), [e.text for e in events]


def test_benchmark_errors_name_parameters(examples_dir: Path, tmp_path: Path) -> None:
    from optimizer_cli import benchmark

    cnn, mlp = examples_dir / "digits_cnn.onnx", examples_dir / "digits_mlp.onnx"
    with pytest.raises(UserInputError, match="file not found"):
        benchmark(cnn, tmp_path / "missing.onnx")
    with pytest.raises(UserInputError, match="models have different inputs/outputs"):
        benchmark(cnn, mlp, providers="cpu", **QUICK)
    with pytest.raises(UserInputError) as caught:
        benchmark(cnn, cnn, fail_if=["nonsense"])
    assert str(caught.value).startswith("fail_if 'nonsense'"), caught.value
    with pytest.raises(UserInputError) as caught:
        benchmark(cnn, cnn, sweep=["batch"], providers="cpu", **QUICK)
    assert str(caught.value).startswith("sweep 'batch'"), caught.value
    with pytest.raises(UserInputError, match="rounds at least 2"):
        benchmark(cnn, cnn, rounds=1)


def test_tune_checks_its_parameters_before_any_work(examples_dir: Path, tmp_path: Path) -> None:
    from optimizer_cli import tune

    model, data = examples_dir / "digits_cnn.onnx", examples_dir / "digits_eval.npz"
    with pytest.raises(UserInputError) as caught:
        tune(model, data=data, goals=[], trials=1, output=tmp_path / "t.onnx")
    assert "goal" in str(caught.value) and "--goal" not in str(caught.value), caught.value
    with pytest.raises(UserInputError, match="unknown parameter.s. trails"):
        tune(model, data=data, goals=["cosine>=0.99"], trails=3)
    assert not list(tmp_path.iterdir())
