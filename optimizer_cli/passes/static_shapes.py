"""static_shapes (exact): fix the symbolic dims of the model's inputs to the shapes it is run with.

Contract: only the declared shapes of graph inputs change (a symbolic or unknown dim becomes a number) and the
intermediate shapes are inferred again; no node, weight, name or element type changes, so every output is
the same for inputs of the fixed shapes. A model with static shapes can only be fed those shapes: the pass
takes them from the data it is verified on (every sample must agree) or from `dims`, and leaves an input
alone, saying why, when the samples disagree (text lines of several widths).

Why: some engines compile a graph per shape and need (or profit from) static shapes: OpenVINO and TensorRT
build for the shapes they see, and onnxruntime's CPU EP plans memory and picks kernels once (silero-vad ran
1.39x faster with its input dims fixed). Run it last, after the passes that read calibration data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import onnx_ir as ir
from pydantic import Field

from optimizer_cli.passes._graph import is_symbolic_dim, refresh_shapes
from optimizer_cli.passes.base import ModelTraits, OptimizationPass, PassConfig, RecipeContext, SearchDimension


class StaticShapesConfig(PassConfig):
    type: Literal["static_shapes"] = "static_shapes"
    dims: dict[str, Annotated[int, Field(ge=1)]] = Field(
        {},
        description="Values for symbolic dims by name, e.g. {batch: 1, sequence: 128}; dims not named here take "
        "the size every verification sample has (null: leave a dim the samples disagree on symbolic).",
    )


def _dim_name(dim: object) -> str | None:
    value = getattr(dim, "value", None)
    return value if isinstance(value, str) else None


class StaticShapesPass(OptimizationPass[StaticShapesConfig]):
    name = "static_shapes"
    Config = StaticShapesConfig
    contract = (
        "fixes symbolic input dims to the data's shapes (or `dims`); no node or weight changes; outputs exact "
        "for inputs of those shapes"
    )
    search_switches = ("static_shapes",)

    @classmethod
    def search_dimensions(cls, traits: ModelTraits) -> list[SearchDimension]:
        # Engines that compile per shape (OpenVINO, TensorRT), and the CPU EP's memory planning, can profit;
        # the data must say which shape to fix.
        if not (traits.symbolic_inputs and traits.one_evaluation_shape):
            return []
        return [SearchDimension("static_shapes", (False, True), "fix the symbolic input dims to the data's shapes")]

    @classmethod
    def recipe_entries(cls, params: dict[str, Any], ctx: RecipeContext) -> list[dict[str, Any]]:
        # Last in the recipe: the passes before it may read data of other shapes.
        return [{"type": "static_shapes"}] if params.get("static_shapes") else []

    @classmethod
    def describe_trial(cls, params: dict[str, Any]) -> str | None:
        return "static shapes" if params.get("static_shapes") else None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.config
        feeds = self.ctx.verify_data.feeds
        fixed: dict[str, list[int]] = {}
        left: dict[str, str] = {}
        for value in model.graph.inputs:
            if value.name in model.graph.initializers or value.shape is None:
                continue
            dims = list(value.shape.dims)
            if not any(is_symbolic_dim(d) for d in dims):
                continue
            shape, reason = self._shape_for(value.name, dims, feeds, cfg.dims)
            if shape is None:
                left[str(value.name)] = reason
                continue
            value.shape = ir.Shape(shape)
            fixed[str(value.name)] = shape
        self.stats["fixed"] = {k: "x".join(map(str, v)) for k, v in fixed.items()} or "none"
        if left:
            self.stats["left_symbolic"] = left
        if not fixed:
            return self.refuse(model, "no input has a symbolic dim that can be fixed" + (f" ({left})" if left else ""))
        refresh_shapes(model)
        return ir.passes.PassResult(model, True)

    @staticmethod
    def _shape_for(
        name: str | None, dims: Sequence[object], feeds: list[dict], named: dict[str, int]
    ) -> tuple[list[int] | None, str]:
        """The static shape of one input: named dims from `named`, the rest from the samples (which must agree)."""
        seen = {tuple(f[name].shape) for f in feeds if name in f}
        if len(seen) > 1:
            return None, f"its samples have {len(seen)} shapes"
        data_shape = next(iter(seen)) if seen else None
        shape: list[int] = []
        for axis, dim in enumerate(dims):
            if not is_symbolic_dim(dim):
                shape.append(int(dim))  # type: ignore[call-overload]
                continue
            dim_name = _dim_name(dim)
            if dim_name is not None and dim_name in named:
                size = named[dim_name]
                if data_shape is not None and data_shape[axis] != size:
                    return None, f"dims says {dim_name}={size} but its samples have {data_shape[axis]}"
                shape.append(size)
            elif data_shape is not None:
                shape.append(int(data_shape[axis]))
            else:
                return None, f"no sample and no value for dim {dim_name or axis}"
        return shape, ""
