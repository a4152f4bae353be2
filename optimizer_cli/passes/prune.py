"""prune (approximate): unstructured magnitude pruning, or structured channel pruning that shrinks tensors.

Contract
- magnitude: zeroes the smallest-|w| entries of Conv/MatMul/Gemm weights (global threshold or per
  layer). Shapes unchanged, so ORT's dense kernels run no faster; the file compresses better.
- structured: removes whole Conv output channels / MatMul-Gemm hidden units. Channel groups come from
  analysis.channel_groups (residual Adds, Concat, depthwise convs, BN, Flatten/Reshape); a group is
  pruned only when every use of its channels is understood, and never when it reaches a graph
  output. Kept channels are rounded up to a multiple (`round_to`) for fast kernels. Outputs are
  approximated: removing channel c equals zeroing the weights that read c (the test oracle).
Importance: L2 norm of each channel's producer weights, each producer normalized by its max, summed.
Run `fuse` first so BatchNorm scales are folded into the conv weights the norm is taken over.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from optimizer_cli.analysis.channel_groups import Analysis, Group, Root, analyze, expr_mask, expr_size
from optimizer_cli.analysis.cost import macs, parameter_count
from optimizer_cli.analysis.graph import name_of, output_names
from optimizer_cli.errors import UserInputError
from optimizer_cli.model_io import read_weight
from optimizer_cli.passes._graph import (
    KEPT_CHANNELS_META,
    infer_shapes,
    is_large,
    refresh_shapes,
    replace_model_contents,
    set_const,
)
from optimizer_cli.passes.base import (
    Exactness,
    ModelTraits,
    OptimizationPass,
    PassConfig,
    RecipeContext,
    SearchDimension,
)
from optimizer_cli.runtime.session import SessionConfig, capture_values, run_model
from optimizer_cli.verify import drift


class PruneConfig(PassConfig):
    type: Literal["prune"] = "prune"
    method: Literal["structured", "magnitude"] = Field(
        "structured", description="structured: remove whole channels; magnitude: zero the smallest weights."
    )
    # 1.0 would remove every channel: the model is destroyed, so the bound is strict.
    sparsity: float = Field(
        0.3, ge=0, lt=1, description="Fraction of channels (structured) or weights (magnitude) to remove."
    )
    scope: Literal["layer", "global"] = Field(
        "layer", description="Rank importance per layer or across all layers (global)."
    )
    round_to: int = Field(8, ge=1, description="Round kept channels up to a multiple of this (1: no rounding).")
    min_channels: int = Field(8, ge=1, description="Keep at least this many channels per group.")
    op_types: list[str] = Field(["Conv", "MatMul", "Gemm"], description="Op types whose channels are pruned.")
    exclude_nodes: list[str] = Field([], description="Node names left alone.")
    # activation: channel RMS on calibration data x norm of the consumer weights reading it (what the
    # channel contributes downstream; needs --calib); weight: producer weight norms. auto: activation
    # for MatMul/Gemm groups, weight for Conv groups. Measured with reconstruct, held-out data:
    # MiniLM FFN 25%: cosine 0.955 (activation) vs 0.814 (weight); digits ResNet 30%: top-1 91.8%
    # (activation) vs 98.4% (weight, = fp32).
    importance: Literal["auto", "activation", "weight"] = Field(
        "auto",
        description="Channel importance: activation (needs --calib), weight norms, or auto "
        "(activation for MatMul/Gemm, weight for Conv).",
    )
    samples: int = Field(32, ge=1, description="Calibration samples for activation importance.")
    # Accuracy-guarded: find the largest sparsity <= `sparsity` whose outputs keep this cosine to the
    # unpruned model on held-out calibration samples (after a least-squares refit when `refit`).
    # No upper bound: a target above 1 is never met, so the pass keeps the model (tests rely on it).
    target_cosine: float | None = Field(
        None, ge=-1, description="Search the largest sparsity keeping this output cosine (needs --calib)."
    )
    search_steps: int = Field(5, ge=1, description="Trials of the target_cosine bisection.")
    refit: bool = Field(True, description="Least-squares refit (reconstruct) of each search trial before scoring.")


def _tensor(value: ir.Value) -> np.ndarray:
    return read_weight(value.const_value)  # type: ignore[arg-type]


def activation_importance(
    analysis: Analysis, groups: list[Group], model: ir.Model, feeds: list[dict[str, np.ndarray]], threads: int
) -> dict[int, np.ndarray]:
    """Per channel: RMS of the activation a consumer reads x norm of that consumer's weight slice.

    This is the size of what the channel adds to the consumer's output, the quantity removal loses
    (a producer's weight norm ignores what follows it, e.g. a GELU that silences the channel).
    """
    wanted = {analysis.find(g.gid): g for g in groups}
    reads: dict[int, list[tuple[str, int, np.ndarray]]] = {gid: [] for gid in wanted}
    for consumer in analysis.consumers:
        if not isinstance(consumer.expr, Root) or analysis.find(consumer.expr.group) not in wanted:
            continue
        w = _tensor(consumer.node.inputs[consumer.weight_index])  # type: ignore[arg-type]
        axes = tuple(a for a in range(w.ndim) if a != consumer.axis)
        norms = np.sqrt(np.sum(w.astype(np.float64) ** 2, axis=axes))
        value = consumer.node.inputs[0]
        rank = len(value.shape) if value is not None and value.shape is not None else None
        if value is None or rank is None:
            continue
        channel_axis = 1 if consumer.node.op_type in ("Conv", "ConvTranspose") else rank - 1
        reads[analysis.find(consumer.expr.group)].append((name_of(value), channel_axis, norms))
    names = sorted({name for entries in reads.values() for name, _, _ in entries})
    if not names:
        return {}
    captured = capture_values(model, feeds, names, threads)
    scores: dict[int, np.ndarray] = {}
    for gid, entries in reads.items():
        if not entries:
            continue
        total = np.zeros(wanted[gid].size)
        for name, axis, norms in entries:
            acts = captured[name]
            sq = sum(
                np.sum(np.moveaxis(a.astype(np.float64), axis, 0).reshape(a.shape[axis], -1) ** 2, axis=1) for a in acts
            )
            count = sum(a.size // a.shape[axis] for a in acts)
            total += np.sqrt(sq / max(count, 1)) * norms
        scores[gid] = total
    return scores


def _wants_activation(group: Group, mode: str) -> bool:
    if mode == "auto":
        return all(p.node.op_type in ("MatMul", "Gemm") for p in group.producers)
    return mode == "activation"


def group_importance(group: Group) -> np.ndarray:
    score = np.zeros(group.size)
    for prod in group.producers:
        w = _tensor(prod.node.inputs[prod.weight_index])  # type: ignore[arg-type]
        axes = tuple(a for a in range(w.ndim) if a != prod.axis)
        norms = np.sqrt(np.sum(w.astype(np.float64) ** 2, axis=axes))
        score += norms / max(float(norms.max()), 1e-12)
    return score


def choose_keep(
    analysis: Analysis, groups: list[Group], cfg: PruneConfig, scores: dict[int, np.ndarray] | None = None
) -> dict[int, np.ndarray]:
    """Keep-mask per group: the most important channels, count rounded up to `round_to`."""
    keep: dict[int, np.ndarray] = {}
    scores = {g.gid: (scores or {}).get(g.gid, group_importance(g)) for g in groups}
    if cfg.scope == "global":
        # Normalize per group so wide and narrow layers compete fairly, then one threshold.
        pooled = np.concatenate([s / max(float(s.mean()), 1e-12) for s in scores.values()]) if scores else np.array([])
        threshold = np.quantile(pooled, cfg.sparsity) if pooled.size else 0.0
    for g in groups:
        s = scores[g.gid]
        if cfg.scope == "global":
            n_keep = int(np.sum(s / max(float(s.mean()), 1e-12) > threshold))
        else:
            n_keep = g.size - math.floor(g.size * cfg.sparsity)
        n_keep = max(n_keep, cfg.min_channels)
        n_keep = int(math.ceil(n_keep / cfg.round_to) * cfg.round_to) if cfg.round_to > 1 else n_keep
        if n_keep >= g.size:
            continue
        mask = np.zeros(g.size, bool)
        mask[np.argsort(-s, kind="stable")[:n_keep]] = True
        keep[g.gid] = mask
    return keep


def apply_structured(
    model: ir.Model, analysis: Analysis, keep: dict[int, np.ndarray], *, zero_only: bool = False
) -> None:
    """Remove the channels not kept (or, with zero_only, zero the consumer weights that read them)."""
    graph = model.graph
    find = analysis.find
    for consumer in analysis.consumers:
        mask = expr_mask(consumer.expr, keep, find)
        if mask.all():
            continue
        w = _tensor(consumer.node.inputs[consumer.weight_index])  # type: ignore[arg-type]
        if zero_only:
            w = w.copy()
            index = [slice(None)] * w.ndim
            index[consumer.axis] = ~mask  # type: ignore[call-overload]
            w[tuple(index)] = 0
            set_const(consumer.node, consumer.weight_index, w, graph)
        else:
            set_const(consumer.node, consumer.weight_index, np.compress(mask, w, axis=consumer.axis), graph)
    if zero_only:
        return
    canonical = analysis.canonical()
    for gid, mask in keep.items():
        for value in canonical[gid].values:
            # In-memory only: tells `reconstruct` which original channels this tensor still holds.
            value.meta[KEPT_CHANNELS_META] = np.flatnonzero(mask)
        for prod in canonical[gid].producers:
            w = _tensor(prod.node.inputs[prod.weight_index])  # type: ignore[arg-type]
            set_const(prod.node, prod.weight_index, np.compress(mask, w, axis=prod.axis), graph)
            if prod.bias_index is not None:
                b = _tensor(prod.node.inputs[prod.bias_index])  # type: ignore[arg-type]
                set_const(prod.node, prod.bias_index, np.compress(mask, b, axis=b.ndim - 1), graph)
    for dep in analysis.dependents:
        mask = expr_mask(dep.expr, keep, find)
        if not mask.all():
            c = _tensor(dep.node.inputs[dep.input_index])  # type: ignore[arg-type]
            set_const(dep.node, dep.input_index, np.compress(mask, c, axis=dep.axis), graph)
    for dw in analysis.depthwise:
        mask = expr_mask(dw.expr, keep, find)
        if not mask.all():
            w = _tensor(dw.node.inputs[1])  # type: ignore[arg-type]
            set_const(dw.node, 1, np.compress(mask, w, axis=0), graph)
            dw.node.attributes["group"] = ir.AttrInt64("group", int(mask.sum()))
    for split in analysis.splits:
        sizes = [int(expr_mask(part, keep, find).sum()) for part in split.parts]
        if sizes != [expr_size(part) for part in split.parts]:
            if split.from_input:
                set_const(split.node, 1, np.array(sizes, np.int64), graph)
            else:
                split.node.attributes["split"] = ir.AttrInt64s("split", sizes)
    for fix in analysis.reshapes:
        mask = expr_mask(fix.expr, keep, find)
        if not mask.all():
            target = _tensor(fix.node.inputs[1]).copy()  # type: ignore[arg-type]
            target[fix.position] = int(mask.sum()) * fix.factor
            set_const(fix.node, 1, target, graph)
    refresh_shapes(model)


def _magnitude_targets(model: ir.Model, cfg: PruneConfig) -> list[ir.Node]:
    """Nodes whose constant float weight (rank >= 2) magnitude pruning zeroes."""
    targets = []
    for node in model.graph:
        if node.op_type in cfg.op_types and node.name not in cfg.exclude_nodes and len(node.inputs) > 1:
            tensor = node.inputs[1].const_value if node.inputs[1] is not None else None
            if tensor is not None and len(tensor.shape) >= 2 and tensor.dtype.is_floating_point():
                targets.append(node)
    return targets


def global_quantile(arrays: Callable[[], Iterator[np.ndarray]], q: float) -> float:
    """np.quantile(concatenate(|a| for a in arrays()), q) (linear interpolation), holding one array at a time.

    Two passes: count |a| by the top 16 bits of its float32 pattern (monotonic for non-negative floats),
    then keep only the values in the bins holding the two order statistics the quantile interpolates."""
    counts = np.zeros(1 << 16, dtype=np.int64)
    for a in arrays():
        counts += np.bincount(np.abs(a.astype(np.float32)).view(np.uint32).ravel() >> 16, minlength=1 << 16)
    total = int(counts.sum())
    position = q * (total - 1)
    ranks = (int(np.floor(position)), int(np.ceil(position)))
    cumulative = np.cumsum(counts)
    bins = sorted({int(np.searchsorted(cumulative, r, side="right")) for r in ranks})
    picked = []
    for a in arrays():
        magnitude = np.abs(a.astype(np.float32)).ravel()
        picked.append(magnitude[np.isin(magnitude.view(np.uint32) >> 16, bins)])
    values = np.sort(np.concatenate(picked))
    below = int(cumulative[bins[0] - 1]) if bins[0] > 0 else 0  # elements in bins before the first picked one
    low, high = values[ranks[0] - below], values[ranks[1] - below]
    return float(low + (high - low) * (position - ranks[0]))


def magnitude_prune(model: ir.Model, cfg: PruneConfig) -> dict[str, object]:
    """Zero the smallest |w| of each target weight, one weight in memory at a time (models over 2 GB)."""
    targets = _magnitude_targets(model, cfg)
    if not targets:
        return {"layers": 0}

    def weights() -> Iterator[np.ndarray]:
        return (_tensor(node.inputs[1]) for node in targets)  # type: ignore[arg-type]

    threshold = global_quantile(weights, cfg.sparsity) if cfg.scope == "global" else None
    zeroed = total = 0
    for node in targets:
        w = _tensor(node.inputs[1])  # type: ignore[arg-type]
        t = threshold if threshold is not None else np.quantile(np.abs(w), cfg.sparsity)
        pruned = np.where(np.abs(w) <= t, 0, w).astype(w.dtype)
        zeroed += int(np.sum(pruned == 0))
        total += w.size
        set_const(node, 1, pruned, model.graph)
    return {"layers": len(targets), "weight_sparsity": round(zeroed / total, 4)}


class PrunePass(OptimizationPass[PruneConfig]):
    name = "prune"
    Config = PruneConfig
    exactness = Exactness.APPROXIMATE
    contract = (
        "structured: removes Conv channels / MatMul-Gemm hidden units by channel group; magnitude: zeroes small weights"
    )
    search_switches = ("prune_sparsity",)

    @classmethod
    def search_dimensions(cls, traits: ModelTraits) -> list[SearchDimension]:
        if not (traits.prunable_groups and traits.has_calibration):
            return []
        sparsities = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
        return [SearchDimension("prune_sparsity", sparsities, "structured prune + reconstruct")]

    @classmethod
    def recipe_entries(cls, params: dict[str, Any], ctx: RecipeContext) -> list[dict[str, Any]]:
        sparsity = params.get("prune_sparsity") or 0.0
        if not sparsity:
            return []
        # Pruning before fusion: structured groups are read on the plain graph (as transformer-prune-int8 does).
        return [{"type": "prune", "method": "structured", "sparsity": sparsity}, {"type": "reconstruct"}]

    @classmethod
    def describe_trial(cls, params: dict[str, Any]) -> str | None:
        return f"prune {params['prune_sparsity']:g}" if params.get("prune_sparsity") else None

    @classmethod
    def calibration_use(cls, config: PruneConfig) -> str | None:
        return "prune with target_cosine" if config.target_cosine is not None else None

    @classmethod
    def fidelity_advice(cls, config: PruneConfig, key: str, excluded_tried: bool) -> str | None:
        return (
            f"lower {key}.sparsity (now {config.sparsity}) or set {key}.target_cosine to let prune pick the "
            f"largest sparsity that keeps that cosine, or keep the most sensitive layers whole with {key}.exclude_nodes"
        )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.config
        if cfg.target_cosine is not None and cfg.method == "structured":
            return self._search(model, cfg)
        params_before, macs_before = parameter_count(model), None
        infer_shapes(model)
        macs_before = macs(model)
        if cfg.method == "magnitude":
            self.stats = magnitude_prune(model, cfg)
            return ir.passes.PassResult(model, bool(self.stats.get("layers")))
        analysis = analyze(model)
        canonical = analysis.canonical()
        excluded = set(cfg.exclude_nodes)
        groups = [
            g
            for g in analysis.prunable()
            if not any(p.node.name in excluded for p in g.producers)
            and all(p.node.op_type in cfg.op_types for p in g.producers)
        ]
        scores = None
        by_activation = [g for g in groups if _wants_activation(g, cfg.importance)]
        if by_activation and self.ctx.calibration is not None:
            feeds = self.ctx.calibration.feeds[: cfg.samples]
            scores = activation_importance(analysis, by_activation, model, feeds, self.ctx.threads)
        keep = choose_keep(analysis, groups, cfg, scores)
        if keep:
            apply_structured(model, analysis, keep)
        blocked = Counter(g.blocked.split("'")[0].strip() for g in canonical.values() if g.blocked and g.producers)
        channels_before = sum(g.size for g in groups)
        channels_removed = sum(int((~m).sum()) for m in keep.values())
        macs_after = macs(model)
        self.stats = {
            "groups": len([g for g in canonical.values() if g.producers]),
            "pruned_groups": len(keep),
            "channels_removed": f"{channels_removed}/{channels_before}",
            "params": f"{params_before}->{parameter_count(model)}",
            "macs": f"{macs_before}->{macs_after}" if macs_before and macs_after else "unknown (dynamic shapes)",
            "blocked": dict(blocked.most_common(4)),
            "importance": f"activation for {len(scores)} groups" if scores else "weight",
        }
        return ir.passes.PassResult(model, bool(keep))

    def _search(self, model: ir.Model, cfg: PruneConfig) -> ir.passes.PassResult:
        """Bisect the sparsity; keep the largest whose held-out cosine meets the target (never nothing)."""
        from optimizer_cli.data import Dataset
        from optimizer_cli.passes.reconstruct import ReconstructConfig, ReconstructPass

        if self.ctx.calibration is None or len(self.ctx.calibration) < 2:
            raise UserInputError("prune with target_cosine needs at least 2 calibration samples")
        if is_large(model):
            raise UserInputError("prune with target_cosine copies the model per trial: not available over 2 GB")
        feeds = self.ctx.calibration.feeds
        n_score = max(1, len(feeds) // 4)
        fit_ctx = dataclasses.replace(self.ctx, calibration=Dataset(feeds[:-n_score], source="calibration (fit)"))
        score_feeds = feeds[-n_score:]
        names = output_names(model)
        target = cfg.target_cosine
        assert target is not None  # _search runs only when it is set
        config = SessionConfig(threads=self.ctx.threads, opt_level="disable")
        reference = run_model(model, score_feeds, config)
        baseline = ir.serde.serialize_model(model)
        tried: list[str] = []
        best: tuple[float, ir.Model, dict] | None = None

        def trial(sparsity: float) -> float:
            nonlocal best
            candidate = ir.serde.deserialize_model(baseline)
            inner = PrunePass(cfg.model_copy(update={"target_cosine": None, "sparsity": sparsity}), fit_ctx)
            inner(candidate)
            if cfg.refit and self.ctx.load_original is not None:
                ReconstructPass(ReconstructConfig(samples=cfg.samples * 4), fit_ctx)(candidate)
            cosine = min(d.cosine for d in drift(names, reference, run_model(candidate, score_feeds, config)))
            tried.append(f"{sparsity:.3f}:{cosine:.4f}")
            if cosine >= target and (best is None or sparsity > best[0]):
                best = (sparsity, candidate, inner.stats)
            return cosine

        lo, hi = 0.0, cfg.sparsity
        if trial(hi) < target:
            for _ in range(max(0, cfg.search_steps - 1)):
                mid = (lo + hi) / 2
                if trial(mid) >= target:
                    lo = mid
                else:
                    hi = mid
        if best is None:
            self.stats = {"search": ", ".join(tried), "chosen_sparsity": 0.0, "note": "no sparsity met target_cosine"}
            return ir.passes.PassResult(model, False)
        sparsity, chosen, stats = best
        replace_model_contents(model, chosen)
        self.stats = {"chosen_sparsity": round(sparsity, 3), "search": ", ".join(tried), **stats}
        return ir.passes.PassResult(model, stats.get("pruned_groups", 0) > 0)
