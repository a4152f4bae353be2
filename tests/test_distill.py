"""distill: torch tensors bound to the right initializers, lr 0 exact, fidelity recovered after a prune."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from optimizer_cli.data import Dataset
from optimizer_cli.passes import _onnx_torch as bridge
from optimizer_cli.passes.base import RunInputs
from optimizer_cli.passes.distill import DistillConfig, DistillPass
from optimizer_cli.passes.prune import PrunePass
from tests import builders as B

# Installed with the optional extra: pip install -e ".[dev,distill]" (CI installs it).
pytestmark = pytest.mark.skipif(bool(bridge.missing_packages()), reason="needs the distill extra (torch, onnx2torch)")


def _gemm_model():
    """Gemm with transB=1 and transB=0 (torch holds the second one transposed) and a LayerNorm."""
    b = B.Builder(3)
    w = b.const((b.rng.standard_normal((6, 12)) * 0.3).astype(np.float32))
    x = b.op("Gemm", ["x", w, b.const(np.zeros(6, np.float32), "b")], transB=1)
    x = b.op("LayerNormalization", [x, b.const(np.ones(6, np.float32), "g"), b.const(np.zeros(6, np.float32), "b")])
    x = b.op("Gemm", [x, b.const((b.rng.standard_normal((6, 5)) * 0.3).astype(np.float32))])
    return b.model([("x", TensorProto.FLOAT, ["batch", 12])], [("y", x)])


@pytest.mark.parametrize("build", [B.resnet_like, B.mlp, _gemm_model, B.tiny_encoder])
def test_bindings_round_trip_every_weight_exactly(build):
    model = B.to_ir(build())
    names = bridge.trainable_initializers(model)
    binds = bridge.bindings(model, names)
    assert binds, "nothing bound"
    module, params = bridge.trainable_module(model, binds)
    assert len(params) == len(binds)
    weights = bridge.module_weights(module, binds)
    for name, array in weights.items():
        original = model.graph.initializers[name].const_value.numpy()
        assert array.shape == original.shape or array.size == original.size
        np.testing.assert_array_equal(array.reshape(original.shape), original)
    assert {b.initializer for b in binds} == set(names)  # every weight of these models is trainable
    if build is _gemm_model:
        assert [b.initializer for b in binds if b.transposed] == ["w7"]


def test_torch_module_matches_onnxruntime():
    import torch

    model = B.resnet_like()
    m = B.to_ir(model)
    module, _ = bridge.trainable_module(m, bridge.bindings(m, bridge.trainable_initializers(m)))
    feed = B.random_feed(model, batch=3)
    got = module(torch.from_numpy(feed["x"])).detach().numpy()
    np.testing.assert_allclose(got, B.run(model, feed)[0], rtol=1e-4, atol=1e-4)


def _pruned(tmp_path, model, feeds):
    ctx = B.context(tmp_path, calibration=Dataset(feeds), load_original=lambda: B.to_ir(model))
    m = B.to_ir(model)
    PrunePass(PrunePass.Config(method="structured", sparsity=0.5), ctx)(m)
    return m, ctx


def test_zero_learning_rate_is_exact(tmp_path):
    model = B.resnet_like()
    feeds = [B.random_feed(model, seed=i, batch=2) for i in range(10)]
    m, ctx = _pruned(tmp_path, model, feeds)
    before = {k: v.const_value.numpy().copy() for k, v in m.graph.initializers.items()}
    out_before = B.run(m, feeds[0])[0]
    p = DistillPass(DistillConfig(steps=5, learning_rate=0.0), ctx)
    assert not p(m).modified
    assert p.stats["kept"].startswith("no")
    for name, value in m.graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), before[name])
    np.testing.assert_array_equal(B.run(m, feeds[0])[0], out_before)


@pytest.mark.parametrize("loss", ["mse", "cosine", "kl"])
def test_distill_recovers_what_prune_lost(tmp_path, loss):
    model = B.resnet_like()
    feeds = [B.random_feed(model, seed=i, batch=4) for i in range(30)]
    m, ctx = _pruned(tmp_path, model, feeds)
    shapes = {k: tuple(v.const_value.shape) for k, v in m.graph.initializers.items()}
    ops = [n.op_type for n in m.graph]
    p = DistillPass(DistillConfig(steps=120, learning_rate=1e-3, loss=loss), ctx)
    assert p(m).modified, p.stats
    before, after = (float(x) for x in p.stats["heldout_cosine"].split(" -> "))
    assert after > before + 0.02
    assert p.stats["samples"] == "24 trained, 6 held out"
    # Structure unchanged: same ops, same initializer names and shapes.
    assert [n.op_type for n in m.graph] == ops
    assert {k: tuple(v.const_value.shape) for k, v in m.graph.initializers.items()} == shapes
    B.check(m)


def test_samples_that_do_not_stack_train_one_by_one(tmp_path):
    model = B.tiny_encoder()
    feeds = [B.padded_feed([3 + i % 4], 4 + i % 3, seed=i) for i in range(12)]  # lengths differ
    ctx = B.context(tmp_path, calibration=Dataset(feeds), load_original=lambda: B.to_ir(model))
    m = B.to_ir(model)
    p = DistillPass(DistillConfig(steps=4, learning_rate=1e-4, batch_size=3), ctx)
    p(m)
    assert p.stats["steps"] == 4
    B.check(m)


def test_missing_torch_is_a_requirement_problem(monkeypatch):
    monkeypatch.setattr(bridge, "missing_packages", lambda: ["onnx2torch"])
    problems = DistillPass.requirement_problems(DistillConfig(), RunInputs(calibration="random"))
    assert problems == ['distill needs onnx2torch: pip install -e ".[distill]" (the optional extra)']
    problems = DistillPass.requirement_problems(DistillConfig(train_data="nowhere.npz"), RunInputs())
    assert "distill.train_data: data not found: nowhere.npz" in problems


def test_the_best_held_out_checkpoint_is_kept(tmp_path):
    """A learning rate that wrecks the weights: the step-0 weights had the best held-out fidelity and come back."""
    model = B.resnet_like()
    feeds = [B.random_feed(model, seed=i, batch=2) for i in range(10)]
    m, ctx = _pruned(tmp_path, model, feeds)
    before = {k: v.const_value.numpy().copy() for k, v in m.graph.initializers.items()}
    p = DistillPass(DistillConfig(steps=12, learning_rate=50.0, eval_every=4, schedule="constant"), ctx)
    assert not p(m).modified
    assert p.stats["checkpoint"] == "step 0 (best held-out)"
    for name, value in m.graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), before[name])


def test_an_omitted_trailing_optional_input_converts(tmp_path):
    """Clip(x, min, "") (max omitted), as mean-pooling exports write it: onnx2torch must not read "" as a name."""
    b = B.Builder(1)
    y = b.op("Clip", [b.matmul("x", 8, 4), b.const(np.float32(0.05), "min"), ""])
    model = b.model([("x", TensorProto.FLOAT, ["batch", 8])], [("y", y)])
    m = B.to_ir(model)
    module, params = bridge.trainable_module(m, bridge.bindings(m, bridge.trainable_initializers(m)))
    assert len(params) == 2  # the MatMul weight and bias
    import torch

    feed = B.random_feed(model, batch=3)
    np.testing.assert_allclose(module(torch.from_numpy(feed["x"])).detach().numpy(), B.run(model, feed)[0], atol=1e-6)
