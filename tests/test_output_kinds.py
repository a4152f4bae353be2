"""Output kinds: what each output is, and the fidelity figures of its kind on pairs with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from optimizer_cli.bench.accuracy import fidelity
from optimizer_cli.bench.gate import evaluate, parse_gate
from optimizer_cli.bench.output_kinds import classify, classify_outputs, map_iou, nn_agreement, output_fidelity
from optimizer_cli.errors import UserInputError

RNG = np.random.default_rng(0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1 / (1 + np.exp(-x))).astype(np.float32)


@pytest.mark.parametrize(
    ("name", "arrays", "kind", "reason"),
    [
        ("logits", [RNG.standard_normal((2, 97)).astype(np.float32)], "class_scores", "last axis 97 classes"),
        ("out", [RNG.standard_normal((4, 1000)).astype(np.float32)], "class_scores", "last axis 1000 classes"),
        ("ctc", [RNG.standard_normal((25, 1, 97)).astype(np.float32)], "sequence_logits", "97 classes at each"),
        ("ctc", [np.full((1, 25, 6), 1 / 6, np.float32)], "sequence_logits", "6 classes"),  # softmaxed
        ("maps", [_sigmoid(RNG.standard_normal((1, 1, 32, 32)))], "dense_map", "1 channel map in [0,1]"),
        ("maps", [_sigmoid(RNG.standard_normal((1, 32, 40)))], "dense_map", "32x40 map in [0,1]"),
        ("pooled", [RNG.standard_normal((2, 384)).astype(np.float32)], "embedding", "384-d"),
        ("y", [np.eye(3, 16, dtype=np.float32)], "embedding", "unit norm"),
        ("sentence_vec", [RNG.standard_normal((2, 100)).astype(np.float32)], "embedding", "100-d"),
        ("class_logits", [RNG.standard_normal((2, 512)).astype(np.float32)], "class_scores", "512 classes"),
        ("last_hidden_state", [RNG.standard_normal((1, 8, 384)).astype(np.float32)], "regression", "width 384"),
        ("boxes", [RNG.standard_normal((2, 1)).astype(np.float32)], "regression", "shape [2, 1]"),
        ("ids", [np.arange(6).reshape(2, 3)], "regression", "integer output"),
    ],
)
def test_classification_of_synthetic_outputs(name: str, arrays: list, kind: str, reason: str) -> None:
    got = classify(name, arrays)
    assert got.kind == kind and reason in got.reason, got


def test_recipe_kind_wins_and_unknown_names_are_refused() -> None:
    outs = [[RNG.standard_normal((2, 10)).astype(np.float32)]]
    assert classify_outputs(["y"], outs, {"y": "regression"})[0].reason == "recipe metrics.outputs"
    with pytest.raises(UserInputError, match="not outputs of the model"):
        classify_outputs(["y"], outs, {"z": "dense_map"})


def test_map_iou_known_value() -> None:
    ref = np.zeros((1, 1, 4, 4), np.float32)
    new = np.zeros_like(ref)
    ref[..., :2, :] = 0.9  # 8 pixels on
    new[..., 1:3, :] = 0.9  # 8 pixels on, 4 shared: IoU 4 / 12
    assert map_iou([ref], [new], 0.3) == pytest.approx(1 / 3)
    assert map_iou([ref], [new * 0.3], 0.3) == 0.0  # at the threshold is off
    assert map_iou([ref * 0], [new * 0], 0.3) == 1.0  # both empty agree


def test_sequence_position_agreement_known_value() -> None:
    ref = np.zeros((4, 1, 5), np.float32)
    ref[np.arange(4), 0, [0, 1, 2, 3]] = 1.0
    new = ref.copy()
    new[3, 0, 4] = 2.0  # the last of 4 positions changes its argmax
    entry = output_fidelity(classify("ctc", [ref]), [ref], [new], 0.3)
    assert entry["kind"] == "sequence_logits"
    assert entry["position_agreement"] == 0.75 and entry["top1_agreement"] == 0.75


def test_nn_agreement_broken_by_a_permutation() -> None:
    base = np.array([[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 1, 0, 0], [0, 0.9, 0.1, 0]], np.float32)
    samples = [base[i : i + 1] for i in range(4)]
    assert nn_agreement(samples, samples) == 1.0
    # Rows 1 and 2 swap: 0's neighbour moves from 1 to 2, 3's from 2 to 1, 1 and 2 now pick 3 and 0.
    swapped = [base[[0, 2, 1, 3]][i : i + 1] for i in range(4)]
    assert nn_agreement(samples, swapped) == 0.0
    assert nn_agreement(samples[:2], samples[:2]) is None


def test_class_scores_top5_and_map_outputs_lose_last_axis_top1() -> None:
    logits = [RNG.standard_normal((3, 10)).astype(np.float32) for _ in range(2)]
    noisy = [x + np.float32(0.01) * RNG.standard_normal(x.shape).astype(np.float32) for x in logits]
    maps = [_sigmoid(RNG.standard_normal((1, 1, 16, 16))) for _ in range(2)]
    fid = fidelity(
        [[a, m] for a, m in zip(logits, maps, strict=True)],
        [[b, m] for b, m in zip(noisy, maps, strict=True)],
        ["logits", "maps"],
    )
    by_name = {p["name"]: p for p in fid.per_output}
    assert by_name["logits"]["top5_agreement"] == 1.0 and by_name["logits"]["top1_agreement"] is not None
    assert by_name["maps"]["top1_agreement"] is None and by_name["maps"]["map_iou"] == 1.0
    assert fid.top1_agreement == by_name["logits"]["top1_agreement"]


def _row(per_output: list[dict]) -> dict:
    return {
        "rows": [{"provider": "cpu", "shape": "", "usable": True, "fidelity": {"per_output": per_output}}],
        "original_bytes": 1,
        "optimized_bytes": 1,
    }


def test_gates_take_the_worst_output_of_a_kind_and_name_missing_kinds() -> None:
    bench = _row(
        [
            {"name": "a", "kind": "dense_map", "map_iou": 0.95},
            {"name": "b", "kind": "dense_map", "map_iou": 0.999},
            {"name": "c", "kind": "class_scores", "top5_agreement": None},
        ]
    )
    [result] = evaluate([parse_gate("map_iou<0.99")], bench)
    assert result.violated and "0.95" in result.detail
    with pytest.raises(UserInputError, match="no output is of kind embedding .*a=dense_map"):
        evaluate([parse_gate("nn_agreement<0.9")], bench)
    with pytest.raises(UserInputError, match="fraction"):
        parse_gate("map_iou<99")


def _map_model(path, shift: float = 0.0) -> None:
    """A tiny text-detector-like model: conv, relu, conv, sigmoid -> a [N, 1, H, W] probability map."""
    import onnx

    from .builders import Builder

    b = Builder(0)
    y = b.conv(b.op("Relu", [b.conv("x", 1, 4)]), 4, 1)
    if shift:
        y = b.op("Add", [y, b.const(np.array(shift, np.float32), "shift")])
    onnx.save(b.model([("x", 1, [2, 1, 16, 16])], [("maps", b.op("Sigmoid", [y]))]), path)


def test_cli_reports_map_iou_and_gates_it(tmp_path) -> None:
    import json

    from .conftest import run_cli

    _map_model(tmp_path / "det.onnx")
    _map_model(tmp_path / "shifted.onnx", shift=1.0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes: [{type: cleanup}]\nmetrics: {map_threshold: 0.5}\n")
    fast = ["--providers", "cpu", "--no-memory", "--json"]
    proc = run_cli(
        str(tmp_path / "det.onnx"), "--recipe", str(recipe), "-o", str(tmp_path / "out.onnx"), *fast,
        "--no-attribute", "--set", "benchmark.rounds=2", "--set", "benchmark.runs_per_round=2",
        "--fail-if", "map_iou<0.99",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    fid = json.loads(proc.stdout)["benchmark"]["rows"][0]["fidelity"]
    [entry] = fid["per_output"]
    assert entry["kind"] == "dense_map" and entry["map_iou"] == 1.0 and entry["map_threshold"] == 0.5
    assert entry["top1_agreement"] is None and fid["top1_agreement"] is None
    shifted = [str(tmp_path / "det.onnx"), str(tmp_path / "shifted.onnx"), *fast, "--rounds", "2"]
    proc = run_cli("bench", *shifted, "--fail-if", "map_iou<0.99")
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["benchmark"]["rows"][0]["fidelity"]["per_output"][0]["map_iou"] < 0.99
    proc = run_cli("bench", *shifted, "--fail-if", "nn_agreement<0.9")
    assert proc.returncode == 2 and "no output is of kind embedding (outputs: maps=dense_map)" in proc.stderr


def test_table_prints_a_line_per_output_within_80_columns() -> None:
    from rich.console import Console

    from optimizer_cli.report.table import render_rich

    from .test_report_table import fake_report

    report = fake_report()
    row = report["benchmark"]["rows"][0]
    row["fidelity"]["per_output"] = [
        {"name": "maps", "kind": "dense_map", "reason": "1 channel map in [0,1]", "cosine_min": 0.974,
         "rel_l2": 0.2, "max_abs": 0.5, "top1_agreement": None, "map_iou": 0.8312, "map_threshold": 0.3},
    ]  # fmt: skip
    row["accuracy_original"] = {"top1": None, "metric": 0.05, "metric_name": "cer", "lower_is_better": True}
    row["accuracy_optimized"] = {"top1": None, "metric": 0.07, "metric_name": "cer", "lower_is_better": True}
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    render_rich(report, console)
    text = console.export_text()
    assert "cpu maps: dense_map (1 channel map in [0,1]): map IoU@0.3 83.12%" in " ".join(text.split())
    assert "cpu cer: 0.05 original, 0.07 optimized (lower is better)" in text
    assert max(len(line) for line in text.splitlines() if "--set" not in line) <= 80


def test_kinds_declared_in_the_recipe_refuse_gates_before_the_work(tmp_path) -> None:
    from .conftest import run_cli

    _map_model(tmp_path / "det.onnx")
    out = tmp_path / "out.onnx"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes: [{type: cleanup}]\nmetrics: {outputs: {maps: dense_map}}\n")
    base = [str(tmp_path / "det.onnx"), "--recipe", str(recipe), "-o", str(out), "--providers", "cpu"]
    proc = run_cli(*base, "--fail-if", "position_agreement<0.9")
    assert proc.returncode == 2 and "no output is of kind sequence_logits (recipe metrics.outputs: maps=dense_map)" in (
        proc.stderr
    )
    assert not out.exists(), "refused before the work"
    recipe.write_text("passes: [{type: cleanup}]\nmetrics: {outputs: {prob: dense_map}}\n")
    proc = run_cli(*base)
    assert proc.returncode == 2 and "names ['prob'], not outputs of the model" in proc.stderr


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("metrics: {map_threshold: 1.5}", "map_threshold"),
        ("metrics: {outputs: {y: mask}}", "outputs"),
        ("metrics: {task: wer}", "task"),
        ("metrics: {treshold: 0.3}", "treshold"),
    ],
)
def test_recipe_metrics_section_is_validated(text: str, needle: str) -> None:
    from optimizer_cli.recipe import parse_recipe

    assert parse_recipe("metrics: {outputs: {maps: dense_map}, map_threshold: 0.5, task: cer}").metrics.task == "cer"
    with pytest.raises(UserInputError, match=needle):
        parse_recipe(text)
