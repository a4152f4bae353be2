"""Render a run report (the same dict --json prints) as rich tables or Markdown."""

from __future__ import annotations

import textwrap
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from optimizer_cli.bench.environment import cpu_label
from optimizer_cli.runtime.targets import parse_target


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
        provider = r["provider"] + (f" {r['shape']}" if r["shape"] else "") + _fallback_mark(r)
        alone = r.get("engine_alone")
        # A target other than the reference with no "engine alone" figure (the engine refused the original) is
        # compared with the original on the CPU EP: its first line says so.
        elsewhere = bool(r.get("target")) and not parse_target(r["target"]["target"]).is_reference
        lines = [("original (cpu)" if elsewhere and not alone else "original", bench["original_bytes"])]
        if alone:  # another engine: the reference (the CPU EP), the original on this target, then the optimized
            lines = [("original (cpu)", bench["original_bytes"]), ("original", bench["original_bytes"])]
        for which, size in [*lines, ("optimized", bench["optimized_bytes"])]:
            if which == "original" and alone:
                lat, acc, sp, fid, mem = alone["latency"], alone["accuracy"], alone["speedup"], alone["fidelity"], None
            else:
                key = "optimized" if which == "optimized" else "original"
                lat, acc, mem = r[f"latency_{key}"], r[f"accuracy_{key}"], r[f"memory_{key}_mb"]
                sp, fid = (r["speedup"], r["fidelity"]) if which == "optimized" else (None, None)
            rows.append(
                [
                    "",
                    which,
                    _mb(size),
                    _f(lat["p50_ms"]),
                    _f(lat["p90_ms"]),
                    _f(lat["p99_ms"]),
                    _f(lat["throughput"], ".1f"),
                    _speed_text(sp),
                    _pct(acc["top1"]) if acc else "-",
                    _f(fid["cosine_min"], ".5f") if fid else "",
                    _pct(fid["top1_agreement"]) if fid and fid["top1_agreement"] is not None else "",
                    _f(mem, ".1f"),
                ]
            )
        rows[-len(lines) - 1][0] = provider
    return head, rows


def _speed_text(sp: dict[str, Any] | None) -> str:
    if not sp:
        return ""
    speed = f"{sp['median']:.2f}x [{sp['ci_low']:.2f}, {sp['ci_high']:.2f}]"
    speed += " noisy" if sp["noisy"] else ""
    speed += " n.s." if not sp["significant"] else ""
    return speed + (" SLOWER" if sp["ci_high"] < 1.0 else "")


# A target whose provider ran under half of the optimized model's nodes is labelled: its speed is mostly
# the CPU EP's, whatever the row's name says.
MOSTLY_FALLBACK = 0.5


def _fallback_mark(row: dict[str, Any]) -> str:
    share = row.get("fallback_share")
    if share is None or share <= 0:
        return ""
    where = f"{share:.0%} of nodes fell back"
    return f" ({where}: mostly fallback)" if share >= MOSTLY_FALLBACK else f" ({where})"


def unusable_lines(report: dict[str, Any]) -> list[str]:
    """The providers looked for and not usable here, in one line (each with why)."""
    missing = [f"{r['provider']} ({r['reason']})" for r in report["benchmark"]["rows"] if not r["usable"]]
    return [f"not benchmarked, not usable here: {'; '.join(missing)}"] if missing else []


_FIGURES = (
    ("top1_agreement", "top-1 agree"),
    ("top5_agreement", "top-5 agree"),
    ("position_agreement", "position agree"),
    ("map_iou", "map IoU"),
    ("nn_agreement", "NN agree"),
)


def fidelity_lines(report: dict[str, Any]) -> list[str]:
    """One line per provider and output: its kind, why, and the figures that mean something for it."""
    out, seen = [], set()
    for r in report["benchmark"]["rows"]:
        fid = r.get("fidelity") if r["usable"] else None
        if not fid or r["provider"] in seen:
            continue
        seen.add(r["provider"])  # sweep points share one fidelity measurement
        for p in fid.get("per_output", []):
            at = f"@{p['map_threshold']:g}" if p.get("map_threshold") is not None else ""
            figures = [
                f"{label}{at if key == 'map_iou' else ''} {_pct(p[key])}"
                for key, label in _FIGURES
                if p.get(key) is not None
            ]
            figures += [f"cosine min {_f(p['cosine_min'], '.5f')}", f"rel-L2 {_f(p['rel_l2'], '.3g')}"]
            out.append(f"{r['provider']} {p['name']}: {p['kind']} ({p['reason']}): " + ", ".join(figures))
    return out


def accuracy_lines(report: dict[str, Any]) -> list[str]:
    """The task metric (builtin:cer, builtin:miou or the user's), original vs optimized, once per provider."""
    out, seen = [], set()
    for r in report["benchmark"]["rows"]:
        a, b = (r.get("accuracy_original"), r.get("accuracy_optimized")) if r["usable"] else (None, None)
        if not a or not b or a.get("metric") is None or r["provider"] in seen:
            continue
        seen.add(r["provider"])
        direction = "lower" if b.get("lower_is_better") else "higher"
        out.append(
            f"{r['provider']} {a.get('metric_name') or 'metric'}: {a['metric']:.4g} original, "
            f"{b['metric']:.4g} optimized ({direction} is better)"
        )
    return out


def setup_lines(report: dict[str, Any]) -> list[str]:
    """Session setup (incl. TensorRT engine build) is reported apart from latency."""
    out = []
    for r in report["benchmark"]["rows"]:
        if r["usable"] and r.get("setup_s_original") is not None:
            out.append(
                f"{r['provider']}: session setup {r['setup_s_original']:.2f}s original, {r['setup_s_optimized']:.2f}s optimized"
            )
    return out


def verdict_line(report: dict[str, Any]) -> str:
    """The run's outcome in one phrase (speedup 95% intervals): faster, slower, no significant change, ..."""
    verdict = report["benchmark"].get("verdict", "not measured")
    meaning = {
        "faster": "the optimized model is significantly faster on every measured provider",
        "slower": "the optimized model is significantly SLOWER than the original on every measured provider",
        "no significant change": "no significant speed difference (the 95% intervals include 1.0)",
        "mixed": "faster on some providers, not on others",
        "not measured": "no provider could be measured",
    }
    return f"verdict: {verdict}: {meaning.get(verdict, '')}"


# The text columns; every other column holds numbers (or short codes) and is never wrapped, so a
# value is never split mid-digit.
_STAGE_TEXT = {"pass", "details"}
_BENCH_TEXT = {"provider", "model"}
# Text columns wrap at spaces and fold inside a word only past this width (long shapes, stats).
_NAME_MIN = 12
# When the benchmark table is wider than the terminal it is printed as two: latency, then accuracy.
_BENCH_SPLIT = (
    ["provider", "model", "size", "p50 ms", "p90 ms", "p99 ms", "thru/s", "mem MB"],
    ["provider", "model", "speedup [95% CI]", "top-1", "cosine min", "top-1 agree"],
)


def _table(title: str, head: list[str], rows: list[list[str]], text_columns: set[str], compact: bool) -> Table:
    """Numeric columns: no_wrap, as wide as their widest value, header wrapped at spaces to fit;
    text columns: see _NAME_MIN. compact: no outer edge or vertical rules, two spaces between
    columns (for narrow terminals)."""
    style: dict[str, Any] = (
        {"box": box.SIMPLE_HEAD, "show_edge": False, "pad_edge": False, "collapse_padding": True} if compact else {}
    )
    t = Table(title=title, title_justify="left", **style)
    for i, h in enumerate(head):
        cells = [row[i] for row in rows]
        if h in text_columns:
            longest = max(len(w) for c in [h, *cells] for w in c.split() or [""])
            # Names and shapes: whole words up to _NAME_MIN, folded (never cut with an ellipsis) past it.
            t.add_column(escape(h), min_width=min(longest, _NAME_MIN), overflow="fold")
            continue
        width = max([len(c) for c in cells] + [len(w) for w in h.split()])
        t.add_column(escape("\n".join(textwrap.wrap(h, width))), no_wrap=True, min_width=width)
    for row in rows:
        t.add_row(*(escape(c) for c in row))
    return t


def _min_width(head: list[str], rows: list[list[str]], text_columns: set[str], compact: bool) -> int:
    """Narrowest rendering of _table that cuts no value and no word. rich's own measure lets no_wrap
    columns squeeze text columns to nothing, so count here: per column 2 padding + 1 rule (plus the
    closing rule), or in compact style 2 spaces between columns."""
    widths = []
    for i, h in enumerate(head):
        words = [w for c in [h] + [row[i] for row in rows] for w in c.split()] or [""]
        if h in text_columns:
            widths.append(min(max(len(w) for w in words), _NAME_MIN))
        else:
            widths.append(max([len(w) for w in words] + [len(row[i]) for row in rows]))
    return sum(widths) + (2 * (len(head) - 1) if compact else 3 * len(head) + 1)


def _style_for(console: Console, head: list[str], rows: list[list[str]], text: set[str], room: int = 0) -> bool | None:
    """False: the normal style fits (with `room` to spare); True: only the compact one; None: neither."""
    for compact in (False, True):
        if _min_width(head, rows, text, compact) + room <= console.width:
            return compact
    return None


def _columns(head: list[str], rows: list[list[str]], keep: list[str]) -> tuple[list[str], list[list[str]]]:
    index = [head.index(h) for h in keep]
    return [head[i] for i in index], [[row[i] for i in index] for row in rows]


# -q: the result alone, short enough to read at a glance (<= 12 lines for the quick start): latency at the
# median, the speedup and the two quality figures; the rest is in the full table, --json and --markdown.
_QUIET_BENCH = ["provider", "model", "size", "p50 ms", "speedup [95% CI]", "top-1", "cosine min"]


def render_quiet(report: dict[str, Any], console: Console) -> None:
    """What -q prints: the benchmark table (its essential columns, compact), the task metric, unusable
    providers, the verdict and the gates; without a benchmark, the pass table is the result. SLOWER and
    fallback marks live in the cells, so they stay."""
    if not report.get("benchmark"):
        render_rich({k: v for k, v in report.items() if k in ("stages", "recipe", "gates")}, console)
        return
    head, rows = _columns(*bench_rows(report), _QUIET_BENCH)
    console.print(_table("", head, rows, _BENCH_TEXT, compact=True))
    for line in accuracy_lines(report) + unusable_lines(report):
        console.print(f"  {escape(line)}")
    console.print(verdict_line(report))
    for gate in report.get("gates", []):
        color = "red" if gate["violated"] else "green"
        console.print(f"[{color}]fail-if {gate['expression']}: {gate['detail']}[/{color}]")


def stage_title(report: dict[str, Any]) -> str:
    """'Passes: NAME (drift on 4 verification samples from FILE)': the stage table's cosine is the worst of those
    few samples, not of the benchmark's, so its figures are said to be read elsewhere."""
    title = f"Passes: {report.get('recipe', {}).get('name', '')}"
    seen = report.get("verification")
    if seen and any(s.get("drift_vs_original") for s in report.get("stages", [])):
        title += f" (drift on {seen['samples']} verification samples from {seen['source']})"
    return title


def bench_title(report: dict[str, Any]) -> str:
    """'Benchmark (256 of 397 samples from FILE; ORT ..., CPU)': the count read, and the file's when it holds more
    (tune reads all of them by default, so its figures on the same file may differ)."""
    bench = report["benchmark"]
    read, available = bench["eval_samples"], bench.get("eval_available")
    count = f"{read} of {available}" if available is not None and available > read else str(read)
    env = bench["environment"]
    return f"Benchmark ({count} samples from {bench['eval_source']}; ORT {env['onnxruntime']}, {cpu_label(env)})"


def attribution_head(attribution: dict[str, Any]) -> list[str]:
    """The ranking's cosine is a mean over the first few samples: beside the benchmark's min it would disagree."""
    n = attribution.get("ranked_samples")
    cosine = f"mean cosine of output (first {n} samples)" if n else "cosine of output"
    return ["node", "op", cosine, "local drop"]


def render_rich(report: dict[str, Any], console: Console) -> None:
    if report.get("stages"):
        head, rows = stage_rows(report)
        title = stage_title(report)
        without = _columns(head, rows, head[:-1])
        # A details column squeezed under 30 characters is unreadable: then the details go under the
        # table, one line per pass.
        compact = _style_for(console, *without, _STAGE_TEXT, room=30 + 3)
        if compact is not None:
            console.print(_table(title, head, rows, _STAGE_TEXT, compact))
        else:
            console.print(_table(title, *without, _STAGE_TEXT, _style_for(console, *without, _STAGE_TEXT) is not False))
            for row in rows:
                if row[-1]:
                    console.print(f"  {escape(row[0])} {escape(row[1])}: {escape(row[-1])}")
    if report.get("benchmark"):
        head, rows = bench_rows(report)
        title = bench_title(report)
        compact = _style_for(console, head, rows, _BENCH_TEXT)
        if compact is not None:
            console.print(_table(title, head, rows, _BENCH_TEXT, compact))
        else:
            for n, keep in enumerate(_BENCH_SPLIT):
                part = _columns(head, rows, keep)
                style = _style_for(console, *part, _BENCH_TEXT) is not False
                console.print(_table("" if n else title, *part, _BENCH_TEXT, style))
        for line in accuracy_lines(report) + fidelity_lines(report) + setup_lines(report) + unusable_lines(report):
            console.print(f"  {escape(line)}")
        console.print(verdict_line(report))
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
            for h in attribution_head(attribution):
                t.add_column(escape(h))
            for item in attribution["nodes"][:10]:
                t.add_row(escape(item["node"]), item["op"], f"{item['cosine']:.5f}", f"{item['local_drop']:.5f}")
            console.print(t)
        if attribution.get("search"):
            console.print(f"  {escape(attribution['search'])}")
        if attribution.get("patch"):
            console.print(f"[bold]Recipe patch[/bold] (fidelity {attribution['patch_fidelity']:.5f}):")
            # On its own line and soft-wrapped: the terminal folds it, a copy-paste gets one intact line.
            console.print(f"  {escape(attribution['patch'])}", soft_wrap=True)
    for gate in report.get("gates", []):
        color = "red" if gate["violated"] else "green"
        console.print(f"[{color}]fail-if {gate['expression']}: {gate['detail']}[/{color}]")
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
        parts.append(f"**{_md_cell(stage_title(report))}**")
        parts.append(_md_table(*stage_rows(report)))
    if report.get("benchmark"):
        parts.append(f"**{_md_cell(bench_title(report))}**")
        parts.append(_md_table(*bench_rows(report)))
        parts.extend(
            f"- {line}"
            for line in accuracy_lines(report) + fidelity_lines(report) + setup_lines(report) + unusable_lines(report)
        )
        parts.append(f"**{verdict_line(report)}**")
        env = report["benchmark"]["environment"]
        parts.append(
            f"_{env['tool']}, onnxruntime {env['onnxruntime']}, {cpu_label(env)}, GPUs: {', '.join(env['gpus']) or 'none'}_"
        )
    for gate in report.get("gates", []):
        parts.append(f"- fail-if `{gate['expression']}`: {'VIOLATED' if gate['violated'] else 'ok'} ({gate['detail']})")
    attribution = report.get("attribution") or {}
    if attribution.get("search"):  # which stage lost the fidelity, and on which samples the patch was confirmed
        parts.append(f"- {attribution['search']}")
    if attribution.get("patch"):
        fidelity = attribution.get("patch_fidelity")
        said = f" (fidelity {fidelity:.5f})" if fidelity is not None else ""
        parts.append(f"Recipe patch{said}: `{attribution['patch']}`")
    for note in report.get("notes", []):
        parts.append(f"- note: {note}")
    return "\n\n".join(parts) + "\n"
