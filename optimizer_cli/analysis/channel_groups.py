"""Channel dependency groups for structured pruning.

Removing output channel c of a Conv (or hidden unit c of a MatMul/Gemm) changes every tensor that
carries that channel: BatchNorm and activations pass it through, a residual Add ties the channels of
all its inputs together, a depthwise conv carries it to its own output, Concat places it at an
offset, Flatten expands it into H*W consecutive features, and every consumer (Conv input channels,
Gemm/MatMul input rows) must drop the matching weight slice.

Each channel axis we track is described by an expression over *root groups* (sets of tied channel
spaces of one size): Root(g), Cat(e1, e2, ...) for Concat, Rep(e, k) for Flatten-like expansion and
SplitPart(e, a, b) for Split (sizes rewritten). Elementwise ops between two tracked tensors unify their expressions
(union-find over root groups). Anything the analysis does not understand blocks the groups it
touches, with the reason kept for the report: pruning is only ever applied where every use is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np
import onnx_ir as ir

from optimizer_cli.analysis.graph import int_attr
from optimizer_cli.model_io import read_weight

# Ops whose output carries the input channel axis unchanged (and whose other inputs are scalars or
# per-channel constants that get sliced).
UNARY_PASSTHROUGH = {
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "Clip",
    "HardSigmoid",
    "HardSwish",
    "Gelu",
    "Erf",
    "Elu",
    "Selu",
    "Softplus",
    "Softsign",
    "Identity",
    "Dropout",
    "Cast",
    "Abs",
    "Neg",
    "Exp",
    "Log",
    "Sqrt",
    "Reciprocal",
    "Mish",
    "Celu",
    "ThresholdedRelu",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Sin",
    "Cos",
    "Swish",
}
BINARY_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Where"}
SPATIAL_PASSTHROUGH = {
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "LpPool",
    "Resize",
    "Upsample",
    "GlobalLpPool",
    "SpaceToDepth",
}


# ---------------------------------------------------------------- channel expressions
@dataclass(frozen=True)
class Root:
    group: int
    size: int


@dataclass(frozen=True)
class Cat:
    """Channel spaces placed one after another (Concat along the channel axis)."""

    parts: tuple[Expr, ...]


@dataclass(frozen=True)
class Rep:
    """Each channel repeated `factor` times in a row (Flatten/Reshape of C x H x W into C*H*W features)."""

    inner: Expr
    factor: int


@dataclass(frozen=True)
class SplitPart:
    """Channels [start, stop) of `inner`: one output of a Split along the channel axis."""

    inner: Expr
    start: int
    stop: int


Expr: TypeAlias = "Root | Cat | Rep | SplitPart"


def expr_size(e: Expr) -> int:
    if isinstance(e, Root):
        return e.size
    if isinstance(e, Cat):
        return sum(expr_size(p) for p in e.parts)
    if isinstance(e, Rep):
        return expr_size(e.inner) * e.factor
    return e.stop - e.start


def expr_roots(e: Expr) -> set[int]:
    if isinstance(e, Root):
        return {e.group}
    if isinstance(e, Cat):
        return set().union(*(expr_roots(p) for p in e.parts))
    return expr_roots(e.inner)


# ---------------------------------------------------------------- group records
@dataclass
class Producer:
    """A node whose weight axis `axis` indexes the group's channels (output side)."""

    node: ir.Node
    weight_index: int  # input index of the weight
    axis: int
    bias_index: int | None  # input index of a per-channel bias, if any


@dataclass
class Consumer:
    """A node reading the channels through `expr`; its weight `axis` must keep the same indices."""

    node: ir.Node
    weight_index: int
    axis: int
    expr: Expr


@dataclass
class Dependent:
    """A constant input broadcast along the channel axis (BN params, per-channel scales, biases)."""

    node: ir.Node
    input_index: int
    axis: int  # axis in the constant's own shape
    expr: Expr


@dataclass
class DepthwiseMember:
    """A depthwise Conv that carries the group's channels to its output (weight/bias and `group` shrink)."""

    node: ir.Node
    expr: Expr


@dataclass
class ReshapeFix:
    """A Reshape whose constant target shape holds the channel count at `position` (times `factor`)."""

    node: ir.Node
    position: int
    factor: int
    expr: Expr


@dataclass
class SplitFix:
    """A Split along the channel axis whose `split` sizes (input or attribute) follow the kept counts."""

    node: ir.Node
    parts: list[Expr]
    from_input: bool


@dataclass
class Group:
    gid: int
    size: int
    producers: list[Producer] = field(default_factory=list)
    values: list[ir.Value] = field(default_factory=list)  # the tensors carrying this group's channels
    blocked: str | None = None


@dataclass
class Analysis:
    groups: dict[int, Group]
    consumers: list[Consumer]
    dependents: list[Dependent]
    depthwise: list[DepthwiseMember]
    reshapes: list[ReshapeFix]
    parent: dict[int, int]
    splits: list[SplitFix] = field(default_factory=list)

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def canonical(self) -> dict[int, Group]:
        """Root groups after union, with producers/values merged and blocks propagated."""
        merged: dict[int, Group] = {}
        for gid, group in self.groups.items():
            root = self.find(gid)
            target = merged.setdefault(root, Group(root, group.size))
            target.producers.extend(group.producers)
            target.values.extend(group.values)
            if group.blocked and not target.blocked:
                target.blocked = group.blocked
            if group.size != target.size and not target.blocked:
                target.blocked = "tied channel spaces of different sizes"
        return merged

    def prunable(self) -> list[Group]:
        return [g for g in self.canonical().values() if not g.blocked and g.producers]


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return read_weight(value.const_value)


def _static_shape(value: ir.Value) -> tuple[int, ...] | None:
    if value.shape is None:
        return None
    dims = []
    for d in value.shape.dims:
        if not isinstance(d, int):
            return None
        dims.append(d)
    return tuple(dims)


def _dims(value: ir.Value) -> tuple[int | None, ...] | None:
    """Shape with symbolic/unknown dims as None (rank must be known)."""
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in value.shape.dims)


def _input(node: ir.Node, index: int) -> ir.Value:
    """A node input the op requires (the walk only reaches nodes through a tracked, present input)."""
    value = node.inputs[index]
    assert value is not None, f"{node.op_type} '{node.name}' has no input {index}"
    return value


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape.dims)


class _Analyzer:
    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.groups: dict[int, Group] = {}
        self.parent: dict[int, int] = {}
        self.tracked: dict[ir.Value, tuple[int, Expr]] = {}  # value (by identity) -> (channel axis, expr)
        self.consumers: list[Consumer] = []
        self.dependents: list[Dependent] = []
        self.depthwise: list[DepthwiseMember] = []
        self.reshapes: list[ReshapeFix] = []
        self.splits: list[SplitFix] = []

    # -- union-find
    def new_group(self, size: int) -> Root:
        gid = len(self.groups)
        self.groups[gid] = Group(gid, size)
        self.parent[gid] = gid
        return Root(gid, size)

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def block(self, e: Expr, reason: str) -> None:
        for g in expr_roots(e):
            grp = self.groups[g]
            if not grp.blocked:
                grp.blocked = reason

    def unify(self, a: Expr, b: Expr, reason: str) -> bool:
        if isinstance(a, Root) and isinstance(b, Root):
            if a.size != b.size:
                self.block(a, reason)
                self.block(b, reason)
                return False
            ra, rb = self.find(a.group), self.find(b.group)
            if ra != rb:
                self.parent[rb] = ra
            return True
        if isinstance(a, Cat) and isinstance(b, Cat) and len(a.parts) == len(b.parts):
            return all(self.unify(x, y, reason) for x, y in zip(a.parts, b.parts, strict=True))
        if isinstance(a, Rep) and isinstance(b, Rep) and a.factor == b.factor:
            return self.unify(a.inner, b.inner, reason)
        if isinstance(a, SplitPart) and isinstance(b, SplitPart) and (a.start, a.stop) == (b.start, b.stop):
            return self.unify(a.inner, b.inner, reason)
        self.block(a, reason)
        self.block(b, reason)
        return False

    def track(self, value: ir.Value, axis: int, e: Expr) -> None:
        self.tracked[value] = (axis, e)
        for g in expr_roots(e):
            self.groups[g].values.append(value)
        if value.is_graph_output():
            self.block(e, f"reaches graph output '{value.name}'")
        if any(use.node.graph is not self.graph for use in value.uses()):
            self.block(e, f"'{value.name}' is used inside a subgraph")

    # -- the walk
    def run(self) -> Analysis:
        for node in self.graph:
            tracked_inputs = [(i, v) for i, v in enumerate(node.inputs) if v is not None and v in self.tracked]
            if tracked_inputs:
                self.visit_consumer(node, tracked_inputs)
            self.visit_producer(node)
        return Analysis(
            self.groups, self.consumers, self.dependents, self.depthwise, self.reshapes, self.parent, self.splits
        )

    def visit_producer(self, node: ir.Node) -> None:
        """Nodes that create a new channel space from constant weights."""
        if node.domain not in ("", "ai.onnx") or not node.outputs:
            return
        out = node.outputs[0]
        if node.op_type == "Conv":
            w = _const(node.inputs[1])
            group = int_attr(node, "group", 1)
            if w is None or group != 1 or out in self.tracked:
                return
            bias = 2 if len(node.inputs) > 2 and node.inputs[2] is not None else None
            if bias is not None and _const(node.inputs[2]) is None:
                return
            root = self.new_group(w.shape[0])
            self.groups[root.group].producers.append(Producer(node, 1, 0, bias))
            self.track(out, 1, root)
        elif node.op_type in ("MatMul", "Gemm"):
            w = _const(node.inputs[1])
            if w is None or w.ndim != 2 or out in self.tracked:
                return
            if node.op_type == "Gemm":
                if int_attr(node, "transA", 0):
                    return
                axis = 0 if int_attr(node, "transB", 0) else 1
                bias = 2 if len(node.inputs) > 2 and node.inputs[2] is not None else None
                if bias is not None:
                    c = _const(node.inputs[2])
                    if c is None or (c.ndim > 1 and c.shape[0] != 1):
                        return  # a full [M, N] bias would need row handling
            else:
                axis, bias = 1, None
            root = self.new_group(w.shape[axis])
            self.groups[root.group].producers.append(Producer(node, 1, axis, bias))
            rank = _rank(out)
            self.track(out, (rank - 1) if rank else 1, root)

    def visit_consumer(self, node: ir.Node, tracked_inputs: list[tuple[int, ir.Value]]) -> None:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            for _, v in tracked_inputs:
                self.block(self.tracked[v][1], f"consumed by {node.domain}::{op} '{node.name}'")
            return
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            if op in UNARY_PASSTHROUGH:
                handler = self._unary
            elif op in BINARY_ELEMENTWISE:
                handler = self._elementwise
            elif op in SPATIAL_PASSTHROUGH:
                handler = self._spatial
        if handler is None or handler(node, tracked_inputs) is False:
            for _, v in tracked_inputs:
                self.block(self.tracked[v][1], f"{op} '{node.name}' is not understood by the pruner")

    # -- op handlers (return False to block)
    def _unary(self, node: ir.Node, tracked: list) -> bool:
        if len(tracked) != 1 or tracked[0][0] != 0:
            return False
        axis, e = self.tracked[tracked[0][1]]
        for _i, v in enumerate(node.inputs[1:], start=1):
            const = _const(v) if v is not None else None
            if const is not None and const.size > 1:
                return False
        self.track(node.outputs[0], axis, e)
        return True

    def _spatial(self, node: ir.Node, tracked: list) -> bool:
        if tracked[0][0] != 0:
            return False
        axis, e = self.tracked[tracked[0][1]]
        if axis != 1:
            return False
        self.track(node.outputs[0], axis, e)
        return True

    def _elementwise(self, node: ir.Node, tracked: list) -> bool:
        out = node.outputs[0]
        out_rank = _rank(out)
        if out_rank is None:
            return False
        ref_axis, ref_expr = None, None
        for _, v in tracked:
            axis, e = self.tracked[v]
            rank = _rank(v)
            if rank is None:
                return False
            aligned = axis + (out_rank - rank)  # numpy broadcasting aligns from the right
            if ref_axis is None:
                ref_axis, ref_expr = aligned, e
            elif aligned != ref_axis:
                return False
            elif ref_expr is not None:
                self.unify(ref_expr, e, f"{node.op_type} '{node.name}' mixes channel spaces")
        assert ref_axis is not None and ref_expr is not None
        tracked_idx = {i for i, _ in tracked}
        for i, v in enumerate(node.inputs):
            if i in tracked_idx or v is None:
                continue
            c = _const(v)
            shape = _static_shape(v) if c is None else c.shape
            if shape is None:
                return False
            local = ref_axis - (out_rank - len(shape))
            if 0 <= local < len(shape) and shape[local] != 1:
                if c is None or shape[local] != expr_size(ref_expr):
                    return False  # a non-constant tensor varying along the channel axis
                self.dependents.append(Dependent(node, i, local, ref_expr))
        self.track(out, ref_axis, ref_expr)
        return True

    def _op_BatchNormalization(self, node: ir.Node, tracked: list) -> bool:
        if (
            tracked[0][0] != 0
            or len(tracked) != 1
            or (len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]))
        ):
            return False
        axis, e = self.tracked[tracked[0][1]]
        if axis != 1 or any(_const(v) is None for v in node.inputs[1:5]):
            return False
        for i in range(1, 5):
            self.dependents.append(Dependent(node, i, 0, e))
        self.track(node.outputs[0], axis, e)
        return True

    def _op_InstanceNormalization(self, node: ir.Node, tracked: list) -> bool:
        if tracked[0][0] != 0 or len(tracked) != 1 or any(_const(v) is None for v in node.inputs[1:3]):
            return False
        axis, e = self.tracked[tracked[0][1]]
        if axis != 1:
            return False
        for i in (1, 2):
            self.dependents.append(Dependent(node, i, 0, e))
        self.track(node.outputs[0], axis, e)
        return True

    def _op_Conv(self, node: ir.Node, tracked: list) -> bool:
        if [i for i, _ in tracked] != [0]:
            return False
        axis, e = self.tracked[_input(node, 0)]
        w = _const(node.inputs[1])
        if axis != 1 or w is None:
            return False
        group = int_attr(node, "group", 1)
        if group == 1:
            self.consumers.append(Consumer(node, 1, 1, e))
            return True
        if group == w.shape[0] == expr_size(e) and w.shape[1] == 1:
            # Depthwise: channel c in -> channel c out; the group carries through.
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                if _const(node.inputs[2]) is None:
                    return False
                self.dependents.append(Dependent(node, 2, 0, e))
            self.depthwise.append(DepthwiseMember(node, e))
            self.track(node.outputs[0], 1, e)
            return True
        return False  # grouped conv: channels of a group are tied in blocks; not pruned

    def _op_ConvTranspose(self, node: ir.Node, tracked: list) -> bool:
        if [i for i, _ in tracked] != [0] or int_attr(node, "group", 1) != 1:
            return False
        axis, e = self.tracked[_input(node, 0)]
        if axis != 1 or _const(node.inputs[1]) is None:
            return False
        self.consumers.append(Consumer(node, 1, 0, e))
        return True

    def _op_MatMul(self, node: ir.Node, tracked: list) -> bool:
        if [i for i, _ in tracked] != [0]:
            return False
        axis, e = self.tracked[_input(node, 0)]
        w = _const(node.inputs[1])
        rank = _rank(_input(node, 0))
        if w is None or w.ndim != 2 or rank is None or axis != rank - 1:
            return False
        self.consumers.append(Consumer(node, 1, 0, e))
        return True

    def _op_Gemm(self, node: ir.Node, tracked: list) -> bool:
        if [i for i, _ in tracked] != [0] or int_attr(node, "transA", 0):
            return False
        axis, e = self.tracked[_input(node, 0)]
        if axis != 1 or _const(node.inputs[1]) is None:
            return False
        self.consumers.append(Consumer(node, 1, 1 if int_attr(node, "transB", 0) else 0, e))
        return True

    def _op_Concat(self, node: ir.Node, tracked: list) -> bool:
        out_rank = _rank(node.outputs[0])
        if out_rank is None:
            return False
        cat_axis = int_attr(node, "axis", 0) % out_rank
        tracked_idx = {i: v for i, v in tracked}
        axes = {self.tracked[v][0] for v in tracked_idx.values()}
        if len(axes) != 1:
            return False
        axis = axes.pop()
        if axis != cat_axis:
            # Concat along another axis: all inputs must carry the same channel space.
            if len(tracked_idx) != len([v for v in node.inputs if v is not None]):
                return False
            first = self.tracked[_input(node, 0)][1]
            for i in range(1, len(node.inputs)):
                self.unify(first, self.tracked[_input(node, i)][1], f"Concat '{node.name}'")
            self.track(node.outputs[0], axis, first)
            return True
        parts = []
        for i in range(len(node.inputs)):
            if i in tracked_idx:
                parts.append(self.tracked[_input(node, i)][1])
            else:
                shape = _static_shape(_input(node, i))
                if shape is None:
                    return False
                parts.append(self.new_group(shape[axis]))  # untracked input: fixed channels
                self.block(parts[-1], "channels from an input without a prunable producer")
        self.track(node.outputs[0], axis, Cat(tuple(parts)))
        return True

    def _op_Split(self, node: ir.Node, tracked: list) -> bool:
        """Split along the channel axis hands each output a slice (SplitPart) of the channel space."""
        if [i for i, _ in tracked] != [0]:
            return False
        axis, e = self.tracked[_input(node, 0)]
        rank = _rank(_input(node, 0))
        if rank is None:
            return False
        split_axis = int_attr(node, "axis", 0) % rank
        outputs = list(node.outputs)
        if split_axis != axis:
            for out in outputs:
                self.track(out, axis, e)
            return True
        # Only explicit sizes: an equal split would no longer be equal after pruning.
        from_input = len(node.inputs) > 1 and node.inputs[1] is not None
        if from_input:
            c = _const(node.inputs[1])
            if c is None:
                return False
            sizes = [int(v) for v in c]
        elif "split" in node.attributes:
            sizes = list(node.attributes.get_ints("split", []))
        else:
            return False
        if sum(sizes) != expr_size(e) or len(sizes) != len(outputs):
            return False
        parts: list[Expr] = []
        start = 0
        for out, size in zip(outputs, sizes, strict=True):
            parts.append(SplitPart(e, start, start + size))
            self.track(out, axis, parts[-1])
            start += size
        self.splits.append(SplitFix(node, parts, from_input))
        return True

    def _op_Flatten(self, node: ir.Node, tracked: list) -> bool:
        axis, e = self.tracked[_input(node, 0)]
        shape = _dims(_input(node, 0))
        if shape is None or int_attr(node, "axis", 1) != axis or any(d is None for d in shape[axis + 1 :]):
            return False
        factor = int(np.prod(shape[axis + 1 :])) if axis + 1 < len(shape) else 1  # type: ignore[arg-type]
        self.track(node.outputs[0], 1, e if factor == 1 else Rep(e, factor))
        return True

    def _op_Reshape(self, node: ir.Node, tracked: list) -> bool:
        if [i for i, _ in tracked] != [0]:
            return False
        axis, e = self.tracked[_input(node, 0)]
        src, dst = _dims(_input(node, 0)), _dims(node.outputs[0])
        target = _const(node.inputs[1])
        if src is None or dst is None or target is None or int_attr(node, "allowzero", 0):
            return False
        if any(d is None for d in (*src[axis:], *dst[axis:])):
            return False
        if src[:axis] != dst[:axis] or len(dst) <= axis:
            return False
        channels = int(src[axis] or 0)  # not None: checked above
        rest = int(np.prod([int(d or 0) for d in src[axis + 1 :]])) if axis + 1 < len(src) else 1
        if dst[axis] == channels and dst[axis + 1 :] == src[axis + 1 :]:
            factor, out_expr = 1, e
        elif dst[axis] == channels * rest and len(dst) == axis + 1:
            factor, out_expr = rest, (e if rest == 1 else Rep(e, rest))
        else:
            return False
        if target[axis] not in (0, -1):
            self.reshapes.append(ReshapeFix(node, axis, factor, e))
        elif target[axis] == -1 and any(t == -1 for j, t in enumerate(target) if j != axis):
            return False
        if target[axis] == 0 and factor != 1:
            return False
        self.track(node.outputs[0], axis, out_expr)
        return True

    def _op_Squeeze(self, node: ir.Node, tracked: list) -> bool:
        return self._reindex(node, tracked)

    def _op_Unsqueeze(self, node: ir.Node, tracked: list) -> bool:
        return self._reindex(node, tracked)

    def _reindex(self, node: ir.Node, tracked: list) -> bool:
        """Squeeze/Unsqueeze of other axes: find the channel axis again by matching static shapes."""
        if [i for i, _ in tracked] != [0]:
            return False
        axis, e = self.tracked[_input(node, 0)]
        src, dst = _static_shape(_input(node, 0)), _static_shape(node.outputs[0])
        if src is None or dst is None:
            return False
        before = [d for d in src[:axis] if d != 1]
        for j, d in enumerate(dst):
            if d == src[axis] and [x for x in dst[:j] if x != 1] == before:
                self.track(node.outputs[0], j, e)
                return True
        return False

    def _op_Transpose(self, node: ir.Node, tracked: list) -> bool:
        axis, e = self.tracked[_input(node, 0)]
        perm = node.attributes.get_ints("perm", None)
        rank = _rank(_input(node, 0))
        if rank is None:
            return False
        perm = list(perm) if perm is not None else list(reversed(range(rank)))
        self.track(node.outputs[0], perm.index(axis), e)
        return True


def analyze(model: ir.Model) -> Analysis:
    """Channel groups of the main graph (run shape inference first for Reshape/Flatten/broadcasting)."""
    return _Analyzer(model.graph).run()


def expr_mask(e: Expr, keep: dict[int, np.ndarray], find) -> np.ndarray:
    """Boolean keep-mask of a channel expression given each root group's mask."""
    if isinstance(e, Root):
        root = find(e.group)
        return keep.get(root, np.ones(e.size, bool))
    if isinstance(e, Cat):
        return np.concatenate([expr_mask(p, keep, find) for p in e.parts])
    if isinstance(e, Rep):
        return np.repeat(expr_mask(e.inner, keep, find), e.factor)
    return expr_mask(e.inner, keep, find)[e.start : e.stop]
