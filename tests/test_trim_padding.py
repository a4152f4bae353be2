"""trim_padding: exact on pooled encoders, really shortens the sequence, refuses what it cannot prove."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from optimizer_cli.data import Dataset
from optimizer_cli.errors import UserInputError
from optimizer_cli.passes.trim_padding import TrimPaddingConfig, TrimPaddingPass
from optimizer_cli.runtime.session import capture_values

from .builders import check, context, mlp, padded_feed, run, tiny_encoder, to_ir
from .conftest import run_cli

SEQ = 32


def _calibration(seed: int = 0) -> Dataset:
    feeds = [padded_feed([n, max(1, n // 2)], SEQ, seed=seed + n) for n in (3, 11, 20, 27)]
    return Dataset(feeds, None, "test", False)


def _trim(model: onnx.ModelProto, tmp_path, calibration: Dataset | None = None) -> tuple[ir.Model, TrimPaddingPass]:
    m = to_ir(model)
    p = TrimPaddingPass(TrimPaddingConfig(), context(tmp_path, calibration or _calibration()))
    p(m)
    return m, p


@pytest.mark.parametrize("seed", [0, 1])
def test_pooled_encoder_outputs_kept_and_sequence_shortened(tmp_path, seed: int) -> None:
    original = tiny_encoder(seed=seed)
    trimmed, p = _trim(original, tmp_path)
    check(trimmed)
    assert "skipped" not in p.stats, p.stats
    assert p.stats["sliced_inputs"] == ["input_ids", "attention_mask"]
    # Held-out feeds: mixed lengths in one batch, full length, left padding, a fully masked row.
    lengths_cases = [[4, 17], [SEQ, 2], [1, 1], [9, 0]]
    feeds = [padded_feed(lengths, SEQ, seed=100 + i) for i, lengths in enumerate(lengths_cases)]
    left = padded_feed([6, 10], SEQ, seed=7)
    left["attention_mask"] = left["attention_mask"][:, ::-1].copy()
    feeds.append(left)
    for feed in feeds:
        (want,), (got,) = run(original, feed), run(trimmed, feed)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    # The work really shrinks: the sliced ids are as long as the longest kept row.
    seen = capture_values(trimmed, feeds, ["input_ids_trimmed"], threads=1)["input_ids_trimmed"]
    assert [s.shape[1] for s in seen] == [17, SEQ, 1, 9, SEQ]
    # The declared signature is unchanged.
    assert [(v.name, v.shape) for v in trimmed.graph.inputs] == [
        (v.name, v.shape) for v in to_ir(original).graph.inputs
    ]


def _unchanged(original: onnx.ModelProto, model: ir.Model) -> None:
    assert [n.op_type for n in model.graph] == [n.op_type for n in to_ir(original).graph]
    assert not any(k.startswith("trim_padding") for k in model.graph.initializers)


def test_refuses_outputs_that_carry_the_sequence_axis(tmp_path) -> None:
    original = tiny_encoder(pooled=False)
    # Declared: refused before anything runs.
    declared = onnx.ModelProto()
    declared.CopyFrom(original)
    declared.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "sequence"
    model, p = _trim(declared, tmp_path)
    assert "carry the sequence axis" in p.stats["skipped"]
    _unchanged(declared, model)
    # Not declared (shape inference lost the name): per-token outputs at padded positions read the padding.
    model, p = _trim(original, tmp_path)
    assert "depend on what masked-out positions hold" in p.stats["skipped"]
    _unchanged(original, model)


def test_refuses_models_whose_outputs_read_padded_positions(tmp_path) -> None:
    original = tiny_encoder(masked=False)  # attention sees every position, padding included
    model, p = _trim(original, tmp_path)
    assert "depend on what masked-out positions hold" in p.stats["skipped"]
    _unchanged(original, model)


def test_refuses_and_restores_a_model_that_hard_codes_the_length(tmp_path) -> None:
    original = tiny_encoder(seq=SEQ, hard_coded_seq=SEQ)
    model, p = _trim(original, tmp_path)
    assert "does not run on trimmed sequences" in p.stats["skipped"]
    _unchanged(original, model)
    check(model)
    feed = padded_feed([5, 8], SEQ)
    np.testing.assert_allclose(run(model, feed)[0], run(original, feed)[0], rtol=1e-6)


def test_dynamic_int8_model_depends_on_padding_and_is_refused(tmp_path) -> None:
    """Dynamic quantization takes one scale over the whole tensor, padding included."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(tiny_encoder(hidden=32), src)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    quantized = onnx.load(dst)
    model, p = _trim(quantized, tmp_path)
    assert "depend on what masked-out positions hold" in p.stats["skipped"]
    _unchanged(quantized, model)


def test_model_without_a_mask_input_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(UserInputError, match="attention-mask input"):
        _trim(mlp(), tmp_path, Dataset([], None, "test", False))
    with pytest.raises(UserInputError, match="mask_input 'mask' is not a model input"):
        p = TrimPaddingPass(TrimPaddingConfig(mask_input="mask"), context(tmp_path, _calibration()))
        p(to_ir(tiny_encoder()))


def test_cli_recipe_with_trim_padding(tmp_path) -> None:
    model, calib = tmp_path / "encoder.onnx", tmp_path / "calib.npz"
    onnx.save(tiny_encoder(seed=3), model)
    feeds = _calibration(seed=5).feeds
    np.savez(calib, **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
    recipe = tmp_path / "trim.yaml"
    recipe.write_text("name: trim\npasses:\n  - type: cleanup\n  - type: trim_padding\ndata:\n  dims: {sequence: 32}\n")
    out = tmp_path / "out.onnx"
    proc = run_cli(str(model), "-r", str(recipe), "-o", str(out), "--calib", str(calib), "--no-bench", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    trim = next(s for s in report["stages"] if s["type"] == "trim_padding")
    assert "skipped" not in trim["stats"] and trim["stats"]["sliced_inputs"] == ["input_ids", "attention_mask"], trim
    feed = padded_feed([7, 30], SEQ, seed=9)
    np.testing.assert_allclose(run(onnx.load(out), feed)[0], run(onnx.load(model), feed)[0], rtol=1e-5, atol=1e-5)
