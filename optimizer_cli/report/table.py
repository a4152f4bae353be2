"""Render a run report (the same dict --json prints) as rich tables or Markdown."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from optimizer_cli.bench.environment import cpu_label


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _stats_text(stats: dict[str, Any]) -> str:
    parts = []
    for k, v in stats.items():
        if isinstance(v, dict):
            v = ", ".join(f"{kk}={vv}" for kk, vv in v.items()) or "none"
        parts.append(f"{k}: {v}")
    return "; ".join(parts)


def stage_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["#", "pass", "kind", "time", "nodes", "weights", "cos vs orig", "max|Δ| vs prev", "details"]
    rows = []
    for i, s in enumerate(report.get("stages", [])):
        orig = s["drift_vs_original"]
        prev = s["drift_vs_previous"]
        cos = min((d["cosine"] for d in orig), default=None)
        mad = max((d["max_abs"] for d in prev), default=None)
        rows.append(
            [
                str(i),
                s["name"],
                s["exactness"],
                f"{s['seconds']:.2f}s",
                str(s["nodes"]),
                _mb(s["weight_bytes"]),
                _f(cos, ".5f"),
                _f(mad, ".3g"),
                _stats_text(s["stats"]),
            ]
        )
    return head, rows


def bench_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Two rows per usable provider (original, optimized); unusable providers are listed by unusable_lines."""
    bench = report["benchmark"]
    head = [
        "provider",
        "model",
        "size",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "thru/s",
        "speedup [95% CI]",
        "top-1",
        "cosine min",
        "top-1 agree",
        "mem MB",
    ]
    rows = []
    for r in bench["rows"]:
        if not r["usable"]:
            continue
        provider = r["provider"] + (f" {r['shape']}" if r["shape"] else "")
        fid = r["fidelity"]
        for which, size in (("original", bench["original_bytes"]), ("optimized", bench["optimized_bytes"])):
            lat, acc, sp = r[f"latency_{which}"], r[f"accuracy_{which}"], r["speedup"]
            optimized = which == "optimized"
            speed = ""
            if optimized and sp:
                speed = f"{sp['median']:.2f}x [{sp['ci_low']:.2f}, {sp['ci_high']:.2f}]"
                speed += " noisy" if sp["noisy"] else ""
                speed += " n.s." if not sp["significant"] else ""
            rows.append(
                [
                    "" if optimized else provider,
                    which,
                    _mb(size),
                    _f(lat["p50_ms"]),
                    _f(lat["p90_ms"]),
                    _f(lat["p99_ms"]),
                    _f(lat["throughput"], ".1f"),
                    speed,
                    _pct(acc["top1"]) if acc else "-",
                    _f(fid["cosine_min"], ".5f") if optimized and fid else "",
                    _pct(fid["top1_agreement"]) if optimized and fid and fid["top1_agreement"] is not None else "",
                    _f(r[f"memory_{which}_mb"], ".1f"),
                ]
            )
    return head, rows


def unusable_lines(report: dict[str, Any]) -> list[str]:
    return [f"{r['provider']}: not benchmarked, {r['reason']}" for r in report["benchmark"]["rows"] if not r["usable"]]


def setup_lines(report: dict[str, Any]) -> list[str]:
    """Session setup (incl. TensorRT engine build) is reported apart from latency."""
    out = []
    for r in report["benchmark"]["rows"]:
        if r["usable"] and r.get("setup_s_original") is not None:
            out.append(
                f"{r['provider']}: session setup {r['setup_s_original']:.2f}s original, {r['setup_s_optimized']:.2f}s optimized"
            )
    return out


def render_rich(report: dict[str, Any], console: Console) -> None:
    if report.get("stages"):
        head, rows = stage_rows(report)
        t = Table(title=f"Passes: {report.get('recipe', {}).get('name', '')}", title_justify="left")
        for h in head:
            t.add_column(h, overflow="fold")
        for row in rows:
            t.add_row(*row)
        console.print(t)
    if report.get("benchmark"):
        head, rows = bench_rows(report)
        env = report["benchmark"]["environment"]
        t = Table(
            title=f"Benchmark ({report['benchmark']['eval_samples']} samples from {report['benchmark']['eval_source']}; "
            f"ORT {env['onnxruntime']}, {cpu_label(env)})",
            title_justify="left",
        )
        for h in head:
            t.add_column(h, overflow="fold")
        for row in rows:
            t.add_row(*row)
        console.print(t)
        for line in setup_lines(report) + unusable_lines(report):
            console.print(f"  {line}")
    for entry in report.get("baseline", []):
        console.print(
            f"vs baseline {entry['provider']} {entry['shape']}: p50 {_f(entry['p50_ms']['now'])} ms "
            f"(was {_f(entry['p50_ms']['baseline'])}; ratio {_f(entry['p50_ratio'], '.2f')}), "
            f"top-1 {_pct(entry['top1']['now'])} (was {_pct(entry['top1']['baseline'])})"
        )
    attribution = report.get("attribution")
    if attribution:
        if attribution["nodes"]:
            t = Table(title="Layers that cost fidelity (largest local drop first)", title_justify="left")
            for h in ("node", "op", "cosine of output", "local drop"):
                t.add_column(h)
            for item in attribution["nodes"][:10]:
                t.add_row(escape(item["node"]), item["op"], f"{item['cosine']:.5f}", f"{item['local_drop']:.5f}")
            console.print(t)
        if attribution.get("search"):
            console.print(f"  {escape(attribution['search'])}")
        if attribution.get("patch"):
            console.print(
                f"[bold]Recipe patch[/bold] (fidelity {attribution['patch_fidelity']:.5f}): {escape(attribution['patch'])}"
            )
    for gate in report.get("gates", []):
        style = "red" if gate["violated"] else "green"
        console.print(f"[{style}]fail-if {gate['expression']}: {gate['detail']}[/{style}]")
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {note}")


def _md_cell(text: str) -> str:
    """A `|` ends a Markdown cell (headers included: `max|Δ|`) and a newline ends the row."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    parts = [f"## optimizer-cli report: {report.get('input', '')} -> {report.get('output', '')}"]
    if report.get("stages"):
        parts.append(_md_table(*stage_rows(report)))
    if report.get("benchmark"):
        parts.append(_md_table(*bench_rows(report)))
        parts.extend(f"- {line}" for line in setup_lines(report) + unusable_lines(report))
        env = report["benchmark"]["environment"]
        parts.append(
            f"_{env['tool']}, onnxruntime {env['onnxruntime']}, {cpu_label(env)}, GPUs: {', '.join(env['gpus']) or 'none'}_"
        )
    for gate in report.get("gates", []):
        parts.append(f"- fail-if `{gate['expression']}`: {'VIOLATED' if gate['violated'] else 'ok'} ({gate['detail']})")
    if report.get("attribution", {}).get("patch"):
        parts.append(f"Recipe patch: `{report['attribution']['patch']}`")
    for note in report.get("notes", []):
        parts.append(f"- note: {note}")
    return "\n\n".join(parts) + "\n"
