"""prune_heads: standard multi-head attention matched; removing heads equals zeroing their Wo rows."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from optimizer_cli.data import Dataset
from optimizer_cli.passes._graph import infer_shapes
from optimizer_cli.passes.prune_heads import PruneHeadsConfig, PruneHeadsPass, match_attention
from tests import builders as B

HEADS, SIZE = 4, 4
HIDDEN = HEADS * SIZE


def multi_head_encoder(k_chain: bool = False, shared_q: bool = False, seed: int = 0) -> onnx.ModelProto:
    """A torch-exported-style multi-head attention layer: head shapes computed from Shape/Gather/Concat."""
    b = B.Builder(seed)
    x = b.op("Gather", [b.const((0.5 * b.rng.standard_normal((30, HIDDEN))).astype(np.float32), "emb"), "input_ids"])
    shape = b.op("Shape", [x])
    bs = b.op("Slice", [shape, b.const(np.array([0], np.int64), "i"), b.const(np.array([2], np.int64), "i")])
    split = b.op("Concat", [bs, b.const(np.array([HEADS, SIZE], np.int64), "hs")], axis=0)
    merged_shape = b.op("Concat", [bs, b.const(np.array([HIDDEN], np.int64), "hs")], axis=0)
    wq = b.const((b.rng.standard_normal((HIDDEN, HIDDEN)) / 4).astype(np.float32))

    def heads(perm: list[int], weight: str | None = None) -> str:
        y = b.op("MatMul", [x, weight or b.const((b.rng.standard_normal((HIDDEN, HIDDEN)) / 4).astype(np.float32))])
        y = b.op("Add", [b.const((0.1 * b.rng.standard_normal(HIDDEN)).astype(np.float32), "b"), y])
        return b.op("Transpose", [b.op("Reshape", [y, split])], perm=perm)

    q = heads([0, 2, 1, 3], wq)
    if k_chain:
        k = b.op("Transpose", [heads([0, 2, 1, 3])], perm=[0, 1, 3, 2])
    else:
        k = heads([0, 2, 3, 1])
    v = heads([0, 2, 1, 3])
    scores = b.op("Div", [b.op("MatMul", [q, k]), b.const(np.float32(SIZE**0.5))])
    mask = b.op(
        "Mul",
        [b.op("Sub", [b.const(np.float32(1)), b.op("Cast", ["attention_mask"], to=1)]), b.const(np.float32(-1e4))],
    )
    mask = b.op("Unsqueeze", [mask, b.const(np.array([1, 2], np.int64), "axes")])
    probs = b.op("Softmax", [b.op("Add", [scores, mask])], axis=-1)
    context = b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    out = b.matmul(b.op("Reshape", [context, merged_shape]), HIDDEN, HIDDEN)
    if shared_q:
        out = b.op("Add", [out, b.op("MatMul", [x, wq])])  # Wq read by a second node
    y = b.op(
        "LayerNormalization",
        [b.op("Add", [x, out]), b.const(np.ones(HIDDEN, np.float32)), b.const(np.zeros(HIDDEN, np.float32))],
    )
    inputs = [
        ("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        ("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
    ]
    return b.model(inputs, [("hidden", y)])


def _feeds(n: int = 6) -> list[dict[str, np.ndarray]]:
    return [B.padded_feed([5, 7], 7, vocab=30, seed=i) for i in range(n)]


def _matched(model: onnx.ModelProto):
    m = B.to_ir(model)
    infer_shapes(m)
    return [match_attention(n) for n in m.graph if n.op_type == "Softmax"]


@pytest.mark.parametrize("k_chain", [False, True])
def test_matches_the_exported_pattern(k_chain):
    (att,) = _matched(multi_head_encoder(k_chain=k_chain))
    assert att is not None and (att.heads, att.head_size) == (HEADS, SIZE)


def _zeroed_heads(model: onnx.ModelProto, wo_name: str, removed: list[int]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    init = next(i for i in out.graph.initializer if i.name == wo_name)
    wo = numpy_helper.to_array(init).copy()
    for h in removed:
        wo[h * SIZE : (h + 1) * SIZE] = 0
    init.CopyFrom(numpy_helper.from_array(wo, wo_name))
    return out


@pytest.mark.parametrize("k_chain", [False, True])
def test_removing_heads_equals_zeroing_their_output_rows(tmp_path, k_chain):
    model = multi_head_encoder(k_chain=k_chain)
    feeds = _feeds()
    (att,) = _matched(model)
    wo_name = att.out.inputs[1].name
    m = B.to_ir(model)
    p = PruneHeadsPass(PruneHeadsConfig(sparsity=0.5), B.context(tmp_path, calibration=Dataset(feeds)))
    assert p(m).modified
    assert p.stats["heads_removed"] == "2/4"
    B.check(m)
    kept_wo = m.graph.initializers[wo_name].const_value.numpy()
    assert kept_wo.shape == (HEADS // 2 * SIZE, HIDDEN)
    full_wo = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == wo_name))
    rows = lambda w, h: w[h * SIZE : (h + 1) * SIZE]  # noqa: E731
    kept = [next(h for h in range(HEADS) if np.array_equal(rows(kept_wo, i), rows(full_wo, h))) for i in range(2)]
    oracle = _zeroed_heads(model, wo_name, [h for h in range(HEADS) if h not in kept])
    for feed in [*feeds, B.padded_feed([3], 11, vocab=30, seed=9)]:  # another batch and sequence length too
        np.testing.assert_allclose(B.run(m, feed)[0], B.run(oracle, feed)[0], rtol=1e-5, atol=1e-5)


def test_the_least_important_heads_go(tmp_path):
    """Importance is what each head adds to the output: zero one head's Wo rows and it is the one removed."""
    model = multi_head_encoder()
    (att,) = _matched(model)
    silenced = _zeroed_heads(model, att.out.inputs[1].name, [2])
    m = B.to_ir(silenced)
    p = PruneHeadsPass(PruneHeadsConfig(sparsity=0.25), B.context(tmp_path, calibration=Dataset(_feeds())))
    assert p(m).modified
    feed = _feeds(1)[0]
    np.testing.assert_allclose(B.run(m, feed)[0], B.run(silenced, feed)[0], rtol=1e-5, atol=1e-5)


def test_shared_weights_and_missing_pattern_are_refused(tmp_path):
    ctx = B.context(tmp_path, calibration=Dataset(_feeds(2)))
    m = B.to_ir(multi_head_encoder(shared_q=True))
    p = PruneHeadsPass(PruneHeadsConfig(sparsity=0.5), ctx)
    assert not p(m).modified and "no standard multi-head attention" in p.stats["skipped"]
    m = B.to_ir(B.tiny_encoder())  # single head: nothing to remove
    p = PruneHeadsPass(PruneHeadsConfig(sparsity=0.5), ctx)
    assert not p(m).modified
