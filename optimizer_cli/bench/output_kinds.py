"""What each graph output is, and the fidelity figures that mean something for that kind.

The kind is read from the original model's outputs over the evaluation set (shape and values), unless
the recipe's `metrics.outputs` names it. The rules, first match wins (every kind keeps rel-L2, max-abs
and cosine):

- not floating point: `regression` ("integer output").
- rank 3 or 4 with values in [0, 1] that are not a distribution over the last axis, and a 1-channel
  layout ([N, 1, H, W], or [N, H, W] with H, W >= 8): `dense_map` (a text detector's probability
  map). Figure: `map_iou`, the IoU of the two maps thresholded at `metrics.map_threshold`.
- rank 2, [N, D] with D > 1: `embedding` when the rows have unit L2 norm, or the name says
  embed/pool/sentence/feature, or D >= 128 is a multiple of 64 (hidden widths: 128, 384, 768, ...)
  and the name does not say logit/score/prob/class; else `class_scores`. Figures: embeddings get
  `nn_agreement` (per sample row, is its nearest neighbour by cosine among the other rows of the
  evaluation set the same under both models); class scores get `top1_agreement` and, with more than
  5 classes, `top5_agreement` (the original's top class is among the optimized model's top 5).
- rank 3, [T, N, K] or [N, T, K] with K > 1: `sequence_logits` (CTC, tagging), unless K looks like a
  hidden width by the embedding rule (then `regression`: per-token features). Figure:
  `position_agreement`, the per-position argmax agreement (also reported as `top1_agreement`).
- anything else: `regression`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from optimizer_cli.errors import UserInputError
from optimizer_cli.recipe import OUTPUT_KINDS
from optimizer_cli.verify import Drift, compare_arrays

_EMBED_WORDS = ("embed", "pool", "sentence", "feature")
_CLASS_WORDS = ("logit", "score", "prob", "class")


# The kind-specific figures a gate can name (worst over the outputs that have it), and the kind with each.
KIND_FIGURES = {
    "top5_agreement": "class_scores",
    "position_agreement": "sequence_logits",
    "map_iou": "dense_map",
    "nn_agreement": "embedding",
}


@dataclass(frozen=True)
class OutputKind:
    name: str
    kind: str
    reason: str


def _floating(arrays: list[np.ndarray]) -> bool:
    return bool(arrays) and all(np.issubdtype(a.dtype, np.floating) for a in arrays)


def _in_unit_range(arrays: list[np.ndarray]) -> bool:
    finite = [a[np.isfinite(a)] for a in arrays]
    return all(f.size == 0 or (f.min() >= 0.0 and f.max() <= 1.0) for f in finite)


def _is_distribution(arrays: list[np.ndarray]) -> bool:
    """Rows summing to 1 over the last axis (softmax output)."""
    return all(np.allclose(a.sum(-1), 1.0, atol=1e-3) for a in arrays)


def _hidden_width(width: int, name: str) -> bool:
    lowered = name.lower()
    if any(w in lowered for w in _CLASS_WORDS):
        return False
    return any(w in lowered for w in _EMBED_WORDS) or (width >= 128 and width % 64 == 0)


def classify(name: str, arrays: list[np.ndarray]) -> OutputKind:
    """The kind of one output from its values in every evaluation sample (see the module docstring)."""
    if not _floating(arrays):
        return OutputKind(name, "regression", "integer output")
    shape = arrays[0].shape
    unit = _in_unit_range(arrays)
    if unit and len(shape) == 4 and shape[1] == 1:
        return OutputKind(name, "dense_map", "1 channel map in [0,1]")
    if unit and len(shape) == 3 and min(shape[1:]) >= 8 and not _is_distribution(arrays):
        return OutputKind(name, "dense_map", f"{shape[1]}x{shape[2]} map in [0,1]")
    if len(shape) == 2 and shape[1] > 1:
        norms = np.concatenate([np.linalg.norm(a.astype(np.float64), axis=-1) for a in arrays])
        if np.allclose(norms, 1.0, atol=1e-3):
            return OutputKind(name, "embedding", f"{shape[1]}-d rows of unit norm")
        if _hidden_width(shape[1], name):
            return OutputKind(name, "embedding", f"{shape[1]}-d rows (hidden width or name)")
        return OutputKind(name, "class_scores", f"last axis {shape[1]} classes")
    if len(shape) == 3 and shape[2] > 1:
        if _hidden_width(shape[2], name):
            return OutputKind(name, "regression", f"per-position features of width {shape[2]}")
        return OutputKind(name, "sequence_logits", f"last axis {shape[2]} classes at each position")
    return OutputKind(name, "regression", f"shape {list(shape)}")


def check_declared(names: list[str], overrides: Mapping[str, str]) -> None:
    """The recipe's metrics.outputs may only name graph outputs."""
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise UserInputError(f"recipe metrics.outputs names {unknown}, not outputs of the model (outputs: {names})")


def classify_outputs(
    names: list[str], outputs: list[list[np.ndarray]], overrides: Mapping[str, str] | None = None
) -> list[OutputKind]:
    """One OutputKind per graph output; the recipe's `metrics.outputs` wins over the heuristic."""
    overrides = dict(overrides or {})
    check_declared(names, overrides)
    kinds = []
    for i, name in enumerate(names):
        if name in overrides:
            assert overrides[name] in OUTPUT_KINDS
            kinds.append(OutputKind(name, overrides[name], "recipe metrics.outputs"))
        else:
            kinds.append(classify(name, [sample[i] for sample in outputs]))
    return kinds


def same_nonfinite(a: np.ndarray, b: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Whether NaN, +inf and -inf sit at exactly the same places in both (over `axis`, or the whole array)."""
    same = (np.isnan(a) == np.isnan(b)) & (np.isposinf(a) == np.isposinf(b)) & (np.isneginf(a) == np.isneginf(b))
    return np.asarray(same.all(axis=axis))


def faithful_drift(name: str, ref: np.ndarray, new: np.ndarray) -> Drift:
    """compare_arrays, where non-finite values count only when reproduced exactly: the same NaN/+inf/-inf at the
    same places is faithful and the finite rest is compared; any other difference in them fails the sample
    (cosine 0, rel-L2 and max-abs inf); with nothing finite left the figures are undefined (NaN), never perfect."""
    drift = compare_arrays(name, ref, new)
    if ref.dtype.kind not in "fc" or new.dtype.kind not in "fc":
        return drift
    if not bool(same_nonfinite(ref, new)):
        return replace(drift, max_abs=float("inf"), rel_l2=float("inf"), cosine=0.0)
    if ref.size and not np.isfinite(ref).any():
        return replace(drift, max_abs=float("nan"), rel_l2=float("nan"), cosine=float("nan"))
    return drift


def _finite_rows(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both as [rows, classes] with NaN ranked lowest, and per row whether their non-finite values agree."""
    rows_a, rows_b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    same = same_nonfinite(rows_a, rows_b, axis=-1)
    return np.nan_to_num(rows_a, nan=-np.inf, posinf=np.inf), np.nan_to_num(rows_b, nan=-np.inf, posinf=np.inf), same


def _argmax_agreement(ref: list[np.ndarray], new: list[np.ndarray]) -> float:
    """Rows whose argmax and whose NaN/Inf positions are the same under both models (a NaN both have at the
    same place is reproduced, not broken; one only the optimized model has never agrees)."""
    hits = []
    for a, b in zip(ref, new, strict=True):
        rows_a, rows_b, same = _finite_rows(a, b)
        hits.append(same & (rows_a.argmax(-1) == rows_b.argmax(-1)))
    return float(np.mean(np.concatenate(hits)))


def _top5_agreement(ref: list[np.ndarray], new: list[np.ndarray]) -> float | None:
    """Fraction of rows whose original top class is among the optimized model's top 5 (None: 5 classes or fewer)."""
    if ref[0].shape[-1] <= 5:
        return None
    hits = []
    for a, b in zip(ref, new, strict=True):
        rows_a, rows_b, same = _finite_rows(a, b)
        top5 = np.argsort(-rows_b, axis=-1)[:, :5]
        hits.append(same & (top5 == rows_a.argmax(-1)[:, None]).any(-1))
    return float(np.mean(np.concatenate(hits)))


def map_iou(ref: list[np.ndarray], new: list[np.ndarray], threshold: float) -> float:
    """IoU of the thresholded maps over the whole evaluation set (1.0 when both are empty)."""
    inter = union = 0
    for a, b in zip(ref, new, strict=True):
        ma, mb = a > threshold, b > threshold
        inter += int(np.count_nonzero(ma & mb))
        union += int(np.count_nonzero(ma | mb))
    return inter / union if union else 1.0


def _nearest(rows: np.ndarray) -> np.ndarray:
    unit = rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return np.asarray(np.nan_to_num(sim, nan=-np.inf).argmax(-1))


def nn_agreement(ref: list[np.ndarray], new: list[np.ndarray]) -> float | None:
    """Fraction of evaluation rows whose nearest neighbour (cosine) among the other rows is the same under
    both models; None with fewer than 3 rows (two rows are always each other's neighbour)."""
    rows_a = np.concatenate([a.reshape(-1, a.shape[-1]) for a in ref]).astype(np.float64)
    rows_b = np.concatenate([b.reshape(-1, b.shape[-1]) for b in new]).astype(np.float64)
    if len(rows_a) < 3:
        return None
    return float(np.mean(_nearest(rows_a) == _nearest(rows_b)))


def _defined(values: list[float]) -> list[float]:
    return [v for v in values if not np.isnan(v)]


# Over samples, those with nothing finite to compare (NaN) are left out; NaN when no sample had anything.
def nan_min(values: list[float]) -> float:
    return min(_defined(values), default=float("nan"))


def nan_max(values: list[float]) -> float:
    return max(_defined(values), default=float("nan"))


def nan_mean(values: list[float]) -> float:
    defined = _defined(values)
    return float(np.mean(defined)) if defined else float("nan")


def output_fidelity(
    kind: OutputKind, ref: list[np.ndarray], new: list[np.ndarray], map_threshold: float
) -> dict[str, Any]:
    """The per_output entry of a benchmark row's fidelity: common figures plus the kind's own."""
    drifts = [faithful_drift(kind.name, a, b) for a, b in zip(ref, new, strict=True)]
    entry: dict[str, Any] = {
        **asdict(kind),
        "cosine_min": nan_min([d.cosine for d in drifts]),
        "rel_l2": nan_mean([d.rel_l2 for d in drifts]),
        "max_abs": nan_max([d.max_abs for d in drifts]),
        "top1_agreement": None,
    }
    if kind.kind in ("class_scores", "sequence_logits") and ref[0].ndim >= 1 and ref[0].shape[-1] > 1:
        entry["top1_agreement"] = _argmax_agreement(ref, new)
    if kind.kind == "class_scores":
        entry["top5_agreement"] = _top5_agreement(ref, new)
    elif kind.kind == "sequence_logits":
        entry["position_agreement"] = entry["top1_agreement"]
    elif kind.kind == "dense_map":
        entry["map_iou"] = map_iou(ref, new, map_threshold)
        entry["map_threshold"] = map_threshold
    elif kind.kind == "embedding":
        entry["nn_agreement"] = nn_agreement(ref, new)
    return entry
