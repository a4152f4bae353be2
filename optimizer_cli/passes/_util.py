"""Helpers shared by passes: node counting and round-trips through tools that work on files."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common

from optimizer_cli.model_io import EXTERNAL_DATA_THRESHOLD_BYTES, save_model, weights_nbytes


def op_counts(model: ir.Model) -> Counter[str]:
    return Counter(node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph))


def node_count(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


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


@contextlib.contextmanager
def tool_working_directory(directory: Path) -> Iterator[Path]:
    """Run library tools from `directory`: onnxruntime's symbolic shape inference, when it gives up,
    saves sym_shape_infer_temp.onnx and a uuid-named .data file into the working directory, which
    would be the user's. Paths given to the tools must be absolute (they are: temp dirs)."""
    directory = directory.resolve()
    previous = os.getcwd()
    os.chdir(directory)
    try:
        yield directory
    finally:
        os.chdir(previous)


def write_for_tool(model: ir.Model, directory: Path, name: str = "input.onnx") -> Path:
    """Save for a tool that takes a path; external data when the model is large.

    Initializers are written without a value_info entry (onnx_ir writes one for each by default). Tools
    edit weights in place and leave that entry stale: ORT's dynamic quantizer transposes a Gemm's
    transB weight to turn it into a MatMul, then its own shape inference fails on the old entry
    ("Inferred shape and existing shape differ in dimension 0: (128) vs (512)"). The tensor's dims
    already say everything the entry would.
    """
    path = directory / name
    weights = [v for v in model.graph.initializers.values() if not v.is_graph_input()]
    saved = [(v.type, v.shape) for v in weights]
    for value in weights:
        value.type, value.shape = None, None
    try:
        save_model(model, path, external_data=weights_nbytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES)
    finally:
        for value, (type_, shape) in zip(weights, saved, strict=True):
            value.type, value.shape = type_, shape
    return path


def is_large(model: ir.Model) -> bool:
    return weights_nbytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES


def load_tool_output(path: Path) -> ir.Model:
    """Load a tool's output with its weights in memory, so the tool's temp dir can go away."""
    model = ir.load(path)
    for init in model.graph.initializers.values():
        if isinstance(init.const_value, ir.ExternalTensor):
            init.const_value = ir.tensor(init.const_value.numpy(), name=init.name)
    return model


def new_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """Register `array` as an initializer named `base` (or base_1, base_2, ... when taken)."""
    name, k = base, 0
    while name in graph.initializers:
        k += 1
        name = f"{base}_{k}"
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
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
    import tempfile

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
