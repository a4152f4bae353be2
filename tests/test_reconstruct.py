"""Least-squares reconstruction brings compressed layers back toward the original outputs."""

from __future__ import annotations

import numpy as np
import pytest

from optimizer_cli.data import Dataset
from optimizer_cli.passes.base import RunInputs
from optimizer_cli.passes.factorize import FactorizeConfig, FactorizePass
from optimizer_cli.passes.fuse import FuseConfig, FusePass
from optimizer_cli.passes.prune import PruneConfig, PrunePass
from optimizer_cli.passes.reconstruct import ReconstructConfig, ReconstructPass, im2col

from .builders import check, context, mlp, random_feed, resnet_like, run, to_ir


def _calib(proto, n: int, batch: int = 8) -> Dataset:
    return Dataset([random_feed(proto, seed=1000 + i, batch=batch) for i in range(n)], source="test")


def _rel_err(proto, model, feed) -> float:
    ref, new = run(proto, feed)[0], run(model, feed)[0]
    return float(np.linalg.norm(ref - new) / np.linalg.norm(ref))


def _correlated_mlp(seed: int = 0):
    return mlp((32, 128, 64, 10), seed=seed)


@pytest.mark.parametrize("compress", ["factorize", "prune"])
def test_reconstruct_lowers_error_on_held_out_inputs(tmp_path, compress: str) -> None:
    proto = _correlated_mlp()
    model = to_ir(proto)
    FusePass(FuseConfig(), context(tmp_path))(model)
    if compress == "factorize":
        FactorizePass(FactorizeConfig(rank=16, round_to=1, min_size=1), context(tmp_path))(model)
    else:
        PrunePass(PruneConfig(sparsity=0.5, round_to=1), context(tmp_path))(model)
    held_out = random_feed(proto, seed=5, batch=64)
    before = _rel_err(proto, model, held_out)
    ctx = context(tmp_path, calibration=_calib(proto, 32), load_original=lambda: to_ir(proto))
    result = ReconstructPass(ReconstructConfig(), ctx)(model)
    assert result.modified
    check(model)
    after = _rel_err(proto, model, held_out)
    # Factorize only refits the second factor (given x A), so it recovers less than prune's refits.
    assert after < (0.9 if compress == "factorize" else 0.8) * before, (before, after)


def test_reconstruct_conv_after_prune(tmp_path) -> None:
    proto = resnet_like(width=16)
    model = to_ir(proto)
    FusePass(FuseConfig(), context(tmp_path))(model)
    PrunePass(PruneConfig(sparsity=0.5, round_to=4, min_channels=4), context(tmp_path))(model)
    held_out = random_feed(proto, seed=9, batch=8)
    before = _rel_err(proto, model, held_out)
    ctx = context(tmp_path, calibration=_calib(proto, 16, batch=2), load_original=lambda: to_ir(proto))
    ReconstructPass(ReconstructConfig(), ctx)(model)
    after = _rel_err(proto, model, held_out)
    assert after < before, (before, after)


def test_too_few_calibration_rows_skip_layers_without_running_the_model(tmp_path, monkeypatch) -> None:
    """4 samples of batch 8 are 32 rows; every pruned layer reads >= 32 features and needs 2x(in+1) rows:
    each is skipped, and said so, before its inputs are captured (a session over the whole model per
    layer: minutes on a large model, for a fit that would be refused)."""
    from optimizer_cli.passes import reconstruct

    proto = _correlated_mlp()
    model = to_ir(proto)
    PrunePass(PruneConfig(sparsity=0.5, round_to=1), context(tmp_path))(model)
    captured: list[list[str]] = []
    real = reconstruct.capture_values

    def spy(m, feeds, names, threads):
        captured.append(names)
        return real(m, feeds, names, threads)

    monkeypatch.setattr(reconstruct, "capture_values", spy)
    ctx = context(tmp_path, calibration=_calib(proto, 4), load_original=lambda: to_ir(proto))
    instance = ReconstructPass(ReconstructConfig(), ctx)
    assert not instance(model).modified
    assert instance.stats["too_few_rows"].startswith("3 layers")
    assert len(captured) == 1  # only the original's outputs (the targets), once
    # With 16 samples (128 rows) the layers reading 32 features (66 rows needed) are refit again.
    captured.clear()
    ctx = context(tmp_path, calibration=_calib(proto, 16), load_original=lambda: to_ir(proto))
    instance = ReconstructPass(ReconstructConfig(), ctx)
    instance(model)
    assert instance.stats["too_few_rows"].startswith("1 layers") and len(captured) == 1 + 2


def test_unchanged_model_is_left_alone(tmp_path) -> None:
    proto = mlp()
    model = to_ir(proto)
    ctx = context(tmp_path, calibration=_calib(proto, 4), load_original=lambda: to_ir(proto))
    assert not ReconstructPass(ReconstructConfig(), ctx)(model).modified


def test_needs_calibration() -> None:
    assert ReconstructPass.requirement_problems(ReconstructConfig(), RunInputs())


def test_im2col_matches_conv(tmp_path) -> None:
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    attrs = {"strides": [2, 1], "pads": [1, 0, 1, 1], "dilations": [1, 2]}
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 2], **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    (y,) = run(proto, {"x": x})
    cols = im2col(x, (3, 2), attrs["strides"], attrs["pads"], attrs["dilations"])
    got = (cols @ w.reshape(4, -1).T).reshape(2, y.shape[2], y.shape[3], 4).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-4)
