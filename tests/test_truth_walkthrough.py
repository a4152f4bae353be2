"""Issue 24 ("Truth"), the new-user walk-through: every number one output shows agrees with the others it can be
checked against (the same unit, the same sample set said, the same count)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.console import Console

from optimizer_cli.data import load_dataset
from optimizer_cli.report.html import tune_html
from optimizer_cli.report.plot import pareto_figure, pareto_png
from optimizer_cli.report.table import render_markdown, render_rich
from tests.builders import mlp, to_ir
from tests.conftest import run_cli
from tests.test_tune_report import tune_document


def _accuracy_doc() -> dict[str, Any]:
    doc = copy.deepcopy(tune_document())
    doc["goals"] = ["accuracy_drop<=1%", "cosine>=0.99"]
    return doc


def test_pareto_axis_reads_a_percent_goal_in_percent() -> None:
    """The goal line says 'accuracy_drop<=1%': its axis counts in percent too, not in fractions (0.010)."""
    figure = pareto_figure(_accuracy_doc())
    top, strip = figure.axes[:2]
    for ax in (top, strip):
        tick = ax.xaxis.get_major_formatter()(0.01, 0)  # decimals follow the axis range: '1%' or '1.00%'
        assert tick.endswith("%") and float(tick[:-1]) == 1.0
        assert "%" in ax.get_xlabel()
    # A similarity stays a plain number.
    plain = pareto_figure(tune_document())
    assert "%" not in plain.axes[0].xaxis.get_major_formatter()(0.99, 0) and "%" not in plain.axes[0].get_xlabel()


def test_html_fidelity_shows_agreements_in_percent_and_counts_as_counts() -> None:
    """The run's table says 'top-1 agree 98.44%': the page does too; nonfinite is a count, never '0.0000'."""
    doc = _accuracy_doc()
    doc["winner"]["fidelity"] = {"cosine": 0.99207, "top1_agreement": 0.98741, "nonfinite": 0, "accuracy": 0.90428}
    page = tune_html(doc, pareto_png(doc), None)
    assert "top1_agreement 98.74%" in page
    assert "nonfinite 0," in page and "nonfinite 0.0000" not in page
    assert "accuracy 90.43%" in page and "cosine 0.9921" in page


# --- the run: which samples each figure was read on ---------------------------------------------------------

ROWS = 10  # in the data file; the run reads fewer of them


def _mlp_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    model, data, recipe = tmp_path / "mlp.onnx", tmp_path / "data.npz", tmp_path / "walk.yaml"
    onnx.save(mlp(), model)
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((ROWS, 32)).astype(np.float32), labels=rng.integers(0, 10, ROWS))
    recipe.write_text(
        "name: walk\npasses:\n  - type: cleanup\nverify: {samples: 3}\n"
        "benchmark: {providers: [cpu], rounds: 2, runs_per_round: 2, warmup: 1}\n"
    )
    return model, data, recipe


def test_a_dataset_knows_how_many_samples_its_source_holds(tmp_path: Path) -> None:
    _, data, _ = _mlp_files(tmp_path)
    ds = load_dataset(data, to_ir(mlp()), limit=4)
    assert len(ds) == 4 and ds.available == ROWS
    assert ds.take(2).available == ROWS
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(5):
        np.savez(folder / f"{i:02d}.npz", x=np.zeros((1, 32), np.float32))
    assert load_dataset(folder, to_ir(mlp()), limit=2).available == 5
    assert load_dataset(data, to_ir(mlp())).available == ROWS


def _text(report: dict[str, Any]) -> str:
    console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    render_rich(report, console)
    return console.export_text()


def test_the_run_says_which_samples_each_table_was_read_on(tmp_path: Path) -> None:
    """The walk-through: the benchmark read 256 of the file's 397 samples (tune reads all 397) and the stage
    table's cosine is the worst of 4 verification samples; both said where the figures are shown."""
    model, data, recipe = _mlp_files(tmp_path)
    proc = run_cli(str(model), "--recipe", str(recipe), "-o", str(tmp_path / "out.onnx"), "--data", str(data),
                   "--eval-samples", "6", "--json", "--no-memory", "--no-attribute")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["benchmark"]["eval_samples"] == 6 and report["benchmark"]["eval_available"] == ROWS
    assert report["verification"] == {"samples": 3, "source": str(data)}
    for text in (_text(report), render_markdown(report)):
        assert f"6 of {ROWS} samples from {data}" in text
        assert f"drift on 3 verification samples from {data}" in text


def test_a_run_without_data_says_its_figures_are_on_calibration_samples(tmp_path: Path) -> None:
    """Without --data the benchmark scores the verification samples, taken from the calibration data: a top-1 of
    100% there is not the model's accuracy, and the report says so."""
    model, data, recipe = _mlp_files(tmp_path)
    proc = run_cli(str(model), "--recipe", str(recipe), "-o", str(tmp_path / "out.onnx"), "--calib", str(data),
                   "--json", "--no-memory", "--no-attribute")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["benchmark"]["eval_source"] == str(data) and report["benchmark"]["eval_samples"] == 3
    assert any("calibration data" in n and "--data" in n for n in report["notes"]), report["notes"]


def test_the_attribution_table_says_its_cosine_is_a_mean_over_few_samples() -> None:
    """Its 'fc' row (the logits) read 0.99585 beside the benchmark's cosine min 0.98161: a mean over 8 samples."""
    report = {
        "attribution": {
            "nodes": [{"node": "fc", "op": "Gemm", "cosine": 0.99585, "local_drop": 0.004}],
            "ranked_samples": 8,
        },
        "notes": [],
    }
    assert "mean cosine of output (first 8 samples)" in " ".join(_text(report).split())


def test_inspect_writes_output_dims_and_dtypes_as_it_writes_the_inputs(tmp_path: Path) -> None:
    """The walk-through's `optimize inspect` printed `image: float32 ['batch', 1, 16, 16]` beside
    `logits: FLOAT ['batch', '10']`: a fixed dim of 10 read as a symbolic one named '10'."""
    model, _, _ = _mlp_files(tmp_path)
    proc = run_cli("inspect", str(model), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout)
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 32]}]
    assert info["outputs"][0]["dtype"] == "float32" and info["outputs"][0]["shape"] == ["batch", 10]


def test_a_gate_shows_its_value_in_the_unit_it_was_written_in() -> None:
    """`--fail-if 'accuracy_drop>1%'` said 'ok: cpu=0.003906' under a table of 90.62% and 90.23%."""
    from optimizer_cli.bench.gate import evaluate, parse_gate

    row = {
        "provider": "cpu",
        "shape": "",
        "usable": True,
        "accuracy_original": {"top1": 0.90625},
        "accuracy_optimized": {"top1": 0.90234375},
        "fidelity": {"cosine_min": 0.981609, "top1_agreement": 0.984375},
    }
    written = ("accuracy_drop>1%", "top1_agreement<0.98", "top1_agreement<98%", "cosine<0.98")
    details = [r.detail for r in evaluate([parse_gate(g) for g in written], {"rows": [row]})]
    assert details == ["ok: cpu=0.3906%", "ok: cpu=0.9844", "ok: cpu=98.44%", "ok: cpu=0.9816"]


def test_the_page_marks_a_noisy_speedup_as_the_run_table_does() -> None:
    """Trial 1 of the walk-through: 1.35x [1.00-1.68] beside a p50 only 1.09x under the original's. The run's
    table marks such an interval 'noisy'; the page said nothing."""
    doc = _accuracy_doc()
    doc["final"]["candidates"][1]["speedup"] = {"median": 1.35, "ci_low": 1.0, "ci_high": 1.68, "noisy": True}
    page = tune_html(doc, pareto_png(doc), None)
    assert "1.35× [1.00–1.68] noisy (final timing)" in page
    assert "1.84× [1.76–1.91] (final timing)" in page  # trial 2: not noisy, not marked


def test_markdown_gives_the_patch_its_fidelity_and_the_search_its_sentence() -> None:
    """The terminal says 'Recipe patch (fidelity 0.99338)' and which stage lost what; the Markdown said neither."""
    search = "excluding 6 node(s) from pass 2 (quantize) gives cosine 0.99338 >= 0.99 on all 256 benchmark samples"
    report = {
        "attribution": {"nodes": [], "search": search, "patch": "--set 'passes.2.exclude_nodes=[fc]'",
                        "patch_fidelity": 0.993378},
        "notes": [],
    }  # fmt: skip
    md = render_markdown(report)
    assert "Recipe patch (fidelity 0.99338): `--set 'passes.2.exclude_nodes=[fc]'`" in md
    assert search in md
