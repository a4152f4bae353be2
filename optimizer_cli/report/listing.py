"""The read-only commands' text: `optimize passes`, `validate`, `recipes`, `inspect` and `providers`, each
rendered from the document its --json prints."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def render_passes(items: Sequence[dict[str, Any]], plugin_problems: Sequence[str], console: Console) -> None:
    """Each pass: its contract, what tune may vary in it, and a table of its options."""
    for problem in plugin_problems:  # an installed plugin pass that could not be registered
        sys.stderr.write(f"warning: plugin pass not loaded: {problem}\n")
    for item in items:
        console.print(f"[bold]{item['type']}[/bold] ({item['exactness']}): {escape(item['contract'])}")
        if item["tune_dimensions"]:
            console.print(escape(f"tune may vary: {', '.join(item['tune_dimensions'])}"))
        if item["tune_opt_in_dimensions"]:
            named = ", ".join(item["tune_opt_in_dimensions"])
            console.print(escape(f"tune may vary where a --space file names it: {named}"))
        console.print(_options_table(item["options"]))
        console.print()


def _options_table(options: dict[str, dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, show_edge=False)
    table.add_column("option", no_wrap=True)
    table.add_column("type", overflow="fold", max_width=16)
    table.add_column("default", overflow="fold", max_width=14)
    table.add_column("bounds", no_wrap=True)
    table.add_column("description", overflow="fold")
    for key, opt in options.items():
        default = opt["default"]
        # YAML spelling (true, null, [..]) rather than Python's True/None.
        shown = default if isinstance(default, str) else json.dumps(default)
        # Types like list[str] and descriptions are text, not rich markup.
        table.add_row(key, escape(opt["type"]), escape(shown), opt["bounds"] or "", escape(opt["description"]))
    return table


def render_valid_recipe(shown: str, pass_types: Sequence[str], console: Console) -> None:
    """`validate`'s line for a valid recipe: what was validated (a preset's name or the file) and its passes."""
    console.print(f"[green]ok[/green] {escape(shown)}: {len(pass_types)} passes: " + " -> ".join(pass_types))


def render_recipes(presets: Sequence[dict[str, Any]]) -> None:
    """One plain line per preset (no rich wrapping), whatever the terminal's width."""
    width = max(len(item["name"]) for item in presets)
    sys.stdout.write("".join(f"{item['name']:<{width}}  {item['summary']}\n" for item in presets))


def render_inspect(info: dict[str, Any], console: Console) -> None:
    """The model's summary (workflows/inspect.py's document): one header line, then inputs, outputs and ops."""
    console.print(
        f"[bold]{info['path']}[/bold]: {info['file_bytes'] / 1e6:.2f} MB, {info['parameters']:,} parameters, "
        f"IR {info['ir_version']}, opsets {info['opsets']}"
    )
    for i in info["inputs"]:
        console.print(f"  input  {i['name']}: {i['dtype']} {i['shape']}")
    for o in info["outputs"]:
        console.print(f"  output {o['name']}: {o['dtype']} {o['shape']}")
    console.print("  ops: " + ", ".join(f"{k}={v}" for k, v in info["ops"].items()))


def render_providers(doc: dict[str, Any], console: Console) -> None:
    """The onnxruntime packages and plugin EPs installed, then each provider: usable or why not, its devices
    and the target options it takes."""
    runtimes, plugins = doc["runtimes"], doc["plugins"]
    console.print(f"onnxruntime packages: {', '.join(runtimes) or 'none'}; plugin EPs: {', '.join(plugins) or 'none'}")
    if len(runtimes) > 1:
        console.print(
            "[yellow]warning:[/yellow] more than one onnxruntime package is installed; the last installed one wins"
        )
    for r in doc["providers"]:
        state = "[green]usable[/green]  " if r["usable"] else "[red]unusable[/red]"
        devices = ",".join(r["devices"]) or "-"
        console.print(f"  {r['alias']:9} {state} devices {devices:8} {escape(r['reason'])}", soft_wrap=True)
        console.print(f"            targets: {escape(r['options'])}", soft_wrap=True)
    console.print(
        escape("A target is PROVIDER[@DEVICE][:PRECISION][:KEY=VALUE], e.g. --providers cpu,openvino:f32,trt:fp16")
    )
