"""The command line as users and scripts see it: exit codes, one-line errors, pure JSON on stdout."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from optimizer_cli.recipe import presets

from .builders import mlp
from .conftest import ROOT, run_cli


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def int8_run(examples_dir: Path, tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("run")
    before = _sha(examples_dir / "digits_cnn.onnx")
    proc = run_cli(
        str(examples_dir / "digits_cnn.onnx"),
        "--recipe",
        "cnn-int8",
        "-o",
        str(out / "cnn.int8.onnx"),
        "--calib",
        str(examples_dir / "digits_calib.npz"),
        "--data",
        str(examples_dir / "digits_eval.npz"),
        "--providers",
        "cpu",
        "--json",
        "--markdown",
        str(out / "report.md"),
        "--fail-if",
        "accuracy_drop>5%",
        "--set",
        "benchmark.rounds=4",
    )
    return proc, out, before, examples_dir


def test_main_form_json_is_the_only_stdout(int8_run) -> None:
    proc, out, before, examples = int8_run
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # the whole of stdout is one JSON document
    assert [s["type"] for s in report["stages"]] == ["cleanup", "fuse", "quantize"]
    assert report["stages"][1]["stats"]["fused"]["batchnorm_folded"] == 6
    row = next(r for r in report["benchmark"]["rows"] if r["provider"] == "cpu")
    assert row["usable"] and row["accuracy_original"]["top1"] > 0.85
    assert row["fidelity"]["top1_agreement"] > 0.9
    assert row["speedup"]["ci_low"] <= row["speedup"]["median"] <= row["speedup"]["ci_high"]
    assert report["gates"][0]["violated"] is False
    assert report["benchmark"]["environment"]["onnxruntime"]
    assert (out / "cnn.int8.onnx").exists() and (out / "report.md").read_text().startswith("## optimizer-cli report")
    assert _sha(examples / "digits_cnn.onnx") == before, "the input model must never change"
    onnx.checker.check_model(str(out / "cnn.int8.onnx"))


def test_gate_violation_exits_1_and_baseline_compares(int8_run, tmp_path) -> None:
    proc, out, _, examples = int8_run
    baseline = tmp_path / "base.json"
    baseline.write_text(proc.stdout)
    again = run_cli(
        "bench",
        str(examples / "digits_cnn.onnx"),
        str(out / "cnn.int8.onnx"),
        "--data",
        str(examples / "digits_eval.npz"),
        "--providers",
        "cpu",
        "--rounds",
        "3",
        "--no-memory",
        "--fail-if",
        "speedup<1000",
        "--fail-if",
        "cpu:cosine<0.5",
        "--baseline",
        str(baseline),
        "--json",
    )
    assert again.returncode == 1, again.stderr
    report = json.loads(again.stdout)
    assert [g["violated"] for g in report["gates"]] == [True, False]
    assert report["gates"][0]["detail"].startswith("violated by cpu=")
    assert report["baseline"] and report["baseline"][0]["p50_ms"]["baseline"] is not None


def test_human_table(examples_dir: Path, tmp_path) -> None:
    proc = run_cli(
        str(examples_dir / "digits_mlp.onnx"),
        "-r",
        "int8",
        "-o",
        str(tmp_path / "m.onnx"),
        "--data",
        str(examples_dir / "digits_mlp_eval.npz"),
        "--providers",
        "cpu,cuda",
        "--set",
        "benchmark.rounds=2",
        "--set",
        "benchmark.runs_per_round=2",
        "--eval-samples",
        "8",
        "--no-memory",
        "--no-attribute",
    )
    assert proc.returncode == 0, proc.stderr
    assert "Passes: int8" in proc.stdout and "speedup" in proc.stdout
    assert "cuda" in proc.stdout  # a usable CUDA row or a line saying why it was skipped


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["missing.onnx", "-r", "int8"], "missing.onnx: file not found"),
        (["{model}", "-r", "nope.yaml"], "no such file or preset 'nope.yaml'"),
        (["{model}", "-r", "{bad_recipe}"], "unknown key 'per_chanel'"),
        (["{model}", "-r", "{unknown_pass}"], "unknown pass type 'sparsify'"),
        (["{garbage}", "-r", "int8"], "not a readable ONNX model"),
        (["{model}", "-r", "cnn-int8"], "needs calibration data"),
        (["{model}", "-r", "cnn-int8", "--calib", "nope.npz"], "calibration data not found: nope.npz"),
        (["{model}", "-r", "int8", "--fail-if", "speed<<2"], "--fail-if"),
        (["{model}", "-r", "int8", "--providers", "tpu"], "unknown execution provider 'tpu'"),
        (["{model}", "-r", "int8", "-o", "{model}"], "refusing to overwrite"),
        (["{model}", "-r", "int8", "--data", "{bad_data}"], "no array for model input"),
        (["{custom_op}", "-r", "int8"], "onnxruntime cannot run the input model"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(mlp(), str(model))
    before = _sha(model)
    files = {
        "model": model,
        "bad_recipe": tmp_path / "bad.yaml",
        "unknown_pass": tmp_path / "unk.yaml",
        "garbage": tmp_path / "garbage.onnx",
        "bad_data": tmp_path / "bad.npz",
        "custom_op": tmp_path / "custom.onnx",
    }
    custom = mlp()
    custom.graph.node[0].domain = "com.example"
    custom.opset_import.add(domain="com.example", version=1)
    onnx.save(custom, str(files["custom_op"]))
    files["bad_recipe"].write_text("passes:\n  - type: quantize\n    per_chanel: true\n")
    files["unknown_pass"].write_text("passes:\n  - type: sparsify\n")
    files["garbage"].write_bytes(b"\x00\x01garbage")
    np.savez(files["bad_data"], nope=np.zeros((2, 32), np.float32))
    proc = run_cli(*[a.format(**files) for a in args], "--no-bench", cwd=ROOT)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    # The one note a run may print before it fails: which preset `-r NAME` picked (said once the checks pass).
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("recipe: preset '")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert _sha(model) == before


def test_debug_shows_traceback(tmp_path: Path) -> None:
    proc = run_cli("missing.onnx", "-r", "int8", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_dry_run_prints_plan_without_loading(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not even a model: dry-run does not load it")
    proc = run_cli(str(model), "-r", "transformer-int8", "--dry-run", "--json", "--set", "passes.2.per_channel=false")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert [p["type"] for p in plan["passes"]] == ["cleanup", "fuse", "quantize"]
    assert plan["passes"][2]["config"]["per_channel"] is False
    assert plan["passes"][2]["exactness"] == "approximate"


def test_verbs(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(mlp(), str(model))
    passes = json.loads(run_cli("passes", "--json").stdout)["passes"]
    assert {"cleanup", "fuse", "prune", "factorize", "reconstruct", "quantize"} <= {p["type"] for p in passes}
    info = json.loads(run_cli("inspect", str(model), "--json").stdout)
    assert info["ops"]["MatMul"] == 3 and info["inputs"][0]["name"] == "x"
    ok = run_cli("validate", "prune")
    assert ok.returncode == 0 and "ok" in ok.stdout
    providers = json.loads(run_cli("providers", "--json").stdout)
    cpu = next(p for p in providers["providers"] if p["alias"] == "cpu")
    assert cpu["usable"]
    assert run_cli("--version").stdout.startswith("optimizer-cli")
    assert "Usage" in run_cli("--help").stdout
    schema = run_cli("schema")
    assert json.loads(schema.stdout)["title"] == "Recipe"


def test_usage_error_exit_2() -> None:
    proc = run_cli("run")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_every_shipped_recipe_dry_runs(capsys) -> None:
    from optimizer_cli.cli import main

    for recipe in sorted(presets().values()):  # in-process: one interpreter for all of them
        with pytest.raises(SystemExit):
            main(["model.onnx", "-r", str(recipe), "--dry-run", "--calib", "random", "--json"])
        plan = json.loads(capsys.readouterr().out)
        assert plan["passes"], recipe
        assert all("calibration" not in p for p in plan["problems"]), (recipe, plan["problems"])


def test_unusable_gpu_providers_keep_json_clean_or_fail_strictly(examples_dir: Path, tmp_path: Path) -> None:
    """TensorRT's failure banner must not reach stdout; --strict-ep turns a fallback into exit 2."""
    from optimizer_cli.runtime.providers import probe_provider

    args = [
        "bench", str(examples_dir / "digits_mlp.onnx"), str(examples_dir / "digits_mlp.onnx"),
        "--rounds", "2", "--no-memory", "--json",
    ]  # fmt: skip
    proc = run_cli(*args, "--providers", "cpu,cuda,trt")
    assert proc.returncode == 0, proc.stderr
    rows = {r["provider"]: r for r in json.loads(proc.stdout)["benchmark"]["rows"]}
    assert rows["cpu"]["usable"]
    for alias in ("cuda", "trt"):
        assert rows[alias]["usable"] == probe_provider(alias).usable
        if not rows[alias]["usable"]:
            assert rows[alias]["reason"] and rows[alias]["latency_optimized"] is None
    if not probe_provider("trt").usable:
        strict = run_cli(*args, "--providers", "cpu,trt", "--strict-ep")
        assert strict.returncode == 2
        assert json.loads(strict.stdout)["exit_code"] == 2  # with --json a failure is one JSON document too
        assert "execution provider 'trt' is not usable" in strict.stderr


def test_recipe_session_options_reach_the_optimized_models_benchmark(tmp_path: Path, monkeypatch, capsys) -> None:
    from optimizer_cli.bench import harness
    from optimizer_cli.cli import main

    model, recipe = tmp_path / "m.onnx", tmp_path / "r.yaml"
    onnx.save(mlp(), str(model))
    recipe.write_text(
        "passes: [{type: cleanup}]\nbenchmark: {rounds: 2, runs_per_round: 2, warmup: 1}\nsession: {opt_level: disable}\n"
    )
    opened: list = []
    real = harness.timed_session
    monkeypatch.setattr(
        harness, "timed_session", lambda src, config, feeds: opened.append(config) or real(src, config, feeds)
    )
    args = [str(model), "-r", str(recipe), "-o", str(tmp_path / "out.onnx"), "--providers", "cpu", "--json"]
    with pytest.raises(SystemExit) as done:
        main([*args, "--no-memory", "--no-attribute"])
    assert done.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert [c.opt_level for c in opened] == ["all", "disable"], "the original keeps the benchmark's level"
    assert report["recipe"]["session"]["opt_level"] == "disable"
    assert any("opt_level=disable (original: all)" in n for n in report["notes"]), report["notes"]
    plan = run_cli(*args, "--dry-run")
    assert json.loads(plan.stdout)["session"]["opt_level"] == "disable"
