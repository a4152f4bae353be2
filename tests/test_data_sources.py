"""Real data of varying shapes: per-sample .npz folders, `<index>/<input>` .npz files and Python loaders,
read lazily up to the stated limits, through calibration, verification and the benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto

from optimizer_cli.data import is_loader_spec, load_dataset, resolve_dataset, shape_mix
from optimizer_cli.errors import UserInputError

from .builders import Builder
from .conftest import run_cli

WIDTHS = (64, 96, 160)
CLASSES = 11


def recognizer(seed: int = 0) -> onnx.ModelProto:
    """CNN+CTC-style text-line recognizer: x [1,3,32,W] (W symbolic) -> per-position logits [W/2,1,K]."""
    b = Builder(seed)
    x = b.op("Relu", [b.conv("x", 3, 8)])
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])  # [1,8,16,W/2]
    x = b.op("Relu", [b.conv(x, 8, 16)])
    x = b.op("AveragePool", [x], kernel_shape=[16, 1])  # collapses the height: [1,16,1,W/2]
    x = b.op("Reshape", [x, b.const(np.array([1, 16, -1], np.int64), "shape")])  # [1,16,W/2]
    x = b.op("Transpose", [x], perm=[2, 0, 1])  # [W/2,1,16]
    logits = b.matmul(x, 16, CLASSES)  # [W/2,1,K]
    return b.model([("x", TensorProto.FLOAT, [1, 3, 32, "W"])], [("logits", logits)])


def line(width: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((1, 3, 32, width)).astype(np.float32)


def widths(n: int) -> list[int]:
    return [WIDTHS[i % len(WIDTHS)] for i in range(n)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "rec.onnx"
    onnx.save(recognizer(), path)
    return path


@pytest.fixture(scope="module")
def model(model_path: Path) -> ir.Model:
    return ir.load(model_path)


def npz_folder(folder: Path, n: int, seed: int = 0, labels: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, w in enumerate(widths(n)):
        extra = {"label": np.arange(w // 8) % CLASSES} if labels else {}
        np.savez(folder / f"line{i:03d}.npz", x=line(w, rng), **extra)
    return folder


LOADER = """
import numpy as np

def samples():
    rng = np.random.default_rng(1)
    for i in range({n}):
        w = (64, 96, 160)[i % 3]
        yield {{"x": rng.standard_normal((1, 3, 32, w)).astype(np.float32)}}, np.arange(w // 8) % 11
"""


def optimize(model_path: Path, out: Path, calib: str, data: str, *extra: str) -> tuple[int, str, str]:
    proc = run_cli(
        str(model_path),
        "-r",
        "cnn-int8",
        "-o",
        str(out / "rec.int8.onnx"),
        "--calib",
        calib,
        "--data",
        data,
        "--providers",
        "cpu",
        "--json",
        "--no-memory",
        "--no-attribute",
        "--set",
        "benchmark.rounds=2",
        "--set",
        "benchmark.runs_per_round=2",
        "--set",
        "benchmark.warmup=1",
        *extra,
    )
    return proc.returncode, proc.stdout, proc.stderr


def loader_file(folder: Path, n: int, body: str = LOADER) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "loader.py").write_text(body.format(n=n))
    return f"{folder / 'loader.py'}:samples"


def indexed_npz(path: Path, n: int, seed: int = 2) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {}
    for i, w in enumerate(widths(n)):
        arrays[f"{i}/x"] = line(w, rng)
        arrays[f"{i}/label"] = np.arange(w // 8) % CLASSES
    np.savez(path, **arrays)
    return path


def check_report(stdout: str, samples: int) -> dict:
    report = json.loads(stdout)
    bench = report["benchmark"]
    assert bench["eval_samples"] == samples
    assert sorted(s["shape"]["x"][3] for s in bench["latency_shapes"]) == list(WIDTHS)
    assert sum(s["count"] for s in bench["latency_shapes"]) == samples
    assert any(
        n.startswith(f"latency cycled through {samples} samples of 3 shapes: x[1,3,32,64] x") for n in bench["notes"]
    )
    row = next(r for r in bench["rows"] if r["provider"] == "cpu")
    # Fidelity compares every sample's outputs on its own: 10 samples of 3 widths, none stacked.
    assert row["usable"] and row["fidelity"]["samples"] == samples and row["fidelity"]["cosine_min"] > 0.9
    quantize = report["stages"][2]
    assert quantize["stats"]["quant_ops"]["QuantizeLinear"] > 0  # calibrated on the mixed widths
    return report


def test_folder_of_per_sample_npz(model_path: Path, tmp_path: Path) -> None:
    calib, data = npz_folder(tmp_path / "calib", 10), npz_folder(tmp_path / "eval", 10, seed=5)
    rc, out, err = optimize(model_path, tmp_path, str(calib), str(data))
    assert rc == 0, err
    report = check_report(out, 10)
    assert report["stages"][2]["stats"]["calibration"] == f"10 samples from {calib}"
    assert report["benchmark"]["labelled"] is True


def test_python_loader_file(model_path: Path, tmp_path: Path) -> None:
    spec = loader_file(tmp_path / "loader", 10)
    rc, out, err = optimize(model_path, tmp_path, spec, spec)
    assert rc == 0, err
    report = check_report(out, 10)
    assert report["benchmark"]["eval_source"] == spec and report["benchmark"]["labelled"] is True


def test_indexed_npz_and_calib_samples(model_path: Path, tmp_path: Path) -> None:
    path = indexed_npz(tmp_path / "lines.npz", 10)
    rc, out, err = optimize(model_path, tmp_path, str(path), str(path), "--calib-samples", "4")
    assert rc == 0, err
    report = check_report(out, 10)
    assert report["stages"][2]["stats"]["calibration"] == f"4 samples from {path}"
    assert report["recipe"]["passes"][2]["calibration_samples"] == 4
    assert report["recipe"]["data"]["calibration_samples"] == 4  # so re-runs (attribution) read the same 4


def test_eval_samples_limits_what_is_read(model_path: Path, tmp_path: Path) -> None:
    # The loader raises past its 5th sample: --eval-samples 3 (verification reads 5 by default) never gets there.
    spec = loader_file(tmp_path / "loader", 5, LOADER + "    raise RuntimeError('read past the limit')\n")
    rc, out, err = optimize(
        model_path, tmp_path, spec, spec, "--eval-samples", "3", "--calib-samples", "5", "--set", "verify.samples=5"
    )
    assert rc == 0, err
    bench = json.loads(out)["benchmark"]
    assert bench["eval_samples"] == 3 and [s["count"] for s in bench["latency_shapes"]] == [1, 1, 1]


RAISING = """
def samples():
    import numpy as np
    for i in range(10):
        if i == 2:
            raise ValueError("corrupt line image")
        yield {"x": np.zeros((1, 3, 32, 64), np.float32)}
"""
MISSING = """
def samples():
    import numpy as np
    yield {"x": np.zeros((1, 3, 32, 64), np.float32)}
    yield {"image": np.zeros((1, 3, 32, 64), np.float32)}
"""


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        (RAISING, ["sample 2 failed", "ValueError: corrupt line image"]),
        (MISSING, ["sample 1: no array for model input(s) x", "(it has: image)"]),
        ("def samples():\n    return 3\n", ["returned no iterable"]),
        ("import nope_no_such_module\n", ["cannot import (ModuleNotFoundError"]),
        ("def samples():\n    yield [1, 2, 3]\n", ["sample 0: expected a dict"]),
    ],
)
def test_bad_loader_is_one_line_exit_2(model_path: Path, tmp_path: Path, body: str, needles: list[str]) -> None:
    spec = loader_file(tmp_path / "loader", 0, body.replace("{", "{{").replace("}", "}}"))
    rc, _, err = optimize(model_path, tmp_path, spec, spec, "--no-bench")
    assert rc == 2, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and f"data loader '{spec}'" in errors[0], err
    assert all(n in errors[0] for n in needles), errors[0]


def test_wrong_rank_in_a_folder_names_the_sample(model_path: Path, tmp_path: Path) -> None:
    folder = npz_folder(tmp_path / "calib", 4)
    np.savez(folder / "line002.npz", x=np.zeros((3, 32, 64), np.float32))
    rc, _, err = optimize(model_path, tmp_path, str(folder), str(folder), "--no-bench")
    assert rc == 2, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and "line002.npz: sample 2 (line002.npz): input 'x' has shape [3, 32, 64]" in errors[0]
    assert "model wants [1,3,32,W] (rank 4)" in errors[0]


def test_histogram_calibration_on_mixed_shapes_says_why(model_path: Path, tmp_path: Path) -> None:
    folder = npz_folder(tmp_path / "calib", 6)
    rc, _, err = optimize(
        model_path, tmp_path, str(folder), str(folder), "--no-bench", "--set", "passes.2.calibration_method=entropy"
    )
    assert rc == 2, err
    assert "calibration_method=entropy needs calibration samples of one shape" in err
    assert "x[1,3,32,64] x2, x[1,3,32,96] x2, x[1,3,32,160] x2" in err and "minmax" in err


COUNTING = """
import numpy as np

def samples():
    for i in range(100):
        if i == {n}:
            raise RuntimeError("pulled past the limit")
        yield {{"x": np.zeros((1, 3, 32, 64 + 8 * i), np.float32)}}
"""


def test_a_generator_is_never_pulled_past_the_limit(model: ir.Model, tmp_path: Path) -> None:
    spec = loader_file(tmp_path, 4, COUNTING)
    ds = load_dataset(spec, model, limit=4)
    assert len(ds) == 4 and ds.labels is None and ds.source == spec and not ds.is_random
    assert [f["x"].shape[3] for f in ds.feeds] == [64, 72, 80, 88]  # never stacked: four shapes
    assert len(shape_mix(ds.feeds)) == 4
    with pytest.raises(UserInputError, match=r"sample 4 failed \(RuntimeError: pulled past the limit\)"):
        load_dataset(spec, model, limit=5)


def test_module_function_loader(model: ir.Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_lines.py").write_text(LOADER.format(n=6))
    monkeypatch.syspath_prepend(str(tmp_path))
    ds = load_dataset("my_lines:samples", model, limit=None)
    assert len(ds) == 6 and ds.labels is not None and list(ds.labels[0]) == list(np.arange(8))


def test_folder_reads_only_the_first_files_in_name_order(model: ir.Model, tmp_path: Path) -> None:
    folder = npz_folder(tmp_path / "d", 5, labels=False)
    (folder / "line999.npz").write_bytes(b"not a zip")  # last by name: never opened under limit=5
    ds = load_dataset(folder, model, limit=5)
    assert [f["x"].shape[3] for f in ds.feeds] == widths(5) and ds.labels is None
    with pytest.raises(UserInputError, match=r"line999.npz: sample 5 \(line999.npz\): cannot read"):
        load_dataset(folder, model)


def test_indexed_npz_orders_numerically_and_limits(model: ir.Model, tmp_path: Path) -> None:
    path = indexed_npz(tmp_path / "d.npz", 12)
    ds = load_dataset(path, model, limit=11)
    assert len(ds) == 11 and [f["x"].shape[3] for f in ds.feeds] == widths(11)  # 10 after 9, not after 1
    assert ds.labels is not None and len(ds.labels[10]) == widths(11)[10] // 8


def test_labels_on_every_sample_or_none(model: ir.Model, tmp_path: Path) -> None:
    folder = npz_folder(tmp_path / "d", 3)
    np.savez(folder / "line001.npz", x=np.zeros((1, 3, 32, 64), np.float32))
    with pytest.raises(UserInputError, match="sample 1 .line001.npz. has no label but sample 0"):
        load_dataset(folder, model)


def test_fixed_dims_dtype_and_mixed_folders(model: ir.Model, tmp_path: Path) -> None:
    folder = npz_folder(tmp_path / "d", 2)
    np.savez(folder / "line001.npz", x=np.zeros((1, 3, 30, 64), np.float32))
    with pytest.raises(UserInputError, match=r"input 'x' has shape \[1, 3, 30, 64\], model wants \[1,3,32,W\]"):
        load_dataset(folder, model)
    np.savez(folder / "line001.npz", x=np.full((1, 3, 32, 64), "a"))
    with pytest.raises(UserInputError, match="sample 1 .line001.npz.: input 'x' is <U1, model wants float32"):
        load_dataset(folder, model)
    np.save(folder / "x.npy", np.zeros((2, 1, 3, 32, 64), np.float32))
    with pytest.raises(UserInputError, match="both .npz and .npy"):
        load_dataset(folder, model)


def test_stacked_formats_are_unchanged(model: ir.Model, tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", x=np.zeros((5, 1, 3, 32, 64), np.float64))  # a sample axis, cast to float32
    ds = load_dataset(tmp_path / "s.npz", model)
    assert len(ds) == 5 and ds.feeds[0]["x"].dtype == np.float32


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("loader.py:samples", True),
        ("pkg.module:make_feeds", True),
        ("random", False),
        ("data.npz", False),
        ("C:\\data\\lines.npz", False),
        ("C:/data/lines", False),
        ("loader.py:not-a-name", False),
    ],
)
def test_loader_spec_detection(spec: str, expected: bool) -> None:
    assert is_loader_spec(spec) is expected


def test_an_existing_path_with_a_colon_is_data(model: ir.Model, tmp_path: Path) -> None:
    path = tmp_path / "run:1.npz"
    np.savez(path, x=np.zeros((2, 1, 3, 32, 64), np.float32))
    assert not is_loader_spec(str(path)) and len(load_dataset(str(path), model)) == 2


def test_pipeline_reads_only_what_calibration_asks_for(model_path: Path, tmp_path: Path) -> None:
    """Without --calib-samples a per-sample source is read up to the pass's calibration_samples (64 here);
    the loader raises on its 65th item."""
    from optimizer_cli.pipeline import run_pipeline
    from optimizer_cli.recipe import load_recipe, preset_path

    spec = loader_file(tmp_path, 64, COUNTING.replace("64 + 8 * i", "64 + 32 * (i % 2)"))
    recipe = load_recipe(preset_path("cnn-int8"))
    result = run_pipeline(model_path, recipe, None, calibration=spec, evaluation=None, threads=1)
    assert result.stages[2].stats["calibration"] == f"64 samples from {spec}"
    assert len(result.verify_data) == recipe.verify.samples  # verification: the calibration's first samples


def test_random_still_resolves(model: ir.Model) -> None:
    ds = resolve_dataset("random", model, samples=3, seed=0, dims={"W": 48}, limit=3)
    assert ds is not None and ds.is_random and ds.feeds[0]["x"].shape == (1, 3, 32, 48)


def test_the_documented_loader_example_runs(model: ir.Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    section = (Path(__file__).parent.parent / "docs" / "data.md").read_text()
    (tmp_path / "lines.py").write_text(re.findall(r"```python\n(.*?)```", section, flags=re.S)[0])
    (tmp_path / "lines").mkdir()
    rng = np.random.default_rng(0)
    for i, w in enumerate(widths(4)):
        np.save(tmp_path / "lines" / f"{i:04d}.npy", line(w, rng)[0])
        (tmp_path / "lines" / f"{i:04d}.txt").write_text(" ".join(str(c) for c in range(w // 16)))
    monkeypatch.chdir(tmp_path)
    ds = load_dataset("lines.py:samples", model, limit=3)
    assert [f["x"].shape for f in ds.feeds] == [(1, 3, 32, w) for w in widths(3)]
    assert ds.labels is not None and [len(lab) for lab in ds.labels] == [w // 16 for w in widths(3)]


def test_pipeline_reads_what_verification_needs_of_an_evaluation_loader(model_path: Path, tmp_path: Path) -> None:
    """Callers that give no eval_samples (the attribution search) never pull an endless loader past what
    verification uses."""
    from optimizer_cli.pipeline import run_pipeline
    from optimizer_cli.recipe import load_recipe, preset_path

    recipe = load_recipe(preset_path("int8"))
    spec = loader_file(tmp_path, recipe.verify.samples, COUNTING)
    result = run_pipeline(model_path, recipe, None, evaluation=spec, threads=1)
    assert result.evaluation is not None and len(result.evaluation) == recipe.verify.samples
    assert len({f["x"].shape for f in result.verify_data.feeds}) == recipe.verify.samples  # one width each


DATACLASS_LOADER = """
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Line:
    width: int


def samples():
    return [{"x": np.zeros((1, 3, 32, Line(w).width), np.float32)} for w in (64, 96)]
"""


def test_a_loader_file_runs_as_an_imported_module(model: ir.Model, tmp_path: Path) -> None:
    """A dataclass in the loader file needs its module in sys.modules; two loader.py files do not collide."""
    first = loader_file(tmp_path / "a", 0, DATACLASS_LOADER.replace("{", "{{").replace("}", "}}"))
    second = loader_file(tmp_path / "b", 3, LOADER)
    assert [f["x"].shape[3] for f in load_dataset(first, model).feeds] == [64, 96]
    assert len(load_dataset(second, model)) == 3
    assert [f["x"].shape[3] for f in load_dataset(first, model).feeds] == [64, 96]


def test_bench_takes_a_per_sample_source(model_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(model_path.read_bytes())
    data = npz_folder(tmp_path / "eval", 7)
    proc = run_cli(
        "bench", str(model_path), str(copy), "--data", str(data), "--eval-samples", "5", "--rounds", "2",
        "--providers", "cpu", "--no-memory", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    bench = json.loads(proc.stdout)["benchmark"]
    assert bench["eval_samples"] == 5 and [s["count"] for s in bench["latency_shapes"]] == [2, 2, 1]
    row = next(r for r in bench["rows"] if r["provider"] == "cpu")
    assert row["fidelity"]["samples"] == 5 and row["fidelity"]["max_abs"] == 0.0


def test_no_output_overwrites_a_loader_file_or_a_sample(model_path: Path, tmp_path: Path) -> None:
    from optimizer_cli.outputs import read_paths

    spec = loader_file(tmp_path / "loader", 2)
    folder = npz_folder(tmp_path / "lines", 2)
    reads = read_paths(model_path, {"--calib": spec, "--data": str(folder), "--metric": "pkg.mod:fn"})
    assert reads[(tmp_path / "loader" / "loader.py").resolve()] == "--calib"
    assert reads[(folder / "line001.npz").resolve()] == "--data (in its folder)"
    proc = run_cli(str(model_path), "-r", "cnn-int8", "--calib", spec, "-o", str(tmp_path / "loader" / "loader.py"))
    assert proc.returncode == 2 and "refusing to overwrite --calib" in proc.stderr
