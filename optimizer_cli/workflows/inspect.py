"""`optimize inspect` as a library call: a model's inputs, outputs, opsets, op counts, parameters and size.

The document returned is exactly `optimize inspect --json`'s (less the schema_version the CLI puts first);
report/listing.py renders it as text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx_ir as ir

from optimizer_cli.analysis.graph import op_counts
from optimizer_cli.data import input_specs
from optimizer_cli.model_io import file_size, load_model, weights_nbytes


def inspect_model(path: str | Path) -> dict[str, Any]:
    """The summary of the model at `path` (loaded memory-mapped: a large model costs no weight reads beyond
    counting its parameters)."""
    model = load_model(path)
    params = sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None)
    return {
        "path": str(path),
        "file_bytes": file_size(path),
        "weight_bytes": weights_nbytes(model),
        "parameters": int(params),
        "ir_version": model.ir_version,
        "opsets": dict(model.opset_imports),
        "producer": model.producer_name,
        "inputs": [
            {"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape) if s.shape else None}
            for s in input_specs(model)
        ],
        "outputs": [
            {"name": v.name, "dtype": _dtype_name(v.dtype), "shape": _dims(v.shape) if v.shape else None}
            for v in model.graph.outputs
        ],
        "ops": dict(op_counts(model).most_common()),
    }


def _dtype_name(dtype: ir.DataType | None) -> str | None:
    """An output's element type as the inputs' is written (numpy's name: float32, not FLOAT)."""
    if dtype is None:
        return None
    try:
        return str(dtype.numpy())
    except Exception:  # a type numpy has no name for: ONNX's
        return str(dtype)


def _dims(shape: ir.Shape) -> list[int | str | None]:
    """Fixed dims as numbers, symbolic ones as names, unnamed ones None: as the inputs' are (data.input_specs);
    a str '10' reads as a dim's name."""
    return [d if isinstance(d, int) else (d.value or None) for d in shape.dims]
