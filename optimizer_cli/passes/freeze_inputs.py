"""freeze_inputs (exact): turn configuration inputs that hold one value in the user's data into constants, and fold.

Contract: each frozen input leaves `graph.inputs` and becomes an initializer holding the value every verification
sample gives it (or the one `values` names, which the samples must agree with); then constants are folded, an `If`
whose condition became constant is replaced by its branch, and shapes are inferred again. Every output is exact
for inputs whose values equal the frozen ones; the model no longer takes the frozen inputs, so a caller who still
feeds one gets onnxruntime's "invalid input name" error rather than an answer computed with the frozen value.

Which inputs, without `values`: integer or bool inputs of at most 16 elements (sample rates, flags, use_cache
switches, integer options) whose value is identical in every sample of real data. Float inputs are never frozen
on their own (silero-vad's `state` is zeros in benchmark data but recurrent state in real use), and neither is
anything on seeded random data (a random feed's attention mask is all ones).

Why: silero-vad branches on its sample rate `sr` with an If over the whole network; users run it at one rate.
With sr frozen to 16000 the If is inlined: the CPU EP ran it 1.25x faster, and the OpenVINO EP, which refused
the original ("unknown rank"), compiled it (1.8x). Run it early (right after cleanup): the passes after it see
the folded graph.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from pydantic import Field

from optimizer_cli.analysis.graph import node_count, op_counts
from optimizer_cli.data import Dataset
from optimizer_cli.passes._graph import refresh_shapes
from optimizer_cli.passes.base import ModelTraits, OptimizationPass, PassConfig, RecipeContext, SearchDimension
from optimizer_cli.passes.cleanup import fold_constants_or_keep

# A configuration input is small: a scalar option, a few flags. Larger integer inputs are data (token ids).
MAX_ELEMENTS = 16
# One sample always "agrees with itself": it says nothing about which inputs are configuration.
MIN_SAMPLES = 2

FrozenValue = bool | int | float | list[Any]


class FreezeInputsConfig(PassConfig):
    type: Literal["freeze_inputs"] = "freeze_inputs"
    values: dict[str, FrozenValue] = Field(
        {},
        description="Values to freeze by input name, e.g. {sr: 16000}; the verification samples must hold the "
        "same value. Empty: freeze every integer or bool input of at most 16 elements that holds one value in "
        "every sample of the (real) data.",
    )


def _numpy_dtype(value: ir.Value) -> np.dtype | None:
    try:
        return None if value.dtype is None else np.dtype(value.dtype.numpy())
    except (TypeError, ValueError):  # types numpy has no dtype for (float8, int4, strings)
        return None


def _is_config_type(dtype: np.dtype | None) -> bool:
    return dtype is not None and (dtype == np.bool_ or np.issubdtype(dtype, np.integer))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    floating = np.issubdtype(a.dtype, np.floating) and np.issubdtype(b.dtype, np.floating)
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=floating))


def _show(array: np.ndarray) -> str:
    return str(array.item()) if array.ndim == 0 else str(array.tolist())


def one_value(name: str, feeds: list[dict[str, np.ndarray]]) -> tuple[np.ndarray | None, str]:
    """The value input `name` has in every sample, or None and why there is none."""
    arrays = [f.get(name) for f in feeds]
    if not arrays:
        return None, "no verification sample"
    if any(a is None for a in arrays):
        return None, "some samples lack it"
    first = np.asarray(arrays[0])
    if any(not _same(first, np.asarray(a)) for a in arrays[1:]):
        return None, f"its {len(arrays)} samples differ"
    return first, ""


def config_inputs(model: ir.Model, data: Dataset) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The configuration inputs `data` holds one value of, with that value; and, for the other integer or bool
    inputs, why they are not frozen. Nothing on seeded random data or on fewer than MIN_SAMPLES samples."""
    frozen: dict[str, np.ndarray] = {}
    left: dict[str, str] = {}
    for value in model.graph.inputs:
        if value.name in model.graph.initializers or not _is_config_type(_numpy_dtype(value)):
            continue
        name = str(value.name)
        if data.is_random:
            left[name] = "the data is seeded random, not the user's"
        elif len(data.feeds) < MIN_SAMPLES:
            left[name] = f"{len(data.feeds)} sample (at least {MIN_SAMPLES} say which inputs never change)"
        else:
            array, reason = one_value(name, data.feeds)
            if array is None:
                left[name] = reason
            elif array.size > MAX_ELEMENTS:
                left[name] = f"{array.size} elements (a configuration input has at most {MAX_ELEMENTS})"
            else:
                frozen[name] = array
    return frozen, left


class FreezeInputsPass(OptimizationPass[FreezeInputsConfig]):
    name = "freeze_inputs"
    Config = FreezeInputsConfig
    contract = (
        "replaces inputs that hold one value in the data (integer/bool, <= 16 elements, or `values`) by that "
        "constant and folds (If on a constant condition inlined); outputs exact for inputs whose values equal "
        "the frozen ones; the model no longer takes those inputs"
    )
    search_switches = ("freeze_inputs",)

    @classmethod
    def search_dimensions(cls, traits: ModelTraits) -> list[SearchDimension]:
        # Only where the evaluation data has a configuration input that never changes (silero-vad's sr).
        if not traits.constant_config_inputs:
            return []
        return [
            SearchDimension(
                "freeze_inputs", (False, True), "freeze the integer inputs that hold one value in the data, and fold"
            )
        ]

    @classmethod
    def recipe_entries(cls, params: dict[str, Any], ctx: RecipeContext) -> list[dict[str, Any]]:
        return [{"type": "freeze_inputs"}] if params.get("freeze_inputs") else []

    @classmethod
    def describe_trial(cls, params: dict[str, Any]) -> str | None:
        return "inputs frozen" if params.get("freeze_inputs") else None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        data = self.ctx.verify_data
        if self.config.values:
            chosen, problem = self._named_values(model, data)
            if problem:
                return self.refuse(model, problem)
        else:
            chosen, left = config_inputs(model, data)
            if left:
                self.stats["left"] = left
            if not chosen:
                return self.refuse(
                    model, "no integer or bool input holds one value in every sample" + (f" ({left})" if left else "")
                )
        self.removed_inputs = tuple(chosen)
        before_nodes, before_ifs = node_count(model), op_counts(model).get("If", 0)
        inputs = {v.name: v for v in model.graph.inputs}
        for name, array in chosen.items():
            value = inputs[name]
            model.graph.inputs.remove(value)
            value.const_value = ir.tensor(array, name=name)
            value.shape = ir.Shape(array.shape)
            model.graph.register_initializer(value)
        self._fold(model)
        refresh_shapes(model)
        self.stats |= {
            "frozen": {name: _show(array) for name, array in chosen.items()},
            "nodes": f"{before_nodes}->{node_count(model)}",
            "ifs_removed": before_ifs - op_counts(model).get("If", 0),
        }
        return ir.passes.PassResult(model, True)

    def _named_values(self, model: ir.Model, data: Dataset) -> tuple[dict[str, np.ndarray], str]:
        """`values` as arrays of each input's type, or why they cannot be frozen (nothing is then frozen: the
        user named them, so a partial freeze would be a surprise)."""
        inputs = {str(v.name): v for v in model.graph.inputs if v.name not in model.graph.initializers}
        chosen: dict[str, np.ndarray] = {}
        for name, given in self.config.values.items():
            value = inputs.get(name)
            if value is None:
                return {}, f"values names '{name}', which is not an input of the model (inputs: {', '.join(inputs)})"
            dtype = _numpy_dtype(value)
            if dtype is None:
                return {}, f"input '{name}' has type {value.dtype}, which values cannot give"
            raw = np.asarray(given)
            array = raw.astype(dtype)
            if raw.dtype.kind in "OUS" or not np.array_equal(array, raw):
                return {}, f"values gives {name}={given!r}, which is not a {value.dtype} value"
            declared = value.shape
            if declared is not None and (
                len(declared) != array.ndim
                or any(
                    isinstance(d, int) and d >= 0 and d != n for d, n in zip(declared.dims, array.shape, strict=True)
                )
            ):
                return {}, f"values gives {name} the shape {list(array.shape)}, the model declares {declared}"
            for feed in data.feeds:
                if name in feed and not _same(np.asarray(feed[name]), array):
                    hint = " (the data is seeded random: give samples of the frozen value with --data)"
                    return {}, (
                        f"values says {name}={_show(array)} but the data has {name}={_show(np.asarray(feed[name]))}"
                        + (hint if data.is_random else "")
                    )
            chosen[name] = array
        return chosen, ""

    def _fold(self, model: ir.Model) -> None:
        """Constant folding (which inlines an If on a constant condition), then dead nodes out. A folder error
        leaves the frozen model unfolded: still exact, only slower."""
        _, skipped = fold_constants_or_keep(model)
        if skipped:
            self.stats["fold"] = f"skipped ({skipped})"
        common.RemoveUnusedNodesPass()(model)
