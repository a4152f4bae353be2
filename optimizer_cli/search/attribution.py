"""Per-layer attribution: which stage and which nodes cost fidelity, and a recipe patch that excludes them.

0. Blame a stage: the pipeline records each stage's worst cosine vs the original; the stage with the
   largest drop from the one before lost the fidelity. Excluding nodes from quantization can only help
   when the loss is mostly at a quantize stage; otherwise the answer is that pass's knob.
1. Rank: run the original and the optimized model with every shared intermediate tensor exposed;
   a node's local drop is how much cosine its output loses beyond the worst of its inputs.
2. Search: re-run the recipe with the top-ranked nodes excluded from the quantize pass and bisect on
   the number excluded, keeping the smallest set whose fidelity meets the threshold.
3. Verify: a patch is reported only after the recipe, patched through the same `--set` path the user
   takes, meets the threshold on the data the threshold was measured on.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import yaml

from optimizer_cli.analysis.graph import name_of, output_names
from optimizer_cli.analysis.int8 import full_range_int8_weights
from optimizer_cli.bench.accuracy import fidelity
from optimizer_cli.data import Dataset
from optimizer_cli.model_io import load_model
from optimizer_cli.passes import PASS_REGISTRY
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
                    target = name_of(q_uses[0].outputs[0])
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
                candidates.append(name_of(out))
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
    ranked: list[dict[str, Any]] = []
    for node in original.graph:
        outs = [name_of(o) for o in node.outputs if o.name in cosine]
        if not outs:
            continue
        out_cos = min(cosine[o] for o in outs)
        # Unmeasured producers (e.g. a Conv whose Relu the quantizer fused away) belong to this step.
        chain, in_cos = _measured_inputs(node, cosine)
        names = [str(n.name) for n in (*chain, node)]
        ranked.append(
            {
                "node": " + ".join(names),
                "nodes": names,
                "op": "+".join([*(n.op_type for n in chain), node.op_type]),
                "cosine": out_cos,
                "local_drop": max(0.0, in_cos - out_cos),
            }
        )
    ranked.sort(key=lambda item: -float(item["local_drop"]))
    return ranked


# --- which stage lost the fidelity -------------------------------------------------------------------

# Excluding quantized layers can only give back what quantization took: below this share of the
# total loss, the patch search would be spent on the wrong pass.
QUANTIZE_SHARE_FOR_PATCH = 0.5


def stage_losses(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage (report["stages"] order == pass order): its worst cosine vs the original and the drop
    from the stage before (the original counts as 1.0). Empty when verification was off."""
    losses = []
    before = 1.0
    for index, stage in enumerate(stages):
        cosines = [d["cosine"] for d in stage.get("drift_vs_original", [])]
        if not cosines:
            return []  # a stage without drift: nothing to compare consecutive stages with
        worst = float(min(cosines))
        losses.append(
            {
                "index": index,
                "name": stage.get("name", stage.get("type", "?")),
                "type": stage.get("type", "?"),
                "cosine_before": before,
                "cosine": worst,
                "drop": before - worst,
            }
        )
        before = worst
    return losses


def blame_stage(stages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The stage with the largest cosine drop, its share of all drops, and the quantize stages' share.

    Shares are of the summed positive drops (a reconstruct stage that recovers cosine does not offset a
    prune that lost it: the loss still happened at prune)."""
    losses = stage_losses(stages)
    lost = sum(max(0.0, s["drop"]) for s in losses)
    if not losses or lost <= 0.0:
        return None
    worst = max(losses, key=lambda s: s["drop"])
    quantize = [s for s in losses if s["type"] == "quantize" and s["drop"] > 0]
    return {
        **worst,
        "share": worst["drop"] / lost,
        "quantize_share": sum(s["drop"] for s in quantize) / lost,
        # The quantize stage to exclude nodes from, if any lost fidelity (the one that lost most).
        "quantize_index": max(quantize, key=lambda s: s["drop"])["index"] if quantize else None,
        "stages": losses,
    }


def suggest_knob(recipe: Any, index: int, excluded_tried: bool = False) -> str:
    """The setting of pass `index` that trades its savings for fidelity (advice, not a verified patch).

    `excluded_tried`: the exclude_nodes search already failed, so do not suggest it again."""
    cfg = recipe.passes[index]
    key = f"passes.{index}"
    # The pass says which of its settings trades savings for fidelity; the generic advice otherwise.
    owner = PASS_REGISTRY.get(cfg.type)
    advice = owner.fidelity_advice(cfg, key, excluded_tried) if owner is not None else None
    if advice is not None:
        return advice
    if "exclude_nodes" in type(cfg).model_fields:
        return f"exclude layers with {key}.exclude_nodes"
    return f"review the settings of {key} ({cfg.type})"


def _stage_text(stage: dict[str, Any]) -> str:
    return (
        f"fidelity was lost at pass {stage['index']} ({stage['name']}): cosine vs original "
        f"{stage['cosine_before']:.5f} -> {stage['cosine']:.5f} ({stage['share']:.0%} of the loss over all stages)"
    )


# --- re-running the recipe ---------------------------------------------------------------------------


def _yaml_item(name: str) -> str:
    """A node name as an item of a YAML flow list: quoted only when it would not read back as itself."""
    try:
        plain = yaml.safe_load(f"[{name}]") == [name]
    except yaml.YAMLError:
        plain = False
    return name if plain else json.dumps(name)


def exclude_assignment(index: int, nodes: list[str]) -> str:
    return f"passes.{index}.exclude_nodes=[{','.join(_yaml_item(n) for n in nodes)}]"


def with_override(recipe: Any, assignment: str) -> Any:
    """The recipe as `--set ASSIGNMENT` makes it: patches are checked through the path the user takes."""
    from optimizer_cli.recipe import Recipe, apply_override

    data = recipe.model_dump(mode="json")
    apply_override(data, assignment)
    return Recipe.model_validate(data)


def _worst_cosine(report: dict[str, Any]) -> float | None:
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
    names = output_names(result.model)
    return fidelity(reference, run_model(result.model, data.feeds, SessionConfig(threads=threads)), names).cosine_min


def _run_prefix(
    recipe: Any, stop: int, model_path: Path, calib: str | None, evaluation: str | None, threads: int
) -> Any:
    """The pipeline's result after passes[:stop], unverified (the stage a pass starts from or produced)."""
    from optimizer_cli.pipeline import run_pipeline

    trial = recipe.model_copy(deep=True)
    trial.passes = trial.passes[:stop]
    trial.verify.enabled = False
    return run_pipeline(model_path, trial, None, calibration=calib, evaluation=evaluation, threads=threads)


def _stage_before(
    recipe: Any, index: int, model_path: Path, calib: str | None, evaluation: str | None, threads: int
) -> ir.Model:
    return _run_prefix(recipe, index, model_path, calib, evaluation, threads).model


def _candidates(ranked: list[dict[str, Any]], already: list[str]) -> list[str]:
    """Node names of the ranked steps that lose fidelity locally, worst first."""
    candidates: list[str] = []
    for item in ranked:
        if item["local_drop"] > 0 and len(candidates) < MAX_CANDIDATES:
            candidates.extend(n for n in item["nodes"] if n not in already and n not in candidates)
    return candidates


def _smallest_passing(
    n: int, score: Callable[[int], float], threshold: float, log: Callable[[str], None], lo: int = 1
) -> tuple[int, float]:
    """Bisect on how many candidates to exclude: (k, cosine) of the smallest k in [lo, n] found to meet the
    threshold, or (n, cosine with all n) when even all n do not (fidelity grows with k in practice)."""
    best_k, best_cos = n, score(n)
    log(f"excluding all {n} candidates gives cosine {best_cos:.5f}")
    if best_cos >= threshold:
        hi = n
        while lo < hi:
            mid = (lo + hi) // 2
            cos = score(mid)
            log(f"excluding {mid}: cosine {cos:.5f}")
            if cos >= threshold:
                hi, best_k, best_cos = mid, mid, cos
            else:
                lo = mid + 1
    return best_k, best_cos


# --- after a benchmark: fidelity below benchmark.attribution_threshold --------------------------------


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
    """When the benchmark's fidelity is below benchmark.attribution_threshold: which stage lost it, which
    nodes, and (only if verified to meet the threshold) a `--set` patch. None when fidelity is fine.

    `result["patch"]` is set only after the patched recipe met the threshold on the benchmark's own
    evaluation samples; `result["stage"]` names the stage blamed; `result["suggestion"]` is advice."""
    threshold = recipe.benchmark.attribution_threshold
    current = _worst_cosine(report)
    if current is None or current >= threshold:
        return None
    log(f"fidelity cosine {current:.5f} < {threshold}: attributing the loss to layers")
    result: dict[str, Any] = {"threshold": threshold, "cosine": current, "nodes": [], "patch": None}
    stage = blame_stage(report.get("stages") or [])
    if stage is not None:
        result["stage"] = {k: v for k, v in stage.items() if k != "stages"}
        result["stage_losses"] = stage["stages"]
        log(_stage_text(stage))
        if stage["quantize_share"] < QUANTIZE_SHARE_FOR_PATCH:
            # Excluding nodes from quantization cannot restore what an earlier pass removed.
            result["suggestion"] = suggest_knob(recipe, stage["index"])
            result["search"] = (
                f"{_stage_text(stage)}; quantization lost {stage['quantize_share']:.0%} of it, so no quantize "
                f"exclusion patch is offered: {result['suggestion']}"
            )
            return result
    quant_indices = [i for i, p in enumerate(recipe.passes) if p.type == "quantize"]
    if stage is not None and stage["quantize_index"] is not None:
        index: int | None = stage["quantize_index"]
    else:
        index = quant_indices[-1] if quant_indices else None
    search = _BenchSearch(report, model_path, recipe, data, calib, evaluation, threads, log)
    if index is not None:
        saturation = search.saturation_patch(index, output_path)
        if saturation is not None:
            return {**result, **saturation}
    return search.exclusion_patch(result, index, output_path, stage)


class _BenchSearch:
    """The exclusion search after a benchmark: trials scored on a few samples, patches confirmed on all of the
    benchmark's samples (where the threshold was measured)."""

    def __init__(
        self,
        report: dict[str, Any],
        model_path: Path,
        recipe: Any,
        data: Dataset,
        calib: str | None,
        evaluation: str | None,
        threads: int,
        log: Callable[[str], None],
    ) -> None:
        self.model_path, self.recipe, self.threshold = model_path, recipe, recipe.benchmark.attribution_threshold
        self.calib, self.evaluation, self.threads, self.log = calib, evaluation, threads, log
        self.subset = data.take(MAX_SAMPLES)
        bench_samples = report.get("benchmark", {}).get("eval_samples")
        self.full = data.take(bench_samples) if bench_samples else data
        # The original's outputs score every trial recipe; computed once, and only if a trial runs.
        config = SessionConfig(threads=threads)
        self.reference = functools.cache(lambda: run_model(load_model(model_path), self.subset.feeds, config))
        self.full_reference = functools.cache(lambda: run_model(load_model(model_path), self.full.feeds, config))

    def _fidelity(self, trial: Any, data: Dataset, reference: list[list[np.ndarray]]) -> float:
        trial.verify.enabled = False
        return _fidelity_of(trial, self.model_path, data, reference, self.calib, self.evaluation, self.threads)

    def confirm(self, assignment: str) -> float:
        """Fidelity of the recipe patched through `--set` on all of the benchmark's samples."""
        return self._fidelity(with_override(self.recipe, assignment), self.full, self.full_reference())

    def saturation_patch(self, index: int, output_path: Path) -> dict[str, Any] | None:
        """On a CPU whose u8*s8 kernels saturate: 7-bit weights, if that alone meets the threshold."""
        saturation = _saturation_fix(
            self.recipe, index, self.model_path, output_path, self.subset, self.reference, self.calib,
            self.evaluation, self.threads,
        )  # fmt: skip
        if saturation is None or saturation["patch_fidelity"] < self.threshold:
            return None
        confirmed = self.confirm(f"passes.{index}.reduce_range=true")
        if confirmed < self.threshold:
            return None
        self.log(saturation["search"])
        return {**saturation, "patch_fidelity": confirmed, "patch_meets_threshold": True}

    def _ranked(self, index: int | None, output_path: Path) -> list[dict[str, Any]]:
        """Nodes ranked by local loss, named as in the model the quantizer saw (the names to exclude)."""
        from optimizer_cli.pipeline import normalize

        before_quant = (
            _stage_before(self.recipe, index, self.model_path, self.calib, self.evaluation, self.threads)
            if index is not None
            else None
        )
        original = before_quant or load_model(self.model_path)
        if before_quant is None:
            normalize(original)
        return rank_nodes(original, load_model(output_path), self.subset.feeds, self.threads)

    def exclusion_patch(
        self, result: dict[str, Any], index: int | None, output_path: Path, stage: dict[str, Any] | None
    ) -> dict[str, Any]:
        ranked = self._ranked(index, output_path)
        result["nodes"] = ranked[:MAX_CANDIDATES]
        if index is None or not ranked:
            result["search"] = (
                "no quantize pass to exclude nodes from (pruned or factorized layers change tensor shapes, so "
                "they are not compared layer by layer: keep a layer whole with that pass's exclude_nodes)"
                if index is None
                else "no shared tensors to compare"
            )
            return result
        already = list(self.recipe.passes[index].exclude_nodes)
        candidates = _candidates(ranked, already)
        if not candidates:
            result["search"] = "no node loses fidelity locally"
            return result
        best_k, cosine, confirmed = self._smallest_confirmed(index, already, candidates)
        blamed = f"{_stage_text(stage)}; " if stage is not None else ""  # the table prints `search`, not the log
        if not confirmed:
            result["best_fidelity"] = cosine
            result["suggestion"] = suggest_knob(self.recipe, index, excluded_tried=True)
            result["search"] = (
                f"{blamed}excluding up to {len(candidates)} nodes from pass {index} (quantize) reaches cosine "
                f"{cosine:.5f} < {self.threshold}: no exclusion patch meets the threshold; {result['suggestion']}"
            )
            return result
        result["search"] = (
            f"{blamed}excluding {best_k} node(s) from pass {index} (quantize) gives cosine {cosine:.5f} "
            f">= {self.threshold} on all {len(self.full)} benchmark samples"
        )
        result["patch"] = f"--set '{exclude_assignment(index, already + candidates[:best_k])}'"
        result["patch_fidelity"] = cosine
        result["patch_meets_threshold"] = True
        return result

    def _smallest_confirmed(self, index: int, already: list[str], candidates: list[str]) -> tuple[int, float, bool]:
        """Smallest k whose exclusion meets the threshold: bisected on a few samples, then confirmed on all
        (and bisected again above k, on all samples, when the few were optimistic)."""

        def score(k: int) -> float:
            trial = self.recipe.model_copy(deep=True)
            trial.passes[index].exclude_nodes = already + candidates[:k]
            return self._fidelity(trial, self.subset, self.reference())

        best_k, best_cos = _smallest_passing(len(candidates), score, self.threshold, self.log)
        if best_cos < self.threshold:
            return best_k, best_cos, False
        assignment = functools.partial(exclude_assignment, index)
        cos = self.confirm(assignment(already + candidates[:best_k]))
        self.log(f"excluding {best_k} on all {len(self.full)} samples: cosine {cos:.5f}")
        if cos < self.threshold and best_k < len(candidates):
            best_k, cos = _smallest_passing(
                len(candidates),
                lambda k: self.confirm(assignment(already + candidates[:k])),
                self.threshold,
                lambda m: self.log(f"{m} (all {len(self.full)} samples)"),
                lo=best_k + 1,
            )
        return best_k, cos, cos >= self.threshold


# --- after a verification failure: an approximate pass fell below verify.min_cosine -------------------

_MIN_COSINE_FAILURE = re.compile(r"^pass (\d+) \(.*\): output cosine vs original \S+ < verify\.min_cosine ")


def min_cosine_failure_index(error: BaseException | str) -> int | None:
    """The pass index of a pipeline VerificationError raised by the verify.min_cosine gate, else None
    (invalid models, exact-pass drift and crashes are not a fidelity trade-off to search)."""
    match = _MIN_COSINE_FAILURE.match(str(error))
    return int(match.group(1)) if match else None


def attribute_verification_failure(
    model_path: str | Path,
    recipe: Any,
    failing_pass_index: int,
    calib: str | None,
    data: str | None,
    threads: int = 2,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any] | None:
    """For a run that stopped at `failing_pass_index` below verify.min_cosine: a `--set` patch that passes.

    `calib` / `data` are the run's --calib / --data (the pipeline derives its verification samples from
    them, so trials are judged on exactly the samples that failed). For a quantize pass, ranks the nodes
    between the model the quantizer saw and its output, bisects on how many to exclude with the
    pipeline's own gate metric, then re-runs the whole recipe patched through `--set`: `patch` is set only
    if that run passes every verification. Other passes get `suggestion` (their knob), no patch.
    None when the recipe has no min_cosine or the index is out of range."""
    threshold = recipe.verify.min_cosine
    index = failing_pass_index
    if threshold is None or not 0 <= index < len(recipe.passes):
        return None
    cfg = recipe.passes[index]
    result: dict[str, Any] = {"pass": index, "type": cfg.type, "threshold": threshold, "nodes": [], "patch": None}
    if cfg.type != "quantize":
        result["suggestion"] = suggest_knob(recipe, index)
        result["search"] = f"pass {index} ({cfg.type}) lost the fidelity: {result['suggestion']}"
        return result
    log(f"pass {index} (quantize) is below verify.min_cosine {threshold}: searching for layers to exclude")
    search = _VerifySearch(Path(model_path), recipe, index, calib, data, threads, log, result)
    if cfg.mode in ("dynamic", "static") and cfg.reduce_range is False and u8s8_saturates():
        # Saturating u8*s8 kernels lose fidelity in every layer at once: one key, not a list of layers.
        trial = recipe.model_copy(deep=True)
        trial.passes[index].reduce_range = True
        cosine = search.gate_cosine(trial)
        if cosine >= threshold:
            how = f"this CPU ({cpu_isa()}) saturates full-range int8 weights; 7-bit weights give cosine {cosine:.5f}"
            if search.found(f"passes.{index}.reduce_range=true", cosine, how) is not None:
                return result
    return search.exclusion()


class _VerifySearch:
    """The exclusion search after a verify.min_cosine failure, judged by the pipeline's own gate metric."""

    def __init__(
        self,
        model_path: Path,
        recipe: Any,
        index: int,
        calib: str | None,
        data: str | None,
        threads: int,
        log: Callable[[str], None],
        result: dict[str, Any],
    ) -> None:
        self.model_path, self.recipe, self.index = model_path, recipe, index
        self.calib, self.data, self.threads, self.log, self.result = calib, data, threads, log, result
        self.threshold = recipe.verify.min_cosine

    def _run(self, recipe: Any) -> Any:
        from optimizer_cli.pipeline import run_pipeline

        return run_pipeline(
            self.model_path, recipe, None, calibration=self.calib, evaluation=self.data, threads=self.threads
        )

    def gate_cosine(self, trial: Any) -> float:
        """The pipeline's own gate metric at this pass (worst of float simulation and ORT's kernels)."""
        trial = trial.model_copy(deep=True)
        trial.passes = trial.passes[: self.index + 1]
        trial.verify.enabled = True
        trial.verify.min_cosine = None  # measure instead of raising
        return self._run(trial).stages[self.index].worst_cosine() or 0.0

    def found(self, assignment: str, cosine: float, how: str) -> dict[str, Any] | None:
        """The result with its patch, if the whole recipe patched through `--set` passes every verification."""
        from optimizer_cli.errors import VerificationError

        try:
            self._run(with_override(self.recipe, assignment))
        except VerificationError as exc:
            self.log(f"{how}, but the patched recipe still fails: {exc}")
            self.result["search"] = f"{how}, but the patched recipe still fails: {exc}"
            return None
        self.result.update(patch=f"--set '{assignment}'", patch_cosine=cosine, verified=True, search=how)
        return self.result

    def sensitivity_patch(self, before: Any, quantized: ir.Model, already: list[str]) -> dict[str, Any] | None:
        """Static int8: keep float the groups output sensitivity says the threshold needs (a gated fake-quant
        simulation, search/sensitivity.py), where local ranking misses the nodes the output cannot afford."""
        from optimizer_cli.search.sensitivity import output_sensitivity, with_headroom

        feeds = before.verify_data.feeds[:MAX_SAMPLES]
        try:
            fit = output_sensitivity(quantized, before.model, feeds, with_headroom(self.threshold), self.threads)
        except Exception as exc:  # an op layout the simulation does not know: the local ranking instead
            self.log(f"no output sensitivity ({type(exc).__name__}: {str(exc)[:160]})")
            return None
        if fit.keep_float is None:
            return None
        ops = {str(n.name): n.op_type for n in before.model.graph}
        nodes = [n for group in fit.ranked[: fit.keep_float] for n in group if n not in already]
        self.result["nodes"] = [
            {
                "node": " + ".join(group),
                "nodes": group,
                "op": "+".join(ops[n] for n in group),
                "output_cosine_alone": alone,  # the output's cosine with only this group in int8
            }
            for group, alone in zip(fit.ranked[:MAX_CANDIDATES], fit.cosine_alone, strict=False)
        ]
        trial = self.recipe.model_copy(deep=True)
        trial.passes[self.index].exclude_nodes = already + nodes
        cosine = self.gate_cosine(trial)
        self.result["sensitivity"] = {"groups": len(fit.ranked), "keep_float": fit.keep_float, "cosine": cosine}
        if cosine < self.threshold:
            return None
        how = (
            f"keeping {len(nodes)} node(s) of pass {self.index} (quantize) float, the {fit.keep_float} of "
            f"{len(fit.ranked)} groups the output is most sensitive to, gives cosine {cosine:.5f} >= {self.threshold}"
        )
        return self.found(exclude_assignment(self.index, already + nodes), cosine, how)

    def exclusion(self) -> dict[str, Any]:
        """Rank nodes between the model the quantizer saw and its output; exclude the fewest that pass."""
        index, result, recipe = self.index, self.result, self.recipe
        before = _run_prefix(recipe, index, self.model_path, self.calib, self.data, self.threads)
        quantized = _run_prefix(recipe, index + 1, self.model_path, self.calib, self.data, self.threads).model
        already = list(recipe.passes[index].exclude_nodes)
        if recipe.passes[index].mode == "static":
            fitted = self.sensitivity_patch(before, quantized, already)
            if fitted is not None:
                return fitted
        ranked = rank_nodes(before.model, quantized, before.verify_data.feeds[:MAX_SAMPLES], self.threads)
        result["nodes"] = ranked[:MAX_CANDIDATES]
        candidates = _candidates(ranked, already)
        if not candidates:
            result["search"] = "no node loses fidelity locally"
            result["suggestion"] = suggest_knob(recipe, index)
            return result

        def score(k: int) -> float:
            trial = recipe.model_copy(deep=True)
            trial.passes[index].exclude_nodes = already + candidates[:k]
            return self.gate_cosine(trial)

        best_k, best_cos = _smallest_passing(len(candidates), score, self.threshold, self.log)
        if best_cos < self.threshold:
            result["best_cosine"] = best_cos
            result["suggestion"] = suggest_knob(recipe, index, excluded_tried=True)
            result["search"] = (
                f"excluding up to {len(candidates)} nodes from pass {index} (quantize) reaches cosine "
                f"{best_cos:.5f} < verify.min_cosine {self.threshold}: {result['suggestion']}"
            )
            return result
        how = f"excluding {best_k} node(s) from pass {index} (quantize) gives cosine {best_cos:.5f} >= {self.threshold}"
        return self.found(exclude_assignment(index, already + candidates[:best_k]), best_cos, how) or result


def on_verification_failure(
    error: BaseException | str,
    model_path: str | Path,
    recipe: Any,
    calib: str | None,
    data: str | None,
    threads: int = 2,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any] | None:
    """The CLI's one call on a VerificationError: None unless it came from the verify.min_cosine gate;
    otherwise attribute_verification_failure's result plus `message`, one line to print before the error."""
    index = min_cosine_failure_index(error)
    if index is None:
        return None
    found = attribute_verification_failure(model_path, recipe, index, calib, data, threads, log)
    if found is None:
        return None
    if found["patch"]:
        found["message"] = (
            f"Recipe patch (verified: the run passes, pass {index} cosine {found['patch_cosine']:.5f} >= "
            f"verify.min_cosine {found['threshold']}): {found['patch']}"
        )
    else:
        found["message"] = f"No verified recipe patch: {found['search']}"
    return found
