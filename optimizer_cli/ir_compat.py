"""IR-version compatibility at load time: raise IR 3 models, lower too-new ones onnxruntime refuses.

- IR < 4 requires every initializer to also be a graph input, so any pass that adds an initializer (a
  quantizer's scales and zero points, a folded constant) makes the checker refuse the model. IR 4 lifted
  that rule; the weights listed as inputs were only overridable defaults, and every tool here (the
  random data, the quantizers' calibration) already treats them as weights, so they stop being inputs.
- A model saved by a newer onnx (IR 14) is refused by an onnxruntime that stops at IR 13 even when it
  uses nothing IR 14 added. Such a model is lowered to the newest IR that onnxruntime loads, when none
  of its opsets or element types needs more.
"""

from __future__ import annotations

import functools

import onnx
import onnx.helper
import onnx_ir as ir

# IR 4: initializers need not be graph inputs.
IR_INITIALIZERS_NOT_INPUTS = 4

# The IR version that introduced each element type added since IR 9 (onnx.proto's IR history).
_DTYPE_MIN_IR: dict[str, int] = {
    "FLOAT8E4M3FN": 9,
    "FLOAT8E4M3FNUZ": 9,
    "FLOAT8E5M2": 9,
    "FLOAT8E5M2FNUZ": 9,
    "UINT4": 10,
    "INT4": 10,
    "FLOAT4E2M1": 11,
    "FLOAT8E8M0": 12,
    "UINT2": 13,
    "INT2": 13,
    "FLOAT6E2M3": 14,
    "FLOAT6E3M2": 14,
}


def _opset_min_ir(model: ir.Model) -> int:
    """The lowest IR version onnx pairs with the model's opset imports (onnx.helper.VERSION_TABLE)."""
    ids = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    try:
        return int(onnx.helper.find_min_ir_version_for(ids, ignore_unknown=True))
    except Exception:  # an opset newer than this onnx knows: assume it needs the newest IR
        return onnx.IR_VERSION


def _graphs(model: ir.Model) -> list[ir.Graph | ir.Function]:
    graphs: list[ir.Graph | ir.Function] = [model.graph, *model.graph.subgraphs()]
    for function in model.functions.values():
        graphs.append(function)
        graphs.extend(function.subgraphs())
    return graphs


def _dtype_min_ir(model: ir.Model) -> int:
    """The lowest IR version whose element types cover every tensor, value and tensor attribute."""
    needed = 3
    dtypes: set[ir.DataType] = set()
    for graph in _graphs(model):
        values = list(graph.inputs) + list(graph.outputs)
        if isinstance(graph, ir.Graph):
            values.extend(graph.initializers.values())
        for node in graph:
            values.extend(node.outputs)
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                    dtypes.add(attr.value.dtype)
                elif attr.type == ir.AttributeType.TENSORS:
                    dtypes.update(t.dtype for t in attr.value)
        # Value.dtype is the element type for sequences and optionals too.
        dtypes.update(v.dtype for v in values if v is not None and v.dtype is not None)
    for dtype in dtypes:
        needed = max(needed, _DTYPE_MIN_IR.get(dtype.name, 3))
    return needed


@functools.cache
def ort_max_ir_version() -> int:
    """The newest IR version this onnxruntime loads, probed with a one-node model (cached)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    for version in range(onnx.IR_VERSION, 3, -1):
        probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=version)
        try:
            ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return version
        except Exception:
            continue
    return onnx.IR_VERSION


def raise_old_ir(model: ir.Model) -> str | None:
    """IR < 4 -> the lowest IR >= 4 that fits the opsets; initializers stop being graph inputs."""
    old = model.ir_version or 0
    if old >= IR_INITIALIZERS_NOT_INPUTS:
        return None
    model.ir_version = max(IR_INITIALIZERS_NOT_INPUTS, _opset_min_ir(model))
    graph = model.graph
    weights = [v for v in graph.inputs if v.name in graph.initializers]
    for value in weights:
        graph.inputs.remove(value)
    note = f"raised IR version {old} -> {model.ir_version} (IR < 4 requires every initializer to be a graph input)"
    if weights:
        note += f"; {len(weights)} initializer(s) listed as inputs are now weights only"
    return note


def lower_new_ir(model: ir.Model) -> str | None:
    """IR newer than onnxruntime loads -> the newest it loads, if the model uses nothing newer."""
    current = model.ir_version or 0
    supported = ort_max_ir_version()
    if current <= supported:
        return None
    needed = max(_opset_min_ir(model), _dtype_min_ir(model), IR_INITIALIZERS_NOT_INPUTS)
    if needed > supported:
        return None  # it does use something newer: onnxruntime's own refusal says what
    model.ir_version = supported
    return (
        f"lowered IR version {current} -> {supported}: this onnxruntime loads up to IR {supported} "
        f"and the model uses nothing newer"
    )


def normalize_ir_version(model: ir.Model) -> list[str]:
    """Both adjustments; returns notes for the report (empty when the model was left as it was)."""
    return [note for note in (raise_old_ir(model), lower_new_ir(model)) if note]
