"""Model inputs: specs from the graph, seeded random feeds, and .npz / .npy-folder datasets.

Dataset layout (.npz, or a folder of <input_name>.npy files): one array per graph input, keyed by the
input's name. An array with one more axis than the input's rank holds samples along axis 0; an array
of the input's rank is split along its batch axis into samples of `batch_size` (an input without a
declared rank always takes samples along axis 0). An optional `labels`
(or `label`) array holds one integer class per sample row for top-1/top-5 accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from optimizer_cli.analysis.graph import name_of
from optimizer_cli.errors import UserInputError, first_line

LABEL_KEYS = ("labels", "label")

_NUMPY_DTYPES: dict[ir.DataType, np.dtype] = {
    ir.DataType.FLOAT: np.dtype(np.float32),
    ir.DataType.FLOAT16: np.dtype(np.float16),
    ir.DataType.DOUBLE: np.dtype(np.float64),
    ir.DataType.INT64: np.dtype(np.int64),
    ir.DataType.INT32: np.dtype(np.int32),
    ir.DataType.INT16: np.dtype(np.int16),
    ir.DataType.INT8: np.dtype(np.int8),
    ir.DataType.UINT8: np.dtype(np.uint8),
    ir.DataType.UINT16: np.dtype(np.uint16),
    ir.DataType.UINT32: np.dtype(np.uint32),
    ir.DataType.UINT64: np.dtype(np.uint64),
    ir.DataType.BOOL: np.dtype(np.bool_),
}


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None  # ints are fixed, str/None are symbolic
    index_limit: int | None = None  # integer inputs that index a table (Gather): random values stay below this


def input_specs(model: ir.Model) -> list[InputSpec]:
    """Graph inputs that need feeding (initializers listed as inputs are skipped)."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        dtype = value.dtype
        if dtype not in _NUMPY_DTYPES:
            raise UserInputError(f"input '{value.name}' has unsupported type {dtype}")
        shape = None
        if value.shape is not None:
            shape = tuple(d if isinstance(d, int) else (d.value if d.value else None) for d in value.shape.dims)
        limit = _index_limit(value) if np.issubdtype(_NUMPY_DTYPES[dtype], np.integer) else None
        specs.append(InputSpec(name_of(value), _NUMPY_DTYPES[dtype], shape, limit))
    return specs


def _index_limit(value: ir.Value) -> int | None:
    """Rows of the smallest constant table this input indexes through Gather (directly or via a Cast), so
    random token ids stay valid for an embedding of any vocabulary size."""
    limits = []
    frontier = [value]
    for _ in range(2):  # the input itself, then the outputs of Casts it feeds
        next_frontier: list[ir.Value] = []
        for v in frontier:
            for use in v.uses():
                node = use.node
                if node.op_type == "Cast" and node.domain == "":
                    next_frontier.extend(node.outputs)
                elif node.op_type == "Gather" and node.domain == "" and use.idx == 1:
                    table = node.inputs[0]
                    axis = node.attributes.get_int("axis", 0)
                    rows = table.shape[axis] if table is not None and table.shape is not None else None
                    if isinstance(rows, int):
                        limits.append(rows)
        frontier = next_frontier
    return min(limits) if limits else None


def resolve_shape(spec: InputSpec, dims: dict[str, int], default_dim: int = 1) -> tuple[int, ...]:
    """Concrete shape: named symbolic dims from `dims`, other unknown dims -> default_dim (batch 1)."""
    if spec.shape is None:
        raise UserInputError(f"input '{spec.name}' has no declared rank; give data with --data/--calib")
    out = []
    for d in spec.shape:
        if isinstance(d, int) and d >= 0:
            out.append(d)
        elif isinstance(d, str) and d in dims:
            out.append(int(dims[d]))
        else:
            out.append(default_dim)
    return tuple(out)


# One random input larger than this is refused: a declared [100000, 100000] would try to allocate 37 GiB.
MAX_RANDOM_INPUT_BYTES = 1 << 30


def random_feed(
    specs: list[InputSpec], rng: np.random.Generator, dims: dict[str, int] | None = None, int_high: int = 64
) -> dict[str, np.ndarray]:
    """One seeded random feed. Names decide integer ranges: *mask* -> ones, *type_ids* -> zeros."""
    dims = dims or {}
    feed = {}
    for spec in specs:
        shape = resolve_shape(spec, dims)
        nbytes = int(np.prod(shape, dtype=np.float64)) * spec.dtype.itemsize
        if nbytes > MAX_RANDOM_INPUT_BYTES:
            symbolic = [d for d in (spec.shape or ()) if isinstance(d, str)]
            hint = (
                f"set smaller dims with --set data.dims.{symbolic[0]}=N"
                if symbolic
                else "give real data with --data/--calib"
            )
            raise UserInputError(
                f"a random feed for input '{spec.name}' of shape {list(shape)} would take "
                f"{nbytes / 2**30:.1f} GiB (limit {MAX_RANDOM_INPUT_BYTES / 2**30:.0f} GiB); {hint}"
            )
        lname = spec.name.lower()
        if spec.dtype == np.bool_:
            arr = rng.random(shape) > 0.5
        elif np.issubdtype(spec.dtype, np.floating):
            arr = rng.standard_normal(shape).astype(spec.dtype)
        elif "mask" in lname:
            arr = np.ones(shape, spec.dtype)
        elif "type" in lname and "id" in lname:
            arr = np.zeros(shape, spec.dtype)
        else:
            info = np.iinfo(spec.dtype)
            high = min(info.max, int_high if spec.index_limit is None else spec.index_limit)
            arr = rng.integers(max(info.min, 0), max(high, 1), size=shape).astype(spec.dtype)
        feed[spec.name] = arr
    return feed


@dataclass
class Dataset:
    """Samples (feeds) for calibration, verification or evaluation, with optional labels."""

    feeds: list[dict[str, np.ndarray]]
    labels: list[np.ndarray] | None = None
    source: str = "random"
    is_random: bool = True
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.feeds)

    def take(self, n: int) -> Dataset:
        labels = self.labels[:n] if self.labels is not None else None
        return Dataset(self.feeds[:n], labels, self.source, self.is_random, list(self.notes))


def random_dataset(model: ir.Model, samples: int, seed: int, dims: dict[str, int] | None = None) -> Dataset:
    rng = np.random.default_rng(seed)
    specs = input_specs(model)
    feeds = [random_feed(specs, rng, dims) for _ in range(samples)]
    ds = Dataset(feeds, None, f"random(seed={seed})", True)
    defaulted = sorted({d for s in specs for d in (s.shape or ()) if isinstance(d, str) and d not in (dims or {})})
    if defaulted:
        ds.notes.append(
            f"random inputs use 1 for symbolic dims {', '.join(defaulted)} (set data.dims to measure real shapes)"
        )
    return ds


def load_dataset(path: str | Path, model: ir.Model, batch_size: int = 1, limit: int | None = None) -> Dataset:
    """Read a .npz or a folder of .npy files into per-sample feeds matched to the model's inputs."""
    path = Path(path)
    arrays = _read_arrays(path)
    specs = input_specs(model)
    if "" in arrays:  # a lone .npy feeds the single input
        if len(specs) != 1:
            raise UserInputError("a single .npy only works for single-input models; use .npz keyed by input name", path)
        arrays[specs[0].name] = arrays.pop("")
    labels_arr = next((arrays[k] for k in LABEL_KEYS if k in arrays), None)
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        have = ", ".join(k for k in arrays if k not in LABEL_KEYS)
        raise UserInputError(f"no array for model input(s) {', '.join(missing)} (file has: {have})", path)
    per_input = {spec.name: _samples(spec, arrays[spec.name], batch_size, path) for spec in specs}
    counts = {len(v) for v in per_input.values()}
    if len(counts) != 1:
        raise UserInputError(f"inputs have different sample counts: {sorted(counts)}", path)
    n = counts.pop()
    if n == 0:
        raise UserInputError("holds no samples (the arrays are empty)", path)
    empty = [name for name, samples in per_input.items() if any(a.size == 0 for a in samples)]
    if empty:
        raise UserInputError(f"input '{empty[0]}' has samples with no elements (a zero-length axis)", path)
    if limit is not None:
        n = min(n, limit)
    feeds = [{name: per_input[name][i] for name in per_input} for i in range(n)]
    labels = _split_labels(labels_arr, feeds, path) if labels_arr is not None else None
    return Dataset(feeds, labels, str(path), False)


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Arrays by name from a .npz, a folder of .npy, or one .npy (named '')."""
    if not path.exists():
        raise UserInputError("data file not found", path)
    arrays: dict[str, np.ndarray] = {}
    try:
        if path.is_dir():
            for f in sorted(path.glob("*.npy")):
                arrays[f.stem] = np.load(f, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        elif path.suffix == ".npy":
            arrays = {"": np.load(path, allow_pickle=False)}
        else:
            raise UserInputError("unsupported data format (expected .npz, .npy or a folder of .npy)", path)
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(f"cannot read data ({first_line(exc)})", path) from exc
    if not arrays:
        raise UserInputError("no arrays found", path)
    return arrays


def _samples(spec: InputSpec, arr: np.ndarray, batch_size: int, path: Path) -> list[np.ndarray]:
    """One input's array as samples: along a leading sample axis, or split along the batch axis."""
    if arr.dtype != spec.dtype:
        if np.can_cast(arr.dtype, spec.dtype, casting="same_kind") or np.issubdtype(arr.dtype, np.integer):
            arr = arr.astype(spec.dtype)
        else:
            raise UserInputError(f"input '{spec.name}' is {arr.dtype}, model wants {spec.dtype}", path)
    # An input without a declared rank takes its samples along axis 0.
    rank = len(spec.shape) if spec.shape is not None else arr.ndim - 1
    if arr.ndim == rank + 1:
        return [np.asarray(arr[i]) for i in range(arr.shape[0])]
    if arr.ndim == rank:
        fixed = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0 else None
        step = fixed or batch_size
        if arr.shape[0] % step:
            raise UserInputError(f"input '{spec.name}': {arr.shape[0]} rows do not split into batches of {step}", path)
        return [arr[i : i + step] for i in range(0, arr.shape[0], step)]
    raise UserInputError(
        f"input '{spec.name}' has rank {arr.ndim}, model expects {rank} (or {rank + 1} with a sample axis)", path
    )


def _split_labels(labels_arr: np.ndarray, feeds: list[dict[str, np.ndarray]], path: Path) -> list[np.ndarray]:
    """One label per sample row, in the feeds' order."""

    def rows_of(feed: dict[str, np.ndarray]) -> int:
        first = next(iter(feed.values()))
        return int(first.shape[0]) if first.ndim else 1

    flat = labels_arr.reshape(-1)
    total = sum(rows_of(f) for f in feeds)
    if len(flat) < total:
        raise UserInputError(f"labels has {len(flat)} entries, data has {total} rows", path)
    labels, pos = [], 0
    for f in feeds:
        labels.append(flat[pos : pos + rows_of(f)])
        pos += rows_of(f)
    return labels


def resolve_dataset(
    spec: str | None, model: ir.Model, *, samples: int, seed: int, dims: dict[str, int] | None = None
) -> Dataset | None:
    """'random' -> seeded random (with a note in the dataset saying accuracy is unknown); a path -> loaded;
    None -> None."""
    if spec is None:
        return None
    if spec == "random":
        ds = random_dataset(model, samples, seed, dims)
        ds.notes.append("seeded random data: accuracy on real data is unknown")
        return ds
    return load_dataset(spec, model, limit=None)
