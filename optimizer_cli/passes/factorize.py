"""factorize (approximate): low-rank SVD of MatMul/Gemm weights and Conv kernels.

Contract: touches MatMul (2-D constant weight), Gemm (transA=0) and Conv (group=1) nodes, each
replaced by two nodes; the second keeps the original output name. With W = U S V^T and rank r:
    MatMul/Gemm:  x W  ~=  (x A) B,   A = U_r sqrt(S_r) [K, r],  B = sqrt(S_r) V_r^T [r, N]
    Conv:         W [Co, Ci, kh, kw] reshaped to [Co, Ci*kh*kw]; a spatial conv to r channels
                  (same strides/pads/dilations) followed by a 1x1 conv r -> Co with the bias.
Full rank reproduces the layer (float rounding only); rank r errs by at most sigma_{r+1} * ||x||
per output row. A layer is skipped when the factorized form would not need fewer MACs.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field, model_validator

from optimizer_cli.analysis.cost import macs, parameter_count
from optimizer_cli.analysis.graph import int_attr
from optimizer_cli.model_io import read_weight
from optimizer_cli.passes._graph import infer_shapes, new_initializer, refresh_shapes
from optimizer_cli.passes.base import (
    Exactness,
    ModelTraits,
    OptimizationPass,
    PassConfig,
    RecipeContext,
    SearchDimension,
)

LOWRANK_SUFFIX = "_lowrank"


class FactorizeConfig(PassConfig):
    type: Literal["factorize"] = "factorize"
    # One of rank / energy / rank_ratio picks the rank (giving rank or rank_ratio clears energy).
    rank: int | None = Field(None, ge=1, description="Fixed rank per layer.")
    energy: float | None = Field(
        0.9, gt=0, le=1, description="Keep singular values up to this fraction of sum(s^2) (the default rule)."
    )
    rank_ratio: float | None = Field(None, gt=0, le=1, description="Rank = ratio * min(K, N).")
    round_to: int = Field(8, ge=1, description="Round the rank up to a multiple of this (1: no rounding).")
    min_size: int = Field(64, ge=1, description="Skip layers whose smaller dimension is below this.")
    # No upper bound: tests force a factorization with a ratio > 1 to check the math.
    max_cost_ratio: float = Field(0.8, gt=0, description="Factorize only if MACs after / before <= this.")
    op_types: list[str] = Field(["MatMul", "Gemm", "Conv"], description="Op types to factorize.")
    exclude_nodes: list[str] = Field([], description="Node names left alone.")

    @model_validator(mode="after")
    def _one_rule(self) -> FactorizeConfig:
        if self.rank is not None or self.rank_ratio is not None:
            self.energy = None
        if sum(x is not None for x in (self.rank, self.energy, self.rank_ratio)) != 1:
            raise ValueError("give exactly one of rank, energy, rank_ratio")
        return self


def choose_rank(s: np.ndarray, cfg: FactorizeConfig) -> int:
    full = len(s)
    if cfg.rank is not None:
        r = cfg.rank
    elif cfg.rank_ratio is not None:
        r = int(np.ceil(cfg.rank_ratio * full))
    else:
        energy = np.cumsum(s.astype(np.float64) ** 2) / max(float(np.sum(s.astype(np.float64) ** 2)), 1e-30)
        r = int(np.searchsorted(energy, cfg.energy - 1e-12) + 1)  # type: ignore[operator]
    if cfg.round_to > 1:
        r = int(np.ceil(r / cfg.round_to) * cfg.round_to)
    return max(1, min(r, full))


def split_matrix(w: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W [K, N] -> A [K, r], B [r, N] with A @ B the best rank-r approximation; also all singular values."""
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:r])
    return (u[:, :r] * root).astype(w.dtype), (root[:, None] * vt[:r]).astype(w.dtype), s


class FactorizePass(OptimizationPass[FactorizeConfig]):
    name = "factorize"
    Config = FactorizeConfig
    exactness = Exactness.APPROXIMATE
    contract = "MatMul/Gemm/Conv -> two low-rank nodes (second keeps the output name); skipped unless MACs drop"
    search_switches = ("factorize_energy",)

    @classmethod
    def search_dimensions(cls, traits: ModelTraits) -> list[SearchDimension]:
        if not (traits.factorizable and traits.has_calibration):
            return []
        help_text = "low-rank factorization + reconstruct (0: none)"
        return [SearchDimension("factorize_energy", (0.0, 0.99, 0.95, 0.9), help_text)]

    @classmethod
    def recipe_entries(cls, params: dict[str, Any], ctx: RecipeContext) -> list[dict[str, Any]]:
        energy = params.get("factorize_energy")
        return [{"type": "factorize", "energy": energy}, {"type": "reconstruct"}] if energy else []

    @classmethod
    def describe_trial(cls, params: dict[str, Any]) -> str | None:
        return f"factorize {params['factorize_energy']:g}" if params.get("factorize_energy") else None

    @classmethod
    def fidelity_advice(cls, config: FactorizeConfig, key: str, excluded_tried: bool) -> str | None:
        if config.rank is not None:
            knob = f"raise {key}.rank (now {config.rank})"
        elif config.rank_ratio is not None:
            knob = f"raise {key}.rank_ratio (now {config.rank_ratio})"
        else:
            knob = f"raise {key}.energy (now {config.energy}, e.g. 0.99)"
        return f"{knob}, or keep the most sensitive layers whole with {key}.exclude_nodes"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.config
        import onnx_ir.passes.common as common

        infer_shapes(model)
        params_before, macs_before = parameter_count(model), macs(model)
        done, skipped = [], {"small": 0, "no_gain": 0, "unsupported": 0}
        targets = [
            n
            for n in model.graph
            if n.op_type in cfg.op_types and n.name not in cfg.exclude_nodes and n.domain in ("", "ai.onnx")
        ]
        for i, node in enumerate(targets):
            if self.ctx.progress:
                self.ctx.progress(f"factorize: layer {i + 1} of {len(targets)} ({node.name})")
            result = self._factorize(model.graph, node, cfg)
            if isinstance(result, str):
                skipped[result] += 1
            else:
                done.append(f"{node.name}:r{result}")
        if done:
            refresh_shapes(model)
            common.RemoveUnusedNodesPass()(model)
        self.stats = {
            "factorized": len(done),
            "ranks": ", ".join(done[:8]) + (" ..." if len(done) > 8 else ""),
            "skipped": {k: v for k, v in skipped.items() if v},
            "params": f"{params_before}->{parameter_count(model)}",
            "macs_per_sample": f"{macs_before}->{macs(model)}",
        }
        return ir.passes.PassResult(model, bool(done))

    def _factorize(self, graph: ir.Graph, node: ir.Node, cfg: FactorizeConfig) -> int | str:
        w_value = node.inputs[1] if len(node.inputs) > 1 else None
        if w_value is None or w_value.const_value is None or w_value.dtype != ir.DataType.FLOAT:
            return "unsupported"
        w = read_weight(w_value.const_value)
        if node.op_type == "Conv":
            return self._conv(graph, node, w, cfg)
        if w.ndim != 2:
            return "unsupported"
        if node.op_type == "Gemm":
            if int_attr(node, "transA", 0):
                return "unsupported"
            if int_attr(node, "transB", 0):
                w = w.T
        k, n = w.shape
        if min(k, n) < cfg.min_size:
            return "small"
        s = np.linalg.svd(w.astype(np.float64), compute_uv=False)  # singular values only: the rank decides
        r = choose_rank(s, cfg)
        if r * (k + n) > cfg.max_cost_ratio * k * n:
            return "no_gain"
        a, b, _ = split_matrix(w, r)
        x = node.inputs[0]
        a_val = new_initializer(graph, f"{w_value.name}{LOWRANK_SUFFIX}_a", a, w_value.const_value)
        mid = ir.Value(name=f"{node.outputs[0].name}{LOWRANK_SUFFIX}")
        first = ir.Node("", "MatMul", [x, a_val], outputs=[mid], name=f"{node.name}{LOWRANK_SUFFIX}_a")
        graph.insert_before(node, first)
        b_val = new_initializer(graph, f"{w_value.name}{LOWRANK_SUFFIX}_b", b, w_value.const_value)
        node.replace_input_with(0, mid)
        node.replace_input_with(1, b_val)
        if node.op_type == "Gemm" and int_attr(node, "transB", 0):
            node.attributes["transB"] = ir.AttrInt64("transB", 0)
        return r

    def _conv(self, graph: ir.Graph, node: ir.Node, w: np.ndarray, cfg: FactorizeConfig) -> int | str:
        if int_attr(node, "group", 1) != 1 or w.ndim != 4:
            return "unsupported"
        co, ci, kh, kw = w.shape
        if (kh * kw == 1 and min(co, ci) < cfg.min_size) or min(co, ci * kh * kw) < cfg.min_size:
            return "small"
        mat = w.reshape(co, ci * kh * kw).T  # [Ci*kh*kw, Co]
        s = np.linalg.svd(mat.astype(np.float64), compute_uv=False)
        r = choose_rank(s, cfg)
        if r * (ci * kh * kw + co) > cfg.max_cost_ratio * co * ci * kh * kw:
            return "no_gain"
        a, b, _ = split_matrix(mat, r)  # a [Ci*kh*kw, r], b [r, Co]
        spatial = a.T.reshape(r, ci, kh, kw)
        pointwise = b.T.reshape(co, r, 1, 1)
        w_name = node.inputs[1].name  # type: ignore[union-attr]
        s_val = new_initializer(graph, f"{w_name}{LOWRANK_SUFFIX}_spatial", np.ascontiguousarray(spatial))
        mid = ir.Value(name=f"{node.outputs[0].name}{LOWRANK_SUFFIX}")
        attrs = [
            a for k, a in node.attributes.items() if k in ("strides", "pads", "dilations", "auto_pad", "kernel_shape")
        ]
        first = ir.Node(
            "",
            "Conv",
            [node.inputs[0], s_val],
            attributes=attrs,
            outputs=[mid],
            name=f"{node.name}{LOWRANK_SUFFIX}_spatial",
        )
        graph.insert_before(node, first)
        p_val = new_initializer(graph, f"{w_name}{LOWRANK_SUFFIX}_pointwise", np.ascontiguousarray(pointwise))
        node.replace_input_with(0, mid)
        node.replace_input_with(1, p_val)
        for key in ("strides", "pads", "dilations", "auto_pad"):
            node.attributes.pop(key, None)
        node.attributes["kernel_shape"] = ir.AttrInt64s("kernel_shape", [1, 1])
        return r
