"""Built-in task metrics (CER of a CTC greedy decode, mean IoU) and the metric plug-in contract."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from optimizer_cli.bench.accuracy import accuracy, load_metric
from optimizer_cli.bench.task_metrics import cer, edit_distance, greedy_ctc_decode, load_charset, mean_iou
from optimizer_cli.data import Dataset
from optimizer_cli.errors import UserInputError

from .conftest import ROOT, run_cli

CHARSET = ["a", "b", "c"]


def _logits(path: list[int], classes: int = 4) -> np.ndarray:
    """[1, T, K] scores whose argmax follows `path`."""
    out = np.zeros((1, len(path), classes), np.float32)
    out[0, np.arange(len(path)), path] = 5.0
    return out


def test_greedy_decode_and_cer_known_answer() -> None:
    # argmax a a _ a b b _ c: repeats merge (a a -> a), a blank separates the two a's -> "aabc".
    logits = _logits([1, 1, 0, 1, 2, 2, 0, 3])
    assert greedy_ctc_decode(logits, CHARSET) == ["aabc"]
    assert edit_distance("aabc", "abc") == 1
    assert cer([[logits]], [np.array(["abc"])], CHARSET) == pytest.approx(1 / 3)
    # [T, N, K] layout: the second axis matches the number of labels.
    two = np.concatenate([logits, _logits([3, 3, 2, 0, 1, 0, 0, 0])])  # "aabc", "cba"
    assert cer([[two.transpose(1, 0, 2)]], [np.array(["abc", "cba"])], CHARSET) == pytest.approx(1 / 6)
    assert greedy_ctc_decode(_logits([4, 1], classes=5), CHARSET) == [" a"]  # one past the charset: space
    with pytest.raises(UserInputError, match="6 classes, the charset 3"):
        greedy_ctc_decode(_logits([1], classes=6), CHARSET)


def test_mean_iou_known_answer() -> None:
    prob = np.zeros((1, 1, 2, 2), np.float32)
    prob[0, 0, 0, :] = 0.9  # predicted: top row is class 1
    mask = np.array([[[1, 0], [0, 0]]])  # label: one pixel of class 1
    # class 1: 1 / 2; class 0: 2 / 3
    assert mean_iou([[prob]], [mask], 0.3) == pytest.approx((1 / 2 + 2 / 3) / 2)
    scores = np.stack([1 - prob[:, 0], prob[:, 0]], axis=1)  # [N, C, H, W]: argmax over C
    assert mean_iou([[scores]], [mask]) == pytest.approx((1 / 2 + 2 / 3) / 2)


def _ctc_model(path, character: str | None = "a\nb\nc") -> None:
    node = helper.make_node("Relu", ["x"], ["ctc"])
    graph = helper.make_graph(
        [node],
        "ctc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4])],
        [helper.make_tensor_value_info("ctc", TensorProto.FLOAT, [1, 8, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if character is not None:
        helper.set_model_props(model, {"character": character})
    onnx.save(model, path)


def test_charset_from_file_or_model_metadata(tmp_path) -> None:
    (tmp_path / "keys.txt").write_text("x\ny\n", encoding="utf-8")
    _ctc_model(tmp_path / "m.onnx")
    _ctc_model(tmp_path / "bare.onnx", character=None)
    assert load_charset(tmp_path / "keys.txt", tmp_path / "m.onnx") == ["x", "y"]
    assert load_charset(None, tmp_path / "m.onnx") == CHARSET
    with pytest.raises(UserInputError, match="needs a charset"):
        load_charset(None, tmp_path / "bare.onnx")
    with pytest.raises(UserInputError, match="unknown"):
        load_metric("builtin:wer")


def test_accuracy_with_string_labels_reports_cer_lower_is_better() -> None:
    data = Dataset([{"x": np.zeros(1)}], [np.array(["abc"])], "t", False)
    acc = accuracy([[_logits([1, 0, 2, 3])]], data, _cer_metric())
    assert acc is not None and acc.metric == 0.0 and acc.metric_name == "cer" and acc.lower_is_better
    assert acc.top1 is None  # string labels are not classes


def _cer_metric():
    from optimizer_cli.bench.task_metrics import builtin_metric

    return builtin_metric("cer", charset=CHARSET)


def test_cli_builtin_cer_and_gate(tmp_path) -> None:
    _ctc_model(tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=_logits([1, 1, 0, 1, 2, 2, 0, 3])[None], labels=np.array(["abc"]))
    args = ["bench", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz")]
    args += ["--providers", "cpu", "--rounds", "2", "--no-memory", "--json", "--metric", "builtin:cer"]
    proc = run_cli(*args, "--fail-if", "cer>0.3")
    assert proc.returncode == 1, proc.stderr  # CER 1/3
    row = json.loads(proc.stdout)["benchmark"]["rows"][0]
    assert row["accuracy_optimized"]["metric"] == pytest.approx(1 / 3)
    assert row["accuracy_optimized"]["metric_name"] == "cer" and row["accuracy_optimized"]["lower_is_better"]
    assert row["fidelity"]["per_output"][0]["kind"] == "sequence_logits"
    assert row["fidelity"]["per_output"][0]["position_agreement"] == 1.0
    assert run_cli(*args, "--fail-if", "accuracy_drop>1%").returncode == 0


def test_metric_plugin_example_runs_as_file_and_module(tmp_path) -> None:
    from .builders import mlp

    onnx.save(mlp(), tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((4, 2, 32)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, labels=np.array([0, 1, 2, 3, 4, 5, 6, 7]))
    example = ROOT / "docs" / "metric_plugin_example.py"
    args = ["bench", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz")]
    args += ["--providers", "cpu", "--rounds", "2", "--no-memory", "--json"]
    proc = run_cli(*args, "--metric", f"{example}:top1_accuracy")
    assert proc.returncode == 0, proc.stderr
    acc = json.loads(proc.stdout)["benchmark"]["rows"][0]["accuracy_original"]
    assert acc["metric"] == acc["top1"] and acc["metric_name"].endswith("top1_accuracy")
    # As a module; and what raising does: exit 2, one line naming the function.
    import sys

    sys.path.insert(0, str(example.parent))
    try:
        metric = load_metric("metric_plugin_example:top1_accuracy")
    finally:
        sys.path.remove(str(example.parent))
    data = Dataset([{"x": x[0]}], [np.array([0, 1])], "t", False)
    assert accuracy([[np.eye(2, 10, dtype=np.float32)]], data, metric).metric == 1.0  # type: ignore[union-attr]
    with pytest.raises(UserInputError, match="metric_plugin_example:top1_accuracy failed: ValueError: expected"):
        accuracy([[np.zeros((2, 1, 10), np.float32)]], data, metric)  # not [rows, classes]
