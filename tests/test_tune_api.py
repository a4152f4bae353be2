"""`run_tune(TuneRequest(...))`: optimize tune as a library call (issue 23). It prints nothing, tells each trial
to the listener, writes the outputs, and returns the report whose to_dict() is the document `--json` prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from optimizer_cli import SCHEMA_VERSION
from optimizer_cli.errors import UserInputError
from optimizer_cli.workflows.events import Event
from optimizer_cli.workflows.tune import TuneRequest, parse_duration, run_tune
from tests.conftest import run_cli
from tests.test_tune import PRUNE_SPACE


def _request(examples_dir: Path, tmp_path: Path, **changes: object) -> TuneRequest:
    """The small study of test_tune.py's CLI tests: structured pruning alone, goals on size and cosine."""
    space = tmp_path / "space.yaml"
    space.write_text(PRUNE_SPACE)
    fields: dict = {
        "model": examples_dir / "digits_cnn.onnx",
        "data": str(examples_dir / "digits_eval.npz"),
        "calib": str(examples_dir / "digits_calib.npz"),
        "goals": ["size_ratio<=0.8", "cosine>=0.1"],
        "space": space,
        "eval_samples": 64,
        "trials": 2,
        "output": tmp_path / "best.onnx",
    }
    return TuneRequest(**(fields | changes))  # type: ignore[arg-type]


def test_run_tune_is_the_cli_json_silently_with_a_trial_event_each(
    examples_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events: list[Event] = []
    study = tmp_path / "study"
    report = run_tune(_request(examples_dir, tmp_path, study=study), events.append)
    assert capsys.readouterr().out == ""  # a library call never prints
    doc = report.to_dict()
    assert next(iter(doc)) == "schema_version" and doc["schema_version"] == SCHEMA_VERSION
    assert doc["kind"] == "tune" and report.exit_code == 0 and report.winner is not None
    trials = [e for e in events if e.kind == "trial"]
    assert [e.data["last"]["number"] for e in trials] == [t["number"] for t in doc["trials"]] == [0, 1]
    assert all(e.text.startswith(f"trial {e.data['last']['number']}:") for e in trials)
    assert trials[-1].data["done"] == 2 and "status" in trials[-1].data
    started = [e for e in events if "model" in e.data]
    assert len(started) == 1 and started[0].data["study"] == str(study)
    # The outputs are written, and tune.json on disk is the report's document.
    out = tmp_path / "best.onnx"
    for path in (out, tmp_path / "best.recipe.yaml", tmp_path / "best.pareto.png", tmp_path / "best.report.html"):
        assert path.is_file() and path.stat().st_size > 0, path
    assert doc["outputs"]["model"] == str(out)
    assert json.loads((tmp_path / "best.tune.json").read_text()) == json.loads(report.to_json())
    # The CLI re-reporting the same study prints the same document: same keys, same trials, same winner.
    again = run_cli("tune", str(examples_dir / "digits_cnn.onnx"), "--data", str(examples_dir / "digits_eval.npz"),
                    "--calib", str(examples_dir / "digits_calib.npz"), "--space", str(tmp_path / "space.yaml"),
                    "--eval-samples", "64", "--goal", "size_ratio<=0.8", "--goal", "cosine>=0.1", "--trials", "2",
                    "--study", str(study), "--report-only", "-o", str(tmp_path / "again.onnx"), "--json")  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    cli_doc = json.loads(again.stdout)
    assert list(cli_doc) == list(doc)
    assert cli_doc["trials"] == doc["trials"] and cli_doc["winner"]["number"] == doc["winner"]["number"]


def test_run_tune_refuses_in_parameter_names_before_any_work(examples_dir: Path, tmp_path: Path) -> None:
    model = examples_dir / "digits_cnn.onnx"
    cases: list[tuple[dict[str, object], str]] = [
        ({"goals": []}, "goals: tune needs at least one goal"),
        ({"goals": ["cosin>=0.9"]}, "goals 'cosin>=0.9': unknown metric"),
        ({"budget": "soon"}, "budget 'soon': expected a duration"),
        ({"trials": None}, "tune needs budget (e.g. 15m) or trials"),
        ({"resume": True}, "resume and report_only need study"),
        ({"sampler": "grid"}, "sampler 'grid': expected tpe or nsga2"),
        ({"executor": "dask"}, "executor 'dask': expected local, ray"),
        ({"trials": 0}, "trials: must be at least 1"),
        ({"dims": {"batch": 0}}, "dims 'batch=0'"),
        ({"output": model}, "refusing to overwrite the input model with output"),
        ({"model": [model, model.with_name("digits_mlp.onnx")]}, "output must name a folder"),
    ]
    for changes, message in cases:
        with pytest.raises(UserInputError) as caught:
            run_tune(_request(examples_dir, tmp_path, **changes))
        assert message in str(caught.value), (changes, str(caught.value))
        assert "--" not in str(caught.value), str(caught.value)  # no CLI flag in a library message
    assert not (tmp_path / "best.onnx").exists() and not (tmp_path / "best.tune.json").exists()


def test_a_caller_names_the_parameters_its_own_way(examples_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="--budget 'soon'"):
        run_tune(_request(examples_dir, tmp_path, budget="soon", names={"budget": "--budget"}))


def test_durations_read_as_seconds() -> None:
    assert [parse_duration(v) for v in (600, "600", "90s", "15m", "1h", None)] == [600, 600, 90, 900, 3600, None]
    for bad in ("0", "-5m", "nan", "m", "soon"):
        with pytest.raises(UserInputError, match=f"budget '{bad}'"):
            parse_duration(bad)
