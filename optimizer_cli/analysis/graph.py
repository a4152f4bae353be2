"""Read-only counts over a model's graphs (subgraphs included)."""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir


def op_counts(model: ir.Model) -> Counter[str]:
    return Counter(node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph))


def node_count(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
