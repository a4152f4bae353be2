"""The plan of a run (`optimize run --dry-run`) as text: the passes with their options, the data, and the
optimized model's session options."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.markup import escape


def options_text(options: dict[str, Any]) -> str:
    """key=value with the recipe's (YAML/JSON) spellings: true, null, [..], not Python's True, None."""
    return ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v, default=str)}" for k, v in options.items())


def render_plan(plan: dict[str, Any], console: Console) -> None:
    """The plan document (workflows.run.plan_run) as lines; its problems are the caller's to say."""
    from optimizer_cli.recipe import SessionSettings

    console.print(escape(f"Plan: {plan['input']} -> {plan['output']} with recipe '{plan['recipe']}'"), soft_wrap=True)
    for p in plan["passes"]:
        config = {k: v for k, v in p["config"].items() if k not in ("type", "label")}
        console.print(escape(f"  {p['index']}. {p['type']} ({p['exactness']}) {options_text(config)}"), soft_wrap=True)
    data = f"  calibration: {plan['calibration'] or '-'}; evaluation: {plan['evaluation'] or 'seeded random'}"
    console.print(escape(data), soft_wrap=True)
    # What differs from onnxruntime's defaults, as the recipe would spell it.
    session = SessionSettings.model_validate(plan["session"]).model_dump(mode="json", exclude_defaults=True)
    if session:
        console.print(escape(f"  optimized model's session options: {options_text(session)}"), soft_wrap=True)
