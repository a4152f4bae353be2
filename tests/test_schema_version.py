"""Every JSON document the tool writes says its schema version first (issue 23): --json of every command, the
--report file, tune.json and the error document."""

from __future__ import annotations

import json
from pathlib import Path

from optimizer_cli import SCHEMA_VERSION
from tests.conftest import run_cli


def _first_key_is_the_version(text: str) -> dict:
    doc = json.loads(text)
    assert next(iter(doc)) == "schema_version" and doc["schema_version"] == SCHEMA_VERSION, list(doc)[:3]
    return doc


def test_every_json_document_says_its_schema_version(examples_dir: Path, tmp_path: Path) -> None:
    model = str(examples_dir / "digits_mlp.onnx")
    fast = ["--providers", "cpu", "--rounds", "2", "--no-memory", "--eval-samples", "4"]
    report = tmp_path / "bench.json"
    bench = run_cli("bench", model, model, *fast, "--json", "--report", str(report))
    assert bench.returncode == 0, bench.stderr
    _first_key_is_the_version(bench.stdout)
    assert json.loads(report.read_text())["schema_version"] == SCHEMA_VERSION
    for args in (["providers", "--json"], ["passes", "--json"], ["recipes", "--json"], ["validate", "int8", "--json"]):
        proc = run_cli(*args)
        assert proc.returncode == 0, (args, proc.stderr)
        _first_key_is_the_version(proc.stdout)
    plan = run_cli(model, "--recipe", "int8", "--dry-run", "--json")
    assert plan.returncode == 0, plan.stderr
    _first_key_is_the_version(plan.stdout)
    error = run_cli(str(tmp_path / "missing.onnx"), "--recipe", "int8", "--json")
    assert error.returncode == 2
    assert _first_key_is_the_version(error.stdout)["exit_code"] == 2
