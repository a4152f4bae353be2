"""drop_layers: residual blocks found, removal equals a zeroed branch, the cheapest dropped first."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer_cli.data import Dataset
from optimizer_cli.errors import UserInputError
from optimizer_cli.passes._graph import infer_shapes
from optimizer_cli.passes.drop_layers import DropLayersConfig, DropLayersPass, find_blocks
from optimizer_cli.verify import min_mean_cosine
from tests import builders as B


def _blocks(model: onnx.ModelProto):
    m = B.to_ir(model)
    infer_shapes(m)
    return find_blocks(m)


def _zeroed(model: onnx.ModelProto, add_name: str, skip: str) -> onnx.ModelProto:
    """The oracle: the block's branch multiplied by zero in the original graph."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    add = next(n for n in out.graph.node if n.name == add_name)
    k = 1 if add.input[0] == skip else 0
    branch = add.input[k]
    out.graph.initializer.append(numpy_helper.from_array(np.float32(0), "zero"))
    out.graph.node.append(helper.make_node("Mul", [branch, "zero"], ["zeroed_branch"], name="zeroing"))
    add.input[k] = "zeroed_branch"
    return _sorted(out)


def _sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    m = ir.serde.deserialize_model(model)
    m.graph.sort()
    return ir.serde.serialize_model(m)


def _encoder_feeds(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    return [B.padded_feed([5, 8], 8, seed=seed + i) for i in range(n)]


def test_finds_resnet_and_transformer_blocks():
    resnet = _blocks(B.resnet_like())
    assert len(resnet) == 1
    assert resnet[0].skip.name.startswith("relu")  # the shortcut is the stem's output
    encoder = _blocks(B.tiny_encoder())
    # The attention sublayer (Q/K/V, softmax, output projection) and the feed-forward sublayer.
    assert [len(b.nodes) for b in encoder] == [14, 5]
    attention = encoder[0]
    assert {n.op_type for n in attention.nodes} >= {"MatMul", "Softmax", "Transpose"}
    # The mask's Cast/Sub/Mul do not depend on the block input: they stay outside the block.
    assert not any(n.op_type == "Cast" for n in attention.nodes)


def test_block_with_an_intermediate_read_elsewhere_is_not_a_candidate():
    b = B.Builder(0)
    x = b.op("Relu", ["x"])
    h = b.matmul(x, 8, 8)
    y = b.op("Add", [x, b.matmul(b.op("Relu", [h]), 8, 8)])
    model = b.model([("x", TensorProto.FLOAT, ["batch", 8])], [("y", y), ("side", h)])
    assert _blocks(model) == []


@pytest.mark.parametrize("build", [B.resnet_like, B.tiny_encoder])
def test_dropping_equals_zeroing_the_branch(tmp_path, build):
    model = build()
    feeds = _encoder_feeds(4) if build is B.tiny_encoder else [B.random_feed(model, seed=i) for i in range(4)]
    for block in _blocks(model):
        m = B.to_ir(model)
        p = DropLayersPass(DropLayersConfig(blocks=[block.name]), B.context(tmp_path))
        assert p(m).modified
        B.check(m)
        assert block.add.name not in {n.name for n in m.graph}
        assert len(m.graph) < len(model.graph.node)
        oracle = _zeroed(model, block.add.name, block.skip.name)
        for feed in feeds:
            for got, want in zip(B.run(m, feed), B.run(oracle, feed), strict=True):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            assert not np.allclose(B.run(m, feed)[0], B.run(model, feed)[0], atol=1e-3)


def test_measured_choice_drops_the_cheapest_block_first(tmp_path):
    model = B.tiny_encoder(pooled=False)
    feeds = _encoder_feeds(6)
    reference = [B.run(model, f) for f in feeds]
    alone = {}
    for block in _blocks(model):
        m = B.to_ir(model)
        DropLayersPass(DropLayersConfig(blocks=[block.name]), B.context(tmp_path))(m)
        alone[block.name] = min_mean_cosine(reference, [B.run(m, f) for f in feeds])
    cheapest = max(alone, key=alone.__getitem__)
    m = B.to_ir(model)
    p = DropLayersPass(DropLayersConfig(min_cosine=-1, count=1), B.context(tmp_path, calibration=Dataset(feeds)))
    assert p(m).modified
    assert p.stats["dropped"] == cheapest
    assert p.stats["cosine_on_calibration"] == pytest.approx(alone[cheapest], abs=1e-4)
    B.check(m)


def test_fidelity_budget_keeps_what_it_cannot_afford(tmp_path):
    model = B.tiny_encoder(pooled=False)
    m = B.to_ir(model)
    ctx = B.context(tmp_path, calibration=Dataset(_encoder_feeds(4)))
    p = DropLayersPass(DropLayersConfig(min_cosine=0.99999), ctx)
    assert not p(m).modified
    assert p.stats["dropped"] == "none"
    assert len(m.graph) == len(model.graph.node)
    # The gates used for measuring are gone again.
    assert [v.name for v in m.graph.inputs] == ["input_ids", "attention_mask"]


def test_unknown_block_names_the_candidates(tmp_path):
    m = B.to_ir(B.tiny_encoder())
    with pytest.raises(UserInputError, match="add44"):
        DropLayersPass(DropLayersConfig(blocks=["nope"]), B.context(tmp_path))(m)


def test_truncation_reads_an_earlier_tensor(tmp_path):
    model = B.tiny_encoder(pooled=False)
    ln = next(n.output[0] for n in model.graph.node if n.op_type == "LayerNormalization")
    m = B.to_ir(model)
    p = DropLayersPass(DropLayersConfig(output_from={"hidden": ln}, count=0), B.context(tmp_path))
    assert p(m).modified
    B.check(m)
    assert not any(n.op_type == "Relu" for n in m.graph)  # the feed-forward block after it is gone
    feed = _encoder_feeds(1)[0]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(ln, TensorProto.FLOAT, None))
    np.testing.assert_allclose(B.run(m, feed)[0], B.run(probe, feed)[-1], rtol=1e-6, atol=1e-6)
    with pytest.raises(UserInputError, match="type and shape must match"):
        DropLayersPass(DropLayersConfig(output_from={"hidden": "input_ids"}, count=0), B.context(tmp_path))(
            B.to_ir(model)
        )
