"""Quantize weight by weight on the onnx_ir graph, in memory bounded by one tensor, for models of any size.

onnxruntime's quantizers and fp16 converter hold the whole model in one protobuf: on a 2.5 GB model the
dynamic quantizer peaks at 3x the model in memory and the fp16 converter fails (protobuf's 2 GB limit).
Here each weight is read from its file (not kept mapped), quantized, written to a scratch data file
(`WeightStore`) and released, and the graph is rewritten in onnxruntime's own operator formats, named as
onnxruntime names them:

- dynamic int8: MatMul -> DynamicQuantizeLinear (one per activation) + MatMulInteger + Cast + Mul by the
  product of scales (`quantize_dynamic`'s QOperator form); Gather of a weight -> Gather of uint8 +
  DequantizeLinear. Weight scales, zero points and integers are computed as onnxruntime.quantization's
  `quantize_data` computes them (same ranges from `get_qmin_qmax_for_qType`), vectorized over channels.
- weight-only: MatMul -> com.microsoft MatMulNBits, blocks packed by onnxruntime's own C++ kernels
  (`quantize_matmul_4bits` / `_8bits`, what MatMulNBitsQuantizer calls).
- fp16: onnxruntime's converter runs on the graph with every large or external weight replaced by a
  data-less stub, then each weight it turned to float16 is converted by `to_float16`, the converter's
  `convert_np_to_float16` element for element, in chunks.

tests/test_per_tensor.py checks graph structure and weights against onnxruntime's tools on small models.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir

from optimizer_cli.analysis.graph import name_of
from optimizer_cli.model_io import map_weight, structure_proto
from optimizer_cli.passes import _graph
from optimizer_cli.passes._graph import WeightStore

# Rows quantized at a time: bounds the float temporaries for a large weight.
ROW_CHUNK = 1024

Progress = Callable[[str], None]


def _weight_of(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant float32 tensor behind a node input, or None (graph inputs are not constants)."""
    if value is None or not value.is_initializer() or value.is_graph_input() or value.const_value is None:
        return None
    return value.const_value if value.const_value.dtype == ir.DataType.FLOAT else None


def _register(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(
        name=name, shape=ir.Shape(tensor.shape.numpy()), type=ir.TensorType(tensor.dtype), const_value=tensor
    )
    graph.register_initializer(value)
    return value


def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if not value.uses() and not value.is_graph_output() and value.name in graph.initializers:
        graph.initializers.pop(name_of(value))


# DynamicQuantizeLinear's first version (MatMulInteger's is 10); per-column zero points need nothing newer.
DYNAMIC_MIN_OPSET = 11


def opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


# ---- int8 weights (dynamic) ------------------------------------------------------------------------------


def quant_range(qtype: int, reduce_range: bool, symmetric: bool) -> tuple[int, int]:
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(qtype, reduce_range=reduce_range, symmetric=symmetric)
    return int(qmin), int(qmax)


def scale_zero_point(
    rmin: np.ndarray, rmax: np.ndarray, qmin: int, qmax: int, symmetric: bool, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime.quantization's compute_scale_zp, one value per channel."""
    rmin = np.minimum(rmin, np.float32(0))
    rmax = np.maximum(rmax, np.float32(0))
    if symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        rmin, rmax = -absmax, absmax
    scale = (rmax.astype(np.float64) - rmin.astype(np.float64)) / (np.float64(qmax) - np.float64(qmin))
    if symmetric:
        zero_point = np.full(scale.shape, np.round((qmin + qmax) / 2.0), dtype=np.float64)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            zero_point = np.round(qmin - rmin.astype(np.float64) / scale)
    degenerate = scale < np.finfo(np.float32).tiny
    scale = np.where(degenerate, 1.0, scale).astype(np.float32)
    zero_point = np.where(degenerate, 0, zero_point).astype(dtype)
    return scale, zero_point


def quantize_columns(
    weight: np.ndarray, qtype: int, symmetric: bool, reduce_range: bool, per_channel: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(integers, scale, zero_point) of a [K, N] weight, per output column N or per tensor, as
    onnxruntime.quantization's quantize_data; rows are quantized ROW_CHUNK at a time."""
    dtype = np.dtype(np.int8 if qtype == onnx.TensorProto.INT8 else np.uint8)
    qmin, qmax = quant_range(qtype, reduce_range, symmetric)
    axis = 0 if per_channel else None
    scale, zero_point = scale_zero_point(
        np.asarray(weight.min(axis=axis)), np.asarray(weight.max(axis=axis)), qmin, qmax, symmetric, dtype
    )
    low, high = quant_range(qtype, False, False)  # integers are clipped to the full type range
    out = np.empty(weight.shape, dtype=dtype)
    zp = zero_point.astype(np.float32)
    for start in range(0, weight.shape[0], ROW_CHUNK):
        block = weight[start : start + ROW_CHUNK].astype(np.float32) / scale
        np.round(block, out=block)
        block += zp
        np.clip(block, low, high, out=block)
        out[start : start + ROW_CHUNK] = block.astype(dtype)
    return out, scale, zero_point


_Quantized = tuple[ir.Value, ir.Value, ir.Value]  # integers, scale, zero point


class _DynamicRewriter:
    """The rewrite of quantize_dynamic (MatMulConstBOnly), one weight at a time."""

    def __init__(self, graph: ir.Graph, store: WeightStore, qtype: int, per_channel: bool, reduce_range: bool):
        self.graph, self.store = graph, store
        self.qtype, self.per_channel, self.reduce_range = qtype, per_channel, reduce_range
        self._weights: dict[str, _Quantized] = {}
        self._activations: dict[str, tuple[ir.Value, ir.Value, ir.Value]] = {}

    def weight(self, value: ir.Value, per_channel: bool, qtype: int, symmetric: bool, reduce_range: bool) -> _Quantized:
        name = name_of(value)
        if name not in self._weights:
            tensor = value.const_value
            assert tensor is not None
            array = map_weight(tensor)
            matrix = array.reshape(-1, array.shape[-1]) if per_channel else array.reshape(-1, 1)
            ints, scale, zp = quantize_columns(matrix, qtype, symmetric, reduce_range, per_channel)
            del array, matrix
            shape = () if not per_channel else (tensor.shape[-1],)
            self._weights[name] = (
                _register(
                    self.graph,
                    f"{name}_quantized",
                    self.store.put(f"{name}_quantized", ints.reshape(tensor.shape.numpy())),
                ),
                _register(self.graph, f"{name}_scale", ir.tensor(scale.reshape(shape), name=f"{name}_scale")),
                _register(self.graph, f"{name}_zero_point", ir.tensor(zp.reshape(shape), name=f"{name}_zero_point")),
            )
        return self._weights[name]

    def activation(self, value: ir.Value, before: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value]:
        name = name_of(value)
        if name not in self._activations:
            node = ir.node("DynamicQuantizeLinear", [value], name=f"{name}_QuantizeLinear", num_outputs=3)
            for out, suffix in zip(node.outputs, ("quantized", "scale", "zero_point"), strict=True):
                out.name = f"{name}_{suffix}"
            self.graph.insert_before(before, node)
            self._activations[name] = (node.outputs[0], node.outputs[1], node.outputs[2])
        return self._activations[name]

    def matmul(self, node: ir.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        assert a is not None and b is not None
        qa, a_scale, a_zp = self.activation(a, node)
        # MatMul weights take reduce_range per channel and per tensor alike (quantize_dynamic's MatMul asks
        # for it either way); it was applied per channel only, so per-tensor weights kept the full range.
        symmetric = self.qtype == onnx.TensorProto.INT8
        qb, b_scale, b_zp = self.weight(b, self.per_channel, self.qtype, symmetric, self.reduce_range)
        out = node.outputs[0]
        scales = ir.node("Mul", [a_scale, b_scale], name=f"{node.name}_quant_scales_mul")
        scales.outputs[0].name = f"{node.name}_quant_scales_mul:0"
        integer = ir.node("MatMulInteger", [qa, qb, a_zp, b_zp], name=f"{node.name}_quant")
        integer.outputs[0].name = f"{out.name}_output_quantized"
        cast = ir.node(
            "Cast", [integer.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{out.name}_output_quantized_cast"
        )
        cast.outputs[0].name = f"{out.name}_output_quantized_cast_output"
        result = ir.node("Mul", [cast.outputs[0], scales.outputs[0]], name=f"{node.name}_quant_output_scale_mul")
        self._replace(node, [scales, integer, cast, result], result.outputs[0])
        _drop_if_unused(self.graph, b)

    def gather(self, node: ir.Node) -> None:
        """Gather of a float table -> Gather of uint8 (per tensor, asymmetric, like an activation) + DequantizeLinear."""
        data = node.inputs[0]
        assert data is not None
        qdata, scale, zp = self.weight(data, False, onnx.TensorProto.UINT8, False, False)
        out = node.outputs[0]
        gather = ir.node("Gather", [qdata, node.inputs[1]], dict(node.attributes), name=node.name)
        gather.outputs[0].name = f"{out.name}_quantized"
        dequant = ir.node("DequantizeLinear", [gather.outputs[0], scale, zp], name=f"{out.name}_DequantizeLinear")
        self._replace(node, [gather, dequant], dequant.outputs[0])
        _drop_if_unused(self.graph, data)

    def _replace(self, node: ir.Node, new_nodes: list[ir.Node], new_output: ir.Value) -> None:
        old = node.outputs[0]
        name, type_, shape = old.name, old.type, old.shape
        ir.convenience.replace_nodes_and_values(self.graph, node, [node], new_nodes, [old], [new_output])
        new_output.name, new_output.type, new_output.shape = name, type_, shape


def quantize_dynamic_per_tensor(
    model: ir.Model,
    *,
    op_types: set[str],
    per_channel: bool,
    reduce_range: bool,
    weight_type: str,
    exclude: set[str],
    progress: Progress | None = None,
) -> Counter[str]:
    """quantize_dynamic's rewrite of MatMul (constant 2-D weight) and Gather (constant table); returns the
    op types rewritten. Other op types in `op_types` are left in float (listed by `unsupported_ops`)."""
    qtype = onnx.TensorProto.INT8 if weight_type == "int8" else onnx.TensorProto.UINT8
    rewriter = _DynamicRewriter(model.graph, WeightStore(model), qtype, per_channel, reduce_range)
    targets = [n for n in model.graph if _dynamic_target(n, op_types, exclude)]
    done: Counter[str] = Counter()
    for i, node in enumerate(targets):
        if progress:
            progress(f"quantize: weight {i + 1} of {len(targets)} ({node.name})")
        (rewriter.matmul if node.op_type == "MatMul" else rewriter.gather)(node)
        done[node.op_type] += 1
    return done


def _dynamic_target(node: ir.Node, op_types: set[str], exclude: set[str]) -> bool:
    if node.domain not in ("", "ai.onnx") or node.name in exclude or node.op_type not in op_types:
        return False
    if node.op_type == "MatMul":
        weight = _weight_of(node.inputs[1])
        return weight is not None and len(weight.shape) == 2 and _weight_of(node.inputs[0]) is None
    if node.op_type == "Gather":
        return _weight_of(node.inputs[0]) is not None and _weight_of(node.inputs[1]) is None
    return False


def unsupported_ops(model: ir.Model, op_types: set[str]) -> dict[str, int]:
    """Op types asked for that the per-tensor path leaves in float, with their counts in the model."""
    counts = Counter(n.op_type for n in model.graph if n.op_type in op_types - {"MatMul", "Gather"})
    return dict(sorted(counts.items()))


# ---- weight-only (MatMulNBits) ---------------------------------------------------------------------------


def block_quantize(
    weight: np.ndarray, bits: int, block_size: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed blocks [N, k_blocks, blob], scales [N, k_blocks], zero points) by onnxruntime's kernels."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    rows, cols = weight.shape
    k_blocks = -(-rows // block_size)
    kpack = 8 // bits
    if k_blocks * block_size > rows:
        weight = np.pad(weight, ((0, k_blocks * block_size - rows), (0, 0)), "constant")
    packed = np.zeros((cols, k_blocks, -(-block_size // kpack)), dtype=np.uint8)
    zero_point = np.zeros((cols, -(-k_blocks // kpack)), dtype=np.uint8)
    scales = np.zeros((cols, k_blocks), dtype=weight.dtype)
    kernel = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    kernel(packed, np.ascontiguousarray(weight), scales, zero_point, block_size, cols, rows, symmetric)
    return packed, scales, zero_point


def quantize_weight_only_per_tensor(
    model: ir.Model,
    *,
    bits: int,
    block_size: int,
    symmetric: bool,
    accuracy_level: int | None,
    exclude: set[str],
    progress: Progress | None = None,
) -> int:
    """MatMulNBitsQuantizer's rewrite of MatMul with a constant 2-D float weight; returns how many. A weight
    shared by several MatMuls is quantized once."""
    graph, store = model.graph, WeightStore(model)
    targets = [n for n in graph if _dynamic_target(n, {"MatMul"}, exclude)]
    weights: dict[str, ir.Value] = {}
    for node in targets:
        b = node.inputs[1]
        assert b is not None
        weights.setdefault(name_of(b), b)
    done: dict[str, list[ir.Value]] = {}
    for i, (name, value) in enumerate(weights.items()):
        if progress:
            progress(f"quantize: weight {i + 1} of {len(weights)} ({name})")
        assert value.const_value is not None
        # One weight in memory at a time. (Two threads measured no faster: onnxruntime's kernel and the reads
        # from disk are the bound.)
        packed, scales, zero_points = block_quantize(map_weight(value.const_value), bits, block_size, symmetric)
        done[name] = [
            _register(graph, f"{name}_Q{bits}", store.put(f"{name}_Q{bits}", packed)),
            _register(graph, f"{name}_scales", store.put(f"{name}_scales", scales)),
        ]
        if not symmetric:
            done[name].append(_register(graph, f"{name}_zero_points", store.put(f"{name}_zero_points", zero_points)))
    for node in targets:
        b = node.inputs[1]
        assert b is not None and b.const_value is not None
        rows, cols = (int(d) for d in b.const_value.shape.numpy())
        attrs: dict[str, int] = {"K": rows, "N": cols, "bits": bits, "block_size": block_size}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        new = ir.node(
            "MatMulNBits",
            [node.inputs[0], *done[name_of(b)]],
            attrs,
            domain="com.microsoft",
            name=f"{node.name}_Q{bits}",
        )
        old = node.outputs[0]
        keep = old.name, old.type, old.shape
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [old], [new.outputs[0]])
        new.outputs[0].name, new.outputs[0].type, new.outputs[0].shape = keep
        _drop_if_unused(graph, b)
    if targets:
        model.opset_imports.setdefault("com.microsoft", 1)
    return len(targets)


# ---- fp16 ------------------------------------------------------------------------------------------------


# onnxruntime's float16 converter's clamping (convert_np_to_float16's defaults).
FP16_MIN_POSITIVE = 5.96e-08
FP16_MAX_FINITE = 65504.0
FP16_CHUNK = 1 << 22


def to_float16(array: np.ndarray) -> np.ndarray:
    """convert_np_to_float16, element for element, in chunks: nonzero magnitudes below 5.96e-8 become
    +-5.96e-8 and finite ones above 65504 become +-65504 (sign, 0, inf and NaN kept). The library's version
    builds index arrays 2x the tensor several times (8.5 GB and 55 s on a 2.7 GB model)."""
    flat = array.reshape(-1)
    out = np.empty(flat.shape, dtype=np.float16)
    low, high = np.float32(FP16_MIN_POSITIVE), np.float32(FP16_MAX_FINITE)
    for start in range(0, flat.size, FP16_CHUNK):
        chunk = flat[start : start + FP16_CHUNK].astype(np.float32)
        magnitude = np.abs(chunk)
        tiny = (magnitude > 0) & (magnitude < low)
        chunk[tiny] = np.copysign(low, chunk[tiny])
        huge = (magnitude > high) & (magnitude < np.inf)
        chunk[huge] = np.copysign(high, chunk[huge])
        out[start : start + FP16_CHUNK] = chunk.astype(np.float16)
    return out.reshape(array.shape)


def _value_info_from_dims(tensor: onnx.TensorProto) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))


def convert_fp16_per_tensor(
    model: ir.Model,
    *,
    op_block_list: list[str] | None,
    node_block_list: list[str] | None,
    progress: Progress | None = None,
) -> ir.Model:
    """onnxruntime's convert_float_to_float16 (keep_io_types) on the graph; weights converted one by one."""
    from unittest import mock

    from onnxruntime.transformers import float16

    proto, stubbed = structure_proto(model, _graph.STORE_MIN_BYTES)
    # onnx_ir writes a value_info for every initializer; the converter retypes every float value_info to
    # float16, so an initializer it keeps float32 (read only by blocked nodes) was declared float16 and given
    # a Cast to float32 of a float32 tensor: the model failed type inference. The initializer says its type.
    initializer_names = {t.name for t in proto.graph.initializer}
    kept = [vi for vi in proto.graph.value_info if vi.name not in initializer_names]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    # The converter reads each converted initializer whole (numpy_helper.to_array) only to learn its
    # shape; the dims say it without touching the (stubbed) data.
    with mock.patch.object(float16, "make_value_info_from_tensor", _value_info_from_dims):
        converted_proto = float16.convert_float_to_float16(
            proto, keep_io_types=True, op_block_list=op_block_list, node_block_list=node_block_list
        )
    converted = ir.serde.deserialize_model(converted_proto)
    store = WeightStore(model)
    names = [n for n in converted.graph.initializers if n in stubbed]
    for i, name in enumerate(names):
        value, original = converted.graph.initializers[name], model.graph.initializers[name].const_value
        assert original is not None
        if value.dtype == ir.DataType.FLOAT16 and original.dtype == ir.DataType.FLOAT:
            if progress:
                progress(f"quantize: weight {i + 1} of {len(names)} ({name})")
            value.const_value = store.put(name, to_float16(map_weight(original)))
        else:
            value.const_value = original
    return converted
