"""prune_heads (approximate): remove whole attention heads from standard (unfused) multi-head attention.

The pattern BERT/ViT-style exports produce (torch.onnx, onnxscript), per attention:
    q = x @ Wq (+ bq) -> Reshape [b, s, H, d] -> Transpose (0,2,1,3)
    k = x @ Wk (+ bk) -> Reshape [b, s, H, d] -> Transpose (0,2,3,1)   (or (0,2,1,3) then (0,1,3,2))
    v = x @ Wv (+ bv) -> Reshape [b, s, H, d] -> Transpose (0,2,1,3)
    probs = Softmax(q @ k, scaled and masked by Div/Mul/Add/Sub with other tensors); c = probs @ v
    c -> Transpose (0,2,1,3) -> Reshape [b, s, H*d] -> @ Wo (+ bo)
Removing head h removes columns h*d..(h+1)*d-1 of Wq, Wk, Wv (and of their biases) and the same rows
of Wo. The head-split Reshapes then read the shape [0, 0, H', d] and the merge [0, 0, H'*d] (0 copies
the input's dim, H' is the heads kept): for the kept heads this is the original shape math for any batch
and sequence length. Removing a head equals zeroing its rows of Wo (the test oracle): no other head
reads it. Fused `Attention` ops are not matched: prune heads before the `fuse` pass.
Importance (per attention, needs calibration data): what the head adds to the output projection,
||c_h @ Wo_h||, summed over the samples. `sparsity` is the fraction of each attention's heads removed
(rounded down; at least `min_heads` kept).
Contract: touches only the matched Q/K/V/output-projection weights and biases and the four Reshapes'
shape inputs of each attention; approximates the outputs by the removed heads' contribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from optimizer_cli.analysis.graph import int_attr, name_of
from optimizer_cli.model_io import read_weight
from optimizer_cli.passes._graph import infer_shapes, new_initializer, refresh_shapes, set_const
from optimizer_cli.passes.base import (
    Exactness,
    ModelTraits,
    OptimizationPass,
    PassConfig,
    RecipeContext,
    SearchDimension,
)
from optimizer_cli.runtime.session import capture_values

_SCALE_MASK_OPS = ("Add", "Sub", "Mul", "Div", "Where")


class PruneHeadsConfig(PassConfig):
    type: Literal["prune_heads"] = "prune_heads"
    sparsity: float = Field(0.25, ge=0, lt=1, description="Fraction of each attention's heads removed (rounded down).")
    min_heads: int = Field(1, ge=1, description="Keep at least this many heads per attention.")
    samples: int = Field(32, ge=1, description="Calibration samples the head importance is measured on.")
    exclude_nodes: list[str] = Field([], description="Softmax node names whose attention is left alone.")


@dataclass
class Projection:
    matmul: ir.Node  # x @ W
    bias_add: ir.Node | None  # (+ b)

    @property
    def weight(self) -> ir.Value:
        value = self.matmul.inputs[1]
        assert value is not None
        return value


@dataclass
class AttentionHeads:
    softmax: ir.Node
    q: Projection
    k: Projection
    v: Projection
    out: ir.Node  # merged @ Wo
    split_reshapes: list[ir.Node]
    merge_reshape: ir.Node
    context: ir.Value  # probs @ v: [b, H, s, d]
    heads: int
    head_size: int


def _only_use(value: ir.Value | None, op_type: str) -> ir.Node | None:
    if value is None or value.is_graph_output():
        return None
    uses = list(value.uses())
    if len(uses) != 1 or uses[0].node.op_type != op_type:
        return None
    return uses[0].node


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type else None


def _perm(node: ir.Node | None) -> list[int] | None:
    if node is None or node.op_type != "Transpose":
        return None
    attr = node.attributes.get("perm")
    return list(attr.as_ints()) if attr is not None else None


def _const_2d(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and len(value.const_value.shape) == 2


def _projection(value: ir.Value | None) -> Projection | None:
    """x @ W (+ b) with W a 2-D constant read only here and b a 1-D constant."""
    if value is None or len(value.uses()) != 1:
        return None
    node = value.producer()
    bias_add = None
    if node is not None and node.op_type == "Add":
        consts = [i for i, v in enumerate(node.inputs) if v is not None and v.const_value is not None]
        if len(consts) != 1 or len(node.inputs[consts[0]].const_value.shape) != 1:  # type: ignore[union-attr]
            return None
        bias_add, node = node, _producer(node.inputs[1 - consts[0]], "MatMul")
        if node is not None and len(node.outputs[0].uses()) != 1:
            return None
    if node is None or node.op_type != "MatMul" or not _const_2d(node.inputs[1]):
        return None
    return Projection(node, bias_add)


def _split(value: ir.Value | None, chains: tuple[list[list[int]], ...]) -> tuple[Projection, ir.Node] | None:
    """value = Transpose(s)(Reshape(projection)), the Transposes' perms (in the order applied) one of `chains`."""
    node = value.producer() if value is not None else None
    perms: list[list[int] | None] = []
    while node is not None and node.op_type == "Transpose" and len(perms) < 2:
        if len(node.outputs[0].uses()) != 1:
            return None
        perms.insert(0, _perm(node))
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if node is None or node.op_type != "Reshape" or perms not in list(chains):
        return None
    if int_attr(node, "allowzero", 0) or len(node.outputs[0].uses()) != 1:
        return None
    projection = _projection(node.inputs[0])
    return (projection, node) if projection is not None else None


def _scores_matmul(softmax: ir.Node) -> ir.Node | None:
    """Walk back from the Softmax through scaling and masking to q @ k."""
    value = softmax.inputs[0]
    for _ in range(6):
        node = value.producer() if value is not None else None
        if node is None:
            return None
        if node.op_type == "MatMul":
            return node
        if node.op_type not in _SCALE_MASK_OPS or len(value.uses()) != 1:  # type: ignore[union-attr]
            return None
        # Follow the input that is not a constant and was not computed from the mask alone: the one whose
        # producer is itself on a scale/mask chain or is the MatMul.
        nxt = [v for v in node.inputs if v is not None and v.const_value is None and v.producer() is not None]
        nxt = [v for v in nxt if v.producer().op_type in ("MatMul", *_SCALE_MASK_OPS)]  # type: ignore[union-attr]
        if not nxt:
            return None
        value = nxt[0]
    return None


def match_attention(softmax: ir.Node) -> AttentionHeads | None:
    if softmax.op_type != "Softmax" or int_attr(softmax, "axis", -1) not in (-1, 3):
        return None
    ctx_mm = _only_use(softmax.outputs[0], "MatMul")
    qk = _scores_matmul(softmax)
    if ctx_mm is None or qk is None or ctx_mm.inputs[0] is not softmax.outputs[0]:
        return None
    q = _split(qk.inputs[0], ([[0, 2, 1, 3]],))
    k = _split(qk.inputs[1], ([[0, 2, 3, 1]], [[0, 2, 1, 3], [0, 1, 3, 2]]))
    v = _split(ctx_mm.inputs[1], ([[0, 2, 1, 3]],))
    back = _only_use(ctx_mm.outputs[0], "Transpose")
    merge = _only_use(back.outputs[0], "Reshape") if back is not None and _perm(back) == [0, 2, 1, 3] else None
    out = _only_use(merge.outputs[0], "MatMul") if merge is not None else None
    if q is None or k is None or v is None or merge is None or out is None or not _const_2d(out.inputs[1]):
        return None
    if out.inputs[0] is not merge.outputs[0] or int_attr(merge, "allowzero", 0):
        return None
    shape = ctx_mm.outputs[0].shape
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        return None
    heads, size = int(shape[1]), int(shape[3])
    widths = [p.weight.const_value.shape[1] for p, _ in (q, k, v)]  # type: ignore[union-attr]
    if widths != [heads * size] * 3 or out.inputs[1].const_value.shape[0] != heads * size:  # type: ignore[union-attr]
        return None
    return AttentionHeads(softmax, q[0], k[0], v[0], out, [q[1], k[1], v[1]], merge, ctx_mm.outputs[0], heads, size)


def _shared(att: AttentionHeads) -> bool:
    """A weight or bias read elsewhere too (slicing it would change another layer)."""
    values = [p.weight for p in (att.q, att.k, att.v)] + [att.out.inputs[1]]
    for p in (att.q, att.k, att.v):
        if p.bias_add is not None:
            values.extend(v for v in p.bias_add.inputs if v is not None and v.const_value is not None)
    return any(v is None or len(v.uses()) != 1 for v in values)


class PruneHeadsPass(OptimizationPass[PruneHeadsConfig]):
    name = "prune_heads"
    Config = PruneHeadsConfig
    exactness = Exactness.APPROXIMATE
    contract = "removes whole attention heads (Q/K/V columns, output-projection rows) by measured contribution"
    search_switches = ("prune_heads",)

    @classmethod
    def search_dimensions(cls, traits: ModelTraits) -> list[SearchDimension]:
        if not (traits.head_attentions and traits.has_calibration):  # head importance is measured on data
            return []
        help_text = "remove this fraction of each attention's heads, least contributing first (0: none)"
        return [SearchDimension("prune_heads", (0.0, 0.125, 0.25), help_text)]

    @classmethod
    def recipe_entries(cls, params: dict[str, Any], ctx: RecipeContext) -> list[dict[str, Any]]:
        heads = params.get("prune_heads") or 0.0
        return [{"type": "prune_heads", "sparsity": heads}] if heads else []

    @classmethod
    def describe_trial(cls, params: dict[str, Any]) -> str | None:
        return f"prune heads {params['prune_heads']:g}" if params.get("prune_heads") else None

    @classmethod
    def calibration_use(cls, config: PruneHeadsConfig) -> str | None:
        return "prune_heads (head importance from activations)"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.config
        infer_shapes(model)
        found = [match_attention(n) for n in model.graph if n.op_type == "Softmax" and n.name not in cfg.exclude_nodes]
        attentions = [a for a in found if a is not None and not _shared(a)]
        self.stats["attentions"] = f"{len(attentions)} of {sum(n.op_type == 'Softmax' for n in model.graph)} Softmax"
        if not attentions:
            return self.refuse(model, "no standard multi-head attention found (prune heads before `fuse`)")
        feeds = self.calibration().feeds[: cfg.samples]
        contexts = capture_values(model, feeds, [name_of(a.context) for a in attentions], self.ctx.threads)
        removed, total = 0, 0
        for att in attentions:
            score = _importance(att, contexts[name_of(att.context)])
            drop = min(int(cfg.sparsity * att.heads), att.heads - cfg.min_heads)
            total += att.heads
            if drop <= 0:
                continue
            kept = sorted(np.argsort(-score, kind="stable")[: att.heads - drop].tolist())
            _remove_heads(model, att, kept)
            removed += drop
        if removed:
            refresh_shapes(model)
        self.stats["heads_removed"] = f"{removed}/{total}"
        return ir.passes.PassResult(model, removed > 0)


def _importance(att: AttentionHeads, contexts: list[np.ndarray]) -> np.ndarray:
    wo = read_weight(att.out.inputs[1].const_value).astype(np.float64)  # type: ignore[arg-type, union-attr]
    d = att.head_size
    score = np.zeros(att.heads)
    for c in contexts:  # [b, H, s, d]
        for h in range(att.heads):
            part = c[:, h].reshape(-1, d).astype(np.float64) @ wo[h * d : (h + 1) * d]
            score[h] += float(np.sum(part**2))
    return score


def _remove_heads(model: ir.Model, att: AttentionHeads, kept: list[int]) -> None:
    d = att.head_size
    cols = np.concatenate([np.arange(h * d, (h + 1) * d) for h in kept])
    for p in (att.q, att.k, att.v):
        set_const(p.matmul, 1, np.ascontiguousarray(read_weight(p.weight.const_value)[:, cols]), model.graph)  # type: ignore[arg-type]
        if p.bias_add is not None:
            i = next(i for i, v in enumerate(p.bias_add.inputs) if v is not None and v.const_value is not None)
            bias = read_weight(p.bias_add.inputs[i].const_value)  # type: ignore[arg-type, union-attr]
            set_const(p.bias_add, i, np.ascontiguousarray(bias[cols]), model.graph)
    wo = read_weight(att.out.inputs[1].const_value)  # type: ignore[arg-type, union-attr]
    set_const(att.out, 1, np.ascontiguousarray(wo[cols]), model.graph)
    # Explicit head counts, not -1: onnxruntime's Attention fusion reads the heads from this constant.
    split_shape = np.array([0, 0, len(kept), d], np.int64)
    split = new_initializer(model.graph, "optimize_heads_split_shape", split_shape)
    for reshape in att.split_reshapes:
        reshape.replace_input_with(1, split)
    merge_shape = np.array([0, 0, len(kept) * d], np.int64)
    merge = new_initializer(model.graph, "optimize_heads_merge_shape", merge_shape)
    att.merge_reshape.replace_input_with(1, merge)
