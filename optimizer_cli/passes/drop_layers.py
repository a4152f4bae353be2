"""drop_layers (approximate): remove whole residual blocks, the cheapest first, cost measured on data.

A residual block is y = Add(x, f(x)) where y has x's shape and the branch f is a region of nodes that
depends on x and feeds nothing but itself and the Add: a ResNet basic/bottleneck block with an
identity shortcut, a transformer layer's attention or feed-forward sublayer. Dropping it sets f to zero:
every use of y reads x, and the branch's nodes (with whatever only they used) are removed. The
residual path stays, including what follows y (a post-LN LayerNorm, a ReLU).

Cost is measured, not guessed: every candidate's branch is gated (y = x + g*f(x), g a scalar input) in
one model, so one session evaluates any set of drops on the calibration samples; g = 0 gives exactly
the dropped model's outputs (x + 0*f = x for finite f). Blocks are ranked by the output cosine with each
dropped alone, then dropped cheapest first while the cumulative model keeps `min_cosine` (per output,
mean over samples; the worst output counts) and at most `count` are dropped. `blocks` names them
instead (the Add nodes' names); `output_from` truncates the model, the output read from an earlier
tensor of the same shape.
Contract: touches only the dropped blocks' nodes (removed) and, with output_from, the nodes after
that tensor; everything else, including every weight, is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from pydantic import Field

from optimizer_cli.analysis.graph import name_of
from optimizer_cli.errors import UserInputError
from optimizer_cli.passes._graph import infer_shapes
from optimizer_cli.passes.base import (
    Exactness,
    ModelTraits,
    OptimizationPass,
    PassConfig,
    RecipeContext,
    SearchDimension,
)
from optimizer_cli.runtime.session import ModelSource, SessionConfig, create_session, run_session
from optimizer_cli.verify import min_mean_cosine

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)


class DropLayersConfig(PassConfig):
    type: Literal["drop_layers"] = "drop_layers"
    min_cosine: float = Field(
        0.99,
        ge=-1,
        le=1,
        description="Drop blocks while every output's mean cosine vs the input model stays this high.",
    )
    count: int | None = Field(
        None, ge=0, description="Drop at most this many blocks (unset: as many as min_cosine allows)."
    )
    blocks: list[str] = Field(
        [], description="Drop exactly these blocks, named by their residual Add node (overrides the measured choice)."
    )
    exclude: list[str] = Field([], description="Residual Add nodes whose blocks are never dropped.")
    output_from: dict[str, str] = Field(
        {},
        description="Truncation: graph output name -> an earlier tensor of the same shape and type to read it from; "
        "the nodes only the old path used are removed.",
    )
    samples: int = Field(32, ge=1, description="Calibration samples the costs are measured on.")


@dataclass
class Block:
    """y = add(skip, branch): `nodes` compute the branch from `skip` (topological order)."""

    add: ir.Node
    skip_index: int
    nodes: list[ir.Node]

    @property
    def name(self) -> str:
        return self.add.name or name_of(self.add.outputs[0])

    @property
    def skip(self) -> ir.Value:
        value = self.add.inputs[self.skip_index]
        assert value is not None
        return value

    @property
    def branch(self) -> ir.Value:
        value = self.add.inputs[1 - self.skip_index]
        assert value is not None
        return value


def _ancestors(value: ir.Value) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    stack = [value.producer()]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None)
    return seen


def _descendants(value: ir.Value, graph: ir.Graph) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    stack = [use.node for use in value.uses()]
    while stack:
        node = stack.pop()
        if node in seen or node.graph is not graph:
            continue
        seen.add(node)
        stack.extend(use.node for out in node.outputs for use in out.uses())
    return seen


def _closed(region: set[ir.Node], add: ir.Node) -> bool:
    """Nothing outside the block reads the branch's intermediates (they are safe to remove)."""
    for node in region:
        for out in node.outputs:
            if out.is_graph_output() or any(u.node not in region and u.node is not add for u in out.uses()):
                return False
    return not add.outputs[0].is_graph_output()


def find_blocks(model: ir.Model) -> list[Block]:
    """Every identity-shortcut residual block of the main graph, in graph order."""
    graph = model.graph
    order = {node: i for i, node in enumerate(graph)}
    blocks = []
    for add in graph:
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
            continue
        out = add.outputs[0]
        for skip_index in (0, 1):
            skip, branch = add.inputs[skip_index], add.inputs[1 - skip_index]
            if skip is None or branch is None or skip.const_value is not None or branch.producer() is None:
                continue
            if out.dtype not in _FLOATS or skip.shape is None or out.shape is None or skip.shape != out.shape:
                continue
            region = _ancestors(branch) & _descendants(skip, graph)
            if branch.producer() not in region or not _closed(region, add):
                continue
            blocks.append(Block(add, skip_index, sorted(region, key=order.__getitem__)))
            break
    return blocks


def remove_block(model: ir.Model, block: Block) -> None:
    block.add.outputs[0].replace_all_uses_with(block.skip)
    model.graph.remove([*block.nodes, block.add], safe=True)


class _Gates:
    """The model with a scalar gate input on each block's branch, for one session that tries any drops."""

    def __init__(self, model: ir.Model, blocks: list[Block]) -> None:
        self.model, self.blocks = model, blocks
        self.names: list[str] = []
        # find_blocks kept only float Adds, so the output's dtype is known (the branch's may not be).
        dtypes = [b.add.outputs[0].dtype or ir.DataType.FLOAT for b in blocks]
        self._dtypes = [d.numpy() for d in dtypes]
        self._muls: list[ir.Node] = []
        for k, block in enumerate(blocks):
            branch = block.branch
            gate = ir.Value(name=f"optimize_drop_gate_{k}", shape=ir.Shape([]), type=ir.TensorType(dtypes[k]))
            mul = ir.node("Mul", [branch, gate], name=f"optimize_drop_gate_mul_{k}")
            model.graph.inputs.append(gate)
            model.graph.insert_before(block.add, mul)
            block.add.replace_input_with(1 - block.skip_index, mul.outputs[0])
            self.names.append(gate.name or "")
            self._muls.append(mul)

    def feeds(self, dropped: set[int]) -> dict[str, np.ndarray]:
        return {n: np.array(0 if k in dropped else 1, self._dtypes[k]) for k, n in enumerate(self.names)}

    def restore(self) -> None:
        for block, mul in zip(self.blocks, self._muls, strict=True):
            branch = mul.inputs[0]
            block.add.replace_input_with(1 - block.skip_index, branch)
            self.model.graph.remove(mul, safe=True)
        for _ in self.names:
            self.model.graph.inputs.pop()


class DropLayersPass(OptimizationPass[DropLayersConfig]):
    name = "drop_layers"
    Config = DropLayersConfig
    exactness = Exactness.APPROXIMATE
    contract = "removes whole residual blocks (identity shortcut kept) chosen by measured output cosine; truncation"
    search_switches = ("drop_layers",)

    @classmethod
    def search_dimensions(cls, traits: ModelTraits) -> list[SearchDimension]:
        # Two blocks at least (one kept), and calibration data: each drop's cost is measured on it.
        if traits.residual_blocks < 2 or not traits.has_calibration:
            return []
        help_text = "drop residual blocks, cheapest first, while the calibration cosine stays >= this (0: none)"
        return [SearchDimension("drop_layers", (0.0, 0.99, 0.97, 0.95), help_text)]

    @classmethod
    def recipe_entries(cls, params: dict[str, Any], ctx: RecipeContext) -> list[dict[str, Any]]:
        min_cosine = params.get("drop_layers") or 0.0
        return [{"type": "drop_layers", "min_cosine": min_cosine}] if min_cosine else []

    @classmethod
    def describe_trial(cls, params: dict[str, Any]) -> str | None:
        return f"drop blocks (cosine >= {params['drop_layers']:g})" if params.get("drop_layers") else None

    @classmethod
    def calibration_use(cls, config: DropLayersConfig) -> str | None:
        measured = not config.blocks and (config.count is None or config.count > 0)
        return "drop_layers (it measures each block's cost)" if measured else None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.config
        infer_shapes(model)
        modified = self._truncate(model) if cfg.output_from else False
        blocks = [b for b in find_blocks(model) if b.name not in cfg.exclude]
        self.stats["candidates"] = len(blocks)
        if cfg.blocks:
            by_name = {b.name: b for b in blocks}
            unknown = [n for n in cfg.blocks if n not in by_name]
            if unknown:
                known = ", ".join(by_name) or "none"
                raise UserInputError(f"drop_layers: no residual block named {', '.join(unknown)} (blocks: {known})")
            chosen = _without_nested([by_name[n] for n in cfg.blocks])
        elif cfg.count == 0 or not blocks:
            chosen = []
        else:
            chosen = self._choose(model, blocks)
        before = len(model.graph)
        for block in chosen:
            remove_block(model, block)
        if chosen:
            common.RemoveUnusedNodesPass()(model)  # what only the dropped blocks read (e.g. their shape math)
            self.stats["dropped"] = ", ".join(b.name for b in chosen)
            self.stats["nodes_removed"] = before - len(model.graph)
        elif blocks and "skipped" not in self.stats:
            self.stats["dropped"] = "none"
        return ir.passes.PassResult(model, modified or bool(chosen))

    def _choose(self, model: ir.Model, blocks: list[Block]) -> list[Block]:
        """Cheapest first, each kept only while the cumulative drop meets min_cosine (one session)."""
        cfg = self.config
        feeds = self.calibration().feeds[: cfg.samples]
        gates = _Gates(model, blocks)
        source = ModelSource(model)
        try:
            sess = create_session(source, SessionConfig(threads=self.ctx.threads))
            reference = [run_session(sess, {**f, **gates.feeds(set())}) for f in feeds]

            def cosine(dropped: set[int]) -> float:
                outputs = [run_session(sess, {**f, **gates.feeds(dropped)}) for f in feeds]
                return min_mean_cosine(reference, outputs)

            alone = []
            for k in range(len(blocks)):
                if self.ctx.progress:
                    self.ctx.progress(f"drop_layers: measuring block {k + 1} of {len(blocks)}")
                alone.append(cosine({k}))
            ranked = sorted(range(len(blocks)), key=lambda i: -alone[i])
            chosen: list[int] = []
            score = 1.0
            for k in ranked:
                if (cfg.count is not None and len(chosen) >= cfg.count) or alone[k] < cfg.min_cosine:
                    break
                if any(_overlap(blocks[k], blocks[j]) for j in chosen):
                    continue
                trial = cosine({*chosen, k})
                if trial >= cfg.min_cosine:
                    chosen.append(k)
                    score = trial
        finally:
            source.close()
            gates.restore()
        self.stats["cost_alone"] = "; ".join(f"{blocks[i].name}: {alone[i]:.4f}" for i in ranked[:8]) + (
            " ..." if len(ranked) > 8 else ""
        )
        self.stats["cosine_on_calibration"] = round(score, 5)
        return [blocks[k] for k in chosen]

    def _truncate(self, model: ir.Model) -> bool:
        values = {name_of(v): v for n in model.graph for v in n.outputs}
        values.update({name_of(v): v for v in model.graph.inputs})
        outputs = {name_of(v): i for i, v in enumerate(model.graph.outputs)}
        for out_name, source_name in self.config.output_from.items():
            if out_name not in outputs:
                raise UserInputError(f"drop_layers.output_from: the model has no output '{out_name}'")
            if source_name not in values:
                raise UserInputError(f"drop_layers.output_from: the model has no tensor '{source_name}'")
            old, new = model.graph.outputs[outputs[out_name]], values[source_name]
            if old.dtype != new.dtype or not _same_shape(old.shape, new.shape):
                raise UserInputError(
                    f"drop_layers.output_from: '{source_name}' ({new.dtype}, {new.shape}) cannot stand for output "
                    f"'{out_name}' ({old.dtype}, {old.shape}): type and shape must match"
                )
            # The graph output keeps its name: an Identity reads the earlier tensor.
            producer = old.producer()
            identity = ir.node("Identity", [new], name=f"optimize_truncate_{out_name}")
            model.graph.append(identity)
            model.graph.outputs[outputs[out_name]] = identity.outputs[0]
            if producer is not None:
                old.name = f"{out_name}_truncated_away"
            identity.outputs[0].name = out_name
            identity.outputs[0].shape, identity.outputs[0].type = old.shape, old.type
        common.RemoveUnusedNodesPass()(model)
        self.stats["truncated"] = ", ".join(f"{o} <- {s}" for o, s in self.config.output_from.items())
        return True


def _same_shape(a: ir.Shape | None, b: ir.Shape | None) -> bool:
    """Same rank and the same size wherever both sizes are known (symbolic names may differ)."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(not (isinstance(x, int) and isinstance(y, int)) or x == y for x, y in zip(a, b, strict=True))


def _overlap(a: Block, b: Block) -> bool:
    """One block lies inside the other's branch (dropping the outer one drops the inner)."""
    return a.add in b.nodes or b.add in a.nodes


def _without_nested(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if not any(b.add in other.nodes for other in blocks if other is not b)]
