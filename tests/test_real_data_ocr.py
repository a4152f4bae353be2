"""Real data on real models: rendered text lines of several widths through PP-OCRv4 (rapidocr's pip package).

Marked slow (the models come from PyPI). Lines are rendered offline with Pillow's bundled font, so the
labels are known: the recognizer's report carries per-position agreement and the character error rate
of both models against them; the detector's carries the IoU of its thresholded probability maps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from .conftest import run_cli
from .test_real_models import real_models  # noqa: F401  (the session fixture that fetches the models)

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello World 42", "optimizer", "ONNX Runtime", "int8 on CPU", "text line", "calibration data",
    "recipe.yaml", "speedup 2.5x", "fidelity", "per channel", "held out", "shapes vary",
    "seven", "accuracy drop", "latency p90", "model.onnx",
]  # fmt: skip


def _render(text: str, height: int = 48) -> np.ndarray:
    """A text line as PP-OCRv4 rec wants it: [1, 3, 48, W], (x/255 - 0.5) / 0.5."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=28)
    width = int(font.getlength(text)) + 16
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).text((8, 8), text, fill="black", font=font)
    array = (np.asarray(image, np.float32) / 255 - 0.5) / 0.5
    return array.transpose(2, 0, 1)[None]


def _page(lines: list[str], size: tuple[int, int]) -> np.ndarray:
    """A page for PP-OCRv4 det: [1, 3, H, W] (multiples of 32), ImageNet-normalized like rapidocr."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=24)
    image = Image.new("RGB", (size[1], size[0]), "white")
    draw = ImageDraw.Draw(image)
    for i, text in enumerate(lines):
        draw.text((16, 16 + 40 * i), text, fill="black", font=font)
    array = np.asarray(image, np.float32) / 255
    array = (array - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return array.transpose(2, 0, 1)[None].astype(np.float32)


@pytest.fixture(scope="module")
def line_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Calibration (8 lines) and held-out evaluation (8 other lines) as folders of per-sample .npz."""
    root = tmp_path_factory.mktemp("lines")
    calib, evaluation = root / "calib", root / "eval"
    for folder, texts in ((calib, TEXTS[:8]), (evaluation, TEXTS[8:])):
        folder.mkdir()
        for i, text in enumerate(texts):
            np.savez(folder / f"line{i:03d}.npz", x=_render(text), label=np.array(text))
    return calib, evaluation


def test_recognizer_on_lines_of_several_widths_reports_position_agreement_and_cer(
    real_models: Path,  # noqa: F811
    line_folders: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    calib, evaluation = line_folders
    proc = run_cli(
        str(real_models / "ch_PP-OCRv4_rec_infer.onnx"), "-r", "int8", "-o", str(tmp_path / "rec.onnx"),
        "--calib", str(calib), "--data", str(evaluation), "--metric", "builtin:cer", "--providers", "cpu",
        "--set", "benchmark.rounds=2", "--set", "benchmark.runs_per_round=2", "--no-memory", "--no-attribute", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    bench = report["benchmark"]
    assert bench["eval_samples"] == 8, "every held-out line, none padded or dropped"
    assert len(bench["latency_shapes"]) > 1, "lines of several widths were timed as they are"
    row = bench["rows"][0]
    (output,) = row["fidelity"]["per_output"]
    assert output["kind"] == "sequence_logits" and output["position_agreement"] is not None
    assert row["accuracy_original"]["metric_name"] == "cer" and row["accuracy_original"]["lower_is_better"]
    assert row["accuracy_original"]["metric"] < 0.1, "the fp32 recognizer reads the rendered lines"
    assert row["accuracy_optimized"]["metric"] is not None


def test_detector_pages_report_map_iou(real_models: Path, tmp_path: Path) -> None:  # noqa: F811
    pages = tmp_path / "pages"
    pages.mkdir()
    for i, size in enumerate([(320, 320), (256, 416), (352, 288)]):
        np.savez(pages / f"page{i}.npz", x=_page(TEXTS[3 * i : 3 * i + 3], size))
    proc = run_cli(
        str(real_models / "ch_PP-OCRv4_det_infer.onnx"), "-r", "int8", "-o", str(tmp_path / "det.onnx"),
        "--calib", str(pages), "--data", str(pages), "--providers", "cpu", "--set", "benchmark.rounds=2",
        "--set", "benchmark.runs_per_round=2", "--no-memory", "--no-attribute", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout)["benchmark"]["rows"][0]
    (output,) = row["fidelity"]["per_output"]
    assert output["kind"] == "dense_map" and output["map_iou"] is not None
    assert row["fidelity"]["top1_agreement"] is None, "argmax over a map's last axis means nothing"
