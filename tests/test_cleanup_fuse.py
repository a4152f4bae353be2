"""Exact passes: op-count changes, honest `modified`, idempotence, checker, ORT equality, refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from optimizer_cli.analysis.graph import op_counts
from optimizer_cli.passes.cleanup import CleanupConfig, CleanupPass
from optimizer_cli.passes.fuse import FuseConfig, FusePass
from optimizer_cli.verify import Tolerance

from .builders import Builder, check, context, mlp, random_feed, resnet_like, run, to_ir


def _assert_same(a, b, feed, rtol=1e-5, atol=1e-5) -> None:
    """The pipeline's exact-pass oracle, at a tighter tolerance than its default."""
    for x, y in zip(run(a, feed), run(b, feed), strict=True):
        assert Tolerance(rtol, atol).allows(x, y), float(np.max(np.abs(x - y)))


def test_fuse_folds_batchnorm_and_keeps_outputs(tmp_path) -> None:
    proto = resnet_like()
    model = to_ir(proto)
    result = FusePass(FuseConfig(), context(tmp_path))(model)
    assert result.modified
    assert op_counts(model)["BatchNormalization"] == 0
    assert op_counts(proto.graph and to_ir(proto))["BatchNormalization"] == 4
    check(model)
    _assert_same(proto, model, random_feed(proto))
    # The fused Conv keeps the user's node name (for exclude lists and attribution).
    conv_names = {n.name for n in model.graph if n.op_type == "Conv"}
    assert {n.name for n in proto.graph.node if n.op_type == "Conv"} == conv_names
    again = FusePass(FuseConfig(), context(tmp_path))(model)
    assert not again.modified, "second run must find nothing (idempotent, honest flag)"


def test_fuse_matmul_add_to_gemm(tmp_path) -> None:
    proto = mlp()
    model = to_ir(proto)
    assert FusePass(FuseConfig(batchnorm=False), context(tmp_path))(model).modified
    counts = op_counts(model)
    assert counts["Gemm"] == 3 and counts["MatMul"] == 0 and counts["Add"] == 0
    check(model)
    _assert_same(proto, model, random_feed(proto))


def test_fuse_refuses_rank3_matmul(tmp_path) -> None:
    b = Builder()
    y = b.matmul("x", 8, 4)
    proto = b.model([("x", TensorProto.FLOAT, [2, 3, 8])], [("y", y)])
    model = to_ir(proto)
    fuse = FusePass(FuseConfig(), context(tmp_path))
    assert not fuse(model).modified
    counts = op_counts(model)
    assert counts["MatMul"] == 1 and counts["Add"] == 1 and counts["Gemm"] == 0, "Gemm takes rank-2 inputs only"


def test_fuse_refuses_batchnorm_with_shared_conv_weight(tmp_path) -> None:
    """The conv weight feeds two convs: folding BN into it would change the other conv."""
    b = Builder()
    w = b.const(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32))
    c1 = b.op("Conv", ["x", w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    c2 = b.op("Conv", ["x", w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = b.op("Add", [b.bn(c1, 4), c2])
    proto = b.model([("x", TensorProto.FLOAT, [1, 3, 8, 8])], [("y", y)])
    model = to_ir(proto)
    FusePass(FuseConfig(), context(tmp_path))(model)
    check(model)
    assert op_counts(model)["BatchNormalization"] == 1, "the BN must stay: folding would change the other conv"
    weights = {n.inputs[1].const_value.numpy().tobytes() for n in model.graph if n.op_type == "Conv"}
    assert len(weights) == 1, "both convs still read the one, unchanged weight"
    _assert_same(proto, model, random_feed(proto))


@pytest.mark.parametrize("conv_is_output", [False, True])
def test_fuse_keeps_batchnorm_whose_conv_output_is_a_graph_output(tmp_path, conv_is_output: bool) -> None:
    """Folding BN into the Conv changes the Conv's output: when that output is itself a graph output (no
    Identity between, unlike Builder.model's outputs) the BN must stay. The False case is the control: the
    same Conv+BN folds, so the True case stays only because of the graph output."""
    b = Builder()
    c = b.conv("x", 3, 4)
    n = b.bn(c, 4)
    proto = b.model([("x", TensorProto.FLOAT, [1, 3, 8, 8])], [("y", n)])
    if conv_is_output:
        proto.graph.output.append(helper.make_tensor_value_info(c, TensorProto.FLOAT, [1, 4, 8, 8]))
        onnx.checker.check_model(proto)
    model = to_ir(proto)
    assert FusePass(FuseConfig(), context(tmp_path))(model).modified != conv_is_output
    check(model)
    assert op_counts(model)["BatchNormalization"] == int(conv_is_output)
    assert [v.name for v in model.graph.outputs] == [v.name for v in proto.graph.output]
    _assert_same(proto, model, random_feed(proto))  # both outputs, the Conv's included


def test_cleanup_folds_constants_removes_identity_and_dead_nodes(tmp_path) -> None:
    b = Builder()
    two = b.const(np.float32(2.0), "c")
    folded = b.op("Mul", [b.const(np.ones(4, np.float32), "c"), two])  # constant subgraph
    ident = b.op("Identity", ["x"])
    b.op("Relu", [ident])  # dead: no path to the output
    y = b.op("Add", [ident, folded])
    proto = b.model([("x", TensorProto.FLOAT, [2, 4])], [("y", y)])
    model = to_ir(proto)
    result = CleanupPass(CleanupConfig(), context(tmp_path))(model)
    assert result.modified
    counts = op_counts(model)
    assert counts["Mul"] == 0 and counts["Relu"] == 0
    check(model)
    _assert_same(proto, model, random_feed(proto))
    assert not CleanupPass(CleanupConfig(), context(tmp_path))(model).modified


def test_cleanup_lifts_constant_node_weights(tmp_path) -> None:
    """Paddle-style exports keep weights in Constant nodes; they become initializers."""
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(w)),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    import onnx_ir as ir

    model = ir.serde.deserialize_model(proto)
    assert CleanupPass(CleanupConfig(), context(tmp_path))(model).modified
    assert op_counts(model)["Constant"] == 0 and "w" in model.graph.initializers
    _assert_same(proto, model, random_feed(proto))


@pytest.mark.parametrize("seed", range(5))
def test_cleanup_and_fuse_on_random_cnns(tmp_path, seed: int) -> None:
    proto = resnet_like(width=8 + 8 * (seed % 2), seed=seed)
    model = to_ir(proto)
    CleanupPass(CleanupConfig(), context(tmp_path))(model)
    FusePass(FuseConfig(), context(tmp_path))(model)
    check(model)
    _assert_same(proto, model, random_feed(proto, seed=seed), rtol=1e-4, atol=1e-5)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    ops=st.lists(
        st.sampled_from(["conv_bn", "conv", "relu", "identity", "residual", "scale", "bn"]), min_size=1, max_size=7
    ),
    width=st.integers(2, 8),
    seed=st.integers(0, 10_000),
)
def test_property_exact_passes_on_random_cnn_chains(tmp_path_factory, ops: list[str], width: int, seed: int) -> None:
    """Random chains of the ops the exact passes rewrite: outputs must not move."""
    b = Builder(seed)
    x = b.op("Relu", [b.conv("x", 3, width)])
    for op in ops:
        if op == "conv_bn":
            x = b.bn(b.conv(x, width, width, k=1 + 2 * (seed % 2)), width)
        elif op == "conv":
            x = b.conv(x, width, width, k=1, bias=seed % 2 == 0)
        elif op == "relu":
            x = b.op("Relu", [x])
        elif op == "identity":
            x = b.op("Identity", [x])
        elif op == "residual":
            x = b.op("Add", [x, b.conv(x, width, width, k=3)])
        elif op == "scale":
            x = b.op("Mul", [x, b.const(np.float32(0.5) * np.ones((1, width, 1, 1), np.float32), "s")])
        else:
            x = b.bn(x, width)
    proto = b.model([("x", TensorProto.FLOAT, [1, 3, 6, 6])], [("y", x)])
    tmp_path = tmp_path_factory.mktemp("prop")
    model = to_ir(proto)
    CleanupPass(CleanupConfig(), context(tmp_path))(model)
    FusePass(FuseConfig(), context(tmp_path))(model)
    check(model)
    _assert_same(proto, model, random_feed(proto, seed=seed), rtol=1e-4, atol=1e-5)


def test_cleanup_undoes_a_fold_that_writes_a_newer_opset(tmp_path) -> None:
    """onnxscript's folder rewrites ConcatFromSequence(new_axis=1) into Unsqueeze with an axes input
    (opset 13) even at opset 12, which the checker refuses (onnx's simple/test_sequence_model5)."""
    xs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("a", "b")]
    graph = helper.make_graph(
        [
            helper.make_node("SequenceConstruct", ["a", "b"], ["seq"]),
            helper.make_node("ConcatFromSequence", ["seq"], ["y"], axis=-1, new_axis=1),
        ],
        "g",
        xs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 2])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)], ir_version=7)
    model = to_ir(proto)
    CleanupPass(CleanupConfig(), context(tmp_path))(model)
    check(model)
    _assert_same(proto, model, random_feed(proto))


def _layernorm_decomposed(opset: int, h: int = 32) -> onnx.ModelProto:
    """MatMul -> LayerNorm written out (ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add, as PyTorch exports it below
    opset 17) -> MatMul."""
    b = Builder(0)
    x = b.matmul("x", h, h)
    d = b.op("Sub", [x, b.op("ReduceMean", [x], axes=[-1])])
    var = b.op("ReduceMean", [b.op("Pow", [d, b.const(np.array(2.0, np.float32), "two")])], axes=[-1])
    y = b.op("Div", [d, b.op("Sqrt", [b.op("Add", [var, b.const(np.array(1e-5, np.float32), "eps")])])])
    gamma = b.const((1 + 0.1 * b.rng.standard_normal(h)).astype(np.float32), "gamma")
    y = b.op("Add", [b.op("Mul", [y, gamma]), b.const((0.1 * b.rng.standard_normal(h)).astype(np.float32), "beta")])
    return b.model([("x", TensorProto.FLOAT, ["batch", 8, h])], [("y", b.matmul(y, h, h))], opset=opset)


def _recipe_fuse_config() -> FuseConfig:
    from optimizer_cli.recipe import load_recipe, preset_path

    (fuse,) = [p for p in load_recipe(preset_path("transformer-int8"), []).passes if p.type == "fuse"]
    assert fuse.transformer != "none"
    return fuse


def test_transformer_layernorm_fusion_upgrades_an_opset16_model(tmp_path) -> None:
    """onnxruntime.transformers writes ONNX LayerNormalization (opset 17) into opset-16 models; the
    checker then refused them ("No Op registered for LayerNormalization with domain_version of 16")."""
    proto = _layernorm_decomposed(16)
    model = to_ir(proto)
    fuser = FusePass(_recipe_fuse_config(), context(tmp_path))
    assert fuser(model).modified
    check(model)
    assert op_counts(model)["LayerNormalization"] == 1 and op_counts(model)["ReduceMean"] == 0
    assert model.opset_imports[""] == 17 and fuser.stats["opset"].startswith("16->17")
    _assert_same(proto, model, random_feed(proto), rtol=1e-4, atol=1e-4)


def test_transformer_fusion_keeps_the_opset_when_the_converter_fails(tmp_path, monkeypatch) -> None:
    import optimizer_cli.passes.fuse as fuse_module

    monkeypatch.setattr(fuse_module, "_upgrade_opset", lambda *_args: None)
    proto = _layernorm_decomposed(16)
    model = to_ir(proto)
    fuser = FusePass(_recipe_fuse_config(), context(tmp_path))
    fuser(model)
    check(model)
    assert op_counts(model)["LayerNormalization"] == 0 and model.opset_imports[""] == 16
    assert "LayerNorm not fused" in fuser.stats["opset"]
    _assert_same(proto, model, random_feed(proto), rtol=1e-4, atol=1e-4)


def test_transformer_fusion_at_opset17_needs_no_upgrade(tmp_path) -> None:
    proto = _layernorm_decomposed(17)
    model = to_ir(proto)
    fuser = FusePass(_recipe_fuse_config(), context(tmp_path))
    fuser(model)
    check(model)
    assert op_counts(model)["LayerNormalization"] == 1 and "opset" not in fuser.stats
