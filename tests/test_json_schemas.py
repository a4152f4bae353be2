"""The documents `run`, `bench` and `tune` print with --json, and the error document, match the JSON Schemas in
docs/schemas (issue 23). The commands run through the CLI, as a pipeline runs them, so the test holds wherever the
code that builds the documents lives."""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tests.conftest import ROOT, run_cli

SCHEMAS = ROOT / "docs" / "schemas"
DOCUMENTS = ("run", "bench", "tune", "error")
FAST = ["--eval-samples", "16", "--no-memory"]


def _schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text())


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _problems(name: str, doc: Any, schema: dict[str, Any] | None = None) -> list[str]:
    errors = _validator(schema or _schema(name)).iter_errors(doc)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errors]


def _document(proc: subprocess.CompletedProcess[str], exit_code: int) -> dict[str, Any]:
    assert proc.returncode == exit_code, (proc.returncode, proc.stderr[-2000:])
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


@pytest.fixture(scope="module")
def documents(examples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """One real document of each kind, from the example MLP: run with a gate (its --report is bench's --baseline,
    so bench's document holds baseline rows), bench of run's output, tune, and a missing input file."""
    out = tmp_path_factory.mktemp("json_schemas")
    model = str(examples_dir / "digits_mlp.onnx")
    calib, data = str(examples_dir / "digits_mlp_calib.npz"), str(examples_dir / "digits_mlp_eval.npz")
    optimized, report = out / "mlp.int8.onnx", out / "run.report.json"
    run = run_cli(
        model, "--recipe", "int8", "-o", str(optimized), "--data", data, *FAST, "--providers", "cpu",
        "--fail-if", "cosine<0.5", "--json", "--report", str(report),
    )  # fmt: skip
    # cuda is a row whether or not this host has a GPU: an unusable target is a row of nulls the schema must allow.
    bench = run_cli(
        "bench", model, str(optimized), "--data", data, *FAST, "--providers", "cpu,cuda",
        "--baseline", str(report), "--json",
    )  # fmt: skip
    tune = run_cli(
        "tune", model, "--goal", "cosine>=0.99", "--data", data, "--calib", calib, "--trials", "2",
        "--eval-samples", "16", "-o", str(out / "tuned" / "best.onnx"), "--json",
    )  # fmt: skip
    missing = run_cli(str(out / "missing.onnx"), "--recipe", "int8", "--json")
    docs = {"run": _document(run, 0), "bench": _document(bench, 0), "error": _document(missing, 2)}
    assert json.loads(report.read_text()) == docs["run"], "--report writes the document --json prints"
    # Tune's exit code says whether a winner was found (1: none); the document has one schema either way.
    assert tune.returncode in (0, 1), tune.stderr[-2000:]
    docs["tune"] = json.loads(tune.stdout)
    return docs


@pytest.mark.parametrize("name", DOCUMENTS)
def test_each_schema_is_a_valid_draft_2020_12_schema(name: str) -> None:
    schema = _schema(name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def _property_schemas(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """Every (path, schema) under a `properties` keyword, however deep."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                for prop, sub in value.items():
                    yield f"{where}/{prop}", sub
            yield from _property_schemas(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _property_schemas(value, f"{where}/{i}")


@pytest.mark.parametrize("name", DOCUMENTS)
def test_every_property_is_described(name: str) -> None:
    undescribed = [path for path, sub in _property_schemas(_schema(name)) if not sub.get("description")]
    assert not undescribed, undescribed


def test_definitions_the_schemas_share_are_identical() -> None:
    """run, bench and tune each stand alone (one file to hand a validator), so a shared $def is copied: the copies
    must not drift apart."""
    defs = {name: _schema(name)["$defs"] for name in ("run", "bench", "tune")}
    for a, b in (("run", "bench"), ("run", "tune"), ("bench", "tune")):
        for shared in defs[a].keys() & defs[b].keys():
            assert defs[a][shared] == defs[b][shared], f"$defs/{shared} differs between {a} and {b}"
    assert {"benchmark", "row", "speedup", "fidelity", "gate"} <= defs["run"].keys() & defs["bench"].keys()


@pytest.mark.parametrize("name", DOCUMENTS)
def test_the_document_matches_its_schema(name: str, documents: dict[str, dict[str, Any]]) -> None:
    assert documents[name]["schema_version"] == 1
    assert not _problems(name, documents[name])


def test_the_documents_cover_the_parts_the_docs_promise(documents: dict[str, dict[str, Any]]) -> None:
    """The runs above exercise gates, baseline rows, an unusable provider row and a tune trial list: a schema for
    those parts is checked against real values, not only against their absence."""
    run, bench, tune = documents["run"], documents["bench"], documents["tune"]
    assert run["gates"] and run["gates"][0]["expression"] == "cosine<0.5" and not run["gates"][0]["violated"]
    assert bench["baseline"] and bench["baseline"][0]["provider"] == "cpu"
    assert [r["usable"] for r in bench["benchmark"]["rows"] if r["provider"] == "cuda"] in ([True], [False])
    assert run["stages"] and run["benchmark"]["rows"][0]["fidelity"]["per_output"]
    assert len(tune["trials"]) == 2 and tune["final"]["verdict"] in ("found", "none")
    # Optional in the schema (a library call may skip hashing), but every --json document records them.
    assert all(len(doc["input_sha256"]) == 64 and doc["output_sha256"] for doc in (run, bench))


def _strict(node: Any) -> Any:
    """The schema with every object that lists its properties closed: a key the code writes and the schema does
    not describe is then an error."""
    if isinstance(node, dict):
        closed = {key: _strict(value) for key, value in node.items()}
        if "properties" in closed and "additionalProperties" not in closed:
            closed["additionalProperties"] = False
        return closed
    if isinstance(node, list):
        return [_strict(value) for value in node]
    return node


@pytest.mark.parametrize("name", DOCUMENTS)
def test_every_key_the_document_holds_is_described(name: str, documents: dict[str, dict[str, Any]]) -> None:
    """The schemas are open (a key may be added without a schema_version change), but the keys this version
    writes are all described: a new key fails here until its schema says what it means."""
    strict = _strict(_schema(name))
    assert not _problems(name, documents[name], strict)
    assert _problems(name, {**documents[name], "undescribed": 1}, strict), "the strict copy must refuse a new key"


def _without(doc: dict[str, Any], *path: str | int) -> dict[str, Any]:
    changed = copy.deepcopy(doc)
    node: Any = changed
    for step in path[:-1]:
        node = node[step]
    del node[path[-1]]
    return changed


def _replaced(doc: dict[str, Any], value: Any, *path: str | int) -> dict[str, Any]:
    changed = copy.deepcopy(doc)
    node: Any = changed
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return changed


# Mutations each schema must reject: required keys dropped, wrong types and values, at the top and deep inside.
BROKEN: dict[str, list[tuple[str, Any]]] = {
    "run": [
        ("no schema_version", lambda d: _without(d, "schema_version")),
        ("schema_version 2", lambda d: _replaced(d, 2, "schema_version")),
        ("no stages", lambda d: _without(d, "stages")),
        ("a stage without drift", lambda d: _without(d, "stages", 0, "drift_vs_original")),
        ("exactness misspelt", lambda d: _replaced(d, "exactish", "stages", 0, "exactness")),
        ("a row without speedup", lambda d: _without(d, "benchmark", "rows", 0, "speedup")),
        ("speedup as text", lambda d: _replaced(d, "1.5x", "benchmark", "rows", 0, "speedup", "median")),
        ("a gate without violated", lambda d: _without(d, "gates", 0, "violated")),
        ("an unknown verdict", lambda d: _replaced(d, "better", "benchmark", "verdict")),
        ("a bad timestamp", lambda d: _replaced(d, "yesterday", "timestamp")),
    ],
    "bench": [
        ("no benchmark", lambda d: _without(d, "benchmark")),
        ("a baseline figure as a bare number", lambda d: _replaced(d, 1.0, "baseline", 0, "p50_ms")),
        ("no rows", lambda d: _without(d, "benchmark", "rows")),
        ("a fidelity without cosine_min", lambda d: _without(d, "benchmark", "rows", 0, "fidelity", "cosine_min")),
        ("a short sha256", lambda d: _replaced(d, "abc", "input_sha256")),
        ("an input hash without the output's", lambda d: _without(d, "output_sha256")),
        ("environment without onnxruntime", lambda d: _without(d, "benchmark", "environment", "onnxruntime")),
    ],
    "tune": [
        ("no trials", lambda d: _without(d, "trials")),
        ("a trial without state", lambda d: _without(d, "trials", 0, "state")),
        ("an unknown trial state", lambda d: _replaced(d, "lost", "trials", 0, "state")),
        ("no final verdict", lambda d: _without(d, "final", "verdict")),
        ("an unknown kind", lambda d: _replaced(d, "study", "kind")),
        ("winner as text", lambda d: _replaced(d, "trial 0", "winner")),
    ],
    "error": [
        ("no exit_code", lambda d: _without(d, "exit_code")),
        ("exit_code 0", lambda d: _replaced(d, 0, "exit_code")),
        ("error as a list", lambda d: _replaced(d, ["file not found"], "error")),
    ],
}


@pytest.mark.parametrize(("name", "label"), [(name, label) for name, cases in BROKEN.items() for label, _ in cases])
def test_a_broken_document_is_rejected(name: str, label: str, documents: dict[str, dict[str, Any]]) -> None:
    """The schemas can fail: each mutation of a real document is an error."""
    mutate = dict(BROKEN[name])[label]
    assert _problems(name, mutate(documents[name])), f"{name} schema accepted a document with {label}"


def test_several_models_make_one_tune_many_document(documents: dict[str, dict[str, Any]]) -> None:
    """`tune A B --json` prints {kind: tune-many, studies: [one study per model]}: accepted, and a study inside it
    is checked like a single one."""
    study = documents["tune"]
    many = {"schema_version": 1, "kind": "tune-many", "studies": [study, study]}
    assert not _problems("tune", many)
    assert _problems("tune", {**many, "studies": [_without(study, "final")]})
