"""Structured pruning: removing channels equals zeroing the weights that read them (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto

from optimizer_cli.analysis.channel_groups import analyze
from optimizer_cli.analysis.cost import macs, parameter_count
from optimizer_cli.passes._graph import infer_shapes
from optimizer_cli.passes.fuse import FuseConfig, FusePass
from optimizer_cli.passes.prune import PruneConfig, PrunePass, apply_structured, choose_keep

from .builders import Builder, check, context, flatten_head, mlp, random_feed, resnet_like, run, to_ir


def _prepared(proto, tmp_path, fuse: bool = True):
    model = to_ir(proto)
    if fuse:
        FusePass(FuseConfig(), context(tmp_path))(model)
    infer_shapes(model)
    return model


def _removal_equals_zeroing(proto, tmp_path, cfg: PruneConfig, fuse: bool = True) -> tuple:
    removed, zeroed = _prepared(proto, tmp_path, fuse), _prepared(proto, tmp_path, fuse)
    a_removed, a_zeroed = analyze(removed), analyze(zeroed)
    keep = choose_keep(a_removed, a_removed.prunable(), cfg)
    assert keep, "nothing was pruned"
    apply_structured(zeroed, a_zeroed, keep, zero_only=True)
    apply_structured(removed, a_removed, keep)
    check(removed)
    feed = random_feed(proto, batch=3)
    for r, z in zip(run(removed, feed), run(zeroed, feed), strict=True):
        np.testing.assert_allclose(r, z, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(z).max())))
    return removed, keep


def test_resnet_like_residual_concat_depthwise_flatten(tmp_path) -> None:
    proto = resnet_like(width=16)
    before = parameter_count(_prepared(proto, tmp_path))
    removed, keep = _removal_equals_zeroing(proto, tmp_path, PruneConfig(sparsity=0.5, round_to=4, min_channels=4))
    assert parameter_count(removed) < before
    assert all(int(m.sum()) % 4 == 0 for m in keep.values())


def test_groups_tie_residual_producers_and_block_outputs(tmp_path) -> None:
    model = _prepared(resnet_like(width=16), tmp_path)
    groups = analyze(model).canonical()
    producer_sets = [sorted(p.node.op_type for p in g.producers) for g in groups.values() if g.producers]
    residual = [g for g in groups.values() if len(g.producers) == 2]
    assert residual, f"the residual Add must tie two convs into one group: {producer_sets}"
    gemm_group = next(g for g in groups.values() if any(p.node.op_type == "Gemm" for p in g.producers))
    assert gemm_group.blocked and "graph output" in gemm_group.blocked


def test_flatten_expands_channels_into_features(tmp_path) -> None:
    _removal_equals_zeroing(
        flatten_head(width=16), tmp_path, PruneConfig(sparsity=0.5, round_to=1, min_channels=1), fuse=False
    )


def test_grouped_conv_blocks_its_input_group(tmp_path) -> None:
    b = Builder()
    x = b.op("Relu", [b.conv("x", 3, 8)])
    y = b.conv(x, 8, 8, group=2)  # grouped, not depthwise
    model = _prepared(b.model([("x", TensorProto.FLOAT, [1, 3, 8, 8])], [("y", y)]), tmp_path, fuse=False)
    groups = [g for g in analyze(model).canonical().values() if g.producers]
    assert all(g.blocked for g in groups)
    assert not PrunePass(PruneConfig(sparsity=0.5, round_to=1), context(tmp_path))(model).modified


def test_mlp_hidden_units_shrink_and_macs_drop(tmp_path) -> None:
    proto = mlp((32, 64, 64, 10))
    model = _prepared(proto, tmp_path)
    before = macs(model)
    result = PrunePass(PruneConfig(sparsity=0.5, round_to=8), context(tmp_path))(model)
    assert result.modified
    check(model)
    shapes = sorted(
        v.const_value.shape.dims for v in model.graph.initializers.values() if len(v.const_value.shape) == 2
    )
    assert (32, 32) in [tuple(s) for s in shapes] and (32, 10) in [tuple(s) for s in shapes]
    assert macs(model) < before
    assert run(model, random_feed(proto))[0].shape == (2, 10)


def test_exclude_nodes_keeps_their_groups(tmp_path) -> None:
    proto = mlp((32, 64, 64, 10))
    model = _prepared(proto, tmp_path)
    first = next(n.name for n in model.graph if n.op_type == "Gemm")
    PrunePass(PruneConfig(sparsity=0.5, exclude_nodes=[first]), context(tmp_path))(model)
    first_node = next(n for n in model.graph if n.name == first)
    assert first_node.inputs[1].const_value.shape[1] == 64


def test_magnitude_reaches_target_sparsity_without_changing_shapes(tmp_path) -> None:
    proto = mlp((32, 64, 64, 10))
    model = to_ir(proto)
    shapes = {k: v.const_value.shape for k, v in model.graph.initializers.items()}
    PrunePass(PruneConfig(method="magnitude", sparsity=0.6, scope="global"), context(tmp_path))(model)
    weights = [v.const_value.numpy() for v in model.graph.initializers.values() if len(v.const_value.shape) == 2]
    sparsity = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    assert 0.58 <= sparsity <= 0.62
    assert shapes == {k: v.const_value.shape for k, v in model.graph.initializers.items()}
    check(model)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    widths=st.lists(st.integers(4, 24), min_size=1, max_size=3),
    sparsity=st.floats(0.1, 0.9),
    seed=st.integers(0, 1000),
)
def test_property_random_mlps(tmp_path_factory, widths: list[int], sparsity: float, seed: int) -> None:
    tmp_path = tmp_path_factory.mktemp("p")
    proto = mlp((8, *widths, 3), seed=seed)
    removed, zeroed = _prepared(proto, tmp_path), _prepared(proto, tmp_path)
    a_r, a_z = analyze(removed), analyze(zeroed)
    keep = choose_keep(a_r, a_r.prunable(), PruneConfig(sparsity=sparsity, round_to=1, min_channels=1))
    assume(any(not mask.all() for mask in keep.values()))  # a case that prunes nothing proves nothing
    apply_structured(zeroed, a_z, keep, zero_only=True)
    apply_structured(removed, a_r, keep)
    check(removed)
    feed = random_feed(proto, seed=seed)
    np.testing.assert_allclose(run(removed, feed)[0], run(zeroed, feed)[0], rtol=1e-4, atol=1e-4)
    assert sum(v.const_value.size for v in removed.graph.initializers.values()) < sum(
        v.const_value.size for v in zeroed.graph.initializers.values()
    ), "removal really shrank the weights"


@pytest.mark.parametrize("width", [8, 24])
def test_pass_through_pipeline_oracle_on_widths(tmp_path, width: int) -> None:
    _removal_equals_zeroing(
        resnet_like(width=width, seed=width), tmp_path, PruneConfig(sparsity=0.3, round_to=2, min_channels=2)
    )


def test_activation_importance_for_matmul_groups_with_calibration(tmp_path) -> None:
    from optimizer_cli.data import Dataset

    proto = mlp((32, 64, 64, 10))
    calib = Dataset([random_feed(proto, seed=i, batch=8) for i in range(4)])
    model = _prepared(proto, tmp_path, fuse=False)
    pruned = PrunePass(PruneConfig(sparsity=0.5), context(tmp_path, calibration=calib))
    assert pruned(model).modified
    assert pruned.stats["importance"] == "activation for 2 groups"
    check(model)
    conv = _prepared(resnet_like(width=16), tmp_path)
    by_weight = PrunePass(PruneConfig(sparsity=0.5, round_to=4), context(tmp_path, calibration=calib))
    by_weight(conv)
    assert by_weight.stats["importance"] == "weight"  # auto: Conv groups rank by weight norm


def test_accuracy_guarded_search_keeps_the_largest_sparsity_meeting_the_target(tmp_path) -> None:
    from optimizer_cli.bench.accuracy import fidelity
    from optimizer_cli.data import Dataset

    proto = mlp((32, 128, 64, 10), seed=3)
    calib = Dataset([random_feed(proto, seed=100 + i, batch=16) for i in range(16)])
    ctx = context(tmp_path, calibration=calib, load_original=lambda: to_ir(proto))
    model = _prepared(proto, tmp_path)
    search = PrunePass(PruneConfig(sparsity=0.8, round_to=1, target_cosine=0.98, search_steps=5), ctx)
    result = search(model)
    chosen = search.stats["chosen_sparsity"]
    trials = [tuple(map(float, t.split(":"))) for t in search.stats["search"].split(", ")]
    assert len(trials) == 5 and trials[0][0] == 0.8
    passing = [s for s, cos in trials if cos >= 0.98]
    assert result.modified and chosen == max(passing) > 0
    check(model)
    held_out = [random_feed(proto, seed=999, batch=64)]
    cos = fidelity([run(proto, f) for f in held_out], [run(model, f) for f in held_out], ["y"]).cosine_min
    assert cos > 0.9  # measured on other inputs than the search scored on

    strict = PrunePass(PruneConfig(sparsity=0.5, round_to=1, target_cosine=1.01, search_steps=2), ctx)
    untouched = _prepared(proto, tmp_path)
    assert not strict(untouched).modified and strict.stats["chosen_sparsity"] == 0.0


def test_search_needs_calibration() -> None:
    from optimizer_cli.passes.base import RunInputs

    assert PrunePass.requirement_problems(PruneConfig(target_cosine=0.99), RunInputs())
    assert not PrunePass.requirement_problems(PruneConfig(), RunInputs())


def test_split_hands_each_branch_a_slice_of_the_channels(tmp_path) -> None:
    """Conv -> Split(channels) -> two convs -> Concat -> conv: removal equals zeroing, tensors shrink."""
    b = Builder(seed=5)
    x = b.op("Relu", [b.conv("x", 3, 16)])
    b.count += 1
    left, right = f"split{b.count}_a", f"split{b.count}_b"
    from onnx import helper

    b.nodes.append(
        helper.make_node("Split", [x, b.const(np.array([8, 8], np.int64), "sp")], [left, right], name="split", axis=1)
    )
    y = b.op("Concat", [b.op("Relu", [b.conv(left, 8, 8)]), b.op("Relu", [b.conv(right, 8, 8, k=1)])], axis=1)
    y = b.conv(y, 16, 4)
    proto = b.model([("x", TensorProto.FLOAT, [1, 3, 8, 8])], [("y", y)])
    model = _prepared(proto, tmp_path, fuse=False)
    groups = [g for g in analyze(model).canonical().values() if g.producers]
    stem = next(g for g in groups if g.size == 16 and any(p.node.inputs[0].name == "x" for p in g.producers))
    assert stem.blocked is None, stem.blocked
    removed, _ = _removal_equals_zeroing(
        proto, tmp_path, PruneConfig(sparsity=0.5, round_to=1, min_channels=1), fuse=False
    )
    split = next(n for n in removed.graph if n.op_type == "Split")
    assert split.inputs[1].const_value.numpy().sum() < 16


@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_global_quantile_streams_to_numpys_answer(q: float) -> None:
    """The magnitude threshold over all weights, read one weight at a time (models over 2 GB), equals
    np.quantile over their concatenation, including zeros, ties and mixed scales."""
    from optimizer_cli.passes.prune import global_quantile

    rng = np.random.default_rng(int(q * 1000))
    arrays = [
        rng.standard_normal((rng.integers(1, 60), rng.integers(1, 40))).astype(np.float32) * s for s in (1e-3, 1, 1e3)
    ]
    arrays += [np.zeros((3, 3), np.float32), np.full((2, 5), 0.5, np.float32)]
    expected = float(np.quantile(np.concatenate([np.abs(a).ravel() for a in arrays]), q))
    assert global_quantile(lambda: iter(arrays), q) == pytest.approx(expected, rel=1e-6)
