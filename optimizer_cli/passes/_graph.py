"""Graph edits shared by passes: new and replaced initializers, shape refresh, constant lifting."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common

from optimizer_cli.analysis.graph import name_of
from optimizer_cli.model_io import EXTERNAL_DATA_THRESHOLD_BYTES, DataFile, weights_nbytes
from optimizer_cli.passes._tools import write_for_tool

# Metadata a structured prune leaves on a pruned layer's output: which of the original channels it kept
# (reconstruct refits those rows against the original model).
KEPT_CHANNELS_META = "optimizer_cli.kept_channels"
# Large models: new weights of this size or more go to a scratch data file (WeightStore), smaller ones
# (scales, zero points, biases) stay in memory.
STORE_MIN_BYTES = 1 << 20
META_KEY = "optimizer_cli.weight_stores"


class WeightStore:
    """Appends new weights to one scratch data file and hands back ExternalTensors reading it.

    The scratch folder lives as long as the model or graph that references it (kept in its `meta`), so
    the model stays loadable after the pass returns; the pipeline's save copies the bytes out."""

    def __init__(self, owner: ir.Model | ir.Graph) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="optimize-weights-")
        self._file = DataFile(Path(self._dir.name) / f"{uuid.uuid4().hex}.data")
        owner.meta[META_KEY] = [*(owner.meta.get(META_KEY) or []), self]

    def put(self, name: str, array: np.ndarray) -> ir.TensorProtocol:
        tensor = ir.tensor(np.ascontiguousarray(array), name=name)
        return tensor if tensor.nbytes < STORE_MIN_BYTES else self._file.append(name, tensor)


def weight_tensor(graph: ir.Graph, name: str, array: np.ndarray, like: ir.TensorProtocol | None) -> ir.TensorProtocol:
    """A new weight derived from `like`: kept in external data (the graph's WeightStore) when `like` was, so
    a pass over a model too large to hold in memory writes its new weights to disk as it goes."""
    if isinstance(like, ir.ExternalTensor) and array.nbytes >= STORE_MIN_BYTES:
        stores = graph.meta.get(META_KEY) or [WeightStore(graph)]
        return stores[-1].put(name, array)
    return ir.tensor(array, name=name)


def replace_model_contents(target: ir.Model, source: ir.Model) -> None:
    """Make `target` hold `source`'s graph (in-place passes that call file-based tools)."""
    # Model.opset_imports is the graph's, so assigning the graph carries the opsets along.
    target.graph = source.graph
    target.functions.clear()
    target.functions.update(source.functions)
    if source.ir_version and (target.ir_version or 0) < source.ir_version:
        target.ir_version = source.ir_version


def lift_constants(model: ir.Model) -> bool:
    """Paddle and TF exports keep weights in Constant nodes; quantizers and our passes want initializers."""
    return common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model).modified


def is_large(model: ir.Model) -> bool:
    return weights_nbytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES


def new_initializer(graph: ir.Graph, base: str, array: np.ndarray, like: ir.TensorProtocol | None = None) -> ir.Value:
    """Register `array` as an initializer named `base` (or base_1, base_2, ... when taken); in external data
    when derived from a weight (`like`) that is."""
    name, k = base, 0
    while name in graph.initializers:
        k += 1
        name = f"{base}_{k}"
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=weight_tensor(graph, name, array, like),
    )
    graph.register_initializer(value)
    return value


def refresh_shapes(model: ir.Model) -> None:
    """Drop intermediate shapes a rewrite made stale and infer them again."""
    io = {v.name for v in model.graph.inputs} | {v.name for v in model.graph.outputs}
    for node in model.graph:
        for out in node.outputs:
            if out.name not in io:
                out.shape = None
    infer_shapes(model)


def infer_shapes(model: ir.Model) -> None:
    """Fill shapes of main-graph tensor values from onnx shape inference (never touches types).

    onnx_ir's ShapeInferencePass rewrites value types wholesale and turns sequence-typed values in
    If/Loop bodies into tensors; passes only need main-graph tensor shapes, so copy just those.
    """
    try:
        if is_large(model):
            with tempfile.TemporaryDirectory(prefix="optimize-shapes-") as tmp:
                src = write_for_tool(model, Path(tmp))
                out = Path(tmp) / "inferred.onnx"
                onnx.shape_inference.infer_shapes_path(str(src), str(out), strict_mode=False, data_prop=True)
                inferred = onnx.load(str(out), load_external_data=False)
        else:
            inferred = onnx.shape_inference.infer_shapes(
                ir.serde.serialize_model(model), strict_mode=False, data_prop=True
            )
    except Exception:  # shape inference is a help, not a requirement
        return
    infos = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for node in model.graph:
        for value in node.outputs:
            vi = infos.get(value.name)
            if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
                continue
            if value.type is not None and not isinstance(value.type, ir.TensorType):
                continue
            dims = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim
            ]
            value.shape = ir.Shape(dims)
            if value.type is None and vi.type.tensor_type.elem_type:
                value.dtype = ir.DataType(vi.type.tensor_type.elem_type)


def is_symbolic_dim(dim: object) -> bool:
    """Whether a declared dim is not a fixed size: a name, unknown, or a negative number (exporters such as
    paddle2onnx write -1 for "any")."""
    return not isinstance(dim, int) or dim < 0


def remove_identities(model: ir.Model) -> int:
    """Drop main-graph Identity nodes whose output is not a graph output (subgraph outputs untouched).

    onnx_ir's IdentityEliminationPass also rewires subgraph outputs and breaks Scan/If bodies.
    """
    removed = 0
    for node in list(model.graph):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        if out.type is not None and node.inputs[0].type is not None and out.type != node.inputs[0].type:
            continue
        out.replace_all_uses_with(node.inputs[0])
        model.graph.remove(node, safe=True)
        removed += 1
    return removed


def set_const(node: ir.Node, index: int, array: np.ndarray, graph: ir.Graph) -> None:
    """Give node input `index` a new constant; copy-on-write when the initializer has other uses."""
    value = node.inputs[index]
    assert value is not None
    if len(value.uses()) == 1 and value.is_initializer():
        value.const_value = weight_tensor(graph, name_of(value), array, value.const_value)
        value.shape = ir.Shape(array.shape)
        return
    node.replace_input_with(index, new_initializer(graph, f"{value.name}_{node.name}", array, value.const_value))
