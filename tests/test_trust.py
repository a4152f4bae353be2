"""Trust: no run loses or damages a file, mistakes fail before the work with exit 2, numbers are honest.

Each test reproduces a defect a bad-input review found (see the issue "Trust"); they run the installed
entry point as a user does.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer_cli.recipe import presets

from .builders import mlp
from .conftest import run_cli

FAST = ["--providers", "cpu", "--set", "benchmark.rounds=2", "--set", "benchmark.runs_per_round=2"]
FAST += ["--eval-samples", "4", "--no-memory", "--no-attribute"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    """A folder with an MLP, its calibration data and an int8 recipe."""
    onnx.save(mlp(), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((8, 1, 32)).astype(np.float32))
    (tmp_path / "r.yaml").write_text("passes:\n  - type: cleanup\n  - type: quantize\n    mode: dynamic\n")
    return tmp_path


def _one_error_line(proc, code: int = 2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


# 1. Data loss -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--report", "{m}"], "the input model"),
        (["--markdown", "{m}"], "the input model"),
        (["--report", "{o}"], "name the same file"),
        (["--markdown", "{d}"], "name the same file"),  # the output's own data file
        (["--calib", "{c}", "-o", "{c}"], "--calib"),
        (["--report", "{r}"], "--recipe"),
    ],
)
def test_no_output_may_overwrite_an_input_or_another_output(work: Path, flags: list[str], needle: str) -> None:
    paths = {"m": work / "m.onnx", "o": work / "o.onnx", "d": work / "o.onnx.data", "c": work / "c.npz"}
    paths["r"] = work / "r.yaml"
    before = {p: _sha(p) for p in (paths["m"], paths["c"], paths["r"])}
    args = [str(paths["m"]), "-r", str(paths["r"]), "-o", str(paths["o"]), *[f.format(**paths) for f in flags]]
    line = _one_error_line(run_cli(*args, *FAST))
    assert needle in line
    assert {p: _sha(p) for p in before} == before, "an input changed"
    assert not paths["o"].exists(), "nothing is written by a refused run"


def _bad_metric(tmp: Path) -> list[str]:
    (tmp / "badmetric.py").write_text("def score(outputs, labels):\n    raise ValueError('boom')\n")
    labelled = tmp / "labelled.npz"
    rng = np.random.default_rng(1)
    np.savez(labelled, x=rng.standard_normal((4, 1, 32)).astype(np.float32), labels=np.arange(4))
    return ["--data", str(labelled), "--metric", "badmetric:score"]


def _empty_data(tmp: Path) -> list[str]:
    np.savez(tmp / "empty.npz", x=np.zeros((0, 1, 32), np.float32))
    return ["--data", str(tmp / "empty.npz")]


def _no_inputs_model(tmp: Path) -> list[str]:
    const = helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(np.ones((1, 4), np.float32)))
    graph = helper.make_graph([const], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp / "noinput.onnx")
    return ["MODEL=" + str(tmp / "noinput.onnx")]


FAILING_RUNS = {
    "bad baseline": lambda t: (t / "b.json").write_text("{bad") and ["--baseline", str(t / "b.json")],
    "gate without benchmark": lambda t: ["--no-bench", "--fail-if", "speedup<1"],
    "unknown provider in recipe": lambda t: ["--set", "benchmark.providers=[bogus]"],
    "empty data": _empty_data,
    "zero eval samples": lambda t: ["--eval-samples", "0"],
    "metric that raises": _bad_metric,
    "model with no inputs": _no_inputs_model,
    "gate violated": lambda t: ["--fail-if", "speedup<1000"],
}


@pytest.mark.parametrize("case", sorted(FAILING_RUNS))
def test_a_failing_run_leaves_the_previous_output_alone(work: Path, case: str) -> None:
    out = work / "p.onnx"
    out.write_text("PREV")
    extra = FAILING_RUNS[case](work)
    model = str(work / "m.onnx")
    if extra and extra[0].startswith("MODEL="):
        model, extra = extra[0].removeprefix("MODEL="), extra[1:]
    proc = run_cli(model, "-r", str(work / "r.yaml"), "-o", str(out), *FAST, *extra, cwd=work)
    assert proc.returncode in (1, 2), (case, proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert out.read_text() == "PREV", f"{case}: the previous output was replaced"
    assert not any(p.name.startswith(".optimize-") for p in work.iterdir()), "staging files left behind"


def test_strict_ep_fails_before_any_work(work: Path) -> None:
    from optimizer_cli.runtime.providers import probe_provider

    if probe_provider("cuda").usable:
        pytest.skip("CUDA is usable here")
    out = work / "p.onnx"
    out.write_text("PREV")
    args = [str(work / "m.onnx"), "-r", str(work / "r.yaml"), "-o", str(out), "--providers", "cuda", "--strict-ep"]
    proc = run_cli(*args)
    assert "not usable" in _one_error_line(proc)
    assert "cleanup" not in proc.stderr, "the passes must not have run"
    assert out.read_text() == "PREV"


def test_unwritable_output_folder_fails_before_the_passes(work: Path) -> None:
    # /proc cannot hold new files even for root (a chmod'ed folder can: root ignores permissions).
    proc = run_cli(str(work / "m.onnx"), "-r", str(work / "r.yaml"), "-o", "/proc/optimize-test/o.onnx", "--no-bench")
    assert "cannot write" in _one_error_line(proc)
    assert "cleanup" not in proc.stderr


def test_reports_go_to_new_folders_and_the_model_is_written_last(work: Path) -> None:
    out = work / "o.onnx"
    proc = run_cli(
        str(work / "m.onnx"), "-r", str(work / "r.yaml"), "-o", str(out), *FAST,
        "--report", str(work / "new" / "r.json"), "--markdown", str(work / "new" / "r.md"), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["output_written"] is True and out.exists()
    assert json.loads((work / "new" / "r.json").read_text())["output_sha256"] == report["output_sha256"]
    assert report["output_sha256"] == _sha(out)
    assert report["input_sha256"] == _sha(work / "m.onnx")
    assert report["command"].startswith("optimize ") and report["timestamp"]
    assert report["recipe"]["verify"]["rtol"] > 0 and "benchmark" in report["recipe"], "the full resolved recipe"


# 2. External data ---------------------------------------------------------------------------------------


def _external_model(folder: Path, location: str = "m.data") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 32])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path = folder / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, location=location, size_threshold=0)
    return path


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("recipe", ["int8", "fp16", "EMPTY"])
def test_external_data_model_runs_from_any_folder(tmp_path: Path, recipe: str) -> None:
    from optimizer_cli.recipe import preset_path

    model = _external_model(tmp_path / "model")
    other = tmp_path / "other"
    other.mkdir()
    (other / "m.data").write_bytes(b"\0" * 8192)  # another model's data where the output goes
    if recipe == "EMPTY":
        (tmp_path / "empty.yaml").write_text("passes: []\n")
        recipe = str(tmp_path / "empty.yaml")
    else:
        recipe = str(preset_path(recipe))  # absolute: the runs below start in other folders
    for cwd in (tmp_path, tmp_path / "model"):  # from another folder and from the model's own
        out = other / f"o-{cwd.name}.onnx"
        proc = run_cli(str(model), "-r", recipe, "-o", str(out), "--no-bench", cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        proto = onnx.load(str(out), load_external_data=False)
        locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {out.name + ".data"}, "the output's data file is named after the output"
        x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
        ref, got = _outputs(model, x), _outputs(out, x)
        cos = float(np.dot(ref.ravel(), got.ravel()) / (np.linalg.norm(ref) * np.linalg.norm(got)))
        assert cos > 0.99, f"the output reads the wrong weights (cosine {cos})"
    assert (other / "m.data").read_bytes() == b"\0" * 8192


def test_external_data_outside_the_models_folder_is_refused(tmp_path: Path) -> None:
    model = _external_model(tmp_path / "a" / "b")
    (tmp_path / "a" / "b" / "m.data").rename(tmp_path / "a" / "m.data")
    proto = onnx.load(str(model), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../m.data"
    onnx.save(proto, str(model))
    proc = run_cli(str(model), "-r", "int8", "-o", str(tmp_path / "o.onnx"), "--no-bench")
    assert "leaves the model's folder" in _one_error_line(proc)
    assert not (tmp_path / "o.onnx").exists()


# 3. Exit codes that tell the truth ----------------------------------------------------------------------


def test_invalid_input_model_is_the_users_error(work: Path) -> None:
    model = mlp()
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.attribute.append(helper.make_attribute("alpha", 1.0))  # Relu has no such attribute
    onnx.save(model, work / "bad.onnx")
    proc = run_cli(str(work / "bad.onnx"), "-r", str(work / "r.yaml"), "-o", str(work / "o.onnx"), "--no-bench")
    line = _one_error_line(proc)
    assert "input model fails onnx.checker" in line and "pass 0" not in line


def test_nan_weights_in_the_input_are_refused(work: Path) -> None:
    model = mlp()
    model.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.full((32, 64), np.nan, np.float32), model.graph.initializer[0].name)
    )
    onnx.save(model, work / "nan.onnx")
    proc = run_cli(str(work / "nan.onnx"), "-r", str(work / "r.yaml"), "-o", str(work / "o.onnx"), "--no-bench")
    assert "NaN weights" in _one_error_line(proc)


@pytest.mark.parametrize(
    ("gate", "needle"),
    [
        ("speedup<1..5", "expected"),
        ("bogus:speedup<0.01", "unknown provider"),
        ("accuracy_drop>1", "fraction"),
        ("cosine<99", "fraction"),
        ("p99_speedup<1", "runs per round"),
        ("cuda:speedup<1", "not benchmarked"),
    ],
)
def test_gates_that_cannot_mean_what_they_say_are_exit_2(work: Path, gate: str, needle: str) -> None:
    proc = run_cli(
        str(work / "m.onnx"), "-r", str(work / "r.yaml"), "-o", str(work / "o.onnx"), *FAST, "--fail-if", gate
    )
    assert needle in _one_error_line(proc)
    assert "cleanup" not in proc.stderr


@pytest.mark.parametrize(
    "content", ['{"benchmark": {"rows": 5}}', '{"benchmark": {"rows": [{"provider": "cpu", "speedup": 3}]}}', "[]"]
)
def test_malformed_baselines_are_exit_2(work: Path, content: str) -> None:
    (work / "b.json").write_text(content)
    args = [str(work / "m.onnx"), "-r", str(work / "r.yaml"), "-o", str(work / "o.onnx"), *FAST]
    proc = run_cli(*args, "--baseline", str(work / "b.json"))
    assert "baseline" in _one_error_line(proc)


def test_huge_declared_input_asks_for_dims(work: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [100000, 100000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [100000, 100000])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, work / "huge.onnx")
    proc = run_cli(str(work / "huge.onnx"), "-r", str(work / "r.yaml"), "-o", str(work / "o.onnx"), "--no-bench")
    assert "GiB" in _one_error_line(proc)


def test_json_failures_are_one_json_document(work: Path) -> None:
    proc = run_cli(str(work / "missing.onnx"), "-r", str(work / "r.yaml"), "--json")
    doc = json.loads(proc.stdout)
    assert doc["exit_code"] == proc.returncode == 2 and doc["file"].endswith("missing.onnx")
    assert "file not found" in doc["error"]


# 4. Honest numbers --------------------------------------------------------------------------------------


def _variant(base: onnx.ModelProto, transform) -> onnx.ModelProto:
    """The same signature as `base`, with the output passed through `transform(builder-ish)`."""
    model = onnx.ModelProto()
    model.CopyFrom(base)
    out = model.graph.output[0].name
    internal = out + "_inner"
    for node in model.graph.node:
        node.output[:] = [internal if o == out else o for o in node.output]
    transform(model, internal, out)
    onnx.checker.check_model(model)
    return model


def _nan_tail(model: onnx.ModelProto, src: str, dst: str) -> None:
    model.graph.initializer.append(numpy_helper.from_array(np.array(np.nan, np.float32), "nan_c"))
    model.graph.node.append(helper.make_node("Mul", [src, "nan_c"], [dst]))


def _slow_tail(model: onnx.ModelProto, src: str, dst: str) -> None:
    """Adds 0 * (a heavy MatMul chain on the input): the same outputs, much more work."""
    rng = np.random.default_rng(0)
    model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((32, 512)).astype(np.float32), "up"))
    model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((512, 512)).astype(np.float32), "sq"))
    model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((512, 10)).astype(np.float32), "dn"))
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    x = model.graph.input[0].name
    nodes = [("MatMul", [x, "up"], "h0")] + [("MatMul", [f"h{i}", "sq"], f"h{i + 1}") for i in range(12)]
    nodes += [("MatMul", ["h12", "dn"], "hd"), ("Mul", ["hd", "zero"], "hz"), ("Add", [src, "hz"], dst)]
    model.graph.node.extend(helper.make_node(op, ins, [out]) for op, ins, out in nodes)


def _bench_variant(tmp_path: Path, tail, *flags: str):
    """`optimize bench` of an MLP against the same MLP with `tail` after its output."""
    base = mlp()
    onnx.save(base, tmp_path / "a.onnx")
    onnx.save(_variant(base, tail), tmp_path / "b.onnx")
    return run_cli("bench", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--providers", "cpu", *flags)


def test_nan_outputs_are_a_fidelity_failure(tmp_path: Path) -> None:
    proc = _bench_variant(tmp_path, _nan_tail, "--rounds", "2", "--no-memory", "--fail-if", "cosine<0.99", "--json")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    fid = report["benchmark"]["rows"][0]["fidelity"]
    assert fid["cosine_min"] == 0.0 and fid["nonfinite"] > 0
    assert any("NaN/Inf" in n for n in report["notes"])


def test_compare_arrays_counts_new_nonfinite_values() -> None:
    from optimizer_cli.verify import compare_arrays

    ref = np.ones((2, 4), np.float32)
    new = ref.copy()
    new[0, 1] = np.nan
    drift = compare_arrays("y", ref, new)
    assert drift.nonfinite == 1 and drift.cosine == 0.0 and drift.top1_agreement == 0.5
    same = compare_arrays("y", np.array([np.nan, 1.0]), np.array([np.nan, 1.0]))
    assert same.nonfinite == 0 and same.cosine == 1.0, "a NaN the original has too is not new"


def test_a_slower_model_is_called_slower(tmp_path: Path) -> None:
    proc = _bench_variant(
        tmp_path, _slow_tail, "--rounds", "6", "--no-memory", "--fail-if", "speedup_ci_high<1", "--json"
    )
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["benchmark"]["verdict"] == "slower"
    assert report["benchmark"]["rows"][0]["verdict"] == "slower"
    assert any(n.startswith("SLOWER") for n in report["notes"])
    human = run_cli("bench", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--providers", "cpu", "--rounds", "6")
    assert human.returncode == 0 and "verdict: slower" in human.stdout, "without a gate: said plainly, exit 0"


def test_no_measured_provider_is_said_and_fails_gates(work: Path) -> None:
    from optimizer_cli.runtime.providers import probe_provider

    if probe_provider("cuda").usable:
        pytest.skip("CUDA is usable here")
    m = str(work / "m.onnx")
    proc = run_cli("bench", m, m, "--providers", "cuda", "--rounds", "2", "--json", "--fail-if", "cuda:speedup<1")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["benchmark"]["verdict"] == "not measured"
    assert any(n.startswith("no provider could be measured") for n in report["notes"])


def test_throughput_follows_the_median_not_an_outlier() -> None:
    from optimizer_cli.bench.latency import summarize

    times = np.full(99, 0.001)
    stats = summarize(np.append(times, 10.0), batch_size=8)  # one 10 s hiccup
    assert stats.throughput == pytest.approx(8000, rel=1e-6)
    assert stats.p99_ms is not None and stats.p50_ms == pytest.approx(1.0)


def test_session_memory_is_measured_in_the_child(tmp_path: Path) -> None:
    from optimizer_cli.bench.memory import session_peak_memory

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((2048, 4096)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2048])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4096])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "big.onnx")  # 32 MiB of weights
    # A parent that has already peaked high must not hide the child's own peak (ru_maxrss carries over exec).
    ballast = np.ones(64 * 2**20, np.uint8)
    result = session_peak_memory(tmp_path / "big.onnx", {"x": np.ones((1, 2048), np.float32)}, "cpu", 1)
    del ballast
    assert result is not None
    assert result["delta_mb"] > 24, result


def test_baseline_from_another_model_is_warned_about(work: Path, tmp_path: Path) -> None:
    onnx.save(mlp(seed=3), work / "other.onnx")
    args = [str(work / "r.yaml"), *FAST, "--json"]
    first = run_cli(str(work / "other.onnx"), "-r", *args[:1], "-o", str(work / "o1.onnx"), *args[1:])
    assert first.returncode == 0, first.stderr
    (work / "base.json").write_text(first.stdout)
    second = run_cli(
        str(work / "m.onnx"),
        "-r",
        *args[:1],
        "-o",
        str(work / "o2.onnx"),
        *args[1:],
        "--baseline",
        str(work / "base.json"),
    )
    assert second.returncode == 0, second.stderr
    assert any("different input model" in n for n in json.loads(second.stdout)["notes"])
    assert "different input model" in second.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="native stdout redirection is checked on Linux")
def test_library_prints_do_not_reach_json_stdout(work: Path) -> None:
    """onnxruntime.transformers print()s during fusion; with --json stdout must stay one document."""
    env_recipe = work / "noisy.yaml"
    env_recipe.write_text("passes:\n  - type: cleanup\n")
    (work / "noisy_metric.py").write_text(
        "import os\n"
        "def score(outputs, labels):\n"
        "    print('python print to stdout')\n"
        "    os.write(1, b'native write to fd 1\\n')\n"
        "    return 1.0\n"
    )
    labelled = work / "labelled.npz"
    np.savez(labelled, x=np.random.default_rng(1).standard_normal((4, 1, 32)).astype(np.float32), labels=np.arange(4))
    proc = run_cli(
        str(work / "m.onnx"), "-r", str(env_recipe), "-o", str(work / "o.onnx"), *FAST,
        "--data", str(labelled), "--metric", "noisy_metric:score", "--json", cwd=work,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)
    # What libraries print is captured (issue 23: quiet by default) and shown on stderr with -v only.
    assert "python print to stdout" not in proc.stderr + proc.stdout
    verbose = run_cli(
        "-v", str(work / "m.onnx"), "-r", str(env_recipe), "-o", str(work / "o2.onnx"), *FAST,
        "--data", str(labelled), "--metric", "noisy_metric:score", "--json", cwd=work,
    )  # fmt: skip
    assert verbose.returncode == 0, verbose.stderr
    json.loads(verbose.stdout)
    assert "python print to stdout" in verbose.stderr and "native write" in verbose.stderr


def test_a_library_run_leaves_the_callers_environment_alone(work: Path) -> None:
    """No env-var knobs (ARCHITECTURE.md): running a recipe in-process sets, changes and removes no variable of
    the caller's environment. (It replaces a test that asserted the variable conftest itself sets.)"""
    from optimizer_cli.pipeline import run_pipeline
    from optimizer_cli.recipe import parse_recipe

    before = dict(os.environ)
    recipe = parse_recipe("passes:\n  - type: cleanup\n  - type: fuse\n  - type: quantize\n    mode: static\n")
    run_pipeline(work / "m.onnx", recipe, work / "o.onnx", calibration=str(work / "c.npz"))
    after = dict(os.environ)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert not changed, sorted(changed)


@pytest.mark.parametrize("recipe", sorted(presets()))
def test_every_shipped_recipe_prints_one_json_document(tmp_path: Path, recipe: str) -> None:
    """Fusion libraries print to stdout; whatever a recipe runs, --json stdout parses as one document."""
    from .builders import tiny_encoder

    transformer = recipe.startswith("transformer")
    model = tiny_encoder() if transformer else mlp()
    onnx.save(model, tmp_path / "m.onnx")
    proc = run_cli(
        str(tmp_path / "m.onnx"), "-r", recipe, "-o", str(tmp_path / "o.onnx"), "--calib", "random",
        *FAST, "--json",
    )  # fmt: skip
    if proc.returncode == 0:
        doc = json.loads(proc.stdout)
        assert doc["output_written"] and (tmp_path / "o.onnx").exists()
    else:  # a recipe may refuse a model; it must say so as one JSON document too
        doc = json.loads(proc.stdout)
        assert doc["exit_code"] == proc.returncode in (2, 3), proc.stderr


def test_verification_failure_offers_the_patch_that_passes(examples_dir: Path, tmp_path: Path) -> None:
    """Static int8 stopped by verify.min_cosine: the user gets a verified exclusion patch, not only the failure."""
    args = [
        str(examples_dir / "digits_cnn.onnx"), "-r", "cnn-int8", "-o", str(tmp_path / "o.onnx"),
        "--calib", str(examples_dir / "digits_calib.npz"), "--data", str(examples_dir / "digits_eval.npz"),
        "--set", "verify.min_cosine=0.995",
    ]  # fmt: skip
    failed = run_cli(*args, "--no-bench", "--json")
    assert failed.returncode == 3, failed.stderr
    doc = json.loads(failed.stdout)
    patch = doc["attribution"]["patch"]
    assert patch and doc["attribution"]["verified"] and "Recipe patch (verified" in failed.stderr
    assert patch.startswith("--set 'passes.2.exclude_nodes=")
    fixed = run_cli(*args, "--no-bench", "--set", patch.removeprefix("--set ").strip("'"))
    assert fixed.returncode == 0, fixed.stderr


def test_random_inputs_that_the_model_cannot_run_say_what_to_give(tmp_path: Path) -> None:
    """Unnamed symbolic dims become 1 in random inputs: a model that needs more says so, naming the shapes."""
    shape = numpy_helper.from_array(np.array([2, -1], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, None])],
        [shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "pairs.onnx")
    (tmp_path / "r.yaml").write_text("passes:\n  - type: cleanup\n")
    proc = run_cli(
        str(tmp_path / "pairs.onnx"), "-r", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o.onnx"), "--no-bench"
    )
    line = _one_error_line(proc)
    assert "seeded random inputs x[1]" in line and "--data" in line
