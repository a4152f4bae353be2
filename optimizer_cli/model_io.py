"""Load and save ONNX models through onnx_ir.

onnx_ir memory-maps external data, so models over 2 GB load in ~0 s without copying weights.
The input model is never modified: saves go to a temporary file beside the target and are renamed
into place, and a save whose target is the input (or its external data) is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from optimizer_cli.analysis.graph import name_of
from optimizer_cli.errors import UserInputError, first_line

# Protobuf cannot serialize messages over 2 GiB; stay well below with a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000


def load_model(path: str | Path) -> ir.Model:
    """Load a model, turning every way a file can be wrong into a one-line UserInputError."""
    path = Path(path)
    if not path.exists():
        raise UserInputError("file not found", path)
    if path.is_dir():
        raise UserInputError("is a directory, expected an .onnx file", path)
    if path.stat().st_size == 0:
        raise UserInputError("file is empty, not an ONNX model", path)
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError or ValueError by version
        raise UserInputError(f"not a readable ONNX model ({first_line(exc)})", path) from exc
    if model.ir_version is None or model.ir_version <= 0 or len(model.graph.outputs) == 0:
        raise UserInputError("not an ONNX model (no IR version or no graph outputs)", path)
    _check_external_data(model, path)
    if has_external_data(model) and weights_nbytes(model) <= EXTERNAL_DATA_THRESHOLD_BYTES:
        # Small enough for one protobuf: hold the weights in memory, so sessions built from bytes and
        # passes that save to a scratch folder never resolve `location` against the wrong directory.
        ir.external_data.load_to_model(model)
    return model


def runtime_problem(model: ir.Model) -> str | None:
    """Why onnxruntime would refuse to load the model as it is on disk, for the two causes a user can fix
    without touching the graph (an IR version newer than it reads, two nodes of one name), else None."""
    from optimizer_cli.ir_compat import ort_max_ir_version

    newest = ort_max_ir_version()
    if model.ir_version is not None and model.ir_version > newest:
        import onnxruntime as ort

        return (
            f"IR version {model.ir_version} is newer than onnxruntime {ort.__version__} reads (up to IR {newest}); "
            f"save the model with ir_version={newest} (onnx: m.ir_version = {newest}; onnx.save(m, path)) or "
            "upgrade onnxruntime"
        )
    graphs: list[ir.Graph] = [model.graph, *model.graph.subgraphs()]
    for graph in graphs:
        seen: set[str] = set()
        for node in graph:
            if node.name and node.name in seen:
                return (
                    f"two nodes are named '{node.name}', which onnxruntime refuses; give every node a unique name "
                    "(optimize with any recipe, e.g. a cleanup pass, writes a model that has them)"
                )
            if node.name:
                seen.add(node.name)
    return None


def check_runtime_loadable(model: ir.Model, path: Path) -> None:
    """runtime_problem as a one-line UserInputError naming the file."""
    problem = runtime_problem(model)
    if problem is not None:
        raise UserInputError(problem, path)


# structure_proto's data-less stand-ins: every external weight, and in-memory ones of this size or more.
STUB_MIN_BYTES = 1 << 20
STUB_LOCATION = "optimizer-cli-stub.data"
# Offsets of large tensors in data files we write are aligned so onnxruntime can memory-map them.
ALIGNMENT = 1 << 16


class DataFile:
    """Appends tensors to one external data file and hands back ExternalTensors that read them there."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._size = 0

    def append(self, name: str, tensor: ir.TensorProtocol) -> ir.ExternalTensor:
        offset = -(-self._size // ALIGNMENT) * ALIGNMENT
        with open(self.path, "ab") as fh:
            fh.write(b"\0" * (offset - self._size))
            if isinstance(tensor, (ir.Tensor, ir.ExternalTensor)):
                tensor.tofile(fh)  # numpy-backed and external tensors are written without a bytes copy
            else:
                fh.write(tensor.tobytes())
        self._size = offset + tensor.nbytes
        return ir.ExternalTensor(
            self.path.name,
            offset,
            tensor.nbytes,
            tensor.dtype,
            shape=ir.Shape(tensor.shape.numpy()),
            name=name,
            base_dir=self.path.parent,
        )


@contextlib.contextmanager
def _tensors_replaced(
    model: ir.Model, replacement: Callable[[ir.Value, ir.TensorProtocol], ir.TensorProtocol | None]
) -> Iterator[list[str]]:
    """Every initializer whose `replacement` is not None holds it inside the block (for serializing a variant
    of the model), and its own tensor again afterwards; yields the replaced names."""
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        for value in _all_initializers(model.graph):
            tensor = value.const_value
            new = replacement(value, tensor) if tensor is not None else None
            if new is not None:
                swapped.append((value, tensor))  # type: ignore[arg-type]
                value.const_value = new
        yield [name_of(value) for value, _ in swapped]
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def structure_proto(
    model: ir.Model, min_bytes: int = STUB_MIN_BYTES, location: str = STUB_LOCATION
) -> tuple[onnx.ModelProto, set[str]]:
    """The model as a protobuf whose initializers of `min_bytes` or more, and all in external data, are
    data-less external stubs (nothing is read); returns the stubbed names. For tools that read the graph,
    not the weights."""

    def stub(value: ir.Value, tensor: ir.TensorProtocol) -> ir.TensorProtocol | None:
        # External tensors are always stubbed: a tool that sees their reference could retype it (float ->
        # float16) and leave it pointing at the float32 bytes.
        if tensor.nbytes < min_bytes and not isinstance(tensor, ir.ExternalTensor):
            return None
        shape = ir.Shape(tensor.shape.numpy())
        return ir.ExternalTensor(location, 0, tensor.nbytes, tensor.dtype, shape=shape, name=name_of(value))

    with _tensors_replaced(model, stub) as names:
        return ir.serde.serialize_model(model), set(names)


def save_structure(model: ir.Model, directory: Path) -> Path:
    """The model's graph saved for a checker in `directory`, weights replaced by references into one empty
    stub file: onnx.checker and shape inference read no weight, so nothing is copied."""
    proto, _ = structure_proto(model)
    (directory / STUB_LOCATION).touch()
    path = directory / "structure.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def save_for_reading(model: ir.Model, directory: Path) -> Path:
    """The model saved in `directory` for a reader that takes a path (an onnxruntime session), without
    copying what is already on disk: each external data file is hard-linked into `directory` (copied where
    a link cannot be made, e.g. across file systems) and referenced there; in-memory weights of 1 MiB or
    more are written to one new data file. The source files are only read."""
    links: dict[Path, str] = {}
    memory = DataFile(directory / "weights.data")

    def referenced_here(value: ir.Value, tensor: ir.TensorProtocol) -> ir.TensorProtocol | None:
        if not isinstance(tensor, ir.ExternalTensor):
            return memory.append(name_of(value), tensor) if tensor.nbytes >= STUB_MIN_BYTES else None
        source = Path(tensor.path).resolve()
        if source not in links:
            links[source] = f"linked{len(links)}.data"
            _link_or_copy(source, directory / links[source])
        shape = ir.Shape(tensor.shape.numpy())
        return ir.ExternalTensor(
            links[source],
            tensor.offset,
            tensor.length,
            tensor.dtype,
            shape=shape,
            name=name_of(value),
            base_dir=directory,
        )

    with _tensors_replaced(model, referenced_here):
        path = directory / "model.onnx"
        path.write_bytes(ir.serde.serialize_model(model).SerializeToString())
    return path


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed: the kernel copies file to file
        shutil.copyfile(source, target)


def data_file_of(model_path: Path) -> Path:
    """The external data file saved beside a model: named after it (`out.onnx.data`)."""
    return model_path.with_name(model_path.name + ".data")


def has_external_data(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in _all_initializers(model.graph))


def external_data_files(path: str | Path) -> list[Path]:
    """The external data files a saved model references (resolved against the model's folder)."""
    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return []
    files = []
    for tensor in _iter_proto_tensors(proto.graph):
        for entry in tensor.external_data:
            if entry.key == "location":
                files.append((path.parent / entry.value).resolve())
    return sorted(set(files))


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Fail early (and clearly) when an external data file is missing or shorter than declared."""
    folder = path.resolve().parent
    for init in _all_initializers(model.graph):
        tensor = init.const_value
        if isinstance(tensor, ir.ExternalTensor):
            data_path = (Path(tensor.base_dir) / tensor.location).resolve()
            # onnx and onnxruntime refuse data outside the model's folder; so do we, before any work.
            if Path(tensor.location).is_absolute() or not data_path.is_relative_to(folder):
                raise UserInputError(
                    f"external data location '{tensor.location}' (tensor '{init.name}') leaves the model's folder; "
                    "move the data file next to the model and use a relative location",
                    path,
                )
            if not data_path.exists():
                raise UserInputError(f"external data file '{tensor.location}' not found", path)
            needed = (tensor.offset or 0) + (tensor.length or tensor.nbytes)
            if data_path.stat().st_size < needed:
                raise UserInputError(
                    f"external data file '{tensor.location}' is truncated (tensor '{init.name}' needs {needed} bytes)",
                    path,
                )


def _all_initializers(graph: ir.Graph) -> list[ir.Value]:
    values = list(graph.initializers.values())
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                values.extend(attr.value.initializers.values())
            elif attr.type == ir.AttributeType.GRAPHS:
                for g in attr.value:
                    values.extend(g.initializers.values())
    return values


def _file_dtype(tensor: ir.TensorProtocol) -> np.dtype | None:
    """The numpy dtype of an external tensor numpy can read straight from its file (whole bytes per element,
    little-endian as ONNX stores it); None for anything else."""
    if isinstance(tensor, ir.ExternalTensor) and tensor.dtype.bitwidth >= 8 and tensor.size:
        return np.dtype(tensor.dtype.numpy()).newbyteorder("<")
    return None


def map_weight(tensor: ir.TensorProtocol) -> np.ndarray:
    """A weight to read only: external data is a read-only memory map of just this tensor (no copy; its pages
    leave the process when the array is dropped), anything else as `read_weight` gives it."""
    dtype = _file_dtype(tensor)
    if dtype is None:
        return read_weight(tensor)
    assert isinstance(tensor, ir.ExternalTensor)
    shape = tuple(tensor.shape.numpy())
    # A plain ndarray view (np.memmap's subclass would leak into what is computed from it).
    return np.asarray(np.memmap(tensor.path, dtype=dtype, mode="r", offset=tensor.offset or 0, shape=shape))


def has_nan(array: np.ndarray) -> bool:
    """NaN anywhere in `array`? For float32/float64 a product with a vector of ones first: any NaN reaches
    the result, and BLAS reads the tensor once on every core without a temporary the tensor's size. Only
    when that shows NaN (inf - inf and overflow can too) is every element checked."""
    flat = array.reshape(-1)
    if flat.dtype.type not in (np.float32, np.float64):
        return bool(np.isnan(flat.astype(np.float32)).any())
    width = 1024
    rows = flat.size // width
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is what the exact check is for
        probe = flat[: rows * width].reshape(rows, width) @ np.ones(width, flat.dtype) if rows else flat[:0]
    if not np.isnan(probe).any() and not np.isnan(flat[rows * width :]).any():
        return False
    return bool(np.isnan(flat).any())


def read_weight(tensor: ir.TensorProtocol) -> np.ndarray:
    """A weight as a private array: external data is read from the file (not memory-mapped), so the pages
    do not stay resident in this process once the array is dropped."""
    dtype = _file_dtype(tensor)
    if dtype is not None:
        assert isinstance(tensor, ir.ExternalTensor)
        array = np.fromfile(tensor.path, dtype=dtype, count=tensor.size, offset=tensor.offset or 0)
        return array.reshape(tensor.shape.numpy())
    if not isinstance(tensor, ir.ExternalTensor):
        return tensor.numpy()  # already in memory: not copied (callers do not write into it)
    array = np.array(tensor.numpy(), copy=True)
    tensor.release()
    return array


def nan_weights(model: ir.Model) -> list[str]:
    """Names of floating-point initializers holding NaN (read one tensor at a time: external data stays
    memory-mapped). Inf is legitimate (-inf attention masks, clip bounds in real exports); NaN is not."""
    bad = []
    for init in _all_initializers(model.graph):
        tensor = init.const_value
        if tensor is None or not tensor.dtype.is_floating_point():
            continue
        try:
            array = map_weight(tensor)
        except Exception:  # a dtype numpy cannot hold (e.g. some float8 variants): nothing to check
            continue
        if has_nan(array):
            bad.append(init.name or "?")
        del array  # one tensor at a time: a model over 2 GB is never held whole
    return bad


def weights_nbytes(model: ir.Model) -> int:
    """Bytes held by initializers (and Constant nodes' tensors)."""
    total = 0
    for init in _all_initializers(model.graph):
        if init.const_value is not None:
            total += init.const_value.nbytes
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant" and node.domain == "":
            attr = node.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR:
                total += attr.value.nbytes
    return total


def file_size(path: str | Path) -> int:
    """Size of a model on disk, including the external data files it references."""
    path = Path(path)
    total = path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in _iter_proto_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    for loc in locations:
        data = path.parent / loc
        if data.exists():
            total += data.stat().st_size
    return total


def _iter_proto_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            if attr.HasField("g"):
                yield from _iter_proto_tensors(attr.g)
            for g in attr.graphs:
                yield from _iter_proto_tensors(g)


HASH_WINDOW = 64 << 20  # a multiple of mmap.ALLOCATIONGRANULARITY


def model_sha256(path: str | Path) -> str:
    """sha256 over the model file and then its external data files (in location order), a window at a time."""
    digest = hashlib.sha256()
    for part in [Path(path), *external_data_files(path)]:
        with open(part, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            # Hashed through memory-mapped windows: read() into 1 MB chunks took twice as long on a 2.5 GB file,
            # and one map of the whole file would count all of it in the process's resident memory.
            for start in range(0, size, HASH_WINDOW):
                length = min(HASH_WINDOW, size - start)
                with mmap.mmap(fh.fileno(), length, access=mmap.ACCESS_READ, offset=start) as view:
                    digest.update(view)
    return digest.hexdigest()


def _protected_paths(input_path: Path) -> set[Path]:
    """The input model file and its external data files: a save must never write over them."""
    return {input_path.resolve(), *external_data_files(input_path)}


def check_output_path(output: Path, input_path: Path) -> None:
    """Refuse an output (or its .data file) that would overwrite the input model or its data."""
    protected = _protected_paths(input_path)
    for target in (output, data_file_of(output)):
        if target.resolve() in protected:
            raise UserInputError(
                f"refusing to overwrite the input model or its data with the output ({target})", output
            )


def save_model(
    model: ir.Model,
    path: str | Path,
    *,
    input_path: str | Path | None = None,
    external_data: bool | None = None,
) -> Path:
    """Save atomically; use external data when asked, when weights approach the 2 GB limit, or when the
    model still reads weights from an external file (they are copied, never referenced).

    The data file is always named after the model (`out.onnx.data`) and written beside it, so an output
    never points at another model's data. Returns the external data path if one was written.
    """
    path = Path(path)
    if input_path is not None:
        check_output_path(path, Path(input_path))
    if external_data is None:
        external_data = weights_nbytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES or has_external_data(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = data_file_of(path).name if external_data else None
    tmp_dir = Path(tempfile.mkdtemp(prefix=".optimize-", dir=path.parent))
    try:
        tmp_model = tmp_dir / path.name
        if data_name:
            ir.save(model, tmp_model, external_data=data_name, size_threshold_bytes=1024)
        else:
            ir.save(model, tmp_model)
        if data_name:
            os.replace(tmp_dir / data_name, path.parent / data_name)
        os.replace(tmp_model, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path.parent / data_name if data_name else path


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """In-memory proto (callers must only use this for models under 2 GB)."""
    return ir.serde.serialize_model(model)


def model_to_bytes(model: ir.Model) -> bytes | None:
    """Serialized bytes when the model fits in one protobuf and holds its weights, else None (use a file:
    weights in external data, e.g. written by a per-tensor pass, are referenced by a path)."""
    if weights_nbytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES or has_external_data(model):
        return None
    return to_proto(model).SerializeToString()
