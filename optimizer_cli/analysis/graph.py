"""Read-only counts over a model's graphs (subgraphs included)."""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir


def op_counts(model: ir.Model) -> Counter[str]:
    return Counter(node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph))


def node_count(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def name_of(value: ir.Value) -> str:
    """A value's name. Graph inputs and outputs are always named, and the pipeline names every other value
    (onnx_ir's NameFixPass) before a pass sees it, so a missing name is a bug, not a user error."""
    if value.name is None:
        raise ValueError(f"unnamed value {value!r}")
    return value.name


def output_names(model: ir.Model) -> list[str]:
    return [name_of(v) for v in model.graph.outputs]


def int_attr(node: ir.Node, name: str, default: int) -> int:
    """An INT attribute or its default (onnx_ir's get_int is typed for a bool default)."""
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())
