"""Exact passes keep outputs on onnx's 1,884 node tests and on the classic CNNs shipped in the onnx wheel."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from optimizer_cli.passes.cleanup import CleanupConfig, CleanupPass
from optimizer_cli.passes.fuse import FuseConfig, FusePass
from optimizer_cli.zoo import LIGHT_MODELS, materialize_light_model

from .builders import context, run

HEAVY = {"bvlc_alexnet", "vgg19", "zfnet512"}  # ~0.5 GB of weights each


def _ort_outputs(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray] | None:
    try:
        return run(proto, feeds)
    except Exception:
        return None  # ORT cannot run the original (op or IR version it lacks): not a case for us


def _same(ref, new) -> bool:
    if isinstance(ref, list):  # sequence outputs
        return (
            isinstance(new, list) and len(ref) == len(new) and all(_same(a, b) for a, b in zip(ref, new, strict=True))
        )
    ref, new = np.asarray(ref), np.asarray(new)
    if ref.dtype != new.dtype or ref.shape != new.shape:
        return False
    if not np.issubdtype(ref.dtype, np.floating):
        return bool(np.array_equal(ref, new))
    scale = max(1.0, float(np.nanmax(np.abs(ref[np.isfinite(ref)]))) if np.isfinite(ref).any() else 1.0)
    # 1e-5, or a few units in the last place for fp16/bf16 outputs (folding evaluates in numpy).
    tol = max(1e-5, 4 * float(np.finfo(ref.dtype).eps)) if ref.dtype.itemsize <= 2 else 1e-5
    return bool(np.allclose(new.astype(np.float64), ref.astype(np.float64), rtol=tol, atol=tol * scale, equal_nan=True))


def _transform(proto: onnx.ModelProto, tmp_path) -> onnx.ModelProto:
    model = ir.serde.deserialize_model(proto)
    CleanupPass(CleanupConfig(), context(tmp_path))(model)
    FusePass(FuseConfig(), context(tmp_path))(model)
    return ir.serde.serialize_model(model)


def test_node_test_corpus(tmp_path) -> None:
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = load_model_tests(kind="node")
    assert len(cases) >= 1800
    ran, failures = 0, []
    for case in cases:
        if not case.data_sets:
            continue
        inputs, _ = case.data_sets[0]
        names = [i.name for i in case.model.graph.input if i.name not in {t.name for t in case.model.graph.initializer}]
        feeds = dict(zip(names, inputs, strict=False))
        ref = _ort_outputs(case.model, feeds)
        if ref is None:
            continue
        try:
            new_proto = _transform(case.model, tmp_path)
            new = run(new_proto, feeds)
        except Exception as exc:
            failures.append(f"{case.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
            continue
        ran += 1
        if len(new) != len(ref) or not all(_same(a, b) for a, b in zip(ref, new, strict=True)):
            failures.append(f"{case.name}: outputs changed")
    assert ran > 1200, f"only {ran} node tests could run on ORT"
    assert not failures, f"{len(failures)} of {ran} node tests broke:\n" + "\n".join(failures[:30])


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in LIGHT_MODELS])
def test_light_classic_cnns(name: str, tmp_path) -> None:
    proto = materialize_light_model(name)
    weights = {t.name for t in proto.graph.initializer}
    (data,) = [i for i in proto.graph.input if i.name not in weights]
    shape = [d.dim_value or 1 for d in data.type.tensor_type.shape.dim]
    feeds = {data.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    ref = run(proto, feeds)
    new_proto = _transform(proto, tmp_path)
    assert sum(n.op_type == "BatchNormalization" for n in new_proto.graph.node) <= sum(
        n.op_type == "BatchNormalization" for n in proto.graph.node
    )
    onnx.checker.check_model(new_proto)
    for a, b in zip(ref, run(new_proto, feeds), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(a).max())))


@pytest.mark.parametrize(
    "name", ["resnet50", "densenet121", "inception_v1", "inception_v2", "squeezenet", "shufflenet"]
)
def test_structured_prune_oracle_on_light_cnns(name: str, tmp_path) -> None:
    """Channel groups on real architectures (bottlenecks, dense Concat, inception branches, fire modules,
    channel shuffle): removing channels equals zeroing the weights that read them."""
    from optimizer_cli.analysis.channel_groups import analyze
    from optimizer_cli.analysis.cost import parameter_count
    from optimizer_cli.passes._graph import infer_shapes
    from optimizer_cli.passes.prune import PruneConfig, apply_structured, choose_keep
    from optimizer_cli.pipeline import normalize

    from .builders import check

    proto = materialize_light_model(name)

    def prepared() -> ir.Model:
        model = ir.serde.deserialize_model(proto)
        normalize(model)
        CleanupPass(CleanupConfig(), context(tmp_path))(model)
        FusePass(FuseConfig(), context(tmp_path))(model)
        infer_shapes(model)
        return model

    removed, zeroed = prepared(), prepared()
    a_removed, a_zeroed = analyze(removed), analyze(zeroed)
    keep = choose_keep(a_removed, a_removed.prunable(), PruneConfig(sparsity=0.3, round_to=4, min_channels=4))
    before = parameter_count(removed)
    apply_structured(zeroed, a_zeroed, keep, zero_only=True)
    apply_structured(removed, a_removed, keep)
    check(removed)
    if name == "shufflenet":
        assert not keep  # grouped convs and the channel shuffle tie everything: nothing may be removed
    else:
        assert len(keep) > 10 and parameter_count(removed) < 0.8 * before
    weights = {t.name for t in proto.graph.initializer}
    (data,) = [i for i in proto.graph.input if i.name not in weights]
    shape = [d.dim_value or 1 for d in data.type.tensor_type.shape.dim]
    feed = {data.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    for a, b in zip(run(zeroed, feed), run(removed, feed), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(a).max())))


MODEL_KINDS = ("pytorch-converted", "pytorch-operator", "simple")


@pytest.mark.parametrize("recipe", ["int8", "cnn-int8"])
def test_model_test_corpus_through_the_pipeline(recipe: str, tmp_path) -> None:
    """onnx's 140 model tests (IR 3 to 7, opsets 6 to 12): every one gives a valid output onnxruntime
    loads, or a one-line input error (exit 2) saying why, never a broken pass (exit 3) or a crash (4)."""
    import onnxruntime as ort
    from onnx.backend.test.loader import load_model_tests

    from optimizer_cli.errors import UserInputError
    from optimizer_cli.pipeline import run_pipeline
    from optimizer_cli.recipe import load_recipe, preset_path

    rec = load_recipe(preset_path(recipe), ["verify.samples=2"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = [c for kind in MODEL_KINDS for c in load_model_tests(kind=kind)]
    assert len(cases) >= 140
    ok, refused, failures = 0, 0, []
    for case in cases:
        out = tmp_path / f"{case.name}.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run_pipeline(f"{case.model_dir}/model.onnx", rec, out, calibration="random")
            onnx.checker.check_model(str(out))
            ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            ok += 1
        except UserInputError as exc:
            assert "\n" not in str(exc).strip(), f"{case.name}: a reason must be one line"
            refused += 1
        except Exception as exc:
            failures.append(f"{case.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
    assert not failures, f"{len(failures)} of {len(cases)} broke:\n" + "\n".join(failures[:30])
    assert ok >= 85, (ok, refused)
