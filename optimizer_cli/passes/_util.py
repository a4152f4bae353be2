"""Helpers shared by passes: node counting and round-trips through tools that work on files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import onnx_ir as ir

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


def write_for_tool(model: ir.Model, directory: Path, name: str = "input.onnx") -> Path:
    """Save for a tool that takes a path; external data when the model is large."""
    path = directory / name
    save_model(model, path, external_data=weights_nbytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES)
    return path


def is_large(model: ir.Model) -> bool:
    return weights_nbytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES


def load_tool_output(path: Path) -> ir.Model:
    return ir.load(path)


def proto_to_ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)
