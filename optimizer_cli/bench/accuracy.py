"""Accuracy with labels (top-1/top-5 or a user metric) and fidelity of B against A."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from optimizer_cli.bench.output_kinds import (
    OutputKind,
    classify_outputs,
    faithful_drift,
    nan_max,
    nan_mean,
    nan_min,
    output_fidelity,
)
from optimizer_cli.bench.task_metrics import BuiltinMetric, builtin_metric, load_charset
from optimizer_cli.data import Dataset
from optimizer_cli.errors import UserInputError, first_line
from optimizer_cli.plugins import import_function

Metric = Callable[[list[list[np.ndarray]], list[np.ndarray]], float]


@dataclass
class Fidelity:
    """Optimized vs original outputs over the evaluation set: aggregates over outputs, then per output."""

    samples: int
    # NaN/Inf both models give at the same places are reproduced, and the finite rest is compared; a sample with
    # nothing finite left is undefined and left out; NaN (reported as NaN, and failing every gate): none had any.
    max_abs: float
    rel_l2: float  # mean over samples
    cosine_mean: float
    cosine_min: float
    top1_agreement: float | None  # class-score and sequence-logit outputs only (see output_kinds)
    nonfinite: int = 0  # NaN/Inf values the optimized model produced where the original's were finite
    per_output: list[dict[str, Any]] = field(default_factory=list)  # output_kinds.output_fidelity entries

    def as_dict(self) -> dict:
        return asdict(self)


def fidelity(
    ref: list[list[np.ndarray]],
    new: list[list[np.ndarray]],
    output_names: list[str],
    kinds: list[OutputKind] | None = None,
    map_threshold: float = 0.3,
) -> Fidelity:
    """Aggregate over samples and outputs: worst max-abs, mean rel-L2, mean/min cosine; and per output the
    figures of its kind (classified from the original's outputs unless `kinds` is given)."""
    drifts = [
        faithful_drift(name, a, b)
        for ref_s, new_s in zip(ref, new, strict=True)
        for name, a, b in zip(output_names, ref_s, new_s, strict=True)
    ]
    kinds = kinds if kinds is not None else classify_outputs(output_names, ref)
    per_output = [
        output_fidelity(kind, [s[i] for s in ref], [s[i] for s in new], map_threshold) for i, kind in enumerate(kinds)
    ]
    tops = [p["top1_agreement"] for p in per_output if p["top1_agreement"] is not None]
    return Fidelity(
        samples=len(ref),
        max_abs=nan_max([d.max_abs for d in drifts]),
        rel_l2=nan_mean([d.rel_l2 for d in drifts]),
        cosine_mean=nan_mean([d.cosine for d in drifts]),
        cosine_min=nan_min([d.cosine for d in drifts]),
        top1_agreement=float(np.mean(tops)) if tops else None,
        nonfinite=sum(d.nonfinite for d in drifts),
        per_output=per_output,
    )


def topk_accuracy(outputs: list[list[np.ndarray]], labels: list[np.ndarray], k: int) -> float | None:
    """Top-k on the first output, read as [batch, classes] logits; a row holding NaN/Inf is never a hit."""
    hits = total = 0
    for out, lab in zip(outputs, labels, strict=True):
        logits = out[0]
        if logits.ndim != 2 or logits.shape[-1] < k:
            return None
        top = np.argsort(-logits, axis=-1)[:, :k]
        finite = np.isfinite(logits).all(-1)
        hits += int(np.sum((top == lab.reshape(-1, 1)).any(-1) & finite))
        total += len(lab)
    return hits / total if total else None


def load_metric(
    spec: str, *, model: Path | None = None, charset: str | None = None, map_threshold: float = 0.3
) -> Metric:
    """'builtin:cer' / 'builtin:miou' (bench.task_metrics; cer reads `charset` or the model's metadata), or a
    user's 'package.module:function' / 'path/file.py:function' taking (outputs per sample, labels per
    sample) -> float, higher is better (docs/metric_plugin_example.py)."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        chars = load_charset(charset, model) if name == "cer" else None
        return builtin_metric(name, charset=chars, map_threshold=map_threshold)
    if ":" not in spec:
        raise UserInputError(f"--metric '{spec}': expected module:function, path/file.py:function or builtin:NAME")
    return import_function(spec, f"--metric '{spec}'")


@dataclass
class Accuracy:
    top1: float | None
    top5: float | None
    metric: float | None
    metric_name: str | None = None  # builtin:NAME's NAME, or module:function
    lower_is_better: bool = False  # builtin:cer; accuracy_drop turns the sign so a drop is still bad news

    def as_dict(self) -> dict:
        return asdict(self)


def accuracy(outputs: list[list[np.ndarray]], data: Dataset, metric: Metric | None) -> Accuracy | None:
    if data.labels is None:
        return None
    classes = all(np.issubdtype(np.asarray(lab).dtype, np.integer) for lab in data.labels)
    return Accuracy(
        top1=topk_accuracy(outputs, data.labels, 1) if classes else None,
        top5=topk_accuracy(outputs, data.labels, 5) if classes else None,
        metric=_call_metric(metric, outputs, data.labels) if metric else None,
        metric_name=_metric_name(metric) if metric else None,
        lower_is_better=bool(getattr(metric, "lower_is_better", False)),
    )


def _metric_name(metric: Metric) -> str:
    if isinstance(metric, BuiltinMetric):
        return metric.name
    return f"{getattr(metric, '__module__', '?')}:{getattr(metric, '__qualname__', metric)}"


def _call_metric(metric: Metric, outputs: list[list[np.ndarray]], labels: list[np.ndarray]) -> float:
    """The user's metric; whatever it raises or returns that is not a number is their error (exit 2)."""
    name = _metric_name(metric)
    try:
        value = float(metric(outputs, labels))
    except Exception as exc:
        raise UserInputError(f"--metric {name} failed: {type(exc).__name__}: {first_line(exc)}") from exc
    return value
