"""Low-rank factorization: full rank is exact; rank r errs within the dropped singular value bound."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto

from optimizer_cli.analysis.graph import op_counts
from optimizer_cli.passes.factorize import FactorizeConfig, FactorizePass, choose_rank

from .builders import Builder, check, context, mlp, random_feed, resnet_like, run, to_ir


def _full(**extra) -> FactorizeConfig:
    return FactorizeConfig(rank_ratio=1.0, round_to=1, min_size=1, max_cost_ratio=100.0, **extra)


def test_full_rank_matmul_and_gemm_are_exact(tmp_path) -> None:
    proto = mlp((32, 48, 16))
    model = to_ir(proto)
    result = FactorizePass(_full(), context(tmp_path))(model)
    assert result.modified and op_counts(model)["MatMul"] == 4
    check(model)
    feed = random_feed(proto)
    np.testing.assert_allclose(run(model, feed)[0], run(proto, feed)[0], rtol=1e-4, atol=1e-4)
    assert [v.name for v in model.graph.outputs] == ["y"]


def test_full_rank_conv_is_exact(tmp_path) -> None:
    proto = resnet_like(width=8)
    model = to_ir(proto)
    FactorizePass(_full(op_types=["Conv"]), context(tmp_path))(model)
    check(model)
    assert op_counts(model)["Conv"] > op_counts(to_ir(proto))["Conv"]
    feed = random_feed(proto)
    np.testing.assert_allclose(run(model, feed)[0], run(proto, feed)[0], rtol=1e-3, atol=1e-4)


def test_rank_r_error_within_singular_value_bound(tmp_path) -> None:
    b = Builder(seed=3)
    y = b.matmul("x", 96, 80, bias=False)
    proto = b.model([("x", TensorProto.FLOAT, [16, 96])], [("y", y)])
    w = next(ir.serde.deserialize_tensor(t).numpy() for t in proto.graph.initializer)
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    r = 16
    model = to_ir(proto)
    FactorizePass(FactorizeConfig(rank=r, round_to=1, min_size=1), context(tmp_path))(model)
    feed = random_feed(proto)
    err = np.linalg.norm(run(model, feed)[0] - run(proto, feed)[0])
    bound = np.linalg.norm(feed["x"]) * s[r]
    assert err <= bound * (1 + 1e-4)
    assert err > 0


def test_skips_when_macs_would_not_drop(tmp_path) -> None:
    proto = mlp((64, 64, 64))
    model = to_ir(proto)
    result = FactorizePass(FactorizeConfig(rank_ratio=0.9, min_size=1), context(tmp_path))(model)
    assert not result.modified
    assert result.model is model


def test_choose_rank_rules() -> None:
    s = np.array([10.0, 5.0, 1.0, 0.1])
    assert choose_rank(s, FactorizeConfig(energy=0.99, round_to=1)) == 2
    assert choose_rank(s, FactorizeConfig(rank=3, round_to=1)) == 3
    assert choose_rank(s, FactorizeConfig(rank_ratio=0.5, round_to=1)) == 2
    assert choose_rank(s, FactorizeConfig(rank=3, round_to=8)) == 4  # capped at full rank
