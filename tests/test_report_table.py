"""Report rendering: Markdown tables that stay tables, rich tables readable at 80 columns."""

from __future__ import annotations

import re
from typing import Any

import pytest
from rich.console import Console

from optimizer_cli.report.table import bench_rows, render_markdown, render_rich, stage_rows

PATCH = "--set 'passes.2.reduce_range=true' --set 'passes.2.exclude_nodes=[/layer4/conv2/Conv_quant, /fc/Gemm]'"


def _latency(p50: float) -> dict[str, float]:
    return {"p50_ms": p50, "p90_ms": p50 * 1.1, "p99_ms": p50 * 1.3, "throughput": 1000 / p50}


def fake_report() -> dict[str, Any]:
    """The keys the renderers read, with wide values (4-digit latencies, a sweep shape, long stats)."""
    stage = {"drift_vs_original": [{"cosine": 0.960412}], "drift_vs_previous": [{"max_abs": 1.2345e-06}]}
    return {
        "input": "m.onnx",
        "output": "m.int8.onnx",
        "recipe": {"name": "cnn-int8"},
        "stages": [
            {
                **stage,
                "name": "cleanup",
                "exactness": "exact",
                "seconds": 0.41,
                "nodes": 12345,
                "weight_bytes": 45_030_000,
                "stats": {"folded": 3, "removed": {"Identity": 4, "dead": 12}},
            },
            {
                **stage,
                "name": "quantize",
                "exactness": "approximate",
                "seconds": 12.34,
                "nodes": 23456,
                "weight_bytes": 11_300_000,
                "stats": {"reduce_range": "on (auto: AVX2 (no VNNI) CPU, full-range u8*s8 saturates)", "x": "a|b"},
            },
        ],
        "benchmark": {
            "eval_samples": 256,
            "eval_source": "digits_eval.npz",
            "original_bytes": 45_030_000,
            "optimized_bytes": 11_300_000,
            "environment": {"onnxruntime": "1.20.1", "cpu": "AMD EPYC", "tool": "optimizer-cli", "gpus": []},
            "rows": [
                {
                    "provider": "cpu",
                    "shape": "batch=1,sequence=128",
                    "usable": True,
                    "fidelity": {"cosine_min": 0.938123, "top1_agreement": 0.672},
                    "latency_original": _latency(1234.567),
                    "latency_optimized": _latency(434.21),
                    "accuracy_original": {"top1": 0.987},
                    "accuracy_optimized": {"top1": 0.982},
                    "speedup": {"median": 1.98, "ci_low": 1.89, "ci_high": 2.1, "noisy": True, "significant": False},
                    "memory_original_mb": 1234.5,
                    "memory_optimized_mb": 456.7,
                },
                {"provider": "cuda", "shape": "", "usable": False, "reason": "not available"},
            ],
        },
        "attribution": {"nodes": [], "patch": PATCH, "patch_fidelity": 0.99123},
        "gates": [],
        "notes": [],
    }


def _cells(line: str) -> int:
    """Cells in a Markdown table line: unescaped pipes minus one."""
    return len(re.findall(r"(?<!\\)\|", line)) - 1


def test_markdown_escapes_pipes_in_headers_and_cells() -> None:
    md = render_markdown(fake_report())
    assert "max\\|Δ\\| vs prev" in md and "x: a\\|b" in md
    tables = [block.splitlines() for block in md.split("\n\n") if block.startswith("| ")]
    assert len(tables) == 2
    for lines in tables:
        assert len({_cells(line) for line in lines}) == 1, lines


def _rendered(width: int) -> list[str]:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    render_rich(fake_report(), console)
    return console.export_text().splitlines()


@pytest.mark.parametrize("width", [80, 100, 200])
def test_rich_tables_never_split_a_number(width: int) -> None:
    lines = _rendered(width)
    assert max(len(line.rstrip()) for line in lines if PATCH not in line) <= width
    report = fake_report()
    text_columns = {"#", "pass", "kind", "details", "provider", "model", "speedup [95% CI]"}
    for head, rows in (stage_rows(report), bench_rows(report)):
        for row in rows:
            for h, cell in zip(head, row, strict=True):
                if cell and h not in text_columns:
                    assert any(cell in line for line in lines), (width, h, cell)
    # The speedup and its interval stay on one line, so do model names; a long shape (text, no
    # spaces) may fold at 80 columns but no wider.
    assert any("1.98x [1.89, 2.10]" in line for line in lines)
    assert any("optimized" in line for line in lines)
    assert width == 80 or any("batch=1,sequence=128" in line for line in lines)


def test_recipe_patch_is_one_unbroken_line() -> None:
    assert any(line.strip() == PATCH for line in _rendered(80))


def test_wide_terminal_keeps_one_table_with_details() -> None:
    lines = _rendered(200)
    assert any("details" in line for line in lines) and any("speedup" in line and "p50" in line for line in lines)
