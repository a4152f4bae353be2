"""Built-in task metrics with labels (`--metric builtin:NAME` or the recipe's `metrics.task`).

- `cer`: character error rate of a CTC greedy decode (argmax per position, merge repeats, drop the
  blank at index 0; index i >= 1 is the charset's character i-1, and one index past the charset is a
  space, as PaddleOCR's `use_space_char` adds). The first rank-3 output is read as [N, T, K], or as
  [T, N, K] when its second axis (not its first) matches the number of labels. Labels are strings,
  one per sample row. Lower is better: edit distance summed over rows / label characters summed.
- `miou`: mean IoU of segmentation maps against integer label masks ([rows, H, W] per sample): a
  1-channel probability map ([N, 1, H, W] or [N, H, W]) is thresholded at `metrics.map_threshold`
  (classes 0 and 1), a [N, C, H, W] output takes the argmax over C; IoU per class over the whole set,
  averaged over the classes that occur in the labels or the predictions. Higher is better.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from optimizer_cli.errors import UserInputError, first_line

Outputs = list[list[np.ndarray]]


@dataclass
class BuiltinMetric:
    """A metric with a name and a direction (user metrics are higher-is-better functions)."""

    name: str
    lower_is_better: bool
    fn: Callable[[Outputs, list[np.ndarray]], float]

    def __call__(self, outputs: Outputs, labels: list[np.ndarray]) -> float:
        return self.fn(outputs, labels)


BUILTINS = ("cer", "miou")


def load_charset(path: str | Path | None, model: Path | None) -> list[str]:
    """One character per line of a text file, or the model's metadata_props 'character' list."""
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise UserInputError(f"metrics.charset: cannot read ({first_line(exc)})", path) from exc
        return [line.rstrip("\r\n") for line in text.splitlines() if line.rstrip("\r\n")]
    if model is not None:
        meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
        if meta.get("character"):
            return [c for c in meta["character"].splitlines() if c]
    raise UserInputError(
        "builtin:cer needs a charset: the recipe's metrics.charset (one character per line) or the model's "
        "metadata_props 'character' list"
    )


def greedy_ctc_decode(probs: np.ndarray, charset: list[str], blank: int = 0) -> list[str]:
    """[N, T, K] scores -> one string per row: argmax, merge repeats, drop blanks."""
    if probs.shape[-1] > len(charset) + 2:
        raise UserInputError(
            f"builtin:cer: the output has {probs.shape[-1]} classes, the charset {len(charset)} characters "
            "(expected classes = characters + 1 blank, + 1 space at most)"
        )
    # A position whose scores hold NaN/Inf decodes as U+FFFD, which matches no label character: a broken
    # output never counts as read correctly (argmax would pick the first NaN's class).
    alphabet = ["", *charset, " ", "\ufffd"]
    ids = np.where(np.isfinite(probs).all(-1), probs.argmax(-1), len(alphabet) - 1)
    texts = []
    for row in ids:
        keep = [int(i) for j, i in enumerate(row) if i != blank and (j == 0 or i != row[j - 1])]
        texts.append("".join(alphabet[i] for i in keep))
    return texts


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _sequence_rows(outputs: list[np.ndarray], rows: int) -> np.ndarray:
    seq = next((o for o in outputs if o.ndim == 3), None)
    if seq is None:
        raise UserInputError(f"builtin:cer: no rank-3 sequence output (shapes {[list(o.shape) for o in outputs]})")
    if seq.shape[1] == rows and seq.shape[0] != rows:
        return seq.transpose(1, 0, 2)  # [T, N, K]
    return seq


def cer(outputs: Outputs, labels: list[np.ndarray], charset: list[str]) -> float:
    errors = chars = 0
    for out, lab in zip(outputs, labels, strict=True):
        texts = [str(t) for t in np.asarray(lab).reshape(-1)]
        decoded = greedy_ctc_decode(_sequence_rows(out, len(texts)), charset)
        if len(decoded) != len(texts):
            raise UserInputError(f"builtin:cer: {len(decoded)} decoded rows for {len(texts)} labels")
        errors += sum(edit_distance(d, t) for d, t in zip(decoded, texts, strict=True))
        chars += sum(len(t) for t in texts)
    return errors / max(chars, 1)


# The class of a pixel whose scores hold NaN/Inf: no label has it, so such a pixel is never a hit.
_BROKEN = np.iinfo(np.int64).min


def _segmentation(out: np.ndarray, threshold: float) -> np.ndarray:
    if out.ndim == 4 and out.shape[1] > 1:
        return np.asarray(np.where(np.isfinite(out).all(1), out.argmax(1), _BROKEN))
    maps = out.reshape(out.shape[0], *out.shape[-2:])
    return np.asarray(np.where(np.isfinite(maps), (maps > threshold).astype(np.int64), _BROKEN))


def mean_iou(outputs: Outputs, labels: list[np.ndarray], threshold: float = 0.3) -> float:
    inter: dict[int, int] = {}
    union: dict[int, int] = {}
    for out, lab in zip(outputs, labels, strict=True):
        pred, mask = _segmentation(out[0], threshold), np.asarray(lab).astype(np.int64)
        if pred.size != mask.size:
            raise UserInputError(f"builtin:miou: prediction {list(pred.shape)} vs label mask {list(mask.shape)}")
        mask = mask.reshape(pred.shape)
        for c in np.setdiff1d(np.union1d(np.unique(pred), np.unique(mask)), [_BROKEN]):
            p, m = pred == c, mask == c
            inter[int(c)] = inter.get(int(c), 0) + int(np.count_nonzero(p & m))
            union[int(c)] = union.get(int(c), 0) + int(np.count_nonzero(p | m))
    return float(np.mean([inter[c] / union[c] for c in union])) if union else 1.0


def builtin_metric(name: str, *, charset: list[str] | None = None, map_threshold: float = 0.3) -> BuiltinMetric:
    if name == "cer":
        assert charset is not None
        return BuiltinMetric("cer", True, lambda outs, labels: cer(outs, labels, charset))
    if name == "miou":
        return BuiltinMetric("miou", False, lambda outs, labels: mean_iou(outs, labels, map_threshold))
    raise UserInputError(f"--metric builtin:{name}: unknown (built-in: {', '.join(BUILTINS)})")
