"""Issue 24 items 1, 4 and 14 (parts): what data loading and the fidelity/accuracy numbers report is what happened.

Non-finite data is refused at load unless allowed; non-finite outputs never count as agreement and every gate
fails on an undefined figure; integer data is not silently cast to floating point; unused keys and odd labels
are named; load errors blame the data, not the model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from optimizer_cli.bench.accuracy import accuracy, fidelity, topk_accuracy
from optimizer_cli.bench.gate import evaluate, goal_holds, parse_gate
from optimizer_cli.bench.output_kinds import OutputKind
from optimizer_cli.data import DataPolicy, Dataset, load_dataset, resolve_dataset
from optimizer_cli.errors import UserInputError

from .builders import mlp
from .conftest import run_cli


@pytest.fixture
def model() -> ir.Model:
    return ir.serde.deserialize_model(mlp((8, 16, 4)))


def _nan_rows(n: int, bad: list[int]) -> np.ndarray:
    x = np.ones((n, 8), np.float32)
    for i in bad:
        x[i, 3] = np.nan if i % 2 else np.inf
    return x


# --- item 1: non-finite data is reported at load and refused unless asked for -----------------------------


def test_nonfinite_input_refused_at_load_naming_file_key_and_count(tmp_path: Path, model: ir.Model) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=_nan_rows(8, [1, 2, 5]), labels=np.zeros(8, np.int64))
    with pytest.raises(UserInputError) as info:
        load_dataset(path, model)
    text = str(info.value)
    assert str(path) in text and "'x'" in text and "3 of the 8 samples" in text and "--allow-nonfinite" in text


def test_nonfinite_input_allowed_says_how_many(tmp_path: Path, model: ir.Model) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=_nan_rows(8, [1, 2, 5]))
    ds = load_dataset(path, model, policy=DataPolicy(allow_nonfinite=True))
    assert len(ds) == 8
    assert any("3 of the 8 samples" in n and "'x'" in n for n in ds.notes)


def test_nonfinite_refused_in_per_sample_layouts_and_calibration(tmp_path: Path, model: ir.Model) -> None:
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"s{i}.npz", x=_nan_rows(1, [0] if i == 2 else []))
    with pytest.raises(UserInputError, match=r"'x'.*1 of the 3 samples"):
        load_dataset(folder, model)
    with pytest.raises(UserInputError, match="1 of the 3 samples"):  # calibration data goes through the same check
        resolve_dataset(str(folder), model, samples=3, seed=0)


# --- item 4: dtype mismatches are caught at load; unused keys are named ------------------------------------


def test_integer_data_for_float_input_is_refused(tmp_path: Path, model: ir.Model) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.full((4, 8), 200, np.uint8))
    with pytest.raises(UserInputError) as info:
        load_dataset(path, model)
    text = str(info.value)
    assert str(path) in text and "'x'" in text and "uint8" in text and "float32" in text and "--allow-cast" in text


def test_integer_data_cast_only_when_asked_and_exact(tmp_path: Path, model: ir.Model) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.full((4, 8), 200, np.uint8))
    ds = load_dataset(path, model, policy=DataPolicy(allow_cast=True))
    assert ds.feeds[0]["x"].dtype == np.float32 and float(ds.feeds[0]["x"][0, 0]) == 200.0
    assert any("uint8" in n and "float32" in n for n in ds.notes)
    inexact = tmp_path / "big.npz"
    np.savez(inexact, x=np.full((4, 8), 2**24 + 1, np.int64))  # not representable in float32
    with pytest.raises(UserInputError, match="exact"):
        load_dataset(inexact, model, policy=DataPolicy(allow_cast=True))


def test_integer_narrowing_refused_when_values_do_not_fit() -> None:
    # An int64 id input fed int32 data is a lossless widening (a note); int64 data past int32 is refused.
    from .builders import Builder

    b = Builder(0)
    y = b.op("Cast", ["ids"], to=onnx.TensorProto.FLOAT)
    m = ir.serde.deserialize_model(b.model([("ids", onnx.TensorProto.INT32, [1, 4])], [("y", y)]))
    ok = resolve_dataset("random", m, samples=1, seed=0)
    assert ok is not None
    ds = _load_arrays(m, ids=np.full((2, 1, 4), 7, np.int64))
    assert ds.feeds[0]["ids"].dtype == np.int32
    with pytest.raises(UserInputError, match="int64.*int32"):
        _load_arrays(m, ids=np.full((2, 1, 4), 2**40, np.int64))


def _load_arrays(m: ir.Model, **arrays: np.ndarray) -> Dataset:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.npz"
        np.savez(path, **arrays)  # type: ignore[arg-type]
        return load_dataset(path, m)


def test_unused_keys_are_named(tmp_path: Path, model: ir.Model) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((4, 8), np.float32), y=np.arange(4))  # labels saved as `y`
    ds = load_dataset(path, model)
    assert ds.labels is None
    assert any("'y'" in n and "labels" in n for n in ds.notes)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(2):
        np.savez(folder / f"s{i}.npz", x=np.ones((1, 8), np.float32), target=np.array([1]))
    assert any("'target'" in n for n in load_dataset(folder, model).notes)


# --- item 14: labels, messages ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "said"),
    [
        (np.array([0, 1, -5, 1_000_000_000_000]), "outside the 4 classes"),
        (np.array([0.5, 1.0, 2.0, 3.0]), "not integer class ids"),
        (np.array(["a", "b", "c", "d"]), "strings"),
    ],
)
def test_odd_labels_are_reported(tmp_path: Path, model: ir.Model, labels: np.ndarray, said: str) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((4, 8), np.float32), labels=labels)
    ds = load_dataset(path, model)
    assert any(said in n for n in ds.notes), ds.notes


def test_whole_float_labels_are_read_as_classes(tmp_path: Path, model: ir.Model) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((4, 8), np.float32), labels=np.array([0.0, 1.0, 2.0, 3.0]))
    ds = load_dataset(path, model)
    assert ds.labels is not None and all(np.issubdtype(lab.dtype, np.integer) for lab in ds.labels)
    assert any("float64" in n for n in ds.notes)


def test_dim_mismatch_is_blamed_on_the_data(tmp_path: Path) -> None:
    m = ir.serde.deserialize_model(mlp((32, 16, 4)))
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((4, 31), np.float32))
    with pytest.raises(UserInputError, match=r"'x'.*31.*32"):
        load_dataset(path, m)


def test_garbage_npz_gives_no_pickle_advice(tmp_path: Path, model: ir.Model) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserInputError) as info:
        load_dataset(bad, model)
    assert "pickle" not in str(info.value) and "cannot read" in str(info.value)
    objects = tmp_path / "obj.npz"
    np.savez(objects, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserInputError) as info:
        load_dataset(objects, model)
    assert "allow_pickle" not in str(info.value) and "object" in str(info.value)


def test_label_count_error_names_the_files_rows(tmp_path: Path, model: ir.Model) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((8, 8), np.float32), labels=np.arange(3))
    with pytest.raises(UserInputError, match="8 rows"):
        load_dataset(path, model, limit=4)


# --- fidelity, accuracy and gates on non-finite outputs ---------------------------------------------------

_SCORES = OutputKind("y", "class_scores", "test")


def test_identical_nonfinite_outputs_agree_and_compare_the_finite_rest() -> None:
    ref = np.array([[1.0, 3.0, np.nan, 0.0], [2.0, 1.0, 0.0, np.inf]], np.float32)
    fid = fidelity([[ref]], [[ref.copy()]], ["y"], [_SCORES])
    assert fid.top1_agreement == 1.0
    assert fid.cosine_min == pytest.approx(1.0) and fid.rel_l2 == 0.0 and fid.max_abs == 0.0


def test_all_nonfinite_outputs_are_undefined_not_perfect() -> None:
    ref = np.full((2, 4), np.nan, np.float32)
    fid = fidelity([[ref]], [[ref.copy()]], ["y"], [_SCORES])
    assert math.isnan(fid.cosine_min) and math.isnan(fid.rel_l2) and math.isnan(fid.cosine_mean)
    assert math.isnan(fid.per_output[0]["cosine_min"])


def test_a_changed_nonfinite_mask_fails_the_sample() -> None:
    ref = np.array([[1.0, np.nan, 0.0, 0.0]], np.float32)
    new = np.array([[1.0, 0.0, 0.0, 0.0]], np.float32)  # the optimized model "fixed" a NaN: not faithful
    fid = fidelity([[ref]], [[new]], ["y"], [_SCORES])
    assert fid.cosine_min == 0.0 and fid.max_abs == math.inf
    broken = np.array([[1.0, np.nan, 0.0, 0.0]], np.float32)
    fid = fidelity([[new]], [[broken]], ["y"], [_SCORES])
    assert fid.top1_agreement == 0.0 and fid.cosine_min == 0.0 and fid.nonfinite == 1


def _bench(fid: dict) -> dict:
    return {"rows": [{"provider": "cpu", "usable": True, "shape": "", "fidelity": fid}]}


@pytest.mark.parametrize(
    "gate", ["cosine<0.99", "rel_l2>0.01", "max_abs>0.1", "top1_agreement<0.99", "cosine_mean<0.5"]
)
def test_every_fidelity_gate_fails_on_an_undefined_value(gate: str) -> None:
    nan = float("nan")
    fid = {"cosine_min": nan, "cosine_mean": nan, "rel_l2": nan, "max_abs": nan, "top1_agreement": nan}
    (result,) = evaluate([parse_gate(gate)], _bench(fid))
    assert result.violated and "undefined" in result.detail
    holds, _ = goal_holds(parse_gate(gate), _bench(fid)["rows"][0], _bench(fid))
    assert not holds


def test_nonfinite_logits_never_count_as_a_hit(tmp_path: Path) -> None:
    logits = np.array([[np.nan, np.nan, np.nan, np.nan], [0.0, 5.0, 1.0, 1.0]], np.float32)
    assert topk_accuracy([[logits]], [np.array([0, 1])], 1) == 0.5
    acc = accuracy([[logits]], Dataset([{"x": np.zeros(1)}], [np.array([0, 1])], "t", False), None)
    assert acc is not None and acc.top1 == 0.5


# --- the CLI: the refusal, and the flag that allows it ----------------------------------------------------


def test_cli_bench_refuses_nonfinite_data_and_flag_allows_it(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(mlp((8, 16, 4)), model)
    data = tmp_path / "d.npz"
    np.savez(data, x=_nan_rows(6, [2]))
    refused = run_cli("bench", str(model), str(model), "--data", str(data), "--rounds", "2", "--no-memory")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "1 of the 6 samples" in refused.stderr and "Traceback" not in refused.stderr
    allowed = run_cli(
        "bench", str(model), str(model), "--data", str(data), "--rounds", "2", "--no-memory",
        "--allow-nonfinite", "--json",
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    doc = json.loads(allowed.stdout)
    notes = doc["benchmark"]["notes"] if "benchmark" in doc else doc["notes"]
    assert any("1 of the 6 samples" in n for n in notes)


def test_cli_run_refuses_nonfinite_data_and_flag_allows_it(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(mlp((8, 16, 4)), model)
    data = tmp_path / "d.npz"
    np.savez(data, x=_nan_rows(6, [2, 3]))
    args = ["run", str(model), "-r", "int8", "-o", str(tmp_path / "o.onnx")]
    refused = run_cli(*args, "--data", str(data), "--no-bench")
    assert refused.returncode == 2 and "2 of the 6 samples" in refused.stderr, refused.stderr
    assert not (tmp_path / "o.onnx").exists()
    allowed = run_cli(*args, "--data", str(data), "--no-bench", "--allow-nonfinite", "--json")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert any("2 of the 6 samples" in n for n in json.loads(allowed.stdout)["notes"])


def test_more_labels_than_rows_is_said(tmp_path: Path, model: ir.Model) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((4, 8), np.float32), labels=np.arange(6) % 4)
    assert any("2 more entries" in n for n in load_dataset(path, model).notes)


def test_task_metrics_never_score_nonfinite_outputs() -> None:
    from optimizer_cli.bench.task_metrics import cer, mean_iou

    logits = np.full((1, 3, 3), -5.0, np.float32)  # [N, T, K]: blank, class 1 ('a'), blank
    logits[0, 0, 0] = logits[0, 1, 1] = logits[0, 2, 0] = 5.0
    assert cer([[logits]], [np.array(["a"])], ["a", "b"]) == 0.0
    logits[0, 1, 1] = np.nan  # the position that read 'a' is broken (argmax picks the NaN: still 'a')
    assert cer([[logits]], [np.array(["a"])], ["a", "b"]) == 1.0
    scores = np.zeros((1, 2, 2, 2), np.float32)
    scores[0, 1] = 1.0  # every pixel is class 1
    mask = np.ones((1, 2, 2), np.int64)
    assert mean_iou([[scores]], [mask]) == 1.0
    scores[0, 0, 0, 0] = np.nan
    assert mean_iou([[scores]], [mask]) == 0.75


def test_a_kind_figure_undefined_on_any_output_fails_its_gate() -> None:
    outputs = [
        {"name": "a", "kind": "dense_map", "map_iou": 0.9},
        {"name": "b", "kind": "dense_map", "map_iou": float("nan")},  # min() would keep 0.9
    ]
    (result,) = evaluate([parse_gate("map_iou<0.5")], _bench({"per_output": outputs}))
    assert result.violated and "undefined" in result.detail


def test_integer_data_for_a_bool_input_must_be_zero_or_one() -> None:
    from .builders import Builder

    b = Builder(0)
    y = b.op("Cast", ["mask"], to=onnx.TensorProto.FLOAT)
    m = ir.serde.deserialize_model(b.model([("mask", onnx.TensorProto.BOOL, [1, 4])], [("y", y)]))
    assert _load_arrays(m, mask=np.ones((2, 1, 4), np.int64)).feeds[0]["mask"].dtype == np.bool_
    with pytest.raises(UserInputError, match="int64, model wants bool"):
        _load_arrays(m, mask=np.full((2, 1, 4), 7, np.int64))


def test_stage_drift_never_scores_a_changed_or_missing_nonfinite_as_perfect() -> None:
    """The stage table's figures: a NaN the new output lost (or gained) is a changed output (cosine 0 beside
    max|Δ| inf), an all-NaN output reproduced is undefined (NaN), and an undefined sample never wins the worst."""
    from optimizer_cli.verify import aggregate, compare_arrays

    ref = np.array([[1.0, np.nan, 3.0]], np.float32)
    fixed = np.array([[1.0, 2.0, 3.0]], np.float32)  # the NaN became a number
    lost = compare_arrays("y", ref, fixed)
    assert lost.cosine == 0.0 and lost.max_abs == float("inf") and lost.rel_l2 == float("inf")
    flipped = compare_arrays("y", np.array([np.inf, 1.0]), np.array([-np.inf, 1.0]))  # +inf became -inf
    assert flipped.cosine == 0.0
    all_nan = np.full((1, 3), np.nan, np.float32)
    undefined = compare_arrays("y", all_nan, all_nan.copy())
    assert np.isnan(undefined.cosine) and np.isnan(undefined.max_abs)
    same = compare_arrays("y", ref, ref.copy())
    assert same.cosine == pytest.approx(1.0) and same.max_abs == 0.0
    worst = aggregate([[undefined], [same]])[0]
    assert worst.cosine == pytest.approx(1.0) and worst.max_abs == 0.0
    assert np.isnan(aggregate([[undefined], [undefined]])[0].cosine)
