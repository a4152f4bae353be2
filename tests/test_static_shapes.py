"""static_shapes: fixes symbolic input dims to the data's shapes, exactly; refuses what the data contradicts."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from optimizer_cli.data import Dataset
from optimizer_cli.passes.static_shapes import StaticShapesConfig, StaticShapesPass

from .builders import check, context, mlp, padded_feed, random_feed, run, tiny_encoder, to_ir


def _apply(model: ir.Model, tmp_path, feeds: list[dict], **config) -> StaticShapesPass:
    ctx = dataclasses.replace(context(tmp_path), verify_data=Dataset(feeds, None, "test", False))
    p = StaticShapesPass(StaticShapesConfig(**config), ctx)
    result = p(model)
    assert result.modified == ("skipped" not in p.stats)
    return p


def _input_shapes(model: ir.Model) -> dict[str, list]:
    return {str(v.name): list(v.shape.dims) for v in model.graph.inputs}


def test_batch_dim_fixed_to_the_samples_and_outputs_exact(tmp_path) -> None:
    proto = mlp()
    model = to_ir(proto)
    assert _input_shapes(model)["x"][0] != 4  # symbolic before
    feeds = [random_feed(proto, seed=s, batch=4) for s in range(3)]
    p = _apply(model, tmp_path, feeds)
    assert _input_shapes(model)["x"] == [4, 32]
    assert p.stats["fixed"] == {"x": "4x32"}
    check(model)
    # Intermediate shapes are static too (what an engine compiling per shape reads).
    assert all(isinstance(d, int) for n in model.graph for o in n.outputs if o.shape for d in o.shape.dims)
    for feed in feeds:
        np.testing.assert_array_equal(run(model, feed)[0], run(proto, feed)[0])
    # Idempotent: nothing symbolic is left.
    again = _apply(model, tmp_path, feeds)
    assert "skipped" in again.stats


def test_a_minus_one_dim_counts_as_symbolic(tmp_path) -> None:
    # paddle2onnx declares "any batch" as dim_value -1 (PP-OCR's cls): left as it was, tune's "static shapes" on it
    # still had a dynamic batch, and the search dimension did not see the model as having symbolic inputs.
    proto = mlp()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    model = to_ir(proto)
    assert _input_shapes(model)["x"][0] == -1
    from optimizer_cli.search.space import _symbolic_inputs

    assert _symbolic_inputs(model)
    feeds = [random_feed(proto, seed=s, batch=2) for s in range(2)]
    p = _apply(model, tmp_path, feeds)
    assert _input_shapes(model)["x"] == [2, 32]
    assert p.stats["fixed"] == {"x": "2x32"}
    check(model)
    assert not _symbolic_inputs(model)
    np.testing.assert_array_equal(run(model, feeds[0])[0], run(proto, feeds[0])[0])


def test_named_dims_win_and_must_agree_with_the_data(tmp_path) -> None:
    proto = tiny_encoder()
    feeds = [padded_feed([3, 5], 32, seed=s) for s in range(2)]  # batch 2, sequence 32
    model = to_ir(proto)
    dim_names = {getattr(d, "value", None) for v in model.graph.inputs for d in v.shape.dims}
    seq_name = next(n for n in dim_names if isinstance(n, str) and n != "batch")
    _apply(model, tmp_path, feeds, dims={seq_name: 32})
    assert all(_input_shapes(model)[k] == [2, 32] for k in ("input_ids", "attention_mask"))
    check(model)
    contradicted = to_ir(proto)
    p = _apply(contradicted, tmp_path, feeds, dims={seq_name: 64})
    assert "skipped" in p.stats and "64" in str(p.stats["left_symbolic"])
    assert _input_shapes(contradicted) == _input_shapes(to_ir(proto))


def test_samples_of_several_shapes_leave_the_input_symbolic(tmp_path) -> None:
    proto = mlp()
    model = to_ir(proto)
    feeds = [random_feed(proto, seed=0, batch=1), random_feed(proto, seed=1, batch=3)]
    p = _apply(model, tmp_path, feeds)
    assert "skipped" in p.stats and "2 shapes" in p.stats["left_symbolic"]["x"]
    assert _input_shapes(model) == _input_shapes(to_ir(proto))


def test_dims_below_one_are_refused_by_the_config() -> None:
    with pytest.raises(ValueError):
        StaticShapesConfig(dims={"batch": 0})


def test_a_model_onnxruntimes_optimizer_refuses_is_not_written_even_after_exact_passes(tmp_path, monkeypatch) -> None:
    """Exact stages are run as written (optimizations off); the final model must also load as deployed. Fixing
    silero-vad's input shapes gave a model that ran as written and that onnxruntime refused with its default
    optimizations (an If branch's LSTM then infers a wrong rank): the run must fail, naming the pass, not write it."""
    import onnx

    from optimizer_cli import verify
    from optimizer_cli.errors import VerificationError
    from optimizer_cli.pipeline import run_pipeline
    from optimizer_cli.recipe import parse_recipe

    proto = mlp()
    src = tmp_path / "m.onnx"
    onnx.save(proto, src)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.stack([random_feed(proto, seed=s, batch=1)["x"] for s in range(3)]))
    real = verify.run_model

    def optimizer_refuses_fixed_shapes(model, feeds, config, outputs=None):  # type: ignore[no-untyped-def]
        fixed = all(isinstance(d, int) for v in model.graph.inputs for d in v.shape.dims)
        if config.opt_level == "all" and fixed:
            raise RuntimeError("Node (If_0) Op (If) [TypeInferenceError] Graph attribute inferencing failed")
        return real(model, feeds, config, outputs)

    monkeypatch.setattr(verify, "run_model", optimizer_refuses_fixed_shapes)
    out = tmp_path / "out.onnx"
    recipe = parse_recipe("passes:\n  - type: cleanup\n  - type: static_shapes\n")
    with pytest.raises(VerificationError, match=r"pass 1 \(static_shapes\).*graph optimizations on"):
        run_pipeline(src, recipe, out, evaluation=str(data))
    assert not out.exists()
    # Without the fixed shapes the same check passes: it is the final model's check, not a blanket refusal.
    run_pipeline(src, parse_recipe("passes:\n  - type: cleanup\n"), out, evaluation=str(data))
    assert out.exists()
