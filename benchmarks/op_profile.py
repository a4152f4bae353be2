"""Where the time goes: per-op-type kernel time of two models on the same input (onnxruntime profiler).

    python benchmarks/op_profile.py ORIGINAL OPTIMIZED --data eval.npz [--sample N] [--runs 30]

Runs the two models alternately (CPU, 2 threads, ORT_ENABLE_ALL), repeats the pair `--repeats`
times and keeps, per op type, the median of the per-run kernel time over the repeats (the machines
here are noisy). Prints a table and writes benchmarks/results/op_profile.json. Used to explain a
speedup: which op types got faster and which did not change at all.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from optimizer_cli.data import load_dataset  # noqa: E402
from optimizer_cli.model_io import load_model  # noqa: E402


def profile_once(path: Path, feed: dict[str, np.ndarray], runs: int, tmp: Path) -> dict[str, float]:
    """Milliseconds per run spent in each op type's kernels."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp / path.stem)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in names}
    for _ in range(5 + runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_run: dict[str, float] = collections.defaultdict(float)
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    n_nodes = len(kernels) // (5 + runs)
    for e in kernels[5 * n_nodes :]:  # the warm-up runs' kernels come first
        per_run[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
    return dict(per_run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original", type=Path)
    parser.add_argument("optimized", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--sample", type=int, default=-1, help="eval sample to run (default: the longest)")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    data = load_dataset(args.data, load_model(args.original))
    if args.sample >= 0:
        feed = data.feeds[args.sample]
    else:  # the most real tokens / the biggest input: the compute-bound case
        feed = max(data.feeds, key=lambda f: int(np.count_nonzero(f.get("attention_mask", np.ones(1)))))
    samples: dict[str, dict[str, list[float]]] = {"original": {}, "optimized": {}}
    with tempfile.TemporaryDirectory(prefix="op-profile-") as tmp:
        for _ in range(args.repeats):
            for key, path in (("original", args.original), ("optimized", args.optimized)):
                for op, ms in profile_once(path, feed, args.runs, Path(tmp)).items():
                    samples[key].setdefault(op, []).append(ms)
    table = {k: {op: float(np.median(v)) for op, v in ops.items()} for k, ops in samples.items()}
    ops = sorted(set(table["original"]) | set(table["optimized"]), key=lambda o: -table["original"].get(o, 0.0))
    total_a, total_b = sum(table["original"].values()), sum(table["optimized"].values())
    print(f"{'op type':28s} {'original ms':>12s} {'optimized ms':>13s}")
    for op in ops:
        a, b = table["original"].get(op), table["optimized"].get(op)
        print(f"{op:28s} {'' if a is None else f'{a:12.2f}':>12s} {'' if b is None else f'{b:13.2f}':>13s}")
    print(f"{'kernels total':28s} {total_a:12.2f} {total_b:13.2f}   ratio {total_a / total_b:.2f}x")
    out = ROOT / "benchmarks" / "results" / "op_profile.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"original": str(args.original), "optimized": str(args.optimized), "ms_per_run": table}, indent=2)
        + "\n"
    )


if __name__ == "__main__":
    main()
