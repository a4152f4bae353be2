"""Parameter and multiply-accumulate counts (from static shapes) to report what a pass saved."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from optimizer_cli.analysis.graph import int_attr


def _shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None:
        return None
    # Symbolic dims (batch, sequence) count as 1: MACs are reported per sample.
    return tuple(d if isinstance(d, int) else 1 for d in value.shape.dims)


def parameter_count(model: ir.Model) -> int:
    return int(sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None))


def macs(model: ir.Model) -> int | None:
    """Per-sample MACs of Conv/ConvTranspose/MatMul/Gemm (symbolic dims = 1; None if no shapes known)."""
    total, known = 0, False
    for node in model.graph:
        out = _shape(node.outputs[0]) if node.outputs else None
        if out is None:
            continue
        if node.op_type == "Conv":
            w = _shape(node.inputs[1])
            if w is None:
                continue
            total += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":
            w, x = _shape(node.inputs[1]), _shape(node.inputs[0])
            if w is None or x is None:
                continue
            total += int(np.prod(x)) * int(np.prod(w[1:]))
        elif node.op_type in ("MatMul", "Gemm"):
            a = _shape(node.inputs[0])
            if a is None:
                continue
            k = a[0] if node.op_type == "Gemm" and int_attr(node, "transA", 0) else a[-1]
            total += int(np.prod(out)) * k
        else:
            continue
        known = True
    return total if known else None
