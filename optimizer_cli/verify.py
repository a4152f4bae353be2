"""Checks run after every pass: onnx.checker, strict shape inference, signature, numeric drift."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from optimizer_cli.analysis.graph import name_of, output_names
from optimizer_cli.errors import VerificationError, first_line
from optimizer_cli.model_io import (
    EXTERNAL_DATA_THRESHOLD_BYTES,
    has_external_data,
    save_structure,
    to_proto,
    weights_nbytes,
)
from optimizer_cli.runtime.session import SessionConfig, ort_error_message, run_model


def check_model(model: ir.Model, *, strict_shapes: bool = True) -> None:
    """onnx.checker and strict shape inference; raises VerificationError with the checker's message."""
    try:
        if weights_nbytes(model) <= EXTERNAL_DATA_THRESHOLD_BYTES and not has_external_data(model):
            proto = to_proto(model)
            onnx.checker.check_model(proto)
            onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=strict_shapes, data_prop=True)
        else:
            # Over 2 GB a proto cannot be serialized, and weights in external data are found by path: check the
            # graph saved with its weights replaced by references into an empty stub (nothing is copied).
            with tempfile.TemporaryDirectory(prefix="optimize-check-") as tmp:
                path = save_structure(model, Path(tmp))
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
    ins = [(name_of(v), str(v.dtype)) for v in model.graph.inputs if v.name not in model.graph.initializers]
    outs = [(name_of(v), str(v.dtype)) for v in model.graph.outputs]
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
    # The same NaN / +inf / -inf at the same places is a reproduced output; anything else is a changed one.
    same_nonfinite = bool(
        np.array_equal(np.isnan(a), np.isnan(b))
        and np.array_equal(np.isposinf(a), np.isposinf(b))
        and np.array_equal(np.isneginf(a), np.isneginf(b))
    )
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
    if not same_nonfinite:  # never a perfect score next to max|Δ| inf
        cosine, rel_l2 = 0.0, float("inf")
    elif a.size == 0 and ref.size:  # nothing finite to compare: undefined, not perfect
        max_abs = rel_l2 = cosine = float("nan")
    if new_nonfinite:
        cosine, rel_l2 = 0.0, float("inf")
        if top1 is not None:  # rows holding a new NaN do not agree, whatever argmax picks
            bad_rows = ~np.isfinite(new).reshape(-1, new.shape[-1]).all(-1) & np.isfinite(ref).reshape(
                -1, ref.shape[-1]
            ).all(-1)
            agree = (ref.argmax(-1) == new.argmax(-1)).reshape(-1) & ~bad_rows
            top1 = float(np.mean(agree))
    return Drift(name, max_abs, rel_l2, cosine, top1, new_nonfinite)


def min_mean_cosine(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]]) -> float:
    """The worst output's mean cosine over samples (float outputs only)."""
    per_output: list[list[float]] = [[] for _ in reference[0]] if reference else []
    for ref, new in zip(reference, outputs, strict=True):
        for i, (r, n) in enumerate(zip(ref, new, strict=True)):
            if np.issubdtype(r.dtype, np.floating):
                per_output[i].append(compare_arrays(str(i), r, n).cosine)
    means = [float(np.mean(c)) for c in per_output if c]
    return min(means) if means else 1.0


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
                _worst(max, [d.max_abs for d in per_output]),
                _worst(max, [d.rel_l2 for d in per_output]),
                _worst(min, [d.cosine for d in per_output]),
                float(np.mean(tops)) if tops else None,
                sum(d.nonfinite for d in per_output),
            )
        )
    return out


def _worst(pick: Any, values: list[float]) -> float:
    """min/max over samples, leaving out samples whose figure is undefined (NaN: nothing finite to compare),
    which builtin min/max would let win or lose by their position; NaN only when every sample is undefined."""
    defined = [v for v in values if not np.isnan(v)]
    return float(pick(defined)) if defined else float("nan")


def within_tolerance(ref: np.ndarray, new: np.ndarray, rtol: float, atol: float) -> bool:
    """Exact-pass oracle: allclose scaled by the output's magnitude (fusions reorder float sums)."""
    if not np.issubdtype(ref.dtype, np.floating):
        return bool(np.array_equal(ref, new))
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return bool(np.allclose(new, ref, rtol=rtol, atol=atol * max(1.0, scale), equal_nan=True))


@dataclass(frozen=True)
class Tolerance:
    """The exact-pass oracle: outputs within rtol / atol * max(1, |output|max) (fusions reorder float sums)."""

    rtol: float = 1e-3
    atol: float = 1e-4

    def allows(self, ref: np.ndarray, new: np.ndarray) -> bool:
        return ref.shape == new.shape and within_tolerance(ref, new, self.rtol, self.atol)

    def all_close(self, ref: list[list[np.ndarray]], new: list[list[np.ndarray]]) -> bool:
        """Every output of every sample within tolerance."""
        return all(self.allows(r, n) for rs, ns in zip(ref, new, strict=True) for r, n in zip(rs, ns, strict=True))


def drift(names: list[str], ref: list[list[np.ndarray]], new: list[list[np.ndarray]]) -> list[Drift]:
    """Per output, the worst drift over samples of `new` against `ref`."""
    per_sample = [
        [compare_arrays(name, a, b) for name, a, b in zip(names, ref_s, new_s, strict=True)]
        for ref_s, new_s in zip(ref, new, strict=True)
    ]
    return aggregate(per_sample)


def worse_per_output(a: list[Drift], b: list[Drift]) -> list[Drift]:
    """Per output, the drift with the lower cosine."""
    return [y if y.cosine < x.cosine else x for x, y in zip(a, b, strict=True)]


def same_layout(feeds: list[dict[str, np.ndarray]]) -> bool:
    """Every sample has the same inputs with the same shapes and dtypes, none of them a scalar: the samples
    concatenate along axis 0."""
    first = feeds[0] if feeds else {}
    return all(
        feed.keys() == first.keys()
        and all(v.ndim > 0 and v.shape == first[k].shape and v.dtype == first[k].dtype for k, v in feed.items())
        for feed in feeds
    )


def stack_samples(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    """Two or more samples as one feed, concatenated along axis 0; None unless they have the `same_layout`."""
    if len(feeds) < 2 or not same_layout(feeds):
        return None
    return {k: np.concatenate([feed[k] for feed in feeds]) for k in feeds[0]}


def batching_pays(weight_bytes: int, feeds: list[dict[str, np.ndarray]]) -> bool:
    """Whether to try the verification samples as one batch: on a model over 1.8 GB whose samples together are
    under 1% of its weights. There a run's time is mostly reading the weights, which a batch does once, and
    the batch's extra activations (which grow with the inputs: a large CNN's feature maps at high resolution)
    stay small beside the weights, so the memory bound holds."""
    if weight_bytes <= EXTERNAL_DATA_THRESHOLD_BYTES:
        return False
    return sum(v.nbytes for feed in feeds for v in feed.values()) * 100 <= weight_bytes


def split_samples(outputs: list[np.ndarray], one: list[np.ndarray], count: int) -> list[list[np.ndarray]] | None:
    """A batched run's outputs cut back into `count` samples, each output's slice as long along axis 0 as in
    the one-sample outputs `one`; None where an output is not laid out that way."""
    if len(outputs) != len(one):
        return None
    for out, ref in zip(outputs, one, strict=True):
        if out.ndim == 0 or out.ndim != ref.ndim or out.shape != (count * ref.shape[0], *ref.shape[1:]):
            return None
    return [
        [out[i * ref.shape[0] : (i + 1) * ref.shape[0]] for out, ref in zip(outputs, one, strict=True)]
        for i in range(count)
    ]


@dataclass
class StageDrift:
    vs_previous: list[Drift]
    vs_original: list[Drift]
    skipped: str | None = None  # a check left out, and why (reported with the stage)


class StageVerifier:
    """Checks each stage of a pipeline: onnx.checker + strict shape inference, an unchanged signature, and the
    drift of every output on fixed feeds (ORT, CPU) against the previous stage and the original.

    Exact stages must stay within `tolerance` of the previous stage. Approximate stages are also run with
    ORT's graph optimizations on, which is when QDQ pairs become int8 kernels whose results can differ from
    the float simulation (u8*s8 saturation on CPUs without VNNI): the worse drift counts, and below
    `min_cosine` the run stops. A stage that makes a finite output NaN/Inf stops the run either way.

    One session exists at a time. On a model whose weights exceed 1.8 GB (originally or now) an approximate
    stage is run only as deployed (optimizations on): run as written, onnxruntime keeps a float16 model's
    weights in both precisions on CPU (1.5x the model), and the deployed run is the one users get. There
    small samples are also run as one batch when the original shows that is the same as running them one by
    one: a run streams every weight through memory once, whatever the batch, so four small samples cost
    four passes over gigabytes of weights run alone and about one together.
    """

    def __init__(
        self,
        original: ir.Model,
        feeds: list[dict[str, np.ndarray]],
        *,
        threads: int = 2,
        tolerance: Tolerance = Tolerance(),
        min_cosine: float | None = None,
        numeric: bool = True,
        batched: bool | None = None,
    ) -> None:
        """`batched`: try running the samples as one batch (default: where `batching_pays`)."""
        self.feeds = feeds
        self.tolerance = tolerance
        self.min_cosine = min_cosine
        self.numeric = numeric
        self.names = output_names(original)
        weight_bytes = weights_nbytes(original)
        self.large = weight_bytes > EXTERNAL_DATA_THRESHOLD_BYTES
        self.signature = signature(original)
        self._as_written = SessionConfig(
            provider="cpu", threads=threads, opt_level="disable", cpu_mem_arena=False, prepacking=False
        )
        self._deployed = SessionConfig(provider="cpu", threads=threads, opt_level="all", cpu_mem_arena=False)
        self._batch: dict[str, np.ndarray] | None = None  # the samples stacked, once the original allows it
        try_batch = batching_pays(weight_bytes, feeds) if batched is None else batched
        # Raises what onnxruntime raises: the caller decides whose fault an unrunnable original is.
        self.original = self._run_original(original, try_batch) if numeric else []
        self.previous = self.original
        # Whether the latest stage was also run as deployed (graph optimizations on); see check_deployed.
        self.deployed_checked = True

    def _run_original(self, model: ir.Model, try_batch: bool) -> list[list[np.ndarray]]:
        """The original's outputs per sample. On a large model, the last sample is run alone and all of them
        as one batch in the same session; the batch is used from then on if its slices have the shapes of
        the lone run's and the last slice matches it within `tolerance` (the last sample is the one that an
        axis 0 which is really time or a running sum would change)."""
        batch = stack_samples(self.feeds) if try_batch else None
        if batch is not None:
            try:
                alone, together = run_model(model, [self.feeds[-1], batch], self._as_written)
            except Exception:  # e.g. a fixed batch dimension: run one by one, which raises what is wrong
                alone, together = [], []
            split = split_samples(together, alone, len(self.feeds)) if alone else None
            if split is not None and self.tolerance.all_close([alone], split[-1:]):
                self._batch = batch
                return split
        return self._run(model)

    def _run(self, model: ir.Model, deployed: bool = False) -> list[list[np.ndarray]]:
        config = self._deployed if deployed else self._as_written
        if self._batch is not None:
            try:
                together = run_model(model, [self._batch], config)[0]
            except Exception:  # whatever is wrong, the one-by-one run below says it as it would have
                together = []
            split = split_samples(together, self.original[0], len(self.feeds)) if together else None
            if split is not None:
                return split
        return run_model(model, self.feeds, config)

    def check(self, stage: str, model: ir.Model, exact: bool, removed_inputs: tuple[str, ...] = ()) -> StageDrift:
        """Verify one stage (`stage` names it in errors, e.g. "pass 2 (quantize)"); raises VerificationError.
        `removed_inputs`: inputs the stage declares it froze into constants (freeze_inputs): the signature
        loses them from then on, and the samples still hold them (run_model feeds a model only its inputs)."""
        if removed_inputs:
            ins, outs = self.signature
            self.signature = ([i for i in ins if i[0] not in removed_inputs], outs)
        try:
            check_model(model)
            check_signature(self.signature, model)
        except VerificationError as exc:
            raise VerificationError(f"{stage} produced an invalid model: {exc}") from exc
        if not self.numeric:
            return StageDrift([], [])
        large = self.large or weights_nbytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES
        deployed_only = large and not exact
        current = self._outputs(stage, model, deployed=deployed_only)
        result = StageDrift(drift(self.names, self.previous, current), drift(self.names, self.original, current))
        self._check_finite(stage, result.vs_previous, " with onnxruntime's optimized kernels" if deployed_only else "")
        self.deployed_checked = not exact
        if exact:
            self._check_exact(stage, current)
        elif deployed_only:
            result.skipped = "run as written (optimizations off) skipped: weights over 1.8 GB, checked as deployed only"
        else:
            deployed = drift(self.names, self.original, self._outputs(stage, model, deployed=True))
            self._check_finite(stage, deployed, " with onnxruntime's optimized kernels")
            result.vs_original = worse_per_output(result.vs_original, deployed)
        if not exact:
            worst = min((d.cosine for d in result.vs_original), default=None)
            if self.min_cosine is not None and worst is not None and worst < self.min_cosine:
                raise VerificationError(
                    f"{stage}: output cosine vs original {worst:.4f} < verify.min_cosine {self.min_cosine}"
                )
        self.previous = current
        return result

    def check_deployed(self, stage: str, model: ir.Model) -> None:
        """The final model must also load and run with onnxruntime's graph optimizations on (its default), which
        exact stages are not run with: fixing silero-vad's input shapes gave a model that runs as written but that
        onnxruntime's optimizer refuses (an If branch's LSTM infers a wrong rank). One sample suffices."""
        if not self.numeric or self.deployed_checked or not self.feeds:
            return
        try:
            run_model(model, self.feeds[:1], self._deployed)
        except Exception as exc:
            raise VerificationError(
                f"{stage} produced a model onnxruntime cannot run with its graph optimizations on (its default): "
                f"{ort_error_message(exc)}"
            ) from exc
        self.deployed_checked = True

    def _outputs(self, stage: str, model: ir.Model, deployed: bool) -> list[list[np.ndarray]]:
        try:
            return self._run(model, deployed)
        except Exception as exc:
            how = " with its graph optimizations on (its default)" if deployed else ""
            raise VerificationError(
                f"{stage} produced a model onnxruntime cannot run{how}: {ort_error_message(exc)}"
            ) from exc

    @staticmethod
    def _check_finite(stage: str, drifts: list[Drift], how: str = "") -> None:
        for d in drifts:
            if d.nonfinite:
                raise VerificationError(
                    f"{stage} made output '{d.output}' NaN/Inf{how} ({d.nonfinite} values) where it was finite"
                )

    def _check_exact(self, stage: str, current: list[list[np.ndarray]]) -> None:
        for ref_s, new_s in zip(self.previous, current, strict=True):
            for name, a, b in zip(self.names, ref_s, new_s, strict=True):
                if not self.tolerance.allows(a, b):
                    err = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
                    raise VerificationError(
                        f"{stage} is declared exact but changed output '{name}' (max abs diff {err:.3g})"
                    )
