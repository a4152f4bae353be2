"""Recipes on models over 2 GB: peak memory and wall time of the whole command, vs onnxruntime's own tools.

    python benchmarks/large_models.py [--dir benchmarks/.cache/large] [--models chain,decoder] [--repeat 3]
                                      [--recipes int8,fp16,int4,prune] [--no-reference]

Builds (once, in --dir) two ~2.5 GB fp32 models with their weights in external data:
  chain    10 x MatMul 8192x8192 + Relu                                        (2.68 GB)
  decoder  causal LM: embedding 8192x2048, 12 blocks of attention + MLP with
           LayerNorm, LM head (optimizer_cli.large_examples)                   (2.55 GB)
and runs `optimize MODEL --recipe R -o OUT --no-bench` for each recipe, measuring the
command's peak RSS (the maximum resident set size of the process tree, as /usr/bin/time reports it) and
wall time; then once more with `--report R.json` for the per-pass seconds and the cosine (a report also
carries the sha256 of the input and the output, which costs seconds more on 2.5 GB: its wall time and
peak are kept as wall_s_report and peak_rss_report). The same weights through onnxruntime's own tools
(quantize_dynamic, MatMulNBitsQuantizer, convert_float_to_float16 + onnx.save) are measured the same
way (prune has none: no onnxruntime tool prunes). Each tool runs --repeat times, the two alternating; the
table gives the median wall time and every run's. Recipes that need calibration data get `--calib random`.
Cosine vs fp32 is the pipeline's verification (seeded random inputs). Prints a table and writes
benchmarks/results/large_models.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from optimizer_cli.bench.environment import cpu_label, environment  # noqa: E402
from optimizer_cli.bench.memory import command_peak  # noqa: E402
from optimizer_cli.large_examples import build_decoder, build_matmul_chain, save_large  # noqa: E402
from optimizer_cli.model_io import file_size  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODELS = {
    "chain": lambda: build_matmul_chain(dim=8192, layers=10),
    "decoder": lambda: build_decoder(hidden=2048, layers=12, heads=16, vocab=8192),
}
# What a user would run without this tool, for each recipe (same options as the recipe's quantize pass).
NEEDS_CALIBRATION = {"prune", "lowrank", "cnn-int8", "cnn-prune-int8"}
REFERENCE = {
    "int8": (
        "from onnxruntime.quantization import QuantType, quantize_dynamic\n"
        "quantize_dynamic(SRC, DST, op_types_to_quantize=['MatMul', 'Gather'], per_channel=True, reduce_range=False,\n"
        "                 weight_type=QuantType.QInt8, use_external_data_format=True,\n"
        "                 extra_options={'MatMulConstBOnly': True})\n"
    ),
    "int4": (
        "import onnx\n"
        "from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer\n"
        "q = MatMulNBitsQuantizer(onnx.load(SRC), bits=4, block_size=32, is_symmetric=True, accuracy_level=4)\n"
        "q.process()\n"
        "q.model.save_model_to_file(DST, use_external_data_format=True)\n"
    ),
    "fp16": (
        "import onnx\n"
        "from onnxruntime.transformers.float16 import convert_float_to_float16\n"
        "onnx.save(convert_float_to_float16(onnx.load(SRC), keep_io_types=True), DST, save_as_external_data=True)\n"
    ),
}


def ensure_model(name: str, folder: Path) -> Path:
    path = folder / f"{name}.onnx"
    if not path.exists():
        print(f"building {path} ...", flush=True)
        save_large(MODELS[name](), path)
    return path


def run_ours(model: Path, recipe: str, work: Path, timeout: float, details: bool = True) -> dict:
    out, report = work / f"{model.stem}.{recipe}.onnx", work / f"{model.stem}.{recipe}.json"
    command = [
        sys.executable,
        "-m",
        "optimizer_cli",
        "run",
        str(model),
        "--recipe",
        recipe,  # a preset's name
    ]
    command += ["-o", str(out), "--no-bench"] + (["--calib", "random"] if recipe in NEEDS_CALIBRATION else [])
    row = command_peak(command, timeout)  # the command as a user types it: the figures
    if row["rc"] == 0 and details:
        row["output_bytes"] = file_size(out)
        _remove(out, work / f"{out.name}.data")
        detail = command_peak([*command, "--report", str(report)], timeout)
        row["wall_s_report"], row["peak_rss_report"] = detail["wall_s"], detail["peak_rss"]
        if detail["rc"] == 0:
            stages = json.loads(report.read_text())["stages"]
            row["cosine"] = min(d["cosine"] for d in stages[-1]["drift_vs_original"])
            row["pass_seconds"] = {s["name"]: round(s["seconds"], 2) for s in stages}
            row["verify_seconds"] = round(sum(s["verify_seconds"] for s in stages), 1)
            row["engine"] = stages[-1]["stats"].get("engine", "onnxruntime.quantization")
    _remove(out, work / f"{out.name}.data", report)
    return row


def _remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def run_reference(model: Path, recipe: str, work: Path, timeout: float, details: bool = True) -> dict:
    out = work / f"{model.stem}.{recipe}.ort.onnx"
    code = f"SRC, DST = {str(model)!r}, {str(out)!r}\n" + REFERENCE[recipe]
    row = command_peak([sys.executable, "-c", code], timeout)
    if row["rc"] == 0:
        row["output_bytes"] = file_size(out)
    for leftover in work.glob(f"{out.name}*"):
        leftover.unlink()
    return row


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def print_table(rows: list[dict]) -> None:
    head = [
        "model",
        "recipe",
        "tool",
        "exit",
        "wall (runs)",
        "+report",
        "peak RSS GB",
        "x model",
        "output GB",
        "cosine",
    ]
    print(" | ".join(head))
    for r in rows:
        ratio = f"{r['peak_rss'] / r['model_bytes']:.2f}x" if r.get("peak_rss") else "-"
        walls = ", ".join(f"{w:.1f}" for w in r.get("walls_s", []))
        wall = "-" if r.get("wall_s") is None else f"{r['wall_s']:.1f}s ({walls})"
        with_report = f"{r['wall_s_report']:.1f}s" if r.get("wall_s_report") else "-"
        cos = f"{r['cosine']:.5f}" if r.get("cosine") is not None else "-"
        cells = [r["model"], r["recipe"], r["tool"], str(r["rc"]), wall, with_report, _gb(r.get("peak_rss")), ratio]
        print(" | ".join([*cells, _gb(r.get("output_bytes")), cos]))
        if r["rc"] != 0:
            print(f"    {r['last_line']}")


def measure(model: Path, recipe: str, tools: list, work: Path, timeout: float, repeat: int) -> list[dict]:
    """Each tool `repeat` times, the tools alternating (A/B interleaved: the machine's load hits both alike).
    A row holds the first run's details, the median wall time of all runs and the highest peak."""
    runs: dict[str, list[dict]] = {tool: [] for tool, _ in tools}
    for i in range(repeat):
        for tool, runner in tools:
            print(f"{model.stem} {recipe} {tool} ({i + 1}/{repeat}) ...", flush=True)
            runs[tool].append(runner(model, recipe, work, timeout, details=i == 0))
    rows = []
    for tool, done in runs.items():
        row = dict(done[0])
        ok = [r for r in done if r["rc"] == 0] if done[0]["rc"] == 0 else []
        if ok:
            row["walls_s"] = [r["wall_s"] for r in ok]
            row["wall_s"] = statistics.median(row["walls_s"])
            row["peak_rss"] = max(r["peak_rss"] for r in ok)
        rows.append({"tool": tool, **row})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=ROOT / "benchmarks" / ".cache" / "large")
    parser.add_argument("--models", default="chain,decoder")
    parser.add_argument("--recipes", default="int8,fp16,int4,prune")
    parser.add_argument("--no-reference", action="store_true", help="skip onnxruntime's own tools")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per command")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each tool, interleaved (median wall)")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        model = ensure_model(name, args.dir)
        size = file_size(model)
        for recipe in args.recipes.split(","):
            with tempfile.TemporaryDirectory(prefix="large-bench-", dir=args.dir) as tmp:
                tools = [("optimize", run_ours)]
                if recipe in REFERENCE and not args.no_reference:
                    tools.append(("onnxruntime", run_reference))
                for row in measure(model, recipe, tools, Path(tmp), args.timeout, args.repeat):
                    rows.append({"model": name, "model_bytes": size, "recipe": recipe, **row})
    print_table(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"cpu": cpu_label(environment()), "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "rows": rows}
    (RESULTS / "large_models.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
