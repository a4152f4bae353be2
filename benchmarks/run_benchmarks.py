"""Shipped recipes vs the reference pipelines, on the same models, in one run (CPU, 2 threads).

    python benchmarks/run_benchmarks.py [--models cnn,minilm,digits] [--rounds 10] [--update-docs]

Each variant is timed against the fp32 model in interleaved A/B rounds (ORT_ENABLE_ALL, so a pass
gets no credit for fusions ORT does itself) and reported as the paired median speedup with a 95%
bootstrap interval, with fidelity on held-out inputs and file size. Writes benchmarks/results/*.json
and, with --update-docs, the table between the BENCHMARKS markers in docs/benchmarks.md.

Reference pipelines (what users would otherwise run):
  ort-transformers+dynamic   onnxruntime.transformers.optimizer (bert) + quantize_dynamic per-channel
  ort-static-u8s8            quant_pre_process + quantize_static QDQ, QUInt8 activations, QInt8 per-channel
  onnxslim                   onnxslim.slim (graph clean-up)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from optimizer_cli.bench.accuracy import fidelity, topk_accuracy  # noqa: E402
from optimizer_cli.bench.environment import cpu_label, environment  # noqa: E402
from optimizer_cli.bench.latency import cycling, measure_ab  # noqa: E402
from optimizer_cli.data import Dataset, load_dataset  # noqa: E402
from optimizer_cli.model_io import file_size, load_model  # noqa: E402
from optimizer_cli.pipeline import run_pipeline  # noqa: E402
from optimizer_cli.recipe import load_recipe, preset_path  # noqa: E402
from optimizer_cli.runtime.session import SessionConfig, create_session, run_session  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "results"


class Calib:
    """Calibration data reader for the reference quantize_static."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds, self.i = feeds, 0

    def get_next(self) -> dict | None:
        self.i += 1
        return self.feeds[self.i - 1] if self.i <= len(self.feeds) else None

    def rewind(self) -> None:
        self.i = 0


def ref_ort_transformers_dynamic(src: Path, out: Path, calib: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    fused = out.with_suffix(".fused.onnx")
    # quantize_dynamic fails on the fused model unless value types survive the fusion ("Unable to find
    # data type for weight_name"): run onnx shape inference on the input first, as a user hitting that would.
    typed = out.with_suffix(".typed.onnx")
    onnx.shape_inference.infer_shapes_path(str(src), str(typed))
    optimize_model(str(typed), model_type="bert", opt_level=0).save_model_to_file(str(fused))
    typed.unlink()
    quantize_dynamic(str(fused), str(out), per_channel=True, weight_type=QuantType.QInt8)
    fused.unlink()


def ref_ort_static_u8s8(src: Path, out: Path, calib: Path) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre))
    data = load_dataset(calib, load_model(src))
    quantize_static(
        str(pre),
        str(out),
        Calib(data.feeds[:64]),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    pre.unlink()


def ref_onnxslim(src: Path, out: Path, calib: Path) -> None:
    import onnxslim

    onnx.save(onnxslim.slim(str(src)), str(out))


def ours(recipe: str) -> Callable[[Path, Path, Path], None]:
    def run(src: Path, out: Path, calib: Path) -> None:
        rec = load_recipe(preset_path(recipe))
        rec.verify.enabled = False  # timed separately; the CLI verifies every pass
        run_pipeline(src, rec, out, calibration=str(calib))

    return run


def prepare_cnn() -> tuple[Path, Path, Path, str]:
    from optimizer_cli.zoo import calibrate_batchnorm, resnet18_like

    CACHE.mkdir(parents=True, exist_ok=True)
    model, calib, evals = CACHE / "resnet18_like.onnx", CACHE / "resnet_calib.npz", CACHE / "resnet_eval.npz"
    if not model.exists():
        rng = np.random.default_rng(0)

        def images(n: int) -> np.ndarray:
            # Smooth random "images" (4x4-upsampled noise) so activations have image-like statistics.
            x = rng.standard_normal((n, 1, 3, 28, 28)).astype(np.float32)
            return np.repeat(np.repeat(x, 4, axis=3), 4, axis=4)

        calib_images, eval_images = images(64), images(64)
        proto = calibrate_batchnorm(resnet18_like(width=64, image=112, classes=100), {"image": calib_images[:32, 0]})
        onnx.save(proto, str(model))
        np.savez(calib, image=calib_images)
        np.savez(evals, image=eval_images)
    return model, calib, evals, "ResNet-18 topology, random weights + data BN stats, 112x112, batch 1"


def prepare_minilm() -> tuple[Path, Path, Path, str]:
    from benchmarks.minilm import export, sentences_dataset

    CACHE.mkdir(parents=True, exist_ok=True)
    model, calib, evals = CACHE / "minilm.onnx", CACHE / "minilm_calib.npz", CACHE / "minilm_eval.npz"
    marker = CACHE / "minilm.source"
    if not model.exists() or not marker.exists():
        marker.write_text(export(model))
    source = marker.read_text()
    text = sentences_dataset(calib, n=48, seed=1, half=0)
    sentences_dataset(evals, n=48, seed=2, half=1)  # held out: no sentence in common with calibration
    return model, calib, evals, f"all-MiniLM-L6-v2, {source}, seq 128, batch 1, {text}"


def prepare_digits() -> tuple[Path, Path, Path, str]:
    from benchmarks.digits_resnet import train_and_export

    CACHE.mkdir(parents=True, exist_ok=True)
    model, calib, evals, marker = (CACHE / f"digits_resnet.{k}" for k in ("onnx", "calib.npz", "eval.npz", "acc"))
    if not model.exists() or not marker.exists():
        result = train_and_export(model)
        marker.write_text(f"{result['test_accuracy']:.4f}")
        x, y, n = result["x"], result["y"], result["n_train"]
        np.savez(calib, image=x[:256], labels=y[:256])
        np.savez(evals, image=x[n:], labels=y[n:])
    return model, calib, evals, "ResNet-18 topology (width 32) trained on digits, 64x64, batch 1, real labels"


MODELS = {
    "cnn": (
        # Random weights: a speed benchmark at ImageNet-like scale. Pruning a random-feature network
        # says nothing about trained ones (no redundancy), so prune variants run on the trained model below.
        prepare_cnn,
        [
            ("cnn-int8 (ours)", ours("cnn-int8.yaml")),
            ("ort-static-u8s8", ref_ort_static_u8s8),
            ("onnxslim", ref_onnxslim),
        ],
    ),
    "minilm": (
        prepare_minilm,
        [
            ("transformer-int8 (ours)", ours("transformer-int8.yaml")),
            ("transformer-prune-int8 (ours)", ours("transformer-prune-int8.yaml")),
            ("transformer-int8-trim (ours)", ours("transformer-int8-trim.yaml")),
            ("ort-transformers+dynamic", ref_ort_transformers_dynamic),
            ("onnxslim", ref_onnxslim),
        ],
    ),
    "digits": (
        prepare_digits,
        [
            ("cnn-int8 (ours)", ours("cnn-int8.yaml")),
            ("cnn-prune-int8 (ours)", ours("cnn-prune-int8.yaml")),
            ("prune (ours)", ours("prune.yaml")),
            ("lowrank (ours)", ours("lowrank.yaml")),
            ("ort-static-u8s8", ref_ort_static_u8s8),
            ("onnxslim", ref_onnxslim),
        ],
    ),
}


def full_length_feeds(data: Dataset) -> list[dict[str, np.ndarray]]:
    """Inputs whose every position is a real token (no padding to skip): the compute-bound case."""
    return [f for f in data.feeds if "attention_mask" in f and bool(np.all(f["attention_mask"]))]


def measure(base: Path, variant: Path, data: Dataset, rounds: int, full_length_too: bool = False) -> dict:
    """Fidelity over the eval set; latency cycling through the eval inputs (and full-length ones if asked)."""
    cfg = SessionConfig(threads=2, opt_level="all")
    sa, sb = create_session(str(base), cfg), create_session(str(variant), cfg)
    outs_a = [run_session(sa, f) for f in data.feeds]
    outs_b = [run_session(sb, f) for f in data.feeds]
    fid = fidelity(outs_a, outs_b, [o.name for o in sa.get_outputs()])
    names = {i.name for i in sa.get_inputs()}

    def timed(feeds: list[dict[str, np.ndarray]]) -> tuple:
        feeds = [{k: v for k, v in f.items() if k in names} for f in feeds]
        return measure_ab(
            cycling(lambda f: sa.run(None, f), feeds),
            cycling(lambda f: sb.run(None, f), feeds),
            warmup=5,
            rounds=rounds,
            runs_per_round=max(10, len(feeds)),  # every round covers the whole input mix
            discard_after_switch=3,
        )

    a, b, speed = timed(data.feeds[:32])
    out = {
        "speedup": speed.as_dict(),
        "latency_fp32_ms": a.p50_ms,
        "latency_ms": b.p50_ms,
        "p90_ms": b.p90_ms,
        "fidelity": fid.as_dict(),
        "bytes": file_size(variant),
    }
    full = full_length_feeds(data) if full_length_too else []
    if full:
        a, b, speed = timed(full)
        out["full_length"] = {"speedup": speed.as_dict(), "latency_fp32_ms": a.p50_ms, "latency_ms": b.p50_ms}
    if data.labels is not None:
        out["top1"], out["top1_fp32"] = topk_accuracy(outs_b, data.labels, 1), topk_accuracy(outs_a, data.labels, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,minilm,digits")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--update-docs", action="store_true", help="rewrite the table in docs/benchmarks.md")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    results: dict = {"environment": environment(), "models": {}}
    for key in args.models.split(","):
        prepare, variants = MODELS[key]
        model, calib, evals, label = prepare()
        data = load_dataset(evals, load_model(model))
        entry = {"label": label, "fp32_bytes": file_size(model), "variants": {}}
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            for name, make in variants:
                out = Path(tmp) / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".onnx")
                start = time.perf_counter()
                try:
                    make(model, out, calib)
                except Exception as exc:  # a reference tool failing is a result too
                    entry["variants"][name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
                    print(f"[{key}] {name}: failed: {entry['variants'][name]['error']}", flush=True)
                    continue
                build_s = time.perf_counter() - start
                m = measure(model, out, data, args.rounds, full_length_too=key == "minilm")
                if key == "minilm":  # sentence embeddings have no classes: argmax agreement means nothing
                    m["fidelity"]["top1_agreement"] = None
                m["build_s"] = build_s
                entry["variants"][name] = m
                print(
                    f"[{key}] {name}: {_speed(m['speedup'])}"
                    f" cosine {m['fidelity']['cosine_mean']:.4f} (min {m['fidelity']['cosine_min']:.4f})"
                    f" top-1 agree {m['fidelity']['top1_agreement']} size {m['bytes'] / 1e6:.1f} MB"
                    + (f" full-length {_speed(m['full_length']['speedup'])}" if "full_length" in m else ""),
                    flush=True,
                )
        results["models"][key] = entry
    stamp = time.strftime("%Y-%m-%d")
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results, stamp)
    print(table)
    if args.update_docs:
        page = ROOT / "docs" / "benchmarks.md"
        text = page.read_text()
        start, end = "<!-- BENCHMARKS:START -->", "<!-- BENCHMARKS:END -->"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            _, tail = rest.split(end, 1)
            page.write_text(head + start + "\n" + table + "\n" + end + tail)


def _speed(sp: dict) -> str:
    return f"{sp['median']:.2f}x [{sp['ci_low']:.2f}, {sp['ci_high']:.2f}]"


def markdown(results: dict, stamp: str) -> str:
    env = results["environment"]
    lines = [
        f"_Measured {stamp} with `python benchmarks/run_benchmarks.py`: {cpu_label(env)}, {env['cpu_count']} cores, "
        f"2 ORT threads, onnxruntime {env['onnxruntime']}. Speedup is the paired median over interleaved rounds "
        "vs fp32 (ORT_ENABLE_ALL) with its 95% bootstrap interval, timing cycles through the held-out inputs "
        "(for MiniLM: real sentences of 14-128 tokens padded to 128); *full-length* times inputs with no padding "
        "(128 real tokens), the compute-bound case; fidelity on held-out inputs._",
        "",
    ]
    lines.append(
        "| model | variant | speedup [95% CI] | fp32 → ms (p50) | full-length speedup | cosine mean / min "
        "| top-1 agree | top-1 | size MB |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for entry in results["models"].values():
        lines.append(f"| {entry['label']} | fp32 | 1.00x | | | | | | {entry['fp32_bytes'] / 1e6:.1f} |")
        for name, m in entry["variants"].items():
            if "error" in m:
                lines.append(f"| | {name} | failed: {m['error']} | | | | | | |")
                continue
            sp, fid = m["speedup"], m["fidelity"]
            agree = f"{100 * fid['top1_agreement']:.1f}%" if fid["top1_agreement"] is not None else "-"
            top1 = f"{100 * m['top1']:.1f}% (fp32 {100 * m['top1_fp32']:.1f}%)" if m.get("top1") is not None else "-"
            full = _speed(m["full_length"]["speedup"]) if "full_length" in m else "-"
            lines.append(
                f"| | {name} | {_speed(sp)} | {m['latency_fp32_ms']:.2f} → {m['latency_ms']:.2f} | {full} | "
                f"{fid['cosine_mean']:.4f} / {fid['cosine_min']:.4f} | "
                f"{agree} | {top1} | {m['bytes'] / 1e6:.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
