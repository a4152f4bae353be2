"""Int8 weights that can saturate on CPUs without VNNI.

Without VNNI, onnxruntime's x86 int8 kernels multiply u8 activations by s8 weights with VPMADDUBSW,
which adds each pair of products in int16 with saturation: 2 * 255 * 127 overflows, 2 * 255 * 64 does
not. Weights quantized to the full int8 range can therefore clip there and not on VNNI CPUs (whose
instruction accumulates in int32). 7-bit weights (`reduce_range`) are safe on both.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

SAFE_MAX = 64  # |q| <= 64: two products of 255 * 64 stay within int16

# Ops whose int8 weight meets a u8 activation in an integer kernel (QDQ pairs become these), and the
# input index of that weight (the others are activations, scales and zero points).
WEIGHT_INPUT = {
    "DequantizeLinear": 0,
    "QLinearConv": 3,
    "QLinearMatMul": 3,
    "QGemm": 3,
    "MatMulInteger": 1,
    "ConvInteger": 1,
    "DynamicQuantizeMatMul": 1,
    "MatMulIntegerToFloat": 1,
    "QAttention": 1,
}


def full_range_int8_weights(model: ir.Model) -> tuple[int, int]:
    """(weights reaching |q| > 64, all int8 weights) among initializers consumed by int8 kernels."""
    full = total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or tensor.dtype != ir.DataType.INT8:
            continue
        if not any(WEIGHT_INPUT.get(use.node.op_type) == use.idx for use in value.uses()):
            continue
        total += 1
        if int(np.abs(tensor.numpy().astype(np.int16)).max()) > SAFE_MAX:
            full += 1
    return full, total


def saturation_note(model: ir.Model, isa: str) -> str | None:
    """A report line when this CPU's int8 kernels can clip this model's weights, else None."""
    full, total = full_range_int8_weights(model)
    if not full:
        return None
    return (
        f"{full} of {total} int8 weight tensors use the full int8 range and this CPU ({isa}) has no VNNI: "
        "onnxruntime's u8*s8 kernels can saturate on them, so fidelity here may be lower than on VNNI CPUs; "
        "quantizing with reduce_range (7-bit weights) avoids it"
    )
