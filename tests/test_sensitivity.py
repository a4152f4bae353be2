"""Mixed precision by output sensitivity: the gated fake-quant model, the ranking and the fitted float set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from optimizer_cli.pipeline import run_pipeline
from optimizer_cli.recipe import Recipe
from optimizer_cli.search.sensitivity import GATE_PREFIX, _switch, gate_qdq_model, output_sensitivity

from .builders import Builder, run

STATIC = {"type": "quantize", "mode": "static", "per_channel": True, "reduce_range": False}


def outlier_cnn(seed: int = 0) -> tuple[onnx.ModelProto, list[str]]:
    """Conv+Relu stem, a Conv whose output channel 0 is ~300x the others, and a 1x1 Conv that ignores that
    channel: the tensor between them, per-tensor uint8, leaves the useful channels a few levels. onnxruntime
    quantizes it when either Conv is quantized, so both are the sensitive nodes. Returns the model and them."""
    b = Builder(seed)
    x = b.op("Relu", [b.conv("x", 3, 8)])
    y = b.op("Relu", [b.conv(x, 8, 8)])
    producer = b.nodes[-2].name
    blow_up = next(i for i in b.inits if i.name == b.nodes[-2].input[1])
    w = onnx.numpy_helper.to_array(blow_up).copy()
    w[0] *= 300.0
    blow_up.CopyFrom(onnx.numpy_helper.from_array(w, blow_up.name))
    mix = (b.rng.standard_normal((8, 8, 1, 1)) / np.sqrt(8)).astype(np.float32)
    mix[:, 0] = 0.0  # the huge channel does not reach the output
    z = b.op("Conv", [y, b.const(mix)], kernel_shape=[1, 1])
    sensitive = [producer, b.nodes[-1].name]
    z = b.op("Relu", [b.conv(z, 8, 8)])
    out = b.op("GlobalAveragePool", [z])
    return b.model([("x", onnx.TensorProto.FLOAT, ["batch", 3, 12, 12])], [("y", out)]), sensitive


def _build(tmp_path: Path, exclude: list[str] | None = None) -> tuple[ir.Model, ir.Model, Path, list[dict]]:
    model, _ = outlier_cnn()
    path, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(model, path)
    rng = np.random.default_rng(1)
    np.savez(calib, x=rng.standard_normal((8, 1, 3, 12, 12)).astype(np.float32))
    passes: list[dict] = [{"type": "cleanup"}, {"type": "fuse"}]
    pre = run_pipeline(path, Recipe.model_validate({"name": "pre", "passes": passes}), None, calibration=str(calib))
    quant = {**STATIC, **({"exclude_nodes": exclude} if exclude else {})}
    recipe = Recipe.model_validate({"name": "q", "passes": [*passes, quant], "verify": {"enabled": False}})
    post = run_pipeline(path, recipe, None, calibration=str(calib))
    feeds = [{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(6)]
    return pre.model, post.model, calib, feeds


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_gates_switch_between_the_float_and_the_int8_model(tmp_path: Path) -> None:
    pre, post, _, feeds = _build(tmp_path)
    gated = gate_qdq_model(ir.serde.serialize_model(post), ir.serde.serialize_model(pre))
    onnx.checker.check_model(gated.model)
    assert len(gated.groups) >= 4  # one per Conv (the Relus were dropped into the Q ranges)
    for feed in feeds[:3]:
        off = run(gated.model, {**feed, **{g: np.array(False) for g in gated.groups}})
        on = run(gated.model, {**feed, **{g: np.array(True) for g in gated.groups}})
        # All float: the float model exactly (the dropped Relus replayed); all int8: the QDQ model.
        np.testing.assert_allclose(off[0], run(pre, feed)[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(on[0], run(post, feed)[0], rtol=1e-5, atol=1e-6)


def test_overlapping_reader_sets_share_their_or_chain_and_each_value_is_declared_once() -> None:
    nodes: list[onnx.NodeProto] = []
    cache: dict[tuple[str, ...], str] = {}
    # (a, b) then (a, b, c): the second chain starts with the first's Or (built twice, it was declared twice).
    switches = {key: _switch(list(key), nodes, cache) for key in (("b", "a"), ("a", "b", "c"), ("a", "c"), ("a",))}
    declared = [out for node in nodes for out in node.output]
    assert len(declared) == len(set(declared)) == 3  # a|b, a|b|c, a|c
    assert switches[("a",)] == GATE_PREFIX + "a"
    gates = [helper.make_tensor_value_info(GATE_PREFIX + g, onnx.TensorProto.BOOL, []) for g in "abc"]
    outs = [helper.make_tensor_value_info(s, onnx.TensorProto.BOOL, []) for s in switches.values()]
    graph = helper.make_graph(nodes, "switch", gates, outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    ir.serde.deserialize_model(model)  # the simulator's loader refused the duplicate
    for on in ("a", "b", "c"):
        got = run(model, {GATE_PREFIX + g: np.array(g == on) for g in "abc"})
        assert [bool(v) for v in got] == [on in key for key in switches]


def test_the_sensitive_node_ranks_first_and_the_fit_meets_the_target_for_real(tmp_path: Path) -> None:
    pre, post, _, feeds = _build(tmp_path)
    _, sensitive = outlier_cnn()
    all_int8 = min(_cos(run(post, f)[0], run(pre, f)[0]) for f in feeds)
    target = 0.999
    assert all_int8 < target  # the test needs a model plain static int8 cannot serve
    result = output_sensitivity(post, pre, feeds, target, threads=1)
    assert result.all_float == pytest.approx(1.0, abs=1e-6)
    assert result.all_quantized == pytest.approx(all_int8, abs=1e-4)
    assert set(sensitive) <= {n for group in result.ranked[:2] for n in group}
    assert result.cosine_alone == sorted(result.cosine_alone)
    assert result.keep_float is not None and 0 < result.keep_float < len(result.ranked)
    assert result.fitted_cosine is not None and result.fitted_cosine >= target
    # The real model, built with the fitted groups excluded, meets the target too.
    exclude = [n for group in result.ranked[: result.keep_float] for n in group]
    _, partial, _, _ = _build(tmp_path, exclude)
    assert min(_cos(run(partial, f)[0], run(pre, f)[0]) for f in feeds) >= target - 1e-4
    assert any(n.op_type == "QuantizeLinear" for n in partial.graph)


def test_an_unreachable_target_fits_nothing(tmp_path: Path) -> None:
    pre, post, _, feeds = _build(tmp_path)
    result = output_sensitivity(post, pre, feeds, 1.5, threads=1)
    assert result.keep_float is None and result.fitted_cosine is None


def test_a_static_verification_failure_gets_the_sensitivity_patch(tmp_path: Path) -> None:
    """`optimize run` stopped by verify.min_cosine at static int8: the patch keeps the sensitive groups float
    and is verified by re-running the patched recipe."""
    from optimizer_cli.search.attribution import attribute_verification_failure

    _build(tmp_path)  # writes m.onnx and calib.npz
    _, sensitive = outlier_cnn()
    data = tmp_path / "eval.npz"
    np.savez(data, x=np.random.default_rng(5).standard_normal((6, 1, 3, 12, 12)).astype(np.float32))
    passes = [{"type": "cleanup"}, {"type": "fuse"}, STATIC]
    recipe = Recipe.model_validate({"name": "s", "passes": passes, "verify": {"min_cosine": 0.999}})
    with pytest.raises(Exception, match="verify.min_cosine"):
        run_pipeline(tmp_path / "m.onnx", recipe, None, calibration=str(tmp_path / "calib.npz"), evaluation=str(data))
    found = attribute_verification_failure(tmp_path / "m.onnx", recipe, 2, str(tmp_path / "calib.npz"), str(data), 1)
    assert found is not None and found.get("verified") and "most sensitive" in found["search"]
    assert all(name in found["patch"] for name in sensitive)
    assert found["nodes"] and "output_cosine_alone" in found["nodes"][0]


def test_the_one_group_probes_are_bounded_in_time() -> None:
    """4 samples a group while the runs are quick; fewer (never none) where groups x runs would exceed the
    probe budget (PP-OCRv4 det at 736x736: 64 groups at 0.6 s a run)."""
    from optimizer_cli.search.sensitivity import PROBE_SECONDS, probe_budget

    assert probe_budget(4, 0.01, 64) == 4
    assert probe_budget(4, 0.6, 64) == int(PROBE_SECONDS / (0.6 * 64)) < 4
    assert probe_budget(4, 10.0, 64) == 1
