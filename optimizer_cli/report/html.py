"""One self-contained HTML page for a tune document (best.tune.json): verdict, Pareto plot, trials, attribution.

The page carries everything inline (CSS in a <style>, pictures as base64 data URIs) and no JavaScript, so it
can be mailed or archived as one file and opened offline. Every value from the document goes through
html.escape: node names, recipe summaries and reasons come from the user's model and recipe.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable
from typing import Any

from optimizer_cli.report.tune_doc import (
    final_timings,
    model_name,
    percent_figure,
    trials_by_number,
    winner_number,
)

MAX_CANDIDATES_SHOWN = 10

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
code { background: #f3f3f3; padding: 0 0.25em; border-radius: 3px; }
.summary { color: #555; }
.verdict { border: 2px solid; border-radius: 6px; padding: 0.8em 1.2em; margin: 1.2em 0; }
.verdict.found { border-color: #2e7d32; background: #edf7ee; }
.verdict.none { border-color: #c62828; background: #fdeeee; }
.verdict p { margin: 0.3em 0; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.num { text-align: right; white-space: nowrap; }
tr.rejected td { color: #777; background: #f6f6f6; font-style: italic; }
tr.failed td { color: #8a1c1c; background: #fbecec; }
tr.duplicate td { color: #999; }
tr.winner td { background: #fde6f2; font-weight: bold; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any, fmt: str = ".3f") -> str:
    return "-" if value is None else format(float(value), fmt)


def _speedup(speedup: dict[str, Any] | None) -> str:
    """'1.80× [1.70–1.90]': the median and its 95% interval, 'noisy' when wide (as the run's table marks it);
    '-' when the trial was not timed."""
    if not speedup or speedup.get("median") is None:
        return "-"
    text = f"{float(speedup['median']):.2f}×"
    if speedup.get("ci_low") is not None and speedup.get("ci_high") is not None:
        text += f" [{float(speedup['ci_low']):.2f}–{float(speedup['ci_high']):.2f}]"
    return text + (" noisy" if speedup.get("noisy") else "")


def _fidelity(fidelity: dict[str, Any] | None) -> str:
    """'cosine 0.9950, accuracy_drop 0.40%, nonfinite 0': percent figures as percentage points, counts whole,
    other figures with 4 decimals."""
    parts = []
    for key, value in (fidelity or {}).items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            parts.append(f"{key} {value}")  # a figure the page does not know how to format is shown as it is
        elif percent_figure(key):
            # Accuracy, its drop and agreements in percent, as goals and the run's table write them.
            parts.append(f"{key} {100 * value:.2f}%")
        elif isinstance(value, int):
            parts.append(f"{key} {value}")  # a count (nonfinite values): never '0.0000'
        else:
            parts.append(f"{key} {value:.4f}")  # similarities and errors
    return ", ".join(parts) or "-"


def _params(params: dict[str, Any] | None) -> str:
    """'quantize=static, per_channel=true': values as the JSON document spells them, strings unquoted."""
    shown = (f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in (params or {}).items())
    return ", ".join(shown) or "-"


def _image(png: bytes, element_id: str, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img id="{_e(element_id)}" src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _table(head: list[str] | None, rows: Iterable[tuple[str, list[str]]], table_id: str) -> str:
    """A table from already-escaped cells; each row comes with its CSS class ('' for none)."""
    header = "" if head is None else "<thead><tr>" + "".join(f"<th>{cell}</th>" for cell in head) + "</tr></thead>"
    body = []
    for css_class, cells in rows:
        attribute = f' class="{css_class}"' if css_class else ""
        body.append(f"<tr{attribute}>" + "".join(cells) + "</tr>")
    return f'<table id="{table_id}">{header}<tbody>\n' + "\n".join(body) + "\n</tbody></table>"


def _budget(budget: dict[str, Any]) -> str:
    """'600 s or 50 trials': whichever limits the search had."""
    limits = []
    if budget.get("seconds") is not None:
        limits.append(f"{float(budget['seconds']):.0f} s")
    if budget.get("trials") is not None:
        limits.append(f"{budget['trials']} trials")
    return " or ".join(limits) or "none"


def _heading(tune: dict[str, Any]) -> str:
    goals = ", ".join(f"<code>{_e(g)}</code>" for g in tune.get("goals") or []) or "none"
    original = tune.get("original") or {}
    size = original.get("bytes")
    trials = len(tune.get("trials") or [])
    facts = [
        f"providers {_e(', '.join(map(str, tune.get('providers') or [])) or '-')}",
        f"{_e(tune.get('threads', '-'))} threads",
        f"{trials} trials in {_number(tune.get('elapsed_s'), '.0f')} s (budget {_e(_budget(tune.get('budget') or {}))})",
        f"original: p50 {_number(original.get('p50_ms'))} ms, {'-' if size is None else f'{size / 1e6:.2f}'} MB",
    ]
    return (
        f"<h1>Tune report: {_e(model_name(tune))}</h1>\n"
        f'<p class="summary">Model <code>{_e(tune.get("model", "-"))}</code></p>\n'
        f'<p class="summary">Goals: {goals}</p>\n'
        f'<p class="summary">{" · ".join(facts)}</p>'
    )


def _verdict_found(tune: dict[str, Any], number: int) -> str:
    trial = trials_by_number(tune).get(number, {})
    winner = {**trial, **(tune.get("winner") or {})}  # the winner section is the fuller one when present
    speedup = winner.get("speedup") or {}
    interval = ""
    if speedup.get("ci_low") is not None and speedup.get("ci_high") is not None:
        interval = f" (95% interval {float(speedup['ci_low']):.2f}–{float(speedup['ci_high']):.2f}×)"
    reason = (tune.get("final") or {}).get("reason")
    return (
        '<section class="verdict found" id="verdict">\n'
        f"<p><strong>Winner: trial {number}</strong>, "
        f"{_number(speedup.get('median'), '.2f')}× faster than the original{_e(interval)}</p>\n"
        f"<p>Fidelity: {_e(_fidelity(winner.get('fidelity')))}</p>\n"
        f"<p>Recipe: {_e(winner.get('recipe_summary') or '-')}</p>\n"
        + (f"<p>Why: {_e(reason)}</p>\n" if reason else "")
        + _deploy(winner.get("deploy"))
        + "</section>"
    )


def _deploy(deploy: dict[str, Any] | None) -> str:
    """Where and how the winner runs as it was measured, and the Python that creates its session."""
    if not deploy:
        return ""
    facts = [f"target {deploy.get('target')}", str(deploy.get("provider"))]
    facts += [f"{k} {deploy[k]}" for k in ("device", "precision", "threads") if deploy.get(k)]
    return f'<p>Deploy: {_e(", ".join(facts))}</p>\n<pre class="deploy">{_e(deploy.get("python") or "")}</pre>\n'


def _verdict_none(tune: dict[str, Any]) -> str:
    final = tune.get("final") or {}
    trials = trials_by_number(tune)
    candidates = list(final.get("candidates") or [])
    parts = [
        '<section class="verdict none" id="verdict">',
        f"<p><strong>No winner.</strong> {_e(final.get('reason') or 'The tuner gave no reason.')}</p>",
    ]
    if not candidates:
        parts.append("<p>No trial became a candidate.</p>")
    else:
        parts.append(f"<p>Closest candidates ({len(candidates)}):</p>")
        rows = []
        for c in candidates[:MAX_CANDIDATES_SHOWN]:
            summary = trials.get(int(c.get("number", -1)), {}).get("recipe_summary", "-")
            meets = {True: "yes", False: "no"}.get(c.get("meets_goals"), "-")
            cells = [c.get("number", "-"), summary, _speedup(c.get("speedup")), _number(c.get("p50_ms")), meets]
            rows.append(("", [f"<td>{_e(cell)}</td>" for cell in cells]))
        parts.append(_table(["trial", "recipe", "speedup [95%]", "p50 ms", "meets goals"], rows, "candidates"))
        if len(candidates) > MAX_CANDIDATES_SHOWN:
            parts.append(f"<p>… and {len(candidates) - MAX_CANDIDATES_SHOWN} more in the JSON document.</p>")
    parts.append("</section>")
    return "\n".join(parts)


def _verdict(tune: dict[str, Any]) -> str:
    winner = winner_number(tune)
    return _verdict_none(tune) if winner is None else _verdict_found(tune, winner)


def _trials_table(tune: dict[str, Any]) -> str:
    winner = winner_number(tune)
    finals = final_timings(tune)
    head = ["#", "state", "recipe", "params", "fidelity", "speedup [95%]", "p50 ms", "reason"]
    rows = []
    for t in tune.get("trials") or []:
        state = str(t.get("state") or "-")
        # One speed per candidate: the final round's where it was re-timed there (the verdict's), marked so.
        final = finals.get(int(t["number"])) if t.get("number") is not None else None
        speedup = _speedup(final["speedup"] if final else t.get("speedup")) + (" (final timing)" if final else "")
        p50 = final["p50_ms"] if final else t.get("p50_ms")
        css_class = "winner" if winner is not None and t.get("number") == winner else state
        cells = [
            f'<td class="num">{_e(t.get("number", "-"))}</td>',
            f"<td>{_e(state)}</td>",
            f"<td>{_e(t.get('recipe_summary') or '-')}</td>",
            f"<td>{_e(_params(t.get('params')))}</td>",
            f"<td>{_e(_fidelity(t.get('fidelity')))}</td>",
            f'<td class="num">{_e(speedup)}</td>',
            f'<td class="num">{_number(p50)}</td>',
            f"<td>{_e(t.get('reason') or '')}</td>",
        ]
        rows.append((_e(css_class), cells))
    return _table(head, rows, "trials")


def _plain(value: Any) -> str:
    """A value as a reader writes it: lists comma-separated ('none' when empty), no Python reprs, '-' for None."""
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_plain(v)}" for k, v in value.items()) or "none"
    return str(value)


def _key_value_table(values: dict[str, Any], table_id: str) -> str:
    rows = [("", [f"<th>{_e(key)}</th>", f"<td>{_e(_plain(value))}</td>"]) for key, value in values.items()]
    return _table(None, rows, table_id)


def _space(tune: dict[str, Any]) -> str:
    space = tune.get("space") or {}
    if not space:
        return "<p>The document lists no search space.</p>"
    return _key_value_table(space, "space")


def _outputs(tune: dict[str, Any]) -> str:
    outputs = tune.get("outputs") or {}
    if not outputs:
        return "<p>No outputs were listed.</p>"
    # A file the run did not write (no winner: no model) is said so, not listed as a path named "None".
    items = "".join(
        f"<li>{_e(kind)}: <code>{_e(path)}</code></li>" if path else f"<li>{_e(kind)}: not written</li>"
        for kind, path in outputs.items()
    )
    return f'<ul id="outputs">{items}</ul>'


def _attribution(tune: dict[str, Any], attribution_png: bytes | None) -> str:
    winner = tune.get("winner") or {}
    if attribution_png is None:
        if not winner:
            return "<p>There is no winner, so there is no attribution.</p>"
        return "<p>There is no attribution for the winner (no node's output was compared, or none lost fidelity).</p>"
    alt = f"Nodes of trial {winner.get('number', '?')} that lose the most cosine against the original"
    return _image(attribution_png, "attribution", alt)


def tune_html(tune: dict[str, Any], pareto_png: bytes, attribution_png: bytes | None) -> str:
    """The whole report page for a tune document and its two pictures (from report.plot)."""
    model = model_name(tune)
    trials = tune.get("trials") or []
    pareto_alt = f"Speedup against fidelity of {len(trials)} trials of {model}, with the Pareto front and goals"
    sections = [
        _heading(tune),
        _verdict(tune),
        "<h2>Speedup vs fidelity</h2>",
        _image(pareto_png, "pareto", pareto_alt),
        "<h2>Trials</h2>",
        _trials_table(tune),
        "<h2>Where the winner loses fidelity</h2>",
        _attribution(tune, attribution_png),
        "<h2>Search space</h2>",
        _space(tune),
        "<h2>Environment</h2>",
        _key_value_table(tune["environment"], "environment")
        if tune.get("environment")
        else "<p>The document records no environment.</p>",
        "<h2>Outputs</h2>",
        _outputs(tune),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>Tune report: {_e(model)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )
