"""freeze_inputs: configuration inputs that hold one value in the data become constants and fold away (an If on
them inlined), exactly; inputs the data does not pin down, floats, and contradicted `values` are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from optimizer_cli.analysis.graph import op_counts
from optimizer_cli.data import Dataset
from optimizer_cli.passes.base import ModelTraits, RecipeContext
from optimizer_cli.passes.freeze_inputs import FreezeInputsConfig, FreezeInputsPass
from optimizer_cli.search.candidates import recipe_for, summary
from optimizer_cli.search.space import Dimension, default_space
from optimizer_cli.search.tune import starting_points

from .builders import check, context, run, to_ir

SILERO = Path.home() / ".cache" / "optimizer-cli-test-models" / "silero_vad.onnx"


def switch_model() -> onnx.ModelProto:
    """y = x * 2 where mode == 1, else x + 1 (an If on an int64 scalar, as silero-vad's on its sample rate); a
    float scalar `gain` scales the result (a float input that holds one value in the test data)."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    then_branch = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["doubled"])],
        "then",
        [],
        [helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["n", 4])],
        [two],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["shifted"])],
        "else",
        [],
        [helper.make_tensor_value_info("shifted", TensorProto.FLOAT, ["n", 4])],
        [one],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Equal", ["mode", "mode_one"], ["is_one"]),
            helper.make_node("If", ["is_one"], ["branch"], then_branch=then_branch, else_branch=else_branch),
            helper.make_node("Mul", ["branch", "gain"], ["y"]),
        ],
        "switch",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("mode", TensorProto.INT64, []),
            helper.make_tensor_value_info("gain", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor("mode_one", TensorProto.INT64, [], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def feeds(modes: list[int], gain: float = 0.5) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(len(modes))
    return [
        {
            "x": rng.standard_normal((3, 4)).astype(np.float32),
            "mode": np.array(m, np.int64),
            "gain": np.array(gain, np.float32),
        }
        for m in modes
    ]


def _save(path: Path, samples: list[dict[str, np.ndarray]]) -> None:
    """Samples as a stacked .npz (one row per sample; a scalar input becomes a vector)."""
    stacked: dict[str, Any] = {k: np.stack([s[k] for s in samples]) for k in samples[0]}
    np.savez(path, **stacked)


def _apply(model: ir.Model, tmp_path: Path, data: list[dict], random: bool = False, **config) -> FreezeInputsPass:
    ctx = dataclasses.replace(context(tmp_path), verify_data=Dataset(data, None, "test", random))
    p = FreezeInputsPass(FreezeInputsConfig(**config), ctx)
    result = p(model)
    assert result.modified == ("skipped" not in p.stats)
    return p


def _inputs(model: ir.Model) -> list[str]:
    return [str(v.name) for v in model.graph.inputs]


def test_a_constant_mode_is_frozen_its_if_inlined_and_the_outputs_kept(tmp_path: Path) -> None:
    proto = switch_model()
    model = to_ir(proto)
    data = feeds([1, 1, 1])
    p = _apply(model, tmp_path, data)
    assert p.stats["frozen"] == {"mode": "1"}
    assert p.stats["ifs_removed"] == 1
    assert "If" not in op_counts(model) and "Equal" not in op_counts(model)
    assert _inputs(model) == ["x", "gain"]  # the float gain holds one value too, and is never frozen on its own
    check(model)
    for feed in data:
        np.testing.assert_array_equal(run(model, {"x": feed["x"], "gain": feed["gain"]})[0], run(proto, feed)[0])
        np.testing.assert_array_equal(run(proto, feed)[0], feed["x"] * 2 * 0.5)  # the mode=1 branch
    # A caller who still feeds the frozen input is told, loudly, rather than answered for mode=1.
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString())
    with pytest.raises(Exception, match="mode"):
        sess.run(None, {**data[0], "mode": np.array(0, np.int64)})
    # Idempotent: nothing configurable is left.
    again = _apply(model, tmp_path, data)
    assert "skipped" in again.stats and _inputs(model) == ["x", "gain"]


def test_samples_that_disagree_leave_the_model_unchanged(tmp_path: Path) -> None:
    proto = switch_model()
    model = to_ir(proto)
    p = _apply(model, tmp_path, feeds([1, 0, 1]))
    assert "skipped" in p.stats
    assert p.stats["left"] == {"mode": "its 3 samples differ"}
    assert _inputs(model) == ["x", "mode", "gain"] and op_counts(model)["If"] == 1


def test_seeded_random_data_or_a_single_sample_freezes_nothing(tmp_path: Path) -> None:
    proto = switch_model()
    model = to_ir(proto)
    # A random feed's integers can look constant (masks are all ones): they are not the user's configuration.
    p = _apply(model, tmp_path, feeds([1, 1, 1]), random=True)
    assert "skipped" in p.stats and "seeded random" in p.stats["left"]["mode"]
    p = _apply(model, tmp_path, feeds([1]))
    assert "skipped" in p.stats and "1 sample" in p.stats["left"]["mode"]
    assert _inputs(model) == ["x", "mode", "gain"]


def test_explicit_values_are_frozen_only_where_the_data_agrees(tmp_path: Path) -> None:
    proto = switch_model()
    data = feeds([1, 1])
    contradicted = to_ir(proto)
    p = _apply(contradicted, tmp_path, data, values={"mode": 0})
    assert p.stats["skipped"] == "values says mode=0 but the data has mode=1"
    assert _inputs(contradicted) == ["x", "mode", "gain"]
    for values, why in [
        ({"speed": 3}, "not an input"),
        ({"mode": 1.5}, "not a INT64 value"),
        ({"mode": [1, 1]}, "shape [2]"),
    ]:
        p = _apply(to_ir(proto), tmp_path, data, values=values)
        assert why in p.stats["skipped"], p.stats["skipped"]
    # Named, a float input is frozen too (the user says it is configuration), and only the named inputs are.
    model = to_ir(proto)
    p = _apply(model, tmp_path, data, values={"gain": 0.5})
    assert p.stats["frozen"] == {"gain": "0.5"}
    assert _inputs(model) == ["x", "mode"] and op_counts(model)["If"] == 1
    check(model)
    for feed in data:
        np.testing.assert_array_equal(run(model, {"x": feed["x"], "mode": feed["mode"]})[0], run(proto, feed)[0])
    # A named value with no data for it to contradict is taken as given.
    model = to_ir(proto)
    p = _apply(model, tmp_path, [{"x": f["x"], "gain": f["gain"]} for f in data], values={"mode": 0})
    assert p.stats["frozen"] == {"mode": "0"} and "If" not in op_counts(model)
    np.testing.assert_array_equal(run(model, data[0])[0], (data[0]["x"] + 1) * 0.5)


def test_an_integer_input_of_more_than_16_elements_is_data_not_configuration(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 17])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [1, 17])
    graph = helper.make_graph([helper.make_node("Neg", ["ids"], ["y"])], "g", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    ids = {"ids": np.arange(17, dtype=np.int64)[None]}
    p = _apply(to_ir(proto), tmp_path, [ids, ids])
    assert "skipped" in p.stats and "17 elements" in p.stats["left"]["ids"]


def _traits(constant: tuple[str, ...]) -> ModelTraits:
    return ModelTraits(
        ops={"MatMul": 2, "If": 1},
        depthwise_nodes=[],
        prunable_groups=0,
        factorizable=0,
        mask_input=None,
        transformer=False,
        has_calibration=False,
        mixed_calibration_shapes=False,
        gpu=False,
        saturating_cpu=False,
        symbolic_inputs=True,
        one_evaluation_shape=True,
        constant_config_inputs=constant,
    )


def test_tune_searches_freezing_only_where_the_data_holds_an_input_constant() -> None:
    with_input = [d.name for d in default_space(_traits(("sr",)))]
    without = [d.name for d in default_space(_traits(()))]
    assert with_input == [*without, "freeze_inputs"]  # appended: seeded samplers draw the old dims as before
    from optimizer_cli.workflows.pass_catalog import tune_dimension_names

    assert tune_dimension_names(FreezeInputsPass) == (["freeze_inputs"], [])


def test_the_recipe_freezes_right_after_cleanup_before_quantize_and_static_shapes() -> None:
    params = {"quantize": "dynamic", "freeze_inputs": True, "static_shapes": True, "prune_sparsity": 0.3}
    types = [p["type"] for p in recipe_for(params, RecipeContext(None, {}, 2, "cpu"))["passes"]]
    assert types[:2] == ["cleanup", "freeze_inputs"]
    assert types.index("freeze_inputs") < types.index("prune") < types.index("quantize") < types.index("static_shapes")
    assert summary(params).startswith("inputs frozen + ")
    assert "freeze_inputs" not in str(
        recipe_for({"quantize": "none", "freeze_inputs": False}, RecipeContext(None, {}, 2, "cpu"))
    )


def test_compiling_engines_are_also_tried_with_inputs_frozen_first() -> None:
    dims = [
        Dimension("target", ("cpu", "openvino"), "where"),
        Dimension("quantize", ("none", "dynamic"), "mode"),
        Dimension("static_shapes", (False, True), "fix the symbolic dims"),
        Dimension("freeze_inputs", (False, True), "freeze"),
    ]
    points = starting_points(dims)
    frozen = [p for p in points if p.get("freeze_inputs")]
    assert frozen == [{"target": "openvino", "quantize": "none", "static_shapes": True, "freeze_inputs": True}]
    assert points.index(frozen[0]) == 3  # after each engine alone and OpenVINO on fixed shapes
    # Without the static_shapes dimension (samples of several shapes): frozen alone.
    assert {"target": "openvino", "quantize": "none", "freeze_inputs": True} in starting_points(
        [d for d in dims if d.name != "static_shapes"]
    )
    # No compiling engine: no frozen starting point (the sampler may still draw it).
    assert not any(p.get("freeze_inputs") for p in starting_points(dims[1:]))


def test_tune_reads_the_constant_input_from_the_evaluation_data(tmp_path: Path) -> None:
    from optimizer_cli.search.tune import TuneRequest, prepare

    src = tmp_path / "switch.onnx"
    onnx.save(switch_model(), src)
    spaces = {}
    for name, modes in (("constant", [1, 1, 1, 1]), ("varying", [1, 0, 1, 0])):
        data = tmp_path / f"{name}.npz"
        samples = feeds(modes)
        _save(data, samples)
        request = TuneRequest(model=src, goals=[], evaluation=str(data), calibration=None, study_dir=tmp_path / name)
        spaces[name] = {d.name for d in prepare(request, lambda _m: None).dims}
    assert "freeze_inputs" in spaces["constant"]
    assert "freeze_inputs" not in spaces["varying"]


def test_a_frozen_candidate_is_timed_on_the_inputs_it_still_takes(tmp_path: Path) -> None:
    from optimizer_cli.search.candidates import DataRef, TimeJob, time_candidates

    proto = switch_model()
    src, frozen = tmp_path / "switch.onnx", tmp_path / "frozen.onnx"
    onnx.save(proto, src)
    model = to_ir(proto)
    samples = feeds([1, 1, 1])
    _apply(model, tmp_path, samples)
    onnx.save(ir.serde.serialize_model(model), frozen)
    data = tmp_path / "d.npz"
    _save(data, samples)
    job = TimeJob(
        numbers=[1],
        original=str(src),
        candidates=[str(frozen)],
        sessions=[{}],
        data=DataRef(str(src), str(data), 3),
        threads=1,
        targets=["cpu"],
        rounds=2,
        runs_per_round=2,
        max_seconds=5.0,
    )
    result = time_candidates(job)
    assert result["state"] == "timed", result.get("reason")


@pytest.mark.slow
@pytest.mark.skipif(not SILERO.exists(), reason="silero-vad is not in the test model cache")
def test_silero_vad_at_16_khz_gives_the_same_outputs_without_its_sample_rate_input(tmp_path: Path) -> None:
    original = onnx.load(SILERO)
    model = to_ir(original)
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((1, 512)).astype(np.float32) for _ in range(4)]
    state = np.zeros((2, 1, 128), np.float32)
    data = [{"input": c, "state": state, "sr": np.array(16000, np.int64)} for c in chunks]
    p = _apply(model, tmp_path, data)
    assert p.stats["frozen"] == {"sr": "16000"} and p.stats["ifs_removed"] >= 1
    assert _inputs(model) == ["input", "state"]
    check(model)
    a = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    state_a = state_b = state
    for chunk in chunks:  # the state each run returns feeds the next, as a stream is processed
        out_a = a.run(None, {"input": chunk, "state": state_a, "sr": np.array(16000, np.int64)})
        out_b = b.run(None, {"input": chunk, "state": state_b})
        for x, y in zip(out_a, out_b, strict=True):
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
        state_a, state_b = out_a[1], out_b[1]
