"""Issue 24 ("Truth"), the new-user walk-through: every number one output shows agrees with the others it can be
checked against (the same unit, the same sample set said, the same count)."""

from __future__ import annotations

import copy
from typing import Any

from optimizer_cli.report.html import tune_html
from optimizer_cli.report.plot import pareto_figure, pareto_png
from tests.test_tune_report import tune_document


def _accuracy_doc() -> dict[str, Any]:
    doc = copy.deepcopy(tune_document())
    doc["goals"] = ["accuracy_drop<=1%", "cosine>=0.99"]
    return doc


def test_pareto_axis_reads_a_percent_goal_in_percent() -> None:
    """The goal line says 'accuracy_drop<=1%': its axis counts in percent too, not in fractions (0.010)."""
    figure = pareto_figure(_accuracy_doc())
    top, strip = figure.axes[:2]
    for ax in (top, strip):
        tick = ax.xaxis.get_major_formatter()(0.01, 0)  # decimals follow the axis range: '1%' or '1.00%'
        assert tick.endswith("%") and float(tick[:-1]) == 1.0
        assert "%" in ax.get_xlabel()
    # A similarity stays a plain number.
    plain = pareto_figure(tune_document())
    assert "%" not in plain.axes[0].xaxis.get_major_formatter()(0.99, 0) and "%" not in plain.axes[0].get_xlabel()


def test_html_fidelity_shows_agreements_in_percent_and_counts_as_counts() -> None:
    """The run's table says 'top-1 agree 98.44%': the page does too; nonfinite is a count, never '0.0000'."""
    doc = _accuracy_doc()
    doc["winner"]["fidelity"] = {"cosine": 0.99207, "top1_agreement": 0.98741, "nonfinite": 0, "accuracy": 0.90428}
    page = tune_html(doc, pareto_png(doc), None)
    assert "top1_agreement 98.74%" in page
    assert "nonfinite 0," in page and "nonfinite 0.0000" not in page
    assert "accuracy 90.43%" in page and "cosine 0.9921" in page
