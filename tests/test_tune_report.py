"""The tune report's pictures and page: a valid PNG, one self-contained HTML file, escaped user strings.

The tune documents are written by hand in the shape of best.tune.json (see `optimize tune`): timed trials,
trials rejected for missing a goal (never timed), a failed trial, with a winner and without one.
"""

from __future__ import annotations

import base64
import copy
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from optimizer_cli.report.html import tune_html
from optimizer_cli.report.plot import (
    WINNER_COLOUR,
    TrialPoint,
    attribution_png,
    fidelity_metric,
    pareto_front,
    pareto_png,
)

HOSTILE_NODE = "<script>alert('node')</script>"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WINNER_PIXELS = 250  # well under the star's ~530, far over the few a stray anti-aliased edge could give


def _trial(number: int, state: str, cosine: float | None, speedup: float | None, **extra: Any) -> dict[str, Any]:
    timed = speedup is not None
    return {
        "number": number,
        "params": {"quantize": "static", "per_channel": True, "keep_float_k": number % 5},
        "state": state,
        "reason": None,
        "recipe_summary": f"quantize static ({number % 5} nodes float)",
        "fidelity": {"cosine": cosine, "accuracy_drop": None if cosine is None else (1 - cosine) / 2},
        "goals_met": None if cosine is None else cosine >= 0.99,
        "speedup": {"median": speedup, "ci_low": speedup - 0.08, "ci_high": speedup + 0.07} if timed else None,
        "p50_ms": 3.2 / speedup if timed else None,
        "size_ratio": 0.3 if timed else None,
        "build_s": 4.2,
        "time_s": 1.1 if timed else 0.0,
        **extra,
    }


def tune_document(winner: bool = True, attribution: bool = True) -> dict[str, Any]:
    """A realistic document: 5 timed trials (one the winner), 3 rejected, 1 failed, 1 duplicate."""
    trials = [
        _trial(0, "timed", 0.9991, 1.05),
        _trial(1, "timed", 0.9962, 1.62),
        _trial(2, "timed", 0.9935, 1.84),
        _trial(3, "timed", 0.9978, 1.41),
        _trial(4, "timed", 0.9920, 1.55),  # dominated by trial 2: not on the front
        _trial(5, "rejected", 0.962, None, reason="cosine 0.962 < 0.99 (goal cosine>=0.99)"),
        _trial(6, "rejected", 0.931, None, reason="cosine 0.931 < 0.99 (goal cosine>=0.99)"),
        _trial(7, "rejected", 0.985, None, reason=f"cosine 0.985 < 0.99 at node {HOSTILE_NODE}"),
        _trial(8, "failed", None, None, reason="pass 1 (quantize) failed: no calibration data"),
        _trial(9, "duplicate", None, None, reason="same recipe as trial 2"),
    ]
    doc: dict[str, Any] = {
        "kind": "tune",
        "model": "models/resnet <tiny> $\\frac{$.onnx",
        "model_sha256": "ab" * 32,
        "goals": ["cosine>=0.99", "accuracy_drop<=1%"],
        "providers": ["cpu"],
        "threads": 2,
        "budget": {"seconds": 600.0, "trials": None},
        "elapsed_s": 312.4,
        "space": {"quantize": ["none", "dynamic", "static"], "keep_float_k": [0, 1, 2, 3, 4]},
        "original": {"bytes": 123456, "p50_ms": 3.21},
        "trials": trials,
        "final": {
            "candidates": [
                {"number": n, "speedup": trials[n]["speedup"], "p50_ms": trials[n]["p50_ms"], "meets_goals": True}
                for n in (2, 1, 4)
            ],
            "winner": 2,
            "verdict": "found",
            "reason": "fastest candidate meeting every goal whose speedup's 95% interval lies above 1",
        },
        "winner": {
            "number": 2,
            "recipe_summary": trials[2]["recipe_summary"],
            "speedup": trials[2]["speedup"],
            "fidelity": trials[2]["fidelity"],
            "attribution": [
                {"node": f"conv_{i}", "op": "Conv", "cosine": 0.999 - i / 1000, "local_drop": 0.0004 * (i + 1)}
                for i in range(18)
            ]
            + [
                {"node": HOSTILE_NODE, "op": "MatMul", "cosine": 0.99, "local_drop": 0.009},
                # matplotlib would read "$...$" as mathtext (and fail on this one) if labels were parsed
                {"node": "/blocks.0/attn/$\\frac{x_$", "op": "Softmax", "cosine": 0.995, "local_drop": 0.005},
            ],
        },
        "environment": {"cpu": "AMD EPYC <test>", "onnxruntime": "1.23.0", "python": "3.11"},
        "outputs": {
            "model": "best.onnx",
            "recipe": "best.recipe.yaml",
            "json": "best.tune.json",
            "png": "best.pareto.png",
            "html": "best.report.html",
        },
    }
    if not attribution:
        doc["winner"]["attribution"] = []
    if not winner:
        doc["final"].update(winner=None, verdict="none", reason="no candidate's speedup interval lies above 1.2")
        doc["winner"] = None
    return doc


def _pixels_near(image: Image.Image, colour: str, tolerance: int) -> int:
    """How many pixels are within `tolerance` levels (per channel) of a '#rrggbb' colour."""
    target = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    return int((np.abs(pixels - target) <= tolerance).all(axis=-1).sum())


def test_pareto_png_is_a_sane_png() -> None:
    png = pareto_png(tune_document())
    assert png.startswith(PNG_MAGIC)
    image = Image.open(io.BytesIO(png))
    image.verify()
    width, height = Image.open(io.BytesIO(png)).size
    assert 600 <= width <= 2000 and 400 <= height <= 1500


def test_pareto_png_draws_the_winner_in_its_colour_only_when_there_is_one() -> None:
    # The star covers about 530 pixels at the plot's 100 dpi; nothing else in the figure uses its colour.
    assert _pixels_near(Image.open(io.BytesIO(pareto_png(tune_document()))), WINNER_COLOUR, 0) > WINNER_PIXELS
    assert _pixels_near(Image.open(io.BytesIO(pareto_png(tune_document(winner=False)))), WINNER_COLOUR, 0) == 0


def test_pareto_png_copes_with_no_timed_trial_and_a_lower_is_better_axis() -> None:
    doc = tune_document(winner=False)
    doc["goals"] = ["accuracy_drop<=1%"]
    for trial in doc["trials"]:
        trial.update(state="rejected" if trial["state"] == "timed" else trial["state"], speedup=None)
    assert fidelity_metric(doc) == "accuracy_drop"
    assert pareto_png(doc).startswith(PNG_MAGIC)
    assert pareto_png({"trials": []}).startswith(PNG_MAGIC)


def test_fidelity_metric_is_the_first_goal_when_trials_report_it_else_cosine() -> None:
    doc = tune_document()
    assert fidelity_metric(doc) == "cosine"
    doc["goals"] = ["accuracy_drop<=1%", "cosine>=0.99"]
    assert fidelity_metric(doc) == "accuracy_drop"
    doc["goals"] = ["top1_agreement>=0.99"]  # no trial reports it
    assert fidelity_metric(doc) == "cosine"


def test_pareto_front_keeps_the_trials_nothing_beats_on_both_axes() -> None:
    points = [
        TrialPoint(n, fidelity, speedup)
        for n, fidelity, speedup in [
            (0, 0.999, 1.05),
            (1, 0.996, 1.62),
            (2, 0.9935, 1.84),
            (3, 0.998, 1.41),
            (4, 0.992, 1.55),
            (5, 0.998, 1.30),
        ]
    ]
    assert [p.number for p in pareto_front(points, higher_is_better=True)] == [2, 1, 3, 0]
    # As drops (lower is better), the same numbers mean the opposite: the least-drop trial leads.
    assert [p.number for p in pareto_front(points, higher_is_better=False)] == [2, 4]
    assert pareto_front([], higher_is_better=True) == []


def test_attribution_png_shows_the_top_nodes_or_nothing() -> None:
    png = attribution_png(tune_document()["winner"])
    assert png is not None and png.startswith(PNG_MAGIC)
    Image.open(io.BytesIO(png)).verify()
    assert attribution_png(tune_document(attribution=False)["winner"]) is None
    assert attribution_png({}) is None


class _Page(HTMLParser):
    """What the tests look for: images by id, table rows by table id, every URL-bearing attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, dict[str, str]] = {}
        self.rows: dict[str, list[str]] = {}  # table id -> the class of each body row
        self.urls: list[str] = []
        self.tags: list[str] = []
        self._table: str | None = None
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        self.tags.append(tag)
        self.urls += [value for key, value in attributes.items() if key in ("src", "href", "action")]
        if tag == "img":
            self.images[attributes.get("id", "")] = attributes
        elif tag == "table":
            self._table = attributes.get("id", "")
            self.rows[self._table] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._table is not None and self._in_body:
            self.rows[self._table].append(attributes.get("class", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def _png_of_data_uri(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    data = base64.b64decode(src[len(prefix) :], validate=True)
    assert data.startswith(PNG_MAGIC)
    return Image.open(io.BytesIO(data))


def _page(doc: dict[str, Any]) -> str:
    return tune_html(doc, pareto_png(doc), attribution_png(doc["winner"] or {}))


def test_html_with_a_winner_has_the_plot_the_trials_and_the_attribution() -> None:
    doc = tune_document()
    page = _parse(_page(doc))
    assert list(page.images) == ["pareto", "attribution"]
    assert page.images["pareto"]["alt"]
    assert _png_of_data_uri(page.images["pareto"]["src"]).size[0] >= 600
    _png_of_data_uri(page.images["attribution"]["src"])
    classes = page.rows["trials"]
    assert len(classes) == len(doc["trials"])
    assert classes.count("rejected") == 3 and classes.count("failed") == 1 and classes.count("winner") == 1
    assert len(page.rows["environment"]) == len(doc["environment"])
    assert "script" not in page.tags and "link" not in page.tags


def test_html_escapes_every_user_string_and_loads_nothing_external() -> None:
    text = _page(tune_document())
    assert HOSTILE_NODE not in text
    assert "&lt;script&gt;" in text  # the reason naming the node is shown, escaped
    assert "<tiny>" not in text and "AMD EPYC &lt;test&gt;" in text
    assert not re.search(r"https?://", text)
    assert all(url.startswith("data:") for url in _parse(text).urls)


def test_html_without_a_winner_gives_the_reason_and_the_closest_candidates() -> None:
    doc = tune_document(winner=False)
    text = _page(doc)
    page = _parse(text)
    assert "No winner" in text and "no candidate&#x27;s speedup interval lies above 1.2" in text
    assert len(page.rows["candidates"]) == len(doc["final"]["candidates"])
    assert "attribution" not in page.images and "no winner, so there is no attribution" in text
    assert "winner" not in page.rows["trials"]


def test_html_says_so_when_the_winner_has_no_attribution() -> None:
    doc = tune_document(attribution=False)
    text = _page(doc)
    assert "attribution" not in _parse(text).images
    assert "There is no attribution for the winner" in text


def test_html_tolerates_missing_optional_fields() -> None:
    doc = copy.deepcopy(tune_document(winner=False))
    for key in ("environment", "outputs", "space", "budget", "original", "elapsed_s"):
        doc.pop(key)
    doc["trials"][0]["fidelity"] = {}
    page = _parse(tune_html(doc, pareto_png(doc), None))
    assert len(page.rows["trials"]) == len(doc["trials"])


@pytest.mark.slow
def test_chromium_renders_the_page_with_the_plot(tmp_path: Path) -> None:
    """A real browser opens the file and paints the plot: the winner's colour covers a visible area."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (CI installs Debian's)")
    page = tmp_path / "best.report.html"
    page.write_text(_page(tune_document()), encoding="utf-8")
    screenshot = tmp_path / "screenshot.png"
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",  # no shared profile: runs in parallel do not collide
        f"--screenshot={screenshot}",
        "--window-size=1200,1600",
        page.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert screenshot.exists(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    image = Image.open(screenshot)
    assert image.size == (1200, 1600)
    # A browser that scales the image blends the star's edges; its inside stays within a few levels.
    near = _pixels_near(image, WINNER_COLOUR, 12)
    assert near > WINNER_PIXELS, f"only {near} pixels of the winner's colour: the plot was not painted"
