"""Compare this run with a stored --json report (same provider and shape rows)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from optimizer_cli.errors import UserInputError


def load_baseline(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise UserInputError("baseline report not found", path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"baseline is not a JSON report ({exc.__class__.__name__})", path) from exc
    bench = data.get("benchmark") if isinstance(data, dict) else None
    if not isinstance(bench, dict) or "rows" not in bench:
        raise UserInputError("baseline JSON has no benchmark rows (write one with --json)", path)
    rows = bench["rows"]
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("provider"), str) for r in rows):
        raise UserInputError(
            "baseline JSON's benchmark.rows is not a list of provider rows (write one with --json)", path
        )
    for row in rows:
        for section in ("latency_optimized", "accuracy_optimized", "fidelity", "speedup"):
            if row.get(section) is not None and not isinstance(row[section], dict):
                raise UserInputError(f"baseline row '{row['provider']}' has a malformed '{section}'", path)
    return data


def provenance_warnings(current: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    """A baseline of another model or recipe compares apples with pears: say so."""
    notes = []
    now, then = current.get("input_sha256"), baseline.get("input_sha256")
    if then is None:
        notes.append("the baseline report records no input model hash: cannot tell whether it is the same model")
    elif now != then:
        notes.append(
            f"the baseline was measured on a different input model (sha256 {then[:12]} vs {now[:12] if now else '?'})"
        )
    rec_now, rec_then = current.get("recipe"), baseline.get("recipe")
    if isinstance(rec_now, dict) and isinstance(rec_then, dict) and rec_now.get("passes") != rec_then.get("passes"):
        notes.append("the baseline used a different recipe (its passes differ)")
    return notes


def compare(current: dict[str, Any], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """Per provider/shape: optimized p50/p90 now vs then, and top-1/cosine now vs then."""

    def key(row: dict) -> tuple[str, str]:
        return row["provider"], row.get("shape") or ""

    base_rows = {key(r): r for r in baseline["benchmark"]["rows"] if r.get("usable")}
    out = []
    for row in current["benchmark"]["rows"]:
        if not row.get("usable") or key(row) not in base_rows:
            continue
        base = base_rows[key(row)]

        def get(r: dict, *path: str) -> float | None:
            node: Any = r
            for p in path:
                if not isinstance(node, dict) or node.get(p) is None:
                    return None
                node = node[p]
            return node

        entry: dict[str, Any] = {"provider": row["provider"], "shape": row.get("shape") or ""}
        for name, path in (
            ("p50_ms", ("latency_optimized", "p50_ms")),
            ("p90_ms", ("latency_optimized", "p90_ms")),
            ("top1", ("accuracy_optimized", "top1")),
            ("cosine", ("fidelity", "cosine_min")),
            ("speedup", ("speedup", "median")),
        ):
            now, then = get(row, *path), get(base, *path)
            entry[name] = {"now": now, "baseline": then}
        p50 = entry["p50_ms"]
        entry["p50_ratio"] = p50["now"] / p50["baseline"] if p50["now"] and p50["baseline"] else None
        out.append(entry)
    return out
