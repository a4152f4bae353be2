"""Round-trips through library tools that work on files (onnxruntime's quantizers and transformer optimizer).

`tool_working_directory` changes the process's working directory while a tool runs: onnxruntime's
symbolic shape inference drops files into the working directory when it gives up, and the tools offer
no option to put them elsewhere. It is the one piece of process-wide state the passes touch, restored
on exit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir

from optimizer_cli.model_io import EXTERNAL_DATA_THRESHOLD_BYTES, save_model, weights_nbytes


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


def load_tool_output(path: Path) -> ir.Model:
    """Load a tool's output with its weights in memory, so the tool's temp dir can go away."""
    model = ir.load(path)
    for init in model.graph.initializers.values():
        if isinstance(init.const_value, ir.ExternalTensor):
            init.const_value = ir.tensor(init.const_value.numpy(), name=init.name)
    return model
