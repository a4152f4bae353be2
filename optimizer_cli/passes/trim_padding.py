"""trim_padding (exact): stop computing on trailing padding of sequence models.

Contract: adds a prologue that computes L = 1 + the last position that any row of the attention
mask keeps (at least 1) and slices every sequence input to [:, :L]; no existing node changes.
Outputs are preserved exactly when no output has the sequence axis and none depends on masked-out
trailing positions (BERT-style encoders with pooled outputs: masked keys get a large negative
attention bias and pooling weights positions by the mask). Both conditions are checked, not
assumed: outputs carrying the sequence dim refuse the pass, and on padded copies of the data
(trailing half masked out when the data has no padding) the original must give the same outputs
whatever the padded positions hold, and the rewritten model must match it; otherwise the model is
left unchanged and the reason reported. Input signature (names, types, declared shapes) is kept.

The gain depends on the data: right-padded batches of short texts run as short sequences; inputs
without trailing padding (or left-padded) run as before plus a few tiny ops.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from optimizer_cli.errors import UserInputError
from optimizer_cli.passes._graph import new_initializer, refresh_shapes
from optimizer_cli.passes.base import ModelTraits, OptimizationPass, PassConfig, RecipeContext, SearchDimension
from optimizer_cli.runtime.session import SessionConfig, ort_error_message, run_model

SEQUENCE_AXIS = 1
PREFIX = "trim_padding"
TRIMMED_SUFFIX = "_trimmed"


class TrimPaddingConfig(PassConfig):
    type: Literal["trim_padding"] = "trim_padding"
    mask_input: str | None = Field(
        None, description="Attention-mask input (null: the one integer/bool rank-2 input named *mask*)."
    )
    samples: int = Field(4, ge=1, description="Feeds used for the invariance check.")


def find_mask_input(model: ir.Model, name: str | None) -> ir.Value:
    inputs = {v.name: v for v in model.graph.inputs}
    if name is not None:
        if name not in inputs:
            raise UserInputError(
                f"trim_padding: mask_input '{name}' is not a model input ({', '.join(str(k) for k in inputs)})"
            )
        return inputs[name]
    candidates = [
        v
        for v in model.graph.inputs
        if "mask" in (v.name or "").lower()
        and v.dtype is not None
        and (v.dtype.is_integer() or v.dtype == ir.DataType.BOOL)
        and v.shape is not None
        and len(v.shape) == 2
    ]
    if len(candidates) != 1:
        found = ", ".join(v.name or "?" for v in candidates) or "none"
        raise UserInputError(
            f"trim_padding: need exactly one rank-2 integer attention-mask input (found: {found}); set mask_input"
        )
    return candidates[0]


def _same_dim(a: object, b: object) -> bool:
    if isinstance(a, ir.SymbolicDim) and isinstance(b, ir.SymbolicDim):
        return a.value is not None and a.value == b.value
    return isinstance(a, int) and isinstance(b, int) and a == b


def sequence_inputs(model: ir.Model, mask: ir.Value) -> list[ir.Value]:
    seq = mask.shape[SEQUENCE_AXIS]  # type: ignore[index]
    return [
        v
        for v in model.graph.inputs
        if v.shape is not None and len(v.shape) > SEQUENCE_AXIS and _same_dim(v.shape[SEQUENCE_AXIS], seq)
    ]


def outputs_with_sequence_axis(model: ir.Model, mask: ir.Value) -> list[str]:
    seq = mask.shape[SEQUENCE_AXIS]  # type: ignore[index]
    return [
        v.name or "?" for v in model.graph.outputs if v.shape is None or any(_same_dim(d, seq) for d in v.shape.dims)
    ]


def padded_variants(
    feeds: list[dict[str, np.ndarray]], mask_name: str, seq_names: list[str], rng: np.random.Generator
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Two copies of each feed with trailing padding that differ only in what padded positions hold.

    Feeds without trailing padding get their second half masked out. The second copy refills padded
    positions with values taken from the kept positions of the same input (so ids stay in range).
    """
    first, second = [], []
    for feed in feeds:
        a = {k: np.array(v, copy=True) for k, v in feed.items()}
        mask = a[mask_name]
        seq = mask.shape[SEQUENCE_AXIS]
        keep = int(np.max(np.nonzero(np.any(mask != 0, axis=0))[0], initial=-1)) + 1
        if keep == 0 or seq < 2:
            continue  # nothing kept, or no room for padding: says nothing either way
        if keep == seq:
            keep = seq // 2
            mask[:, keep:] = 0
        b = {k: np.array(v, copy=True) for k, v in a.items()}
        for name in seq_names:
            if name != mask_name:
                b[name][:, keep:] = b[name][:, rng.integers(0, keep, size=seq - keep)]
        first.append(a)
        second.append(b)
    return first, second


def insert_trim(model: ir.Model, mask: ir.Value, seq_inputs: list[ir.Value]) -> list[ir.Node]:
    """Prologue: L = max(1, 1 + last kept position over the batch); every sequence input sliced to [:, :L]."""
    graph = model.graph
    nodes: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value], name: str, **attributes: int) -> ir.Value:
        node = ir.node(op, inputs, attributes=attributes, name=f"{PREFIX}/{name}", num_outputs=1)
        node.outputs[0].name = f"{PREFIX}/{name}"
        nodes.append(node)
        return node.outputs[0]

    def const(name: str, value: object, dtype: type = np.int64) -> ir.Value:
        return new_initializer(graph, f"{PREFIX}_{name}", np.array(value, dtype))

    one = const("one", 1)
    if mask.dtype == ir.DataType.BOOL:
        kept = mask
    else:
        zero = const("mask_zero", 0, mask.dtype.numpy().type)  # type: ignore[union-attr]
        kept = add("Not", [add("Equal", [mask, zero], "is_padding")], "is_kept")
    kept_int = add("Cast", [kept], "kept_int", to=int(ir.DataType.INT64))
    seq_len = add("Gather", [add("Shape", [mask], "mask_shape"), const("axis", SEQUENCE_AXIS)], "seq_len")
    positions = add("Range", [one, add("Add", [seq_len, one], "seq_len_plus_one"), one], "positions")
    last = add("ReduceMax", [add("Mul", [kept_int, positions], "kept_positions")], "last_kept", keepdims=0)
    end = add("Reshape", [add("Max", [last, one], "trim_length"), const("shape_1d", [1])], "slice_end")
    starts, axes = const("starts", [0]), const("axes", [SEQUENCE_AXIS])
    prologue = set(nodes)
    for value in seq_inputs:
        sliced = add("Slice", [value, starts, end, axes], f"slice_{value.name}")
        sliced.name = f"{value.name}{TRIMMED_SUFFIX}"
        sliced.type = value.type
        dims = list(value.shape.dims)  # type: ignore[union-attr]
        dims[SEQUENCE_AXIS] = ir.SymbolicDim("trimmed_sequence")
        sliced.shape = ir.Shape(dims)
        for user, index in list(value.uses()):
            if user not in prologue and user is not sliced.producer():
                user.replace_input_with(index, sliced)
    graph.insert_before(graph[0], nodes)
    return nodes


def remove_trim(model: ir.Model, nodes: list[ir.Node], seq_inputs: list[ir.Value]) -> None:
    """Undo insert_trim: consumers read the inputs again; the prologue and its constants go."""
    trimmed = {n.outputs[0].name: n.outputs[0] for n in nodes}
    for value in seq_inputs:
        trimmed[f"{value.name}{TRIMMED_SUFFIX}"].replace_all_uses_with(value)
    for node in reversed(nodes):
        model.graph.remove(node, safe=True)
    for name in [k for k in model.graph.initializers if k.startswith(PREFIX)]:
        if not model.graph.initializers[name].uses():
            del model.graph.initializers[name]


class TrimPaddingPass(OptimizationPass[TrimPaddingConfig]):
    name = "trim_padding"
    Config = TrimPaddingConfig
    contract = (
        "adds a prologue slicing sequence inputs to the last unmasked position; exact for outputs without the "
        "sequence axis that ignore masked positions (checked on padded data; model left unchanged otherwise)"
    )
    search_switches = ("trim_padding",)

    @classmethod
    def search_dimensions(cls, traits: ModelTraits) -> list[SearchDimension]:
        if traits.mask_input is None:  # no attention-mask-like input: nothing to trim
            return []
        return [SearchDimension("trim_padding", (False, True), "slice padded sequences to their last real token")]

    @classmethod
    def recipe_entries(cls, params: dict[str, Any], ctx: RecipeContext) -> list[dict[str, Any]]:
        return [{"type": "trim_padding"}] if params.get("trim_padding") else []

    @classmethod
    def describe_trial(cls, params: dict[str, Any]) -> str | None:
        return "trim_padding" if params.get("trim_padding") else None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.config
        mask = find_mask_input(model, cfg.mask_input)
        seq_inputs = sequence_inputs(model, mask)
        self.stats["mask_input"] = mask.name
        self.stats["sliced_inputs"] = [v.name for v in seq_inputs]
        reason = self._apply(model, mask, seq_inputs, cfg.samples)
        return self.refuse(model, reason) if reason is not None else ir.passes.PassResult(model, True)

    def _apply(self, model: ir.Model, mask: ir.Value, seq_inputs: list[ir.Value], samples: int) -> str | None:
        """Insert the trim when it provably keeps the outputs on this data; else the reason it was not."""
        if model.opset_imports.get("", 0) < 11:
            return "needs opset >= 11 (Range)"
        if mask.shape is None or mask.shape[SEQUENCE_AXIS] is None:
            return f"the sequence axis of '{mask.name}' has no declared size"
        carrying = outputs_with_sequence_axis(model, mask)
        if carrying:
            return f"output(s) {', '.join(carrying)} carry the sequence axis: trimming would change their shape"
        data = self.ctx.calibration if self.ctx.calibration is not None else self.ctx.verify_data
        feeds = [f for f in data.feeds[:samples] if mask.name in f]
        if not feeds:
            return "no data with the mask input to check the rewrite on"
        first, second = padded_variants(feeds, mask.name or "", [v.name or "" for v in seq_inputs], self.ctx.rng)
        if not first:
            return "no data with room for padding to check the rewrite on"
        config = SessionConfig(threads=self.ctx.threads, opt_level="disable")
        reference = run_model(model, first, config)
        tolerance = self.ctx.tolerance  # the run's verify.rtol/atol: the same oracle as the pipeline's check
        if not tolerance.all_close(reference, run_model(model, second, config)):
            return "the outputs depend on what masked-out positions hold"
        nodes = insert_trim(model, mask, seq_inputs)
        try:
            if tolerance.all_close(reference, run_model(model, first, config)):
                refresh_shapes(model)
                return None
            problem = "the trimmed model's outputs differ from the original's on padded data"
        except Exception as exc:  # e.g. a Reshape that hard-codes the sequence length
            problem = f"the model does not run on trimmed sequences: {ort_error_message(exc)}"
        remove_trim(model, nodes, seq_inputs)
        return problem
