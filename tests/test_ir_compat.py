"""IR-version adjustments at load: IR 3 models accept added initializers, IR 14 models load in ORT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer_cli.ir_compat import lower_new_ir, ort_max_ir_version, raise_old_ir
from optimizer_cli.pipeline import normalize, run_pipeline
from optimizer_cli.recipe import parse_recipe

from .builders import check, run


def _ir3_conv() -> onnx.ModelProto:
    """A PyTorch-1.0-style export: IR 3, opset 6 ops at opset 9, the weights also listed as graph inputs."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "1")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "2")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["0", "1", "2"], ["3"], kernel_shape=[3, 3]), helper.make_node("Relu", ["3"], ["4"])],
        "torch-jit-export",
        [
            helper.make_tensor_value_info("0", TensorProto.FLOAT, [1, 3, 8, 8]),
            helper.make_tensor_value_info("1", TensorProto.FLOAT, [4, 3, 3, 3]),
            helper.make_tensor_value_info("2", TensorProto.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("4", TensorProto.FLOAT, [1, 4, 6, 6])],
        initializer=[w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)


def test_ir3_is_raised_and_weights_stop_being_inputs() -> None:
    proto = _ir3_conv()
    model = ir.serde.deserialize_model(proto)
    note = raise_old_ir(model)
    assert note and "3 -> 4" in note and "2 initializer" in note
    assert model.ir_version == 4
    assert [v.name for v in model.graph.inputs] == ["0"]
    assert set(model.graph.initializers) == {"1", "2"}
    check(model)
    feed = {"0": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run(model, feed)[0], run(proto, feed)[0])
    assert raise_old_ir(model) is None  # idempotent


def test_ir3_model_quantizes_statically(tmp_path: Path) -> None:
    """Before: 'zero_point in initializer but not in graph input' from the checker after quantize (exit 3)."""
    src = tmp_path / "ir3.onnx"
    onnx.save(_ir3_conv(), str(src))
    recipe = parse_recipe(
        "passes:\n  - type: cleanup\n  - type: fuse\n  - type: quantize\n    mode: static\nverify: {samples: 2}\n"
    )
    result = run_pipeline(src, recipe, tmp_path / "out.onnx", calibration="random")
    assert result.stages[-1].stats["quant_ops"]
    assert any("raised IR version 3 -> 4" in n for n in result.notes)
    onnx.checker.check_model(str(tmp_path / "out.onnx"))


def _relu(ir_version: int, dtype: int = TensorProto.FLOAT, opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", dtype, [2])],
        [helper.make_tensor_value_info("y", dtype, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def test_newest_ir_is_lowered_when_nothing_newer_is_used(tmp_path: Path) -> None:
    newest = onnx.IR_VERSION
    supported = ort_max_ir_version()
    if newest <= supported:
        pytest.skip(f"this onnxruntime loads IR {newest}: nothing to lower")
    model = ir.serde.deserialize_model(_relu(newest))
    notes = normalize(model)
    assert model.ir_version == supported
    assert any(f"lowered IR version {newest} -> {supported}" in n for n in notes)
    feed = {"x": np.array([-1.0, 2.0], np.float32)}
    np.testing.assert_array_equal(run(model, feed)[0], [0.0, 2.0])
    # And through the pipeline: before, 'max supported IR version: 13' (exit 2) for a model ORT can run.
    src = tmp_path / "new_ir.onnx"
    onnx.save(_relu(newest), str(src))
    result = run_pipeline(src, parse_recipe("passes:\n  - type: cleanup\nverify: {samples: 2}\n"), None)
    assert any("lowered IR version" in n for n in result.notes)


def test_newest_ir_is_kept_when_a_newer_type_is_used() -> None:
    newest = onnx.IR_VERSION
    if newest <= ort_max_ir_version() or not hasattr(TensorProto, "FLOAT6E2M3"):
        pytest.skip("no IR version newer than this onnxruntime's with a type only it has")
    model = ir.serde.deserialize_model(_relu(newest, TensorProto.FLOAT6E2M3))
    assert lower_new_ir(model) is None
    assert model.ir_version == newest
