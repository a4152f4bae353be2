"""PNG pictures of a tune document (best.tune.json): the speedup-vs-fidelity Pareto plot and the winner's attribution.

Figures are built as `matplotlib.figure.Figure` on their own `FigureCanvasAgg`: pyplot's global figure manager
and backend selection are never touched, so a caller's (or a test's) matplotlib state is left as it was.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from optimizer_cli.bench.gate import Gate, parse_gate
from optimizer_cli.errors import UserInputError
from optimizer_cli.report.tune_doc import final_timings, model_name, percent_figure, winner_number

# Colours are constants so tests can find the plot's pixels in a rendered page. Only the winner (its star and
# label) is magenta, a colour no browser default uses, so counting it proves the image was painted.
WINNER_COLOUR = "#e6007e"
TIMED_COLOUR = "#0072b2"
FRONT_COLOUR = "#d55e00"
GOAL_COLOUR = "#009e73"
NOT_TIMED_COLOUR = "#8c8c8c"
ORIGINAL_COLOUR = "#333333"
DEFAULT_FIDELITY_METRIC = "cosine"
ATTRIBUTION_TOP = 15
_DPI = 100
_LABEL_CHARS = 48  # longer node names are cut in the middle; the HTML tables show them whole


@dataclass(frozen=True)
class TrialPoint:
    """One trial placed on the plot: fidelity on x, speedup median and its 95% interval on y."""

    number: int
    fidelity: float
    speedup: float = 0.0
    ci_low: float = 0.0
    ci_high: float = 0.0
    final: bool = False  # the speedup is the final round's (the verdict's), not the search's


def _goals(tune: dict[str, Any]) -> list[Gate]:
    """The document's goals in the --fail-if grammar; a goal that grammar does not know is left off the plot."""
    parsed = []
    for text in tune.get("goals") or []:
        try:
            parsed.append(parse_gate(str(text)))
        except UserInputError:
            continue
    return parsed


def _has_metric(trials: list[dict[str, Any]], metric: str) -> bool:
    return any((t.get("fidelity") or {}).get(metric) is not None for t in trials)


def fidelity_metric(tune: dict[str, Any]) -> str:
    """The x axis: the first goal's metric when the trials report it as a fidelity figure, else cosine."""
    goals = _goals(tune)
    trials = tune.get("trials") or []
    if goals and _has_metric(trials, goals[0].metric):
        return goals[0].metric
    return DEFAULT_FIDELITY_METRIC


def _higher_is_better(tune: dict[str, Any], metric: str) -> bool:
    """A goal's operator says which way is better ("cosine>=", "accuracy_drop<="); without one, higher."""
    return not any(goal.metric == metric and goal.op in ("<", "<=") for goal in _goals(tune))


def timed_points(tune: dict[str, Any], metric: str) -> list[TrialPoint]:
    """Timed trials at one speed each: the final round's where a trial was re-timed there, else the search's."""
    finals = final_timings(tune)
    points = []
    for t in tune.get("trials") or []:
        fidelity, speedup = (t.get("fidelity") or {}).get(metric), t.get("speedup")
        if t.get("number") is not None and int(t["number"]) in finals:
            speedup = finals[int(t["number"])].get("speedup")
        if t.get("state") != "timed" or fidelity is None or not speedup or speedup.get("median") is None:
            continue
        median = float(speedup["median"])
        low, high = speedup.get("ci_low"), speedup.get("ci_high")
        points.append(
            TrialPoint(
                int(t["number"]),
                float(fidelity),
                median,
                median if low is None else float(low),
                median if high is None else float(high),
                int(t["number"]) in finals,
            )
        )
    return points


def _not_timed_points(trials: list[dict[str, Any]], metric: str) -> list[TrialPoint]:
    """Rejected trials with a fidelity figure: they missed a goal, so they were never timed and have no speedup."""
    points = []
    for t in trials:
        fidelity = (t.get("fidelity") or {}).get(metric)
        if t.get("state") == "rejected" and fidelity is not None:
            points.append(TrialPoint(int(t["number"]), float(fidelity)))
    return points


def pareto_front(points: list[TrialPoint], higher_is_better: bool) -> list[TrialPoint]:
    """Points no other point beats on both fidelity and speedup, worst fidelity (fastest) first."""
    sign = 1.0 if higher_is_better else -1.0
    ordered = sorted(points, key=lambda p: (-sign * p.fidelity, -p.speedup))
    front: list[TrialPoint] = []
    # Walking from the best fidelity down, a point joins the front only if it is faster than all before it.
    for point in ordered:
        if not front or point.speedup > front[-1].speedup:
            front.append(point)
    return front[::-1]


def _draw_timed(ax: Axes, points: list[TrialPoint], higher_is_better: bool) -> None:
    if not points:
        ax.text(0.5, 0.5, "no trial was timed", transform=ax.transAxes, ha="center", color=NOT_TIMED_COLOUR)
        return
    search = [p for p in points if not p.final]
    final = [p for p in points if p.final]
    for group, marker, label in (
        (search, "o", "timed in the search (median, 95% interval)"),
        (final, "D", "re-timed in the final round (median, 95% interval)"),
    ):
        if group:
            _errorbars(ax, group, marker, label)
    front = pareto_front(points, higher_is_better)
    # Rings on the front's points: a front of one point (no line to step between) is drawn too.
    ax.scatter(
        [p.fidelity for p in front],
        [p.speedup for p in front],
        s=180,
        facecolors="none",
        edgecolors=FRONT_COLOUR,
        linewidths=1.5,
        zorder=2,
    )
    # "pre": between two front points the boundary is at the level of the one with the better fidelity.
    ax.step(
        [p.fidelity for p in front],
        [p.speedup for p in front],
        where="pre",
        color=FRONT_COLOUR,
        linewidth=1.5,
        label="Pareto front",
        zorder=2,
    )


def _errorbars(ax: Axes, points: list[TrialPoint], marker: str, label: str) -> None:
    ax.errorbar(
        [p.fidelity for p in points],
        [p.speedup for p in points],
        yerr=[[max(p.speedup - p.ci_low, 0.0) for p in points], [max(p.ci_high - p.speedup, 0.0) for p in points]],
        fmt=marker,
        color=TIMED_COLOUR,
        ecolor=TIMED_COLOUR,
        elinewidth=1,
        capsize=3,
        markersize=6,
        label=label,
        zorder=3,
    )


def _draw_original(ax: Axes, higher_is_better: bool) -> None:
    # The original agrees with itself perfectly: similarity figures are 1, drops and errors 0.
    ax.axhline(1.0, color=ORIGINAL_COLOUR, linestyle=":", linewidth=1)
    ax.plot([1.0 if higher_is_better else 0.0], [1.0], "s", color=ORIGINAL_COLOUR, label="original", zorder=3)
    # Labelled under the line at the right end, beside its marker: slowdowns at near-perfect fidelity are rare.
    ax.annotate(
        "original",
        (1.0, 1.0),
        xycoords=("axes fraction", "data"),
        xytext=(-4, -12),
        textcoords="offset points",
        ha="right",
        color=ORIGINAL_COLOUR,
        fontsize=9,
    )


def _zoom(ax: Axes, tune: dict[str, Any], metric: str, timed: list[TrialPoint], original: float) -> None:
    """The timed panel's x range: its points, the goal thresholds on its metric and the original, padded."""
    xs = [p.fidelity for p in timed] + [g.threshold for g in _goals(tune) if g.metric == metric] + [original]
    low, high = min(xs), max(xs)
    pad = max((high - low) * 0.08, 1e-4)
    ax.set_xlim(low - pad, high + pad)


def _draw_goals(axes: list[Axes], tune: dict[str, Any], metric: str) -> None:
    """A dashed vertical line per goal on the x metric, labelled at the top on whichever side has more room."""
    left, right = axes[0].get_xlim()  # display order, so an inverted axis needs no special case
    for goal in _goals(tune):
        if goal.metric != metric:
            continue
        for ax in axes:
            ax.axvline(goal.threshold, color=GOAL_COLOUR, linestyle="--", linewidth=1.2)
        on_right_half = right != left and (goal.threshold - left) / (right - left) > 0.5
        axes[0].annotate(
            f"goal {goal.expression}",
            (goal.threshold, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(-3 if on_right_half else 3, -12),
            textcoords="offset points",
            ha="right" if on_right_half else "left",
            color=GOAL_COLOUR,
            fontsize=9,
            parse_math=False,
        )


def _draw_winner(ax: Axes, points: list[TrialPoint], winner: int | None) -> None:
    chosen = next((p for p in points if p.number == winner), None)
    if chosen is None:
        return
    ax.plot(
        [chosen.fidelity],
        [chosen.speedup],
        marker="*",
        markersize=22,
        color=WINNER_COLOUR,
        markeredgecolor=WINNER_COLOUR,
        linestyle="none",
        label=f"winner (trial {chosen.number})",
        zorder=4,
    )
    ax.annotate(
        f"#{chosen.number}",
        (chosen.fidelity, chosen.speedup),
        xytext=(10, 8),
        textcoords="offset points",
        color=WINNER_COLOUR,
        fontweight="bold",
    )


def _draw_not_timed(strip: Axes, points: list[TrialPoint], unplaced: int) -> None:
    """The strip under the plot: rejected trials at their fidelity, hollow and grey, with no speedup axis."""
    strip.scatter(
        [p.fidelity for p in points],
        [0.0] * len(points),
        s=40,
        facecolors="none",
        edgecolors=NOT_TIMED_COLOUR,
        linewidths=1.2,
    )
    strip.set_yticks([])
    strip.set_ylim(-1.0, 1.0)
    label = "not timed (missed a goal)"
    if unplaced:
        label += f"; {unplaced} more without this figure (failed, duplicate or not measured)"
    strip.set_title(label, fontsize=9, color=NOT_TIMED_COLOUR, loc="left")


def _png_bytes(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)  # attaches itself to the figure: no backend is chosen globally
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def pareto_png(tune: dict[str, Any]) -> bytes:
    """Speedup against fidelity for every trial, with the Pareto front, the goals, the original and the winner."""
    return _png_bytes(pareto_figure(tune))


def pareto_figure(tune: dict[str, Any]) -> Figure:
    """The figure pareto_png paints (tests read its artists)."""
    trials = tune.get("trials") or []
    metric = fidelity_metric(tune)
    higher = _higher_is_better(tune, metric)
    timed, not_timed = timed_points(tune, metric), _not_timed_points(trials, metric)
    figure = Figure(figsize=(10, 6.5), layout="constrained")
    # Not shared: timed trials crowd just above the goal, rejected ones spread far below it; each panel gets
    # the range of its own points (the top one also the goal and the original).
    ax, strip = figure.subplots(2, 1, gridspec_kw={"height_ratios": [6, 1]})
    _draw_original(ax, higher)
    _draw_timed(ax, timed, higher)
    _draw_winner(ax, timed, winner_number(tune))
    _draw_not_timed(strip, not_timed, len(trials) - len(timed) - len(not_timed))
    _zoom(ax, tune, metric, timed, 1.0 if higher else 0.0)
    if not higher:
        for panel in (ax, strip):
            panel.invert_xaxis()  # better fidelity to the right whichever way the metric runs
    _draw_goals([ax, strip], tune, metric)
    ax.set_ylabel("speedup over the original (×)")
    unit = ""
    if percent_figure(metric):
        # In percent like its goal ('accuracy_drop<=1%') and the page's tables, not as a fraction (0.010).
        unit = ", %"
        for panel in (ax, strip):
            panel.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    label = f"{metric} vs the original{unit} ({'higher' if higher else 'lower'} is better)"
    ax.set_xlabel(label)
    strip.set_xlabel(label)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    ax.set_title(f"{model_name(tune)}: speedup vs {metric}, {len(trials)} trials", parse_math=False)
    return figure


def _short(name: str) -> str:
    if len(name) <= _LABEL_CHARS:
        return name
    half = (_LABEL_CHARS - 1) // 2
    return f"{name[:half]}…{name[-half:]}"


def attribution_png(winner: dict[str, Any]) -> bytes | None:
    """The winner's nodes that lose the most fidelity (local_drop), top 15 as horizontal bars; None when none."""
    rows = [r for r in (winner or {}).get("attribution") or [] if r.get("local_drop") is not None]
    if not rows:
        return None
    top = sorted(rows, key=lambda r: float(r["local_drop"]), reverse=True)[:ATTRIBUTION_TOP]
    top.reverse()  # barh draws bottom-up: the largest drop ends up on top
    labels = [_short(f"{r.get('node', '?')} ({r.get('op', '?')})") for r in top]
    figure = Figure(figsize=(9, 1.2 + 0.38 * len(top)), layout="constrained")
    ax = figure.subplots()
    positions = list(range(len(top)))
    ax.barh(positions, [float(r["local_drop"]) for r in top], color=TIMED_COLOUR)
    # parse_math off: node names are the user's and may hold "$", which would start mathtext.
    ax.set_yticks(positions, labels=labels, parse_math=False, fontsize=9)
    ax.set_xlabel("cosine lost across the node (its inputs' cosine − its output's, vs the original)")
    ax.set_title(f"Where trial {winner.get('number', '?')} loses fidelity (top {len(top)} nodes)")
    ax.grid(True, axis="x", alpha=0.3)
    return _png_bytes(figure)
