"""cleanup (exact): lift Constant weights, fold constants, remove Identity/dead nodes, dedupe weights.

Contract: touches only nodes whose outputs are computable from constants, Identity nodes, nodes with
no path to a graph output, and duplicate initializers. Graph outputs are preserved bit-for-bit up to
the constant folder's float evaluation (within the run's verify.rtol/atol, checked by the pipeline).
"""

from __future__ import annotations

from typing import Any, Literal

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer
from pydantic import Field

from optimizer_cli.analysis.graph import node_count, op_counts
from optimizer_cli.errors import first_line
from optimizer_cli.passes._graph import is_large, lift_constants, remove_identities, replace_model_contents
from optimizer_cli.passes.base import Exactness, OptimizationPass, PassConfig, RecipeContext

SEQUENCE_OPS = {
    "SplitToSequence",
    "SequenceConstruct",
    "SequenceEmpty",
    "SequenceInsert",
    "SequenceErase",
    "SequenceAt",
    "SequenceLength",
    "ConcatFromSequence",
    "SequenceMap",
    "Optional",
    "OptionalGetElement",
    "OptionalHasElement",
}


class CleanupConfig(PassConfig):
    type: Literal["cleanup"] = "cleanup"
    fold_constants: bool = Field(True, description="Fold subgraphs whose inputs are all constants.")
    lift_constants: bool = Field(True, description="Turn Constant nodes into initializers.")
    remove_identity: bool = Field(True, description="Remove Identity nodes.")
    deduplicate_initializers: bool = Field(True, description="Share initializers with identical values.")
    common_subexpressions: bool = Field(True, description="Merge nodes computing the same thing.")
    # Folding must not blow up the file: outputs larger than this stay computed at run time.
    fold_output_size_limit: int = Field(
        1 << 20, ge=0, description="Largest folded output (elements); bigger ones stay computed at run time."
    )


class CleanupPass(OptimizationPass[CleanupConfig]):
    name = "cleanup"
    Config = CleanupConfig
    exactness = Exactness.EXACT
    contract = "constant subgraphs, Identity, dead nodes, duplicate initializers; outputs preserved exactly"

    @classmethod
    def recipe_entries(cls, params: dict[str, Any], ctx: RecipeContext) -> list[dict[str, Any]]:
        return [{"type": "cleanup"}]  # every candidate starts from the cleaned graph

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.config
        before_nodes, before_ops = node_count(model), op_counts(model)
        before_inits = len(model.graph.initializers)
        steps: list[ir.passes.PassBase] = []
        if cfg.common_subexpressions:
            steps.append(common.CommonSubexpressionEliminationPass())
        steps.append(common.RemoveUnusedNodesPass())
        if cfg.deduplicate_initializers:
            steps.append(common.DeduplicateInitializersPass())
        modified = lift_constants(model) if cfg.lift_constants else False
        if cfg.remove_identity:
            modified |= remove_identities(model) > 0
        for step in steps:
            modified |= step(model).modified
        if cfg.fold_constants:
            modified |= self._fold(model, cfg)
            modified |= common.RemoveUnusedNodesPass()(model).modified
        after_ops = op_counts(model)
        removed = {
            op: before_ops[op] - after_ops.get(op, 0) for op in before_ops if before_ops[op] > after_ops.get(op, 0)
        }
        self.stats |= {
            "nodes_removed": before_nodes - node_count(model),
            "initializers": f"{before_inits}->{len(model.graph.initializers)}",
            "removed_ops": dict(sorted(removed.items(), key=lambda kv: -kv[1])[:6]),
        }
        modified = modified or before_nodes != node_count(model)
        return ir.passes.PassResult(model, modified)

    def _fold(self, model: ir.Model, cfg: CleanupConfig) -> bool:
        """Constant folding, all or nothing: a folder error leaves the model as it was."""
        modified, skipped = fold_constants_or_keep(model, cfg.fold_output_size_limit)
        if skipped:
            self.stats["fold_constants"] = f"skipped ({skipped})"
        return modified


def fold_constants_or_keep(model: ir.Model, output_size_limit: int | None = None) -> tuple[bool, str | None]:
    """onnxscript's constant folding (which also inlines an If on a constant condition), all or nothing: a folder
    error or an invalid result leaves the model as it was. Returns whether it changed the model, and why the fold
    was undone (None when it was not)."""

    def should_fold(node: ir.Node) -> bool | None:
        return False if node.op_type in SEQUENCE_OPS else None

    limit = {} if output_size_limit is None else {"output_size_limit": output_size_limit}
    backup = None if is_large(model) else ir.serde.serialize_model(model)
    try:
        result = onnxscript.optimizer.fold_constants(
            model, onnx_shape_inference=False, should_fold=should_fold, **limit
        )
    except Exception as exc:  # the folder evaluates ops with the reference runtime; some refuse
        if backup is None:
            raise
        replace_model_contents(model, ir.serde.deserialize_model(backup))
        return False, type(exc).__name__
    if backup is not None:
        # The folder's partial evaluators can write ops of a newer opset than the model's (e.g.
        # ConcatFromSequence(new_axis=1) -> Unsqueeze with an axes input at opset 12): undo the fold.
        try:
            onnx.checker.check_model(ir.serde.serialize_model(model))
        except onnx.checker.ValidationError as exc:
            replace_model_contents(model, ir.serde.deserialize_model(backup))
            return False, f"the folder wrote an invalid model: {first_line(exc, 100)}"
    return bool(getattr(result, "modified", False)), None
