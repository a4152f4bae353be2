"""Model inputs: specs from the graph, seeded random feeds, and datasets from files or a Python loader.

Stacked layouts (.npz, or a folder of <input_name>.npy files): one array per graph input, keyed by the
input's name. An array with one more axis than the input's rank holds samples along axis 0; an array
of the input's rank is split along its batch axis into samples of `batch_size` (an input without a
declared rank always takes samples along axis 0). An optional `labels`
(or `label`) array holds one integer class per sample row for top-1/top-5 accuracy.

Per-sample layouts, for samples of different shapes (never stacked): a folder of .npz files (one feed
each, sorted by name), one .npz keyed `<index>/<input_name>` (and `<index>/label`), or a Python loader
`module:function` / `file.py:function` returning an iterable of feed dicts or (feeds, label) pairs. Each
sample is checked on its own (dtype, rank, fixed dims) and only the first `limit` are read.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from optimizer_cli.analysis.graph import name_of
from optimizer_cli.errors import UserInputError, first_line
from optimizer_cli.plugins import import_function

LABEL_KEYS = ("labels", "label")


@dataclass(frozen=True)
class DataPolicy:
    """What a load accepts beyond clean data of the model's dtypes, each only when the user says so."""

    allow_nonfinite: bool = False  # --allow-nonfinite: NaN/Inf in input arrays (refused otherwise: nothing compares)
    allow_cast: bool = False  # --allow-cast: integer data for a floating input, when every value is exact


class _Notes:
    """Notes gathered while samples load, each once (a per-sample layout repeats them per sample)."""

    def __init__(self) -> None:
        self._seen: dict[str, None] = {}

    def add(self, text: str) -> None:
        self._seen.setdefault(text, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._seen)


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
    # Samples the source holds, read or not (None: not known without reading on, e.g. a loader stopped at its
    # limit), so a report can say "256 of 397 samples" where it read fewer than the file has.
    available: int | None = None

    def __len__(self) -> int:
        return len(self.feeds)

    def take(self, n: int) -> Dataset:
        labels = self.labels[:n] if self.labels is not None else None
        return Dataset(self.feeds[:n], labels, self.source, self.is_random, list(self.notes), self.available)


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


def load_dataset(
    path: str | Path,
    model: ir.Model,
    batch_size: int = 1,
    limit: int | None = None,
    policy: DataPolicy | None = None,
) -> Dataset:
    """Read any supported layout into per-sample feeds matched to the model's inputs (the first `limit`).

    Checked as it loads: dtypes (integer data for a floating input only with `policy.allow_cast`, and exactly),
    NaN/Inf (only with `policy.allow_nonfinite`), keys neither an input nor labels and odd labels (notes)."""
    policy = policy or DataPolicy()
    specs = input_specs(model)
    notes = _Notes()
    if isinstance(path, str) and is_loader_spec(path):
        ds = _collect(_loader_samples(path, specs, limit, policy, notes), path, None)
        ds.available = len(ds) if limit is None or len(ds) < limit else None  # it ran dry, or may hold more
        return _finish(ds, model, None, policy, notes)
    path = Path(path)
    if path.is_dir() and any(path.glob("*.npz")):
        if any(path.glob("*.npy")):
            raise UserInputError(
                "holds both .npz and .npy files (per-sample .npz files or per-input .npy arrays)", path
            )
        ds = _collect(_npz_folder_samples(path, specs, limit, policy, notes), str(path), path)
        ds.available = len(list(path.glob("*.npz")))
        return _finish(ds, model, path, policy, notes)
    if path.is_file() and path.suffix == ".npz":
        indexed = _indexed_npz(path, specs, limit, policy, notes)
        if indexed is not None:
            return _finish(indexed, model, path, policy, notes)
    return _finish(_stacked_dataset(path, specs, batch_size, limit, policy, notes), model, path, policy, notes)


def _stacked_dataset(
    path: Path, specs: list[InputSpec], batch_size: int, limit: int | None, policy: DataPolicy, notes: _Notes
) -> Dataset:
    """One array per input (samples along a leading axis or the batch axis), as before per-sample layouts."""
    arrays = _read_arrays(path)
    if "" in arrays:  # a lone .npy feeds the single input
        if len(specs) != 1:
            raise UserInputError("a single .npy only works for single-input models; use .npz keyed by input name", path)
        arrays[specs[0].name] = arrays.pop("")
    label_key = next((k for k in LABEL_KEYS if k in arrays), None)
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        have = ", ".join(k for k in arrays if k not in LABEL_KEYS)
        raise UserInputError(f"no array for model input(s) {', '.join(missing)} (file has: {have})", path)
    _note_unused(arrays, specs, label_key, "", notes)
    per_input = {spec.name: _samples(spec, arrays[spec.name], batch_size, path, policy, notes) for spec in specs}
    counts = {len(v) for v in per_input.values()}
    if len(counts) != 1:
        raise UserInputError(f"inputs have different sample counts: {sorted(counts)}", path)
    n = counts.pop()
    if n == 0:
        raise UserInputError("holds no samples (the arrays are empty)", path)
    empty = [name for name, samples in per_input.items() if any(a.size == 0 for a in samples)]
    if empty:
        raise UserInputError(f"input '{empty[0]}' has samples with no elements (a zero-length axis)", path)
    all_feeds = [{name: per_input[name][i] for name in per_input} for i in range(n)]
    # Labels are matched against the whole file, so a count error names the file's rows, not the limit's.
    labels = _split_labels(arrays[label_key], all_feeds, path, label_key) if label_key is not None else None
    if label_key is not None and labels is not None:
        extra = arrays[label_key].size - sum(len(lab) for lab in labels)
        if extra:  # more labels than rows: the rows and labels may not line up
            notes.add(f"'{label_key}' has {extra} more entries than the data has rows: the last {extra} are not used")
    available = n
    if limit is not None:
        n = min(n, limit)
    return Dataset(all_feeds[:n], labels[:n] if labels is not None else None, str(path), False, available=available)


def _note_unused(
    arrays: Mapping[str, Any], specs: list[InputSpec], label_key: str | None, where: str, notes: _Notes
) -> None:
    """Keys that are neither a model input nor the labels are named, not dropped without a word."""
    names = {s.name for s in specs}
    unused = [str(k) for k in arrays if k not in names and k != label_key]
    if unused:
        listed = ", ".join(f"'{k}'" for k in unused)
        notes.add(
            f"{where}key(s) {listed} not used: neither a model input ({', '.join(sorted(names))}) nor labels "
            f"(saved as {' or '.join(LABEL_KEYS)})"
        )


def _read_problem(exc: BaseException) -> str:
    """Why numpy could not read a data file, without numpy's advice to load it with allow_pickle (unsafe)."""
    text = first_line(exc)
    if "Object arrays cannot be loaded" in text:
        return "it holds object arrays (pickled Python objects), which are never loaded; save numeric arrays"
    if "pickle" in text:  # numpy's guess for a file that is neither a .npy header nor a zip
        return "not a numpy .npz/.npy file"
    return text


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
            raise UserInputError(
                "unsupported data format (expected .npz, .npy, a folder of .npy or .npz, or module:function)", path
            )
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(f"cannot read data ({_read_problem(exc)})", path) from exc
    if not arrays:
        raise UserInputError("no arrays found", path)
    return arrays


def _fixed_dims_problem(spec: InputSpec, shape: tuple[int, ...], first: int) -> str | None:
    """Where the data's dims from axis `first` on differ from the model's fixed dims (None: they fit)."""
    if spec.shape is None:
        return None
    for axis, (want, have) in enumerate(zip(spec.shape[first:], shape[first:], strict=False), start=first):
        if isinstance(want, int) and want >= 0 and want != have:
            return f"axis {axis} is {have}, the model's is {want}"
    return None


def _samples(
    spec: InputSpec, arr: np.ndarray, batch_size: int, path: Path, policy: DataPolicy, notes: _Notes
) -> list[np.ndarray]:
    """One input's array as samples: along a leading sample axis, or split along the batch axis."""
    arr = _cast_or_raise(spec, arr, "", path, policy, notes)
    # An input without a declared rank takes its samples along axis 0.
    rank = len(spec.shape) if spec.shape is not None else arr.ndim - 1
    if arr.ndim == rank + 1:
        problem = _fixed_dims_problem(spec, arr.shape[1:], 0)
        if problem:
            raise UserInputError(
                f"input '{spec.name}': samples of shape {list(arr.shape[1:])} do not fit the model's "
                f"{_dims_text(spec.shape or ())} ({problem})",
                path,
            )
        return [np.asarray(arr[i]) for i in range(arr.shape[0])]
    if arr.ndim == rank:
        problem = _fixed_dims_problem(spec, arr.shape, 1)
        if problem:
            raise UserInputError(
                f"input '{spec.name}': shape {list(arr.shape)} does not fit the model's "
                f"{_dims_text(spec.shape or ())} ({problem})",
                path,
            )
        fixed = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0 else None
        step = fixed or batch_size
        if arr.shape[0] % step:
            raise UserInputError(f"input '{spec.name}': {arr.shape[0]} rows do not split into batches of {step}", path)
        return [arr[i : i + step] for i in range(0, arr.shape[0], step)]
    raise UserInputError(
        f"input '{spec.name}' has rank {arr.ndim}, model expects {rank} (or {rank + 1} with a sample axis)", path
    )


def _split_labels(
    labels_arr: np.ndarray, feeds: list[dict[str, np.ndarray]], path: Path, key: str = "labels"
) -> list[np.ndarray]:
    """One label per sample row, in the feeds' order (every sample of the file, before any limit)."""

    def rows_of(feed: dict[str, np.ndarray]) -> int:
        first = next(iter(feed.values()))
        return int(first.shape[0]) if first.ndim else 1

    flat = labels_arr.reshape(-1)
    total = sum(rows_of(f) for f in feeds)
    if len(flat) < total:
        raise UserInputError(f"'{key}' has {len(flat)} entries, the data has {total} rows", path)
    labels, pos = [], 0
    for f in feeds:
        labels.append(flat[pos : pos + rows_of(f)])
        pos += rows_of(f)
    return labels


def resolve_dataset(
    spec: str | None,
    model: ir.Model,
    *,
    samples: int,
    seed: int,
    dims: dict[str, int] | None = None,
    limit: int | None = None,
    policy: DataPolicy | None = None,
) -> Dataset | None:
    """'random' -> seeded random (with a note in the dataset saying accuracy is unknown); a path or a loader ->
    its first `limit` samples, checked under `policy`; None -> None."""
    if spec is None:
        return None
    if spec == "random":
        ds = random_dataset(model, samples, seed, dims)
        ds.notes.append("seeded random data: accuracy on real data is unknown")
        return ds
    return load_dataset(spec, model, limit=limit, policy=policy)


# A Windows drive ("C:\data", "C:/data") has a colon too; it is a path, not a loader.
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
_INDEXED_KEY = re.compile(r"^(\d+)/(.+)$")


def is_loader_spec(spec: str) -> bool:
    """'module:function' or 'path/to/file.py:function' (not 'random', an existing path or a Windows drive)."""
    if ":" not in spec or _DRIVE.match(spec) or Path(spec).exists():
        return False
    target, _, func = spec.rpartition(":")
    return bool(target) and func.isidentifier()


def loader_file(spec: str) -> Path | None:
    """The .py file a 'file.py:function' loader reads (None for a 'module:function' loader or a path)."""
    if not is_loader_spec(spec):
        return None
    target = spec.rpartition(":")[0]
    return Path(target) if target.endswith(".py") else None


def data_problem(spec: str) -> str | None:
    """Why a --calib/--data value cannot be read, known before the model loads (None when it looks usable)."""
    if spec == "random":
        return None
    if is_loader_spec(spec):
        file = loader_file(spec)
        return f"data loader file not found: {file}" if file is not None and not file.is_file() else None
    return None if Path(spec).exists() else f"data not found: {spec}"


def source_files(spec: str) -> list[Path]:
    """Files a --calib/--data value reads (so no output overwrites them)."""
    if spec == "random":
        return []
    if is_loader_spec(spec):
        file = loader_file(spec)
        return [file] if file is not None else []
    path = Path(spec)
    extra = sorted(path.glob("*.np[yz]")) if path.is_dir() else []
    return [path, *extra]


def is_per_sample(spec: str) -> bool:
    """A loader, a folder of .npz or an `<index>/<name>` .npz: samples are read one by one, up to a limit."""
    if is_loader_spec(spec):
        return True
    path = Path(spec)
    if path.is_dir():
        return any(path.glob("*.npz"))
    if path.is_file() and path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:  # the member names only; nothing is decompressed
                return bool(npz.files) and all(_INDEXED_KEY.match(k) for k in npz.files)
        except Exception:
            return False  # reading it will say why
    return False


Sample = tuple[str, dict[str, np.ndarray], np.ndarray | None]  # (where, feed, label)


def _cast(spec: InputSpec, arr: np.ndarray, allow_cast: bool = False) -> tuple[np.ndarray | None, str]:
    """The array in the input's dtype and a note saying how it was cast ('' when it was not); or None and why
    it is refused. Casts that keep every value (a widening, integers that fit) pass with a note; floats are
    rounded to a narrower float unless that overflows; integer (or bool) data for a floating input only with
    `allow_cast` and when every value is exact, since such data usually wants scaling the cast cannot do."""
    found, want = arr.dtype, spec.dtype
    if found == want:
        return arr, ""
    said = f"input '{spec.name}' is {found}, model wants {want}"
    numeric = found.kind in "biuf"  # bool, int, uint, float: strings, objects and complex are never cast
    if not numeric or (np.issubdtype(found, np.floating) and not np.issubdtype(want, np.floating)):
        return None, said
    if want == np.bool_:  # a mask fed as 0/1 integers
        if arr.size and not np.isin(arr, (0, 1)).all():
            return None, f"{said}: values other than 0 and 1 are not booleans"
        return arr.astype(want), f"{said}: cast (every value is 0 or 1)"
    if np.issubdtype(want, np.floating) and not np.issubdtype(found, np.floating):
        if not allow_cast:
            return None, (
                f"{said}: integer data is not cast to floating point silently (images usually need scaling to "
                f"the model's range); save it as {want}, or give run/bench --allow-cast to cast values exact in {want}"
            )
        exact = 2 ** (np.finfo(want).nmant + 1)
        top = int(np.abs(arr.astype(np.int64 if found != np.uint64 else np.uint64)).max()) if arr.size else 0
        if top > exact:
            return None, f"{said}: values up to {top} are not exact in {want} (exact up to {exact})"
        return arr.astype(want), f"{said}: cast exactly (--allow-cast)"
    if np.can_cast(found, want, casting="safe"):
        return arr.astype(want), f"{said}: cast (every value is kept)"
    if np.issubdtype(want, np.integer):  # a narrower integer (or bool): only when every value fits
        info = np.iinfo(want)
        low, high = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if low < info.min or high > info.max:
            return None, f"{said}: values {low}..{high} do not fit {want} ({info.min}..{info.max})"
        return arr.astype(want), f"{said}: cast (every value fits)"
    with np.errstate(over="ignore"):
        cast = arr.astype(want)
    if np.any(np.isfinite(arr) & ~np.isfinite(cast)):
        return None, f"{said}: values up to {float(np.nanmax(np.abs(arr))):g} overflow {want}"
    return cast, f"{said}: rounded to {want}"


def _cast_or_raise(
    spec: InputSpec, arr: np.ndarray, where: str, path: Path | None, policy: DataPolicy, notes: _Notes
) -> np.ndarray:
    cast, said = _cast(spec, arr, policy.allow_cast)
    if cast is None:
        raise UserInputError(where + said, path)
    if said:
        notes.add(said)
    return cast


def _dims_text(shape: tuple[int | str | None, ...]) -> str:
    return "[" + ",".join(str(d) if isinstance(d, int) and d >= 0 else str(d or "?") for d in shape) + "]"


def check_sample(
    specs: list[InputSpec],
    arrays: Mapping[str, Any],
    where: str,
    path: Path | None,
    policy: DataPolicy | None = None,
    notes: _Notes | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """One sample's feed (model inputs only, cast) and its label, or a UserInputError naming the sample."""
    policy, notes = policy or DataPolicy(), notes if notes is not None else _Notes()
    names = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        have = ", ".join(str(k) for k in arrays) or "nothing"
        raise UserInputError(f"{where}: no array for model input(s) {', '.join(missing)} (it has: {have})", path)
    feed = {}
    for spec in specs:
        try:
            arr = np.asarray(arrays[spec.name])
        except Exception as exc:
            raise UserInputError(f"{where}: input '{spec.name}' is not an array ({first_line(exc)})", path) from exc
        cast = _cast_or_raise(spec, arr, f"{where}: ", path, policy, notes)
        if spec.shape is not None:
            fits = cast.ndim == len(spec.shape) and all(
                not isinstance(d, int) or d < 0 or d == n for d, n in zip(spec.shape, cast.shape, strict=True)
            )
            if not fits:
                raise UserInputError(
                    f"{where}: input '{spec.name}' has shape {list(cast.shape)}, model wants {_dims_text(spec.shape)}"
                    f" (rank {len(spec.shape)})",
                    path,
                )
        if cast.size == 0:
            raise UserInputError(f"{where}: input '{spec.name}' has no elements (a zero-length axis)", path)
        feed[spec.name] = cast
    label_key = next((k for k in LABEL_KEYS if k in arrays and k not in names), None)
    _note_unused(arrays, specs, label_key, "", notes)
    label = arrays[label_key] if label_key is not None else None
    return feed, (np.atleast_1d(np.asarray(label)) if label is not None else None)


def _collect(samples: Iterable[Sample], source: str, path: Path | None) -> Dataset:
    """Samples (already limited) into a Dataset: labels on every sample or on none."""
    feeds: list[dict[str, np.ndarray]] = []
    labels: list[np.ndarray | None] = []
    wheres: list[str] = []
    for where, feed, label in samples:
        feeds.append(feed)
        labels.append(label)
        wheres.append(where)
    if not feeds:
        raise UserInputError(("" if path is not None else f"data loader '{source}': ") + "holds no samples", path)
    with_label = [lab is not None for lab in labels]
    if any(with_label) and not all(with_label):
        unlabelled, labelled = wheres[with_label.index(False)], wheres[with_label.index(True)]
        raise UserInputError(f"{unlabelled} has no label but {labelled} has one: label every sample or none", path)
    kept = [lab for lab in labels if lab is not None] if all(with_label) else None
    return Dataset(feeds, kept, source, False)


def _finish(ds: Dataset, model: ir.Model, path: Path | None, policy: DataPolicy, notes: _Notes) -> Dataset:
    """Checks on the loaded samples as a whole: NaN/Inf in the inputs, then the labels; the notes gathered."""
    where = "" if path is not None else f"data loader '{ds.source}': "
    for name in ds.feeds[0] if ds.feeds else {}:
        bad = [i for i, f in enumerate(ds.feeds) if f[name].dtype.kind in "fc" and not np.isfinite(f[name]).all()]
        if not bad:
            continue
        count = f"{len(bad)} of the {len(ds)} samples read (first: sample {bad[0]})"
        if not policy.allow_nonfinite:
            # NaN in, NaN out: nothing would be compared, and every figure would look perfect or be noise.
            raise UserInputError(
                f"{where}input '{name}' holds NaN/Inf in {count}; fix the data, or give run/bench --allow-nonfinite "
                "to run on it anyway",
                path,
            )
        notes.add(f"{where}input '{name}' holds NaN/Inf in {count} (allowed by --allow-nonfinite)")
    if ds.labels is not None:
        ds.labels = _checked_labels(ds.labels, model, notes)
    ds.notes.extend(n for n in notes if n not in ds.notes)
    return ds


def _classes(model: ir.Model) -> tuple[str, int] | None:
    """The first output's name and class count when it is [batch, classes] with a fixed class count (what
    top-1/top-5 read)."""
    out = model.graph.outputs[0] if model.graph.outputs else None
    if out is None or out.shape is None or len(out.shape) != 2 or not isinstance(out.shape[1], int):
        return None
    return name_of(out), int(out.shape[1])


def _checked_labels(labels: list[np.ndarray], model: ir.Model, notes: _Notes) -> list[np.ndarray]:
    """Labels that cannot be top-1/top-5 class ids are named in a note instead of giving 0 % (or no accuracy)
    without a word; whole-valued float labels are read as integer class ids."""
    flat = np.concatenate([np.asarray(lab).reshape(-1) for lab in labels]) if labels else np.zeros(0)
    kind = flat.dtype.kind
    if kind in "US":
        notes.add(f"labels are strings ({flat.dtype}): top-1/top-5 accuracy is not computed (a --metric reads them)")
        return labels
    if kind == "f":
        if flat.size and np.isfinite(flat).all() and np.array_equal(flat, np.round(flat)):
            notes.add(f"labels are {flat.dtype} with whole values: read as integer class ids")
            labels = [np.asarray(lab).astype(np.int64) for lab in labels]
            flat = flat.astype(np.int64)
        else:
            notes.add(
                f"labels are {flat.dtype}, not integer class ids: top-1/top-5 accuracy is not computed "
                "(a --metric reads them as they are)"
            )
            return labels
    if flat.dtype.kind not in "iu":
        notes.add(f"labels are {flat.dtype}, not integer class ids: top-1/top-5 accuracy is not computed")
        return labels
    classes = _classes(model)
    outside = flat[(flat < 0) | (flat >= classes[1])] if classes is not None else flat[flat < 0]
    if outside.size:
        shown = ", ".join(str(int(v)) for v in np.unique(outside)[:3])
        scope = f"the {classes[1]} classes of output '{classes[0]}' (0..{classes[1] - 1})" if classes else "any class"
        notes.add(
            f"labels: {outside.size} of {flat.size} rows are outside {scope}, e.g. {shown}: they count as misses "
            "in top-1/top-5 accuracy"
        )
    return labels


def _npz_folder_samples(
    folder: Path, specs: list[InputSpec], limit: int | None, policy: DataPolicy, notes: _Notes
) -> Iterator[Sample]:
    """One feed per .npz file, sorted by name; only the first `limit` files are opened."""
    files = sorted(folder.glob("*.npz"))
    for index, file in enumerate(files[:limit] if limit is not None else files):
        where = f"sample {index} ({file.name})"
        try:
            with np.load(file, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:
            raise UserInputError(f"{where}: cannot read ({_read_problem(exc)})", file) from exc
        yield (where, *check_sample(specs, arrays, where, file, policy, notes))


def _indexed_npz(
    path: Path, specs: list[InputSpec], limit: int | None, policy: DataPolicy, notes: _Notes
) -> Dataset | None:
    """A .npz keyed `<index>/<input_name>` as per-sample feeds (None when the keys are not laid out so)."""
    names = {s.name for s in specs}
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            if not keys or not all(_INDEXED_KEY.match(k) for k in keys) or all(k in names for k in keys):
                return None
            groups: dict[int, dict[str, str]] = {}
            for key in keys:
                match = _INDEXED_KEY.match(key)
                assert match is not None
                groups.setdefault(int(match[1]), {})[match[2]] = key
            chosen = sorted(groups)[:limit] if limit is not None else sorted(groups)
            # Only the chosen samples' members are decompressed (NpzFile reads a key on access).
            samples = [
                (
                    f"sample {i}",
                    *check_sample(specs, {n: npz[k] for n, k in groups[i].items()}, f"sample {i}", path, policy, notes),
                )
                for i in chosen
            ]
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(f"cannot read data ({_read_problem(exc)})", path) from exc
    ds = _collect(samples, str(path), path)
    ds.available = len(groups)
    return ds


def _loader_items(spec: str, limit: int | None) -> Iterator[tuple[int, Any]]:
    """The loader's items, pulled one at a time and never past `limit`."""
    func = import_function(spec, f"data loader '{spec}'")
    try:
        iterator = iter(func())
    except Exception as exc:
        raise UserInputError(
            f"data loader '{spec}': calling it failed or it returned no iterable ({type(exc).__name__}: "
            f"{first_line(exc)})"
        ) from exc
    for index in itertools.count() if limit is None else range(limit):
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            raise UserInputError(
                f"data loader '{spec}': sample {index} failed ({type(exc).__name__}: {first_line(exc)})"
            ) from exc
        yield index, item


def _loader_samples(
    spec: str, specs: list[InputSpec], limit: int | None, policy: DataPolicy, notes: _Notes
) -> Iterator[Sample]:
    """A loader's feed dicts or (feeds, label) pairs as checked samples."""
    for index, item in _loader_items(spec, limit):
        where = f"data loader '{spec}': sample {index}"
        label = None
        if isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], Mapping):
            item, label = item
        if not isinstance(item, Mapping):
            raise UserInputError(
                f"{where}: expected a dict {{input name: array}} or a (feeds, label) pair, got {type(item).__name__}"
            )
        feed, own_label = check_sample(specs, item, where, None, policy, notes)
        yield where, feed, (np.atleast_1d(np.asarray(label)) if label is not None else own_label)


def shape_mix(feeds: list[dict[str, np.ndarray]]) -> list[tuple[dict[str, list[int]], int]]:
    """The distinct input shapes among feeds with how many feeds have each, in order of first appearance."""
    counts: dict[tuple[tuple[str, tuple[int, ...]], ...], int] = {}
    for feed in feeds:
        key = tuple((name, tuple(int(d) for d in arr.shape)) for name, arr in feed.items())
        counts[key] = counts.get(key, 0) + 1
    return [({name: list(shape) for name, shape in key}, n) for key, n in counts.items()]


def shape_text(shape: dict[str, list[int]]) -> str:
    """{'x': [1, 3, 32, 64]} -> 'x[1,3,32,64]'."""
    return " ".join(f"{name}[{','.join(str(d) for d in dims)}]" for name, dims in shape.items())
