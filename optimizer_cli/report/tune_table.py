"""Render a tune document (tune.json, what `optimize tune --json` prints) as a rich table and its verdict."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def render_tune(doc: dict[str, Any], console: Console, quiet: bool = False) -> None:
    """The finalists' table and the trial counts (not with `quiet`), then the winner or why there is none."""
    if not quiet:  # -q: the winner (or why there is none) alone
        console.print(tune_table(doc))
        counts: dict[str, int] = {}
        for trial in doc["trials"]:
            counts[trial["state"]] = counts.get(trial["state"], 0) + 1
        console.print(
            f"{len(doc['trials'])} trials ({', '.join(f'{n} {k}' for k, n in counts.items())}) in "
            f"{doc['elapsed_s'] / 60:.1f} min; stopped: {doc['stopped']}"
        )
    if doc["winner"]:
        _print_winner(doc, console)
    else:
        final = doc["final"]
        console.print(f"[bold red]no winner[/bold red]: {escape(final['reason'])}; no model written")
        for c in final.get("closest", []):
            console.print(f"  closest: trial {c['number']}: {escape(c['recipe_summary'])}: {escape(str(c['reason']))}")


def tune_table(doc: dict[str, Any]) -> Table:
    """The original and each finalist: speedup with its 95% interval, p50, cosine (and accuracy), verdict."""
    final = doc["final"]
    table = Table(title=f"tune: {doc['model']} (goals: {', '.join(doc['goals'])})", title_justify="left")
    candidates = final.get("candidates", [])
    # With labels, the accuracy (and its drop, the figure an accuracy goal reads) in percent like the goals.
    labelled = any((c.get("fidelity") or {}).get("accuracy") is not None for c in candidates)
    columns = ["trial", "recipe", "speedup [95% CI]", "p50 ms", "cosine", *(["accuracy (drop)"] if labelled else [])]
    for col in [*columns, "verdict"]:
        table.add_column(col)
    base = doc["original"].get("p50_ms")
    table.add_row("-", "original", "1.00", f"{base:.3f}" if base else "-", "1.0000", *([""] if labelled else []), "")
    for c in candidates:
        s, fid = c["speedup"], c["fidelity"]
        verdict = (
            "WINNER" if c["number"] == final.get("winner") else ("ok" if c["meets_goals"] else "; ".join(c["misses"]))
        )
        accuracy = []
        if labelled:
            acc, drop = fid.get("accuracy"), fid.get("accuracy_drop")
            accuracy = [f"{100 * acc:.2f}% ({100 * drop:+.2f}%)" if acc is not None and drop is not None else "-"]
        table.add_row(
            str(c["number"]),
            escape(c["recipe_summary"]),
            f"{s['median']:.2f} [{s['ci_low']:.2f}, {s['ci_high']:.2f}]",
            f"{c['p50_ms']:.3f}",
            f"{fid['cosine']:.4f}",
            *accuracy,
            escape(verdict),
        )
    return table


def _print_winner(doc: dict[str, Any], console: Console) -> None:
    w = doc["winner"]
    console.print(
        f"winner: trial {w['number']}: {escape(w['recipe_summary'])}: {w['speedup']['median']:.2f}x "
        f"[{w['speedup']['ci_low']:.2f}, {w['speedup']['ci_high']:.2f}], cosine {w['fidelity']['cosine']:.4f}"
    )
    deploy = w.get("deploy") or {}
    if deploy:
        console.print(
            escape(
                f"deploy: {deploy['target']} ({deploy['provider']}, {deploy['threads']} thread"
                f"{'s' if deploy['threads'] != 1 else ''}); the session: "
                f"winner.deploy.python in {doc.get('outputs', {}).get('json', 'tune.json')}"
            ),
            soft_wrap=True,
        )
