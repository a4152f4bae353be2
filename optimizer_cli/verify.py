"""Checks run after every pass: onnx.checker, strict shape inference, signature, numeric drift."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from optimizer_cli.errors import VerificationError, first_line
from optimizer_cli.model_io import EXTERNAL_DATA_THRESHOLD_BYTES, save_model, to_proto, weights_nbytes


def check_model(model: ir.Model, *, strict_shapes: bool = True) -> None:
    """onnx.checker and strict shape inference; raises VerificationError with the checker's message."""
    try:
        if weights_nbytes(model) <= EXTERNAL_DATA_THRESHOLD_BYTES:
            proto = to_proto(model)
            onnx.checker.check_model(proto)
            onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=strict_shapes, data_prop=True)
        else:
            # Over 2 GB a proto cannot be serialized: check the saved copy by path.
            with tempfile.TemporaryDirectory(prefix="optimize-check-") as tmp:
                path = Path(tmp) / "model.onnx"
                save_model(model, path, external_data=True)
                onnx.checker.check_model(str(path), full_check=False)
                onnx.shape_inference.infer_shapes_path(
                    str(path),
                    str(Path(tmp) / "inferred.onnx"),
                    check_type=True,
                    strict_mode=strict_shapes,
                    data_prop=True,
                )
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise VerificationError(first_line(exc)) from exc


def signature(model: ir.Model) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    ins = [(v.name, str(v.dtype)) for v in model.graph.inputs if v.name not in model.graph.initializers]
    outs = [(v.name, str(v.dtype)) for v in model.graph.outputs]
    return ins, outs


def check_signature(before: tuple, after: ir.Model) -> None:
    """Inputs and outputs keep their names and element types (a pass must not change the contract)."""
    now = signature(after)
    if now != before:
        raise VerificationError(f"model signature changed: inputs/outputs were {before}, now {now}")


@dataclass
class Drift:
    """How far one output moved: the numbers users compare (and the oracle for approximate passes)."""

    output: str
    max_abs: float
    rel_l2: float
    cosine: float
    top1_agreement: float | None
    nonfinite: int = 0  # NaN/Inf values in the new output where the reference is finite

    def as_dict(self) -> dict:
        return asdict(self)


def compare_arrays(name: str, ref: np.ndarray, new: np.ndarray) -> Drift:
    if ref.shape != new.shape:
        raise VerificationError(f"output '{name}' changed shape from {ref.shape} to {new.shape}")
    if not (np.issubdtype(ref.dtype, np.number) or ref.dtype == np.bool_):
        equal = bool(np.array_equal(ref, new))
        return Drift(name, 0.0 if equal else float("inf"), 0.0 if equal else 1.0, 1.0 if equal else 0.0, None)
    a = ref.astype(np.float64).ravel()
    b = new.astype(np.float64).ravel()
    finite = np.isfinite(a) & np.isfinite(b)
    same_nonfinite = bool(np.array_equal(~np.isfinite(a), ~np.isfinite(b)))
    # A NaN/Inf the reference does not have is a broken output, whatever the finite part says.
    new_nonfinite = int(np.count_nonzero(np.isfinite(a) & ~np.isfinite(b)))
    a, b = a[finite], b[finite]
    diff = a - b
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    if not same_nonfinite:
        max_abs = float("inf")
    norm_a = float(np.linalg.norm(a))
    rel_l2 = float(np.linalg.norm(diff) / norm_a) if norm_a > 0 else float(np.linalg.norm(diff) > 0)
    norm_b = float(np.linalg.norm(b))
    if norm_a == 0 and norm_b == 0:
        cosine = 1.0
    elif norm_a == 0 or norm_b == 0:
        cosine = 0.0
    else:
        cosine = float(np.dot(a, b) / (norm_a * norm_b))
    top1 = None
    if ref.ndim >= 2 and ref.shape[-1] > 1 and np.issubdtype(ref.dtype, np.floating):
        top1 = float(np.mean(ref.argmax(-1) == new.argmax(-1)))
    if new_nonfinite:
        cosine, rel_l2 = 0.0, float("inf")
        if top1 is not None:  # rows holding a new NaN do not agree, whatever argmax picks
            bad_rows = ~np.isfinite(new).reshape(-1, new.shape[-1]).all(-1) & np.isfinite(ref).reshape(
                -1, ref.shape[-1]
            ).all(-1)
            agree = (ref.argmax(-1) == new.argmax(-1)).reshape(-1) & ~bad_rows
            top1 = float(np.mean(agree))
    return Drift(name, max_abs, rel_l2, cosine, top1, new_nonfinite)


def aggregate(drifts: list[list[Drift]]) -> list[Drift]:
    """Worst case over samples for each output (max error, min cosine, mean top-1 agreement)."""
    if not drifts:
        return []
    out = []
    for per_output in zip(*drifts, strict=True):
        tops = [d.top1_agreement for d in per_output if d.top1_agreement is not None]
        out.append(
            Drift(
                per_output[0].output,
                max(d.max_abs for d in per_output),
                max(d.rel_l2 for d in per_output),
                min(d.cosine for d in per_output),
                float(np.mean(tops)) if tops else None,
                sum(d.nonfinite for d in per_output),
            )
        )
    return out


def within_tolerance(ref: np.ndarray, new: np.ndarray, rtol: float, atol: float) -> bool:
    """Exact-pass oracle: allclose scaled by the output's magnitude (fusions reorder float sums)."""
    if not np.issubdtype(ref.dtype, np.floating):
        return bool(np.array_equal(ref, new))
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return bool(np.allclose(new, ref, rtol=rtol, atol=atol * max(1.0, scale), equal_nan=True))
