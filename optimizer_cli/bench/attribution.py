"""Per-layer attribution: which nodes cost fidelity, and a recipe patch that excludes them.

1. Rank: run the original and the optimized model with every shared intermediate tensor exposed;
   a node's local drop is how much cosine its output loses beyond the worst of its inputs.
2. Search: re-run the recipe with the top-ranked nodes excluded from the quantize pass and bisect on
   the number excluded, keeping the smallest set whose fidelity meets the threshold.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from optimizer_cli.analysis.int8 import full_range_int8_weights
from optimizer_cli.bench.accuracy import fidelity
from optimizer_cli.data import Dataset
from optimizer_cli.model_io import load_model
from optimizer_cli.runtime.cpu import cpu_isa, u8s8_saturates
from optimizer_cli.runtime.session import SessionConfig, run_model
from optimizer_cli.verify import compare_arrays

MAX_SAMPLES = 8
MAX_CANDIDATES = 16


def _expose(model: ir.Model, names: list[str]) -> None:
    """Make intermediate values graph outputs (in place) so a session returns them."""
    values = {v.name: v for n in model.graph for v in n.outputs}
    existing = {v.name for v in model.graph.outputs}
    for name in names:
        if name not in existing and name in values:
            model.graph.outputs.append(values[name])


def _run_all(
    model: ir.Model, feeds: list[dict[str, np.ndarray]], names: list[str], threads: int
) -> list[dict[str, np.ndarray]]:
    exposed = {v.name for v in model.graph.outputs}
    wanted = [n for n in names if n in exposed]
    outputs = run_model(model, feeds, SessionConfig(threads=threads, opt_level="disable"), wanted)
    return [dict(zip(wanted, outs, strict=True)) for outs in outputs]


def _effective_names(model: ir.Model, names: list[str]) -> dict[str, str]:
    """In a QDQ graph consumers see DQ(Q(t)), not t (the quantizer may drop a Relu into the Q clamp)."""
    values = {v.name: v for n in model.graph for v in n.outputs}
    out = {}
    for name in names:
        value = values.get(name)
        target = name
        if value is not None:
            uses = [u.node for u in value.uses()]
            if len(uses) == 1 and uses[0].op_type == "QuantizeLinear":
                q_uses = [u.node for u in uses[0].outputs[0].uses()]
                if len(q_uses) == 1 and q_uses[0].op_type == "DequantizeLinear":
                    target = q_uses[0].outputs[0].name
        out[name] = target
    return out


def _measured_inputs(node: ir.Node, cosine: dict[str, float]) -> tuple[list[ir.Node], float]:
    """Walk back through producers whose outputs were not measured; return them and the worst input cosine."""
    chain: list[ir.Node] = []
    worst = 1.0
    stack = [v for v in node.inputs if v is not None and not v.is_initializer()]
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if value.name in cosine:
            worst = min(worst, cosine[value.name])
            continue
        producer = value.producer()
        if producer is None:
            continue
        chain.insert(0, producer)
        stack.extend(v for v in producer.inputs if v is not None and not v.is_initializer())
    return chain, worst


def rank_nodes(
    original: ir.Model, optimized: ir.Model, feeds: list[dict[str, np.ndarray]], threads: int = 2
) -> list[dict[str, Any]]:
    """Nodes of the original graph ordered by the fidelity their output loses locally."""
    opt_values = {v.name for n in optimized.graph for v in n.outputs}
    candidates = []
    for node in original.graph:
        for out in node.outputs:
            # dtype is often unknown without value_info: floating outputs are picked after the run.
            if out.name in opt_values and out.dtype in (
                None,
                ir.DataType.FLOAT,
                ir.DataType.FLOAT16,
                ir.DataType.DOUBLE,
            ):
                candidates.append(out.name)
    if not candidates:
        return []
    effective = _effective_names(optimized, candidates)
    _expose(original, candidates)
    _expose(optimized, list(effective.values()))
    ref = _run_all(original, feeds, candidates, threads)
    new_raw = _run_all(optimized, feeds, list(effective.values()), threads)
    new = [{name: outs[effective[name]] for name in candidates if effective[name] in outs} for outs in new_raw]
    cosine: dict[str, float] = {}
    for name in candidates:
        # Only tensors that still mean the same thing: floating and the same shape (pruning changes shapes).
        vals = [
            compare_arrays(name, r[name], n[name]).cosine
            for r, n in zip(ref, new, strict=True)
            if name in r and name in n and r[name].shape == n[name].shape and np.issubdtype(r[name].dtype, np.floating)
        ]
        if vals:
            cosine[name] = float(np.mean(vals))
    ranked = []
    for node in original.graph:
        outs = [o.name for o in node.outputs if o.name in cosine]
        if not outs:
            continue
        out_cos = min(cosine[o] for o in outs)
        # Unmeasured producers (e.g. a Conv whose Relu the quantizer fused away) belong to this step.
        chain, in_cos = _measured_inputs(node, cosine)
        names = [*(n.name for n in chain), node.name]
        ranked.append(
            {
                "node": " + ".join(names),
                "nodes": names,
                "op": "+".join([*(n.op_type for n in chain), node.op_type]),
                "cosine": out_cos,
                "local_drop": max(0.0, in_cos - out_cos),
            }
        )
    ranked.sort(key=lambda item: -item["local_drop"])
    return ranked


def _cpu_cosine(report: dict[str, Any]) -> float | None:
    rows = [r for r in report.get("benchmark", {}).get("rows", []) if r.get("usable") and r.get("fidelity")]
    return min((r["fidelity"]["cosine_min"] for r in rows), default=None)


def _fidelity_of(
    recipe: Any,
    model_path: Path,
    data: Dataset,
    reference: list[list[np.ndarray]],
    calib: str | None,
    evaluation: str | None,
    threads: int,
) -> float:
    """Cosine of a trial recipe's model against the original's outputs (computed once by the caller)."""
    from optimizer_cli.pipeline import run_pipeline

    result = run_pipeline(model_path, recipe, None, calibration=calib, evaluation=evaluation, threads=threads)
    names = [v.name for v in result.model.graph.outputs]
    return fidelity(reference, run_model(result.model, data.feeds, SessionConfig(threads=threads)), names).cosine_min


def _stage_before(
    recipe: Any, index: int, model_path: Path, calib: str | None, evaluation: str | None, threads: int
) -> ir.Model:
    from optimizer_cli.pipeline import run_pipeline

    trial = recipe.model_copy(deep=True)
    trial.passes = trial.passes[:index]
    trial.verify.enabled = False
    return run_pipeline(model_path, trial, None, calibration=calib, evaluation=evaluation, threads=threads).model


def _saturation_fix(
    recipe: Any,
    index: int,
    model_path: Path,
    output_path: Path,
    subset: Dataset,
    reference: Callable[[], list[list[np.ndarray]]],
    calib: str | None,
    evaluation: str | None,
    threads: int,
) -> dict[str, Any] | None:
    """On a CPU whose u8*s8 kernels saturate, full-range int8 weights lose fidelity in every layer at
    once and no layer ranks high in the float simulation: try 7-bit weights before excluding layers."""
    config = recipe.passes[index]
    if config.mode not in ("dynamic", "static") or config.reduce_range is not False or not u8s8_saturates():
        return None  # `auto` already means 7-bit weights on such a CPU
    if not full_range_int8_weights(load_model(output_path))[0]:
        return None
    trial = recipe.model_copy(deep=True)
    trial.verify.enabled = False
    trial.passes[index].reduce_range = True
    cosine = _fidelity_of(trial, model_path, subset, reference(), calib, evaluation, threads)
    return {
        "search": f"this CPU ({cpu_isa()}) saturates full-range int8 weights in every int8 layer; "
        f"7-bit weights (reduce_range) give cosine {cosine:.5f} with no layer excluded",
        "patch": f"--set 'passes.{index}.reduce_range=true'",
        "patch_fidelity": cosine,
        "patch_meets_threshold": cosine >= recipe.benchmark.attribution_threshold,
    }


def attribute_if_needed(
    report: dict[str, Any],
    model_path: Path,
    output_path: Path,
    recipe: Any,
    data: Dataset,
    calib: str | None,
    evaluation: str | None,
    threads: int,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any] | None:
    from optimizer_cli.pipeline import normalize

    threshold = recipe.benchmark.attribution_threshold
    current = _cpu_cosine(report)
    if current is None or current >= threshold:
        return None
    log(f"fidelity cosine {current:.5f} < {threshold}: attributing the loss to layers")
    quant_indices = [i for i, p in enumerate(recipe.passes) if p.type == "quantize"]
    subset = data.take(MAX_SAMPLES)
    # The original's outputs score every trial recipe; computed once, and only if a trial runs.
    reference = functools.cache(lambda: run_model(load_model(model_path), subset.feeds, SessionConfig(threads=threads)))
    if quant_indices:
        saturation = _saturation_fix(
            recipe, quant_indices[-1], model_path, output_path, subset, reference, calib, evaluation, threads
        )
        if saturation is not None and saturation["patch_fidelity"] >= threshold:
            log(saturation["search"])
            return {"threshold": threshold, "cosine": current, "nodes": [], **saturation}
    # Compare against the model the quantizer saw: its node and tensor names are the ones to exclude.
    before_quant = (
        _stage_before(recipe, quant_indices[-1], model_path, calib, evaluation, threads) if quant_indices else None
    )
    original = before_quant or load_model(model_path)
    if before_quant is None:
        normalize(original)
    optimized = load_model(output_path)
    ranked = rank_nodes(original, optimized, subset.feeds, threads)
    result: dict[str, Any] = {
        "threshold": threshold,
        "cosine": current,
        "nodes": ranked[:MAX_CANDIDATES],
        "patch": None,
    }
    if not quant_indices or not ranked:
        result["search"] = (
            "no quantize pass to exclude nodes from (pruned or factorized layers change tensor shapes, so they "
            "are not compared layer by layer: keep a layer whole with that pass's exclude_nodes)"
            if not quant_indices
            else "no shared tensors to compare"
        )
        return result
    index = quant_indices[-1]
    already = list(recipe.passes[index].exclude_nodes)
    candidates: list[str] = []
    for item in ranked:
        if item["local_drop"] > 0 and len(candidates) < MAX_CANDIDATES:
            candidates.extend(n for n in item["nodes"] if n not in already and n not in candidates)
    if not candidates:
        result["search"] = "no node loses fidelity locally"
        return result

    def score(k: int) -> float:
        trial = recipe.model_copy(deep=True)
        trial.verify.enabled = False
        trial.passes[index].exclude_nodes = already + candidates[:k]
        return _fidelity_of(trial, model_path, subset, reference(), calib, evaluation, threads)

    best_k, best_cos = len(candidates), score(len(candidates))
    log(f"excluding all {len(candidates)} candidates gives cosine {best_cos:.5f}")
    if best_cos >= threshold:
        lo, hi = 1, len(candidates)
        while lo < hi:  # smallest k that meets the threshold (fidelity grows with k in practice)
            mid = (lo + hi) // 2
            cos = score(mid)
            log(f"excluding {mid}: cosine {cos:.5f}")
            if cos >= threshold:
                hi, best_k, best_cos = mid, mid, cos
            else:
                lo = mid + 1
    nodes = already + candidates[:best_k]
    result["patch"] = f"--set 'passes.{index}.exclude_nodes=[{','.join(nodes)}]'"
    result["patch_fidelity"] = best_cos
    result["patch_meets_threshold"] = best_cos >= threshold
    return result
