"""The verifier runs its samples as one batch only where that gives each sample's own outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer_cli.verify import StageVerifier, batching_pays, split_samples, stack_samples

from .builders import mlp, run, to_ir


def _feeds(shape: tuple[int, ...], count: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def _one_op(op: onnx.NodeProto, in_shape: list, out_shape: list, inits: list | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(
        [op],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits or [],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _per_sample(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    return [run(model, feed) for feed in feeds]


def test_stack_samples_only_when_every_sample_has_the_same_shapes() -> None:
    feeds = _feeds((1, 3))
    stacked = stack_samples(feeds)
    assert stacked is not None and stacked["x"].shape == (4, 3)
    np.testing.assert_array_equal(stacked["x"][2:3], feeds[2]["x"])
    assert stack_samples(feeds[:1]) is None
    assert stack_samples([*feeds, {"x": np.zeros((2, 3), np.float32)}]) is None
    assert stack_samples([{"x": np.float32(1.0)}, {"x": np.float32(2.0)}]) is None
    assert stack_samples([*feeds, {"x": feeds[0]["x"].astype(np.float64)}]) is None


def test_split_samples_refuses_outputs_not_laid_out_by_sample() -> None:
    one = [np.zeros((2, 5)), np.zeros((1,))]
    split = split_samples([np.arange(30).reshape(6, 5), np.arange(3.0)], one, 3)
    assert split is not None and len(split) == 3
    np.testing.assert_array_equal(split[1][0], np.arange(10, 20).reshape(2, 5))
    assert split_samples([np.zeros((6, 5)), np.zeros(())], one, 3) is None  # a scalar: summed over the batch
    assert split_samples([np.zeros((6, 4)), np.zeros((3,))], one, 3) is None


def test_a_batch_independent_model_is_verified_in_one_batch() -> None:
    model = mlp()
    feeds = _feeds((1, 32))
    verifier = StageVerifier(to_ir(model), feeds, batched=True)
    assert verifier._batch is not None
    for got, want in zip(verifier.original, _per_sample(model, feeds), strict=True):
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    # A stage is checked on the batch too, and an exact copy passes as exact.
    assert verifier.check("pass 1 (copy)", to_ir(model), exact=True).vs_previous[0].cosine > 0.99999


def test_a_sample_axis_that_is_really_time_is_run_one_by_one() -> None:
    # A running sum over axis 0: stacked samples would carry into each other. The last sample shows it.
    axis = numpy_helper.from_array(np.array(0, np.int64), "axis")
    model = _one_op(helper.make_node("CumSum", ["x", "axis"], ["y"]), ["t", 3], ["t", 3], [axis])
    feeds = _feeds((1, 3))
    verifier = StageVerifier(to_ir(model), feeds, batched=True)
    assert verifier._batch is None
    for got, want in zip(verifier.original, _per_sample(model, feeds), strict=True):
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)


@pytest.mark.parametrize(
    ("op", "in_shape", "out_shape"),
    [
        # The batch is reduced away: outputs do not split by sample.
        (helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0), ["n", 3], []),
        # A fixed batch of 1: onnxruntime refuses the stacked feed.
        (helper.make_node("Relu", ["x"], ["y"]), [1, 3], [1, 3]),
    ],
)
def test_models_that_cannot_be_batched_fall_back(op: onnx.NodeProto, in_shape: list, out_shape: list) -> None:
    model = _one_op(op, in_shape, out_shape)
    feeds = _feeds((1, 3))
    verifier = StageVerifier(to_ir(model), feeds, batched=True)
    assert verifier._batch is None
    for got, want in zip(verifier.original, _per_sample(model, feeds), strict=True):
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)


@pytest.mark.parametrize("shape", [[1, 4], [1, -1]])
def test_a_stage_that_breaks_batching_is_still_checked_sample_by_sample(shape: list[int]) -> None:
    original = mlp(sizes=(3, 4))
    feeds = _feeds((1, 3))
    verifier = StageVerifier(to_ir(original), feeds, batched=True)
    assert verifier._batch is not None
    # The same function on one sample, but a Reshape that assumes a batch of 1: on the stacked feed it fails
    # ([1, 4]) or folds the samples together ([1, -1]); run one by one, it is exact.
    stage = onnx.ModelProto()
    stage.CopyFrom(original)
    last = stage.graph.node[-1]
    last.output[0] = "before_reshape"
    stage.graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), "fixed_shape"))
    stage.graph.node.append(
        helper.make_node("Reshape", ["before_reshape", "fixed_shape"], [original.graph.output[0].name])
    )
    drift = verifier.check("pass 1 (reshape)", to_ir(stage), exact=True)
    assert drift.vs_original[0].cosine > 0.99999


def test_small_models_are_run_one_by_one_by_default() -> None:
    assert StageVerifier(to_ir(mlp()), _feeds((1, 32)))._batch is None


def test_batching_pays_only_on_large_models_with_small_samples() -> None:
    large = 2_500_000_000
    tokens = [{"input_ids": np.zeros((1, 128), np.int64)} for _ in range(4)]
    images = [{"x": np.zeros((1, 3, 1024, 1024), np.float32)} for _ in range(4)]  # 50 MB together: 2% of it
    assert batching_pays(large, tokens)
    assert not batching_pays(large, images)
    assert not batching_pays(100_000_000, tokens)
