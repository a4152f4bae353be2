"""fuse (exact): fold BatchNorm into Conv/ConvTranspose/Gemm, MatMul+Add -> Gemm, transformer fusions.

Contract: touches BatchNormalization (inference mode) after Conv/ConvTranspose/Gemm with constant
weights used only there, rank-2 MatMul followed by Add of a constant bias, and (when `transformer` is
set) the attention/LayerNorm/Gelu subgraphs that onnxruntime.transformers recognizes. Outputs are
preserved up to float re-association (pipeline oracle: rtol 1e-3 of the output's magnitude).

BatchNorm folding math (per output channel c), as in onnxscript's rule:
    y = gamma_c * (conv(x, W)_c + b_c - mean_c) / sqrt(var_c + eps) + beta_c
      = conv(x, W_c * s_c) + (b_c - mean_c) * s_c + beta_c,   s_c = gamma_c / sqrt(var_c + eps)
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any, Literal

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter.rules import common as rules
from pydantic import Field

from optimizer_cli.analysis.graph import name_of
from optimizer_cli.passes._graph import infer_shapes, is_large, lift_constants, replace_model_contents
from optimizer_cli.passes._tools import load_tool_output, tool_working_directory, write_for_tool
from optimizer_cli.passes.base import (
    Exactness,
    ModelTraits,
    OptimizationPass,
    PassConfig,
    RecipeContext,
    SearchDimension,
)

TransformerType = Literal["none", "bert", "bart", "gpt2", "t5", "vit", "clip", "unet", "vae", "phi", "sam2"]


class FuseConfig(PassConfig):
    type: Literal["fuse"] = "fuse"
    batchnorm: bool = Field(True, description="Fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm.")
    matmul_add_to_gemm: bool = Field(True, description="MatMul + Add (2-D) -> Gemm.")
    pad_into_conv: bool = Field(True, description="Fold Pad into the following Conv's pads.")
    transformer: TransformerType = Field(
        "none", description="Run onnxruntime.transformers' fusions for this model family (none: skip)."
    )
    num_heads: int = Field(0, ge=0, description="Attention heads for the transformer fusions (0: detect).")
    hidden_size: int = Field(0, ge=0, description="Hidden size for the transformer fusions (0: detect).")


def _rule_groups(cfg: FuseConfig) -> dict[str, RewriteRuleSet]:
    groups: dict[str, RewriteRuleSet] = {}
    if cfg.batchnorm:
        groups["batchnorm_folded"] = RewriteRuleSet(
            [
                rules.fuse_batchnorm_into_conv_rule,
                rules.fuse_batchnorm_into_conv_transpose_rule,
                rules.fuse_batchnorm_into_gemm_rule,
            ]
        )
    if cfg.pad_into_conv:
        groups["pad_into_conv"] = RewriteRuleSet([rules.normalize_pad_format_conv_rule, rules.fuse_pad_into_conv_rule])
    if cfg.matmul_add_to_gemm:
        groups["matmul_add_to_gemm"] = RewriteRuleSet(
            [
                rules.matmul_add_to_gemm_rule,
                rules.transpose_a_matmul_add_to_gemm_rule,
                rules.transpose_b_matmul_add_to_gemm_rule,
                rules.transpose_ab_matmul_add_to_gemm_rule,
            ]
        )
    return groups


_FUSED_INTO = {"BatchNormalization": ("Conv", "ConvTranspose", "Gemm"), "Add": ("MatMul",)}


def _names_to_keep(model: ir.Model) -> dict[str, str]:
    """Output of a BatchNorm/Add that will absorb its producer -> the producer's name.

    The rewriter builds new nodes with generated names; users exclude nodes from quantization by
    name, so the fused node takes the name of the Conv/Gemm/MatMul it replaces.
    """
    keep: dict[str, str] = {}
    for node in model.graph:
        producers = _FUSED_INTO.get(node.op_type)
        if not producers or not node.inputs or node.inputs[0] is None:
            continue
        producer = node.inputs[0].producer()
        if producer is not None and producer.op_type in producers and producer.name:
            keep[name_of(node.outputs[0])] = producer.name
    return keep


def _restore_names(model: ir.Model, keep: dict[str, str]) -> None:
    used = {n.name for n in model.graph}
    for node in model.graph:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and node.outputs and node.outputs[0].name in keep:
            wanted = keep[node.outputs[0].name]
            if wanted not in used:
                used.discard(node.name)
                node.name = wanted
                used.add(wanted)


class FusePass(OptimizationPass[FuseConfig]):
    name = "fuse"
    Config = FuseConfig
    exactness = Exactness.EXACT
    contract = (
        "BatchNorm into Conv/Gemm, MatMul+Add->Gemm, transformer fusions; outputs preserved (float re-association)"
    )
    search_switches = ("fuse_transformer",)

    @classmethod
    def search_dimensions(cls, traits: ModelTraits) -> list[SearchDimension]:
        if not traits.transformer:
            return []
        return [SearchDimension("fuse_transformer", (False, True), "onnxruntime.transformers fusions (bert)")]

    @classmethod
    def recipe_entries(cls, params: dict[str, Any], ctx: RecipeContext) -> list[dict[str, Any]]:
        # Every candidate is fused; the transformer fusions only where the trial asks.
        entry: dict[str, Any] = {"type": "fuse"}
        if params.get("fuse_transformer"):
            entry["transformer"] = "bert"
        return [entry]

    @classmethod
    def describe_trial(cls, params: dict[str, Any]) -> str | None:
        return "bert fusions" if params.get("fuse_transformer") else None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.config
        modified = lift_constants(model)
        # The rules check ranks and constness: give them shapes first.
        infer_shapes(model)
        counts: dict[str, int] = {}
        names = _names_to_keep(model)
        for label, ruleset in _rule_groups(cfg).items():
            n = ruleset.apply_to_model(model)
            if n:
                counts[label] = n
                modified = True
        if counts:
            common.RemoveUnusedNodesPass()(model)
            _restore_names(model, names)
        if cfg.transformer != "none":
            fused = self._transformer_fusions(model, cfg)
            counts.update({k: v for k, v in fused.items() if v})
            modified = modified or any(fused.values())
            # The fused-op counts matter even when zero: attention fusion silently misses on some exports.
            self.stats["transformer_fusions"] = fused
        self.stats["fused"] = counts
        return ir.passes.PassResult(model, modified)

    def _transformer_fusions(self, model: ir.Model, cfg: FuseConfig) -> dict[str, int]:
        with (
            tempfile.TemporaryDirectory(prefix="optimize-fuse-", dir=self.ctx.tmp_dir) as tmp_name,
            tool_working_directory(Path(tmp_name)) as tmp,
        ):
            large = is_large(model)
            src = write_for_tool(model, tmp)
            counts, fused = _run_transformer_optimizer(src, tmp / "fused.onnx", cfg, large)
            current = _default_opset(model)
            needed = _opset_needed(fused, current)
            if needed is not None:
                # onnxruntime.transformers writes ONNX LayerNormalization (opset 17) whatever the model's
                # opset: upgrade the model first, or fuse without LayerNorm where the converter cannot.
                upgraded = _upgrade_opset(src, tmp / "upgraded.onnx", needed, large)
                if upgraded is not None:
                    counts, fused = _run_transformer_optimizer(upgraded, tmp / "fused.onnx", cfg, large)
                    self.stats["opset"] = f"{current}->{needed} (for the fused LayerNormalization)"
                else:
                    counts, fused = _run_transformer_optimizer(src, tmp / "fused.onnx", cfg, large, layer_norm=False)
                    self.stats["opset"] = (
                        f"{current} kept: LayerNorm not fused (needs opset {needed}; the version converter failed)"
                    )
            replace_model_contents(model, fused)
        return {k: v for k, v in counts.items() if v or k in ("Attention", "SkipLayerNormalization", "BiasGelu")}


def _run_transformer_optimizer(
    src: Path, out: Path, cfg: FuseConfig, large: bool, layer_norm: bool = True
) -> tuple[dict[str, int], ir.Model]:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(cfg.transformer)
    if not layer_norm:
        options.enable_layer_norm = False
        options.enable_skip_layer_norm = False
        options.enable_bias_skip_layer_norm = False
    optimized = optimize_model(
        str(src),
        model_type=cfg.transformer,
        num_heads=cfg.num_heads,
        hidden_size=cfg.hidden_size,
        optimization_options=options,
        opt_level=0,  # graph fusions only; ORT applies its own at session creation
        only_onnxruntime=False,
    )
    counts = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items()}
    optimized.save_model_to_file(str(out), use_external_data_format=large)
    return counts, load_tool_output(out)


def _default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


@functools.cache
def _first_version(op_type: str) -> int | None:
    """The opset that introduced an ONNX-domain op (None: not an ONNX op, e.g. a contrib op)."""
    versions = [
        s.since_version for s in onnx.defs.get_all_schemas_with_history() if s.name == op_type and s.domain == ""
    ]
    return min(versions) if versions else None


def _opset_needed(model: ir.Model, current: int) -> int | None:
    """The ONNX opset the model's ops need when it is above `current` (else None)."""
    needed = current
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in ("", "ai.onnx") or onnx.defs.has(node.op_type, current, ""):
            continue
        first = _first_version(node.op_type)
        if first is not None:
            needed = max(needed, first)
    return needed if needed > current else None


def _upgrade_opset(src: Path, target: Path, opset: int, large: bool) -> Path | None:
    """The model at `src` converted to `opset` by onnx's version converter (None when it fails)."""
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(onnx.load(str(src)), opset)
        onnx.checker.check_model(converted)
    except Exception:  # the converter lacks adapters for some ops
        return None
    onnx.save(converted, str(target), save_as_external_data=large)
    return target
