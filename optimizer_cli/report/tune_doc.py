"""Reading a tune document (best.tune.json, see `optimize tune`): the look-ups the plot and the page share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optimizer_cli.bench.gate import PERCENT_METRICS


def winner_number(tune: dict[str, Any]) -> int | None:
    """The winning trial's number: final.winner, or the winner section's number when only that is filled."""
    number = (tune.get("final") or {}).get("winner")
    if number is None and tune.get("winner"):
        number = tune["winner"].get("number")
    return None if number is None else int(number)


def trials_by_number(tune: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(t["number"]): t for t in tune.get("trials") or [] if t.get("number") is not None}


def model_name(tune: dict[str, Any]) -> str:
    """The model file's name without its folders (the full path is in the document and the page's heading)."""
    return Path(str(tune.get("model") or "model")).name


def final_timings(tune: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The final round's candidates by trial number: their speedup is the one the verdict read, so it is the one
    every picture and table shows for them (documents before trials carried it themselves need this)."""
    final = tune.get("final") or {}
    return {int(c["number"]): c for c in final.get("candidates") or [] if c.get("number") is not None}


def percent_figure(key: str) -> bool:
    """Figures shown in percent everywhere (bench.gate.PERCENT_METRICS): accuracy and its drop (goals write them
    so: 'accuracy_drop<=1%') and the agreements (the run's table prints 'top-1 agree 98.44%')."""
    return key in PERCENT_METRICS
