"""quantize (approximate) through onnxruntime.quantization: dynamic, static QDQ, fp16, weight-only.

Contract: touches MatMul/Gemm (dynamic, weight-only), the ops ORT's static quantizer supports (static),
or every float op not blocked (fp16). Graph input/output names and element types are preserved
(fp16 keeps io types). Outputs are approximated; the pipeline reports cosine/rel-L2 drift and the
recipe's verify.min_cosine bounds it.

Defaults follow what measured fast on x86 (README's benchmarks): per-channel int8 weights,
QUInt8 activations for static QDQ (S8S8 activations run ~10x slower on x86 and are refused unless
asked for), and dynamic quantization of MatMul/Gemm only (dynamic Conv is ~4x slower than fp32).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
import psutil
from pydantic import Field

from optimizer_cli.analysis.graph import name_of, op_counts
from optimizer_cli.data import Dataset, shape_mix, shape_text
from optimizer_cli.errors import UserInputError, VerificationError, first_line
from optimizer_cli.passes._graph import is_large, new_initializer, replace_model_contents
from optimizer_cli.passes._tools import load_tool_output, tool_working_directory, write_for_tool
from optimizer_cli.passes.base import (
    COMPUTE_OPS,
    Exactness,
    ModelTraits,
    OptimizationPass,
    PassConfig,
    RecipeContext,
    SearchDimension,
)
from optimizer_cli.runtime.cpu import cpu_isa, is_x86, u8s8_saturates

PER_CHANNEL_MIN_OPSET = 13
# onnxruntime's IntegerOps registry (Attention, Conv, EmbedLayerNormalization, Gather, LSTM, MatMul, Transpose)
# without Conv, which runs ~4x slower than fp32 when quantized dynamically, and Transpose, which moves data
# and computes nothing; Gemm is asked for too (versions whose registry lacks it ignore it).
DYNAMIC_DEFAULT_OPS = ["MatMul", "Gemm", "Attention", "LSTM", "Gather", "EmbedLayerNormalization"]

QUANT_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "MatMulNBits",
    "QAttention",
    "DynamicQuantizeLSTM",
    "QGemm",
    "QEmbedLayerNormalization",
}


def already_quantized(counts: Counter[str]) -> dict[str, int]:
    """Quantization ops already in a graph (integer kernels, QLinear*, Q/DQ pairs), by op type."""
    return {op: n for op, n in sorted(counts.items()) if n and (op in QUANT_OPS or op.startswith("QLinear"))}


def _flatten_gemm_biases(model: ir.Model) -> int:
    """Give Gemm a 1-D bias where it has a constant [1, N] one; returns how many were changed.

    ORT's static QDQ quantizer adjusts per-channel weight scales with `abs(bias[i])` per output
    channel, assuming a 1-D bias: a [1, N] bias (MatMul+Add fused into Gemm from tf2onnx/jax2tf
    exports, e.g. magika) dies with numpy's "truth value of an array ... is ambiguous". Gemm's C
    broadcasts to [M, N] either way, so [N] is the same bias.
    """
    graph = model.graph
    changed = 0
    for node in graph:
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 3:
            continue
        bias = node.inputs[2]
        if bias is None or bias.const_value is None or not bias.is_initializer() or bias.is_graph_input():
            continue
        array = bias.const_value.numpy()
        if array.ndim != 2 or array.shape[0] != 1:
            continue
        node.replace_input_with(2, new_initializer(graph, f"{bias.name}_1d", array.reshape(-1)))
        if not bias.uses() and not bias.is_graph_output():
            graph.initializers.pop(name_of(bias))
        changed += 1
    return changed


# Element types a quantizer lowers float weights or activations to.
_LOWERED = {
    ir.DataType.INT8,
    ir.DataType.UINT8,
    ir.DataType.INT4,
    ir.DataType.UINT4,
    ir.DataType.FLOAT16,
}


def exclusion_aliases(model: ir.Model, exclude: set[str], mode: str) -> dict[str, set[str]]:
    """The names each excluded node may carry when onnxruntime's tool matches `nodes_to_exclude`: dynamic
    mode first rewrites every Gemm (alpha = beta = 1, no transA) as MatMul '<name>_MatMul' + Add '<name>_Add'
    and matches the MatMul's name, so excluding the Gemm's own name alone excluded nothing."""
    aliases = {name: {name} for name in exclude}
    if mode == "dynamic":
        for node in model.graph:
            if node.name in aliases and node.op_type == "Gemm":
                aliases[node.name].add(f"{node.name}_MatMul")
    return aliases


def _lowered_types(node: ir.Node) -> set[ir.DataType]:
    return {v.dtype for v in node.inputs if v is not None and v.dtype in _LOWERED}


def _computes_in_float(node: ir.Node, lowered_before: set[ir.DataType]) -> bool:
    """No quantized kernel, no dequantized weight and no input lowered to a type it did not have before."""
    if node.op_type in QUANT_OPS:
        return False
    for value in node.inputs:
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type == "DequantizeLinear":
            data = producer.inputs[0]
            if data is not None and data.const_value is not None:
                return False
    return _lowered_types(node) <= lowered_before


def unshare_excluded_constants(model: ir.Model, exclude: set[str]) -> int:
    """Give each excluded node its own copy of every initializer it shares with other nodes; how many copies.

    onnxruntime quantizes a tensor, not a node's use of it: a constant shared by an excluded node and a
    quantized one (a hard-swish's `3`, a tied weight) is rewired to its dequantized form for every consumer,
    the excluded node included, which then no longer computes in float. A private copy keeps it out of reach."""
    graph = model.graph
    copies = 0
    for node in graph:
        if node.name not in exclude:
            continue
        for index, value in enumerate(node.inputs):
            if value is None or value.const_value is None or value.name not in graph.initializers:
                continue
            if len(value.uses()) < 2:
                continue
            copy = new_initializer(graph, f"{value.name}_float", value.const_value.numpy(), like=value.const_value)
            node.replace_input_with(index, copy)
            copies += 1
    return copies


def quantized_exclusions(
    model: ir.Model, aliases: dict[str, set[str]], lowered_before: dict[str, set[ir.DataType]]
) -> list[str]:
    """Excluded nodes the output graph does not compute in float: none of the names they may carry is a
    node that computes in float."""
    by_name = {node.name: node for node in model.graph if node.name}
    return sorted(
        name
        for name, names in aliases.items()
        if not any(n in by_name and _computes_in_float(by_name[n], lowered_before[name]) for n in names)
    )


class QuantizeConfig(PassConfig):
    type: Literal["quantize"] = "quantize"
    mode: Literal["dynamic", "static", "fp16", "weight_only"] = Field(
        "dynamic",
        description="dynamic: int8 weights, activations at run time; static: int8 QDQ from calibration; "
        "fp16: float16 weights and compute; weight_only: 4/8-bit MatMul weights.",
    )
    per_channel: bool = Field(True, description="One weight scale per output channel instead of per tensor.")
    # auto: 7-bit weights where this CPU's u8*s8 kernels saturate (x86 without VNNI), full 8-bit elsewhere.
    reduce_range: bool | Literal["auto"] = Field(
        "auto", description="7-bit weights (auto: where this CPU's u8*s8 kernels saturate)."
    )
    op_types: list[str] | None = Field(None, description="Op types to quantize (null: the mode's defaults).")
    exclude_nodes: list[str] = Field([], description="Node names left in float.")
    exclude_op_types: list[str] = Field([], description="Op types left in float.")
    # static
    calibration_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="static: how activation ranges are calibrated."
    )
    percentile: float = Field(99.999, gt=0, le=100, description="static, percentile method: range percentile.")
    calibration_samples: int = Field(64, ge=1, description="static: calibration samples used.")
    activation_type: Literal["uint8", "int8"] = Field("uint8", description="static: activation integer type.")
    weight_type: Literal["int8", "uint8"] = Field("int8", description="Weight integer type.")
    allow_s8s8: bool = Field(False, description="static: allow int8 activations on x86 (slower than fp32 there).")
    preprocess: bool = Field(True, description="static: run onnxruntime's quantization pre-processing first.")
    # weight_only
    bits: Literal[4, 8] = Field(4, description="weight_only: bits per weight.")
    # MatMulNBits wants a power of two >= 16.
    block_size: int = Field(32, ge=16, description="weight_only: weights per scale (a power of two >= 16).")
    symmetric: bool = Field(True, description="weight_only: symmetric (no zero point).")
    accuracy_level: int | None = Field(
        4, ge=0, le=4, description="weight_only: MatMulNBits compute type (0: unset, 1 fp32 .. 4 int8)."
    )
    # Large models: onnxruntime's tools hold the whole model in one protobuf (3x the model in memory; fp16
    # fails past 2 GB).
    per_tensor: bool | Literal["auto"] = Field(
        "auto",
        description="dynamic/fp16/weight_only: rewrite the graph weight by weight in bounded memory (dynamic: "
        "MatMul and Gather only) instead of through onnxruntime's whole-model tools; auto: when the weights "
        "exceed 1.8 GB.",
    )


class _FeedReader:
    """CalibrationDataReader over our Dataset. onnxruntime calls get_next until None; with the extra option
    CalibStridedMinMax it first calls set_range for each chunk of `len(reader)` samples (calibrate_in_chunks)."""

    def __init__(self, data: Dataset, limit: int, input_names: set[str]) -> None:
        self._feeds = [{k: v for k, v in f.items() if k in input_names} for f in data.feeds[:limit]]
        self._pos, self._end = 0, len(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)

    def get_next(self) -> dict | None:
        if self._pos >= self._end:
            return None
        self._pos += 1
        return self._feeds[self._pos - 1]

    def set_range(self, start_index: int, end_index: int) -> None:
        self._pos, self._end = start_index, min(end_index, len(self._feeds))

    def rewind(self) -> None:
        self._pos, self._end = 0, len(self._feeds)


def activation_bytes(model: ir.Model, feed: dict[str, np.ndarray]) -> int | None:
    """Bytes of every float tensor one inference on `feed` computes (what a calibrator keeps per sample), from
    shape inference with the inputs fixed to the feed's shapes; None where the model is too large to infer
    in memory. Tensors whose shape stays unknown are not counted."""
    if is_large(model):
        return None
    proto = ir.serde.serialize_model(model)
    for value in proto.graph.input:
        if value.name in feed:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in feed[value.name].shape:
                dims.add().dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception:  # shape inference is a help: without it the calibration is chunked as for a large model
        return None
    total = 0
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        tensor = info.type.tensor_type
        dtype = ir.DataType(tensor.elem_type)
        if not dtype.is_floating_point():
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tensor.shape.dim]
        if tensor.HasField("shape") and all(d > 0 for d in dims):
            total += int(np.prod(dims) * dtype.itemsize)
    return total


# onnxruntime's histogram calibrators hold every sample's intermediate tensors at once and copy them again to
# stack them (PP-OCRv4 det at 736x736: 0.9 GB a sample, 32 samples ran a 24 GB machine out of memory): a
# fraction of the free memory is what one chunk of samples may take.
CALIBRATION_MEMORY_SHARE = 0.25
CALIBRATION_COPIES = 3


def calibration_chunk(samples: int, per_sample: int | None, free_bytes: int) -> int:
    """How many samples onnxruntime calibrates at once: all of them when their tensors fit the share of free
    memory, else the largest divisor of `samples` that fits (onnxruntime needs equal chunks), at least 1. An
    unknown size (a model too large to infer) calibrates one sample at a time. Only the histogram methods are
    chunked: onnxruntime merges their histograms chunk by chunk, widening the first chunk's bins as the range
    grows, so the result differs a little from one pass over every sample (and small chunks cost more bins)."""
    if per_sample is None:
        return 1
    fits = int(free_bytes * CALIBRATION_MEMORY_SHARE // max(1, per_sample * CALIBRATION_COPIES))
    if fits >= samples:
        return samples
    return max([d for d in range(1, max(1, fits) + 1) if samples % d == 0])


def _check_histogram_shapes(cfg: QuantizeConfig, calibration: Dataset) -> None:
    """onnxruntime's entropy/percentile calibrators stack every sample's activations into one array, which
    fails on samples of different shapes (minmax reduces each sample on its own): say so, naming the mix."""
    if cfg.calibration_method == "minmax":
        return
    mix = shape_mix(calibration.feeds[: cfg.calibration_samples])
    if len(mix) > 1:
        shapes = ", ".join(f"{shape_text(shape)} x{n}" for shape, n in mix[:4]) + (", ..." if len(mix) > 4 else "")
        raise UserInputError(
            f"calibration_method={cfg.calibration_method} needs calibration samples of one shape (onnxruntime's "
            f"histogram stacks them); {calibration.source} has {len(mix)}: {shapes}. Use calibration_method=minmax "
            "or samples of one shape"
        )


# --- what tune may vary ------------------------------------------------------------------------------

QUANTIZED = ("dynamic", "static")


def _modes(t: ModelTraits) -> list[str]:
    modes: list[str] = ["none"]
    if t.has_dynamic_targets:
        modes.append("dynamic")
    if t.has_static_targets and t.has_calibration:
        modes.append("static")
    if t.ops.get("MatMul", 0) >= 4:  # MatMulNBits pays off on MatMul-heavy models (transformers, MLPs)
        modes.append("weight_only")
    if t.gpu:
        modes.append("fp16")
    return modes


def _static_dimensions(t: ModelTraits) -> list[SearchDimension]:
    methods = ("minmax",) if t.mixed_calibration_shapes else ("minmax", "percentile", "entropy")
    static = (("quantize", ("static",)),)
    dims = [
        SearchDimension("calibration_method", methods, "static activation range calibration", static),
        SearchDimension(
            "static_ops", ("all", "compute"), "all: every op ORT quantizes; compute: Conv/MatMul/Gemm only", static
        ),
    ]
    if t.depthwise_nodes:
        dims.append(SearchDimension("keep_depthwise_float", (False, True), "leave depthwise Convs in float", static))
    # Mixed precision fitted to the goal: the groups the outputs are most sensitive to stay float, as many as
    # a fake-quant simulation on the calibration data says the goal needs (search/sensitivity.py).
    dims.append(
        SearchDimension(
            "keep_float_fit",
            (False, True),
            "keep float the nodes output sensitivity says the fidelity goal needs (static)",
            static,
        )
    )
    return dims


def quantize_dimensions(t: ModelTraits) -> list[SearchDimension]:
    """The quantize mode the model has kernels for, then the knobs of the int8 modes (each suggested only for
    the modes it acts in)."""
    modes = _modes(t)
    dims = [SearchDimension("quantize", tuple(modes), "quantize pass mode (none: no quantization)")]
    if len(modes) == 1:
        return dims
    int8 = (("quantize", QUANTIZED),)
    dims.append(SearchDimension("per_channel", (True, False), "one weight scale per output channel", int8))
    if not t.saturating_cpu:
        # On a CPU whose u8*s8 kernels saturate, auto already is 7-bit: the two values would be one.
        dims.append(SearchDimension("reduce_range", ("auto", True), "7-bit weights", int8))
    if "static" in modes:
        dims += _static_dimensions(t)
    if "static" in modes or "dynamic" in modes:
        # Mixed precision: the k nodes that lose the most fidelity locally (attribution) stay float; up to a
        # half of the quantizable nodes (a detector may need dozens, an MLP one or two).
        quantizable = sum(t.ops.get(op, 0) for op in (*COMPUTE_OPS, "LSTM", "Attention"))
        ks = tuple(k for k in (0, 2, 4, 8, 16, 32, 64) if k <= max(2, quantizable // 2))
        dims.append(
            SearchDimension(
                "keep_float_k",
                ks,
                "k most fidelity-costly nodes kept in float",
                (("quantize", QUANTIZED), ("keep_float_fit", (False, None))),
            )
        )
    if "weight_only" in modes:
        dims.append(SearchDimension("bits", (4, 8), "weight-only bits", (("quantize", ("weight_only",)),)))
    return dims


def kept_float(params: dict[str, Any], ctx: RecipeContext) -> int:
    """How many ranked groups stay float: the fitted count under keep_float_fit, else keep_float_k."""
    if params.get("keep_float_fit"):
        return ctx.fitted_keep.get(str(params.get("quantize")), 0)
    return int(params.get("keep_float_k", 0))


def quantize_step(params: dict[str, Any], ctx: RecipeContext) -> dict[str, Any]:
    """The quantize step of a trial whose `quantize` mode is not none."""
    mode = params["quantize"]
    step: dict[str, Any] = {"type": "quantize", "mode": mode}
    if mode in QUANTIZED:
        step["per_channel"] = params.get("per_channel", True)
        step["reduce_range"] = params.get("reduce_range", "auto")
        excluded: list[str] = []
        for group in ctx.ranked_nodes.get(mode, [])[: kept_float(params, ctx)]:
            excluded.extend(n for n in group if n not in excluded)
        if mode == "static":
            step["calibration_method"] = params.get("calibration_method", "minmax")
            if params.get("static_ops") == "compute":
                step["op_types"] = list(COMPUTE_OPS)
            if params.get("keep_depthwise_float"):
                excluded.extend(n for n in ctx.depthwise_nodes if n not in excluded)
        if excluded:
            step["exclude_nodes"] = excluded
    elif mode == "weight_only":
        step["bits"] = params.get("bits", 4)
    return step


def _fitted_float(params: dict[str, Any]) -> str:
    """The fitted float set in a name: its group count where the caller knows it (0: the fit kept none)."""
    count = params.get("fitted_float")
    if count is None:
        return "float nodes fitted to the goal"
    return (
        "no float nodes: the goal needs none"
        if count == 0
        else f"{count} float group{'s' * (count != 1)} fitted to the goal"
    )


def quantize_summary(params: dict[str, Any]) -> str | None:
    """'static int8 (compute ops, 4 float)', 'weight-only int4', 'fp16'; None unquantized."""
    mode = params.get("quantize", "none")
    if mode in QUANTIZED:
        extra = [
            "per-tensor" if params.get("per_channel") is False else "",
            "7-bit" if params.get("reduce_range") is True else "",
            params.get("calibration_method", "") if params.get("calibration_method", "minmax") != "minmax" else "",
            "compute ops" if params.get("static_ops") == "compute" else "",
            "depthwise float" if params.get("keep_depthwise_float") else "",
            f"{params['keep_float_k']} float" if params.get("keep_float_k") else "",
            _fitted_float(params) if params.get("keep_float_fit") else "",
        ]
        detail = ", ".join(e for e in extra if e)
        return f"{mode} int8" + (f" ({detail})" if detail else "")
    if mode == "weight_only":
        return f"weight-only int{params.get('bits', 4)}"
    if mode == "fp16":
        return "fp16"
    return None


class QuantizePass(OptimizationPass[QuantizeConfig]):
    name = "quantize"
    Config = QuantizeConfig
    exactness = Exactness.APPROXIMATE
    contract = "int8/fp16/int4 via onnxruntime.quantization; io names and types kept; outputs approximated"
    search_knob_defaults = {
        "per_channel": True,
        "reduce_range": "auto",
        "calibration_method": "minmax",
        "static_ops": "all",
        "keep_depthwise_float": False,
    }

    @classmethod
    def search_dimensions(cls, traits: ModelTraits) -> list[SearchDimension]:
        return quantize_dimensions(traits)

    @classmethod
    def recipe_entries(cls, params: dict[str, Any], ctx: RecipeContext) -> list[dict[str, Any]]:
        return [] if params.get("quantize", "none") == "none" else [quantize_step(params, ctx)]

    @classmethod
    def describe_trial(cls, params: dict[str, Any]) -> str | None:
        return quantize_summary(params)

    @classmethod
    def resolved_params(cls, params: dict[str, Any], ctx: RecipeContext) -> dict[str, Any]:
        # A fitted float set is named by the count the fit chose (it may be none: then nothing stays float).
        return {"fitted_float": kept_float(params, ctx)} if params.get("keep_float_fit") else {}

    @classmethod
    def calibration_use(cls, config: QuantizeConfig) -> str | None:
        return "static quantization" if config.mode == "static" else None

    @classmethod
    def host_problems(cls, config: QuantizeConfig) -> list[str]:
        if config.mode == "static" and config.activation_type == "int8" and is_x86() and not config.allow_s8s8:
            return ["activation_type int8 (S8S8) runs slower than fp32 on x86; use uint8 or set allow_s8s8: true"]
        return []

    @classmethod
    def fidelity_advice(cls, config: QuantizeConfig, key: str, excluded_tried: bool) -> str | None:
        tips = [] if excluded_tried else [f"exclude layers with {key}.exclude_nodes"]
        if config.mode in QUANTIZED and not config.per_channel:
            tips.append(f"{key}.per_channel=true")
        if config.mode == "static" and config.calibration_method == "minmax":
            tips.append(f"{key}.calibration_method=percentile (calibration samples of one shape)")
        if config.mode == "static":  # MatMul/Gemm in int8, convolutions kept in float
            tips.append(f"{key}.mode=dynamic")
        return "try " + ", or ".join(tips) if tips else f"this threshold is out of reach for {key} ({config.mode})"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.config
        before = op_counts(model)
        existing = already_quantized(before)
        if existing:
            # ORT's quantizers assume float graphs: on ConvInteger/QDQ models static mode dies with a
            # KeyError on '<tensor>_scale' and the others would stack a second quantization on the first.
            listed = ", ".join(f"{n} {op}" for op, n in existing.items())
            reason = f"the model is already quantized ({listed}): left unchanged"
            self.stats |= {"mode": cfg.mode, "quant_ops": existing, "excluded_nodes": 0}
            return self.refuse(model, reason)
        exclude = set(cfg.exclude_nodes)
        if cfg.exclude_op_types:
            exclude |= {n.name for n in model.graph if n.op_type in cfg.exclude_op_types and n.name}
        unknown = set(cfg.exclude_nodes) - {n.name for n in model.graph}
        if unknown:
            raise UserInputError(f"quantize: exclude_nodes not in the model: {', '.join(sorted(unknown))}")
        # What the exclusion is checked against once the graph is rewritten (_finish).
        self._aliases = exclusion_aliases(model, exclude, cfg.mode)
        self._lowered_before = {n.name: _lowered_types(n) for n in model.graph if n.name in exclude}
        if cfg.mode != "static" and (cfg.per_tensor is True or (cfg.per_tensor == "auto" and is_large(model))):
            from optimizer_cli.passes import _per_tensor as per_tensor

            if cfg.mode == "dynamic" and per_tensor.opset(model) < per_tensor.DYNAMIC_MIN_OPSET:
                reason = (
                    f"per-tensor dynamic int8 needs opset >= {per_tensor.DYNAMIC_MIN_OPSET} (DynamicQuantizeLinear)"
                )
                return self.refuse(model, f"{reason}; this model is opset {per_tensor.opset(model)}")
            copies = unshare_excluded_constants(model, exclude)
            if copies:
                self.stats["constants_unshared"] = copies
            self._per_tensor(model, cfg, exclude)
            return self._finish(model, before)
        with (
            tempfile.TemporaryDirectory(prefix="optimize-quant-", dir=self.ctx.tmp_dir) as tmp,
            tool_working_directory(Path(tmp)) as tmp_dir,
        ):
            flattened = _flatten_gemm_biases(model) if cfg.mode == "static" else 0
            if flattened:
                self.stats["gemm_biases_flattened"] = flattened
            src = write_for_tool(model, tmp_dir)
            out = tmp_dir / "quantized.onnx"
            large = is_large(model)
            if cfg.per_channel and cfg.mode in ("dynamic", "static"):
                src = self._ensure_opset(src, PER_CHANNEL_MIN_OPSET, large)
            src = self._unshared(src, tmp_dir, "unshared.onnx")  # (the model itself stays as it is)
            names = sorted({n for aliases in self._aliases.values() for n in aliases})
            if cfg.mode == "dynamic":
                self._dynamic(src, out, cfg, names, large, self._reduce_range(cfg))
            elif cfg.mode == "static":
                self._static(model, src, out, cfg, large, tmp_dir, self._reduce_range(cfg))
            elif cfg.mode == "fp16":
                self._fp16(src, out, cfg, names, large)
            else:
                self._weight_only(src, out, cfg, names, large)
            result = load_tool_output(out)
            # float16 conversion appends its Casts at the end of the node list.
            common.TopologicalSortPass()(result)
            if cfg.mode == "fp16" or already_quantized(op_counts(result)):
                replace_model_contents(model, result)
            else:
                # ORT rewrites even when it quantizes nothing (e.g. Gemm -> transposed MatMul + Add in If
                # branches it then does not enter): keep the model as it was.
                self.stats["nothing_quantized"] = "no op was quantized: the model is left as it was"
        return self._finish(model, before, changed=flattened > 0)

    def _finish(self, model: ir.Model, before: Counter[str], changed: bool = False) -> ir.passes.PassResult:
        """Stats of what the model now holds; modified when its op counts moved or `changed` says so."""
        cfg = self.config
        quantized = quantized_exclusions(model, self._aliases, self._lowered_before)
        if quantized:  # a tool that renames nodes before matching nodes_to_exclude; never report it as excluded
            raise VerificationError(
                f"quantize ({cfg.mode}): exclude_nodes {', '.join(quantized)} were quantized anyway (the "
                "quantizer renamed or fused them before matching the exclusion)"
            )
        # Read from the output graph: every excluded node computes in float there.
        self.stats["excluded_nodes"] = len(self._aliases)
        after = op_counts(model)
        self.stats |= {"mode": cfg.mode, "quant_ops": {op: after[op] for op in sorted(QUANT_OPS) if after.get(op)}}
        if cfg.mode == "fp16":
            self.stats["casts_added"] = after.get("Cast", 0) - before.get("Cast", 0)
        return ir.passes.PassResult(model, after != before or changed)

    def _per_tensor(self, model: ir.Model, cfg: QuantizeConfig, exclude: set[str]) -> None:
        """The bounded-memory rewrite (passes/_per_tensor.py), in onnxruntime's operator formats."""
        from optimizer_cli.passes import _per_tensor as per_tensor

        progress = self.ctx.progress
        self.stats["engine"] = "per tensor (bounded memory)"
        if cfg.mode == "dynamic":
            op_types = set(cfg.op_types or DYNAMIC_DEFAULT_OPS)
            left = per_tensor.unsupported_ops(model, op_types)
            if left:
                self.stats["left_float"] = left
                self.ctx.logger.warning(
                    "quantize: the per-tensor path quantizes MatMul and Gather; left in float: %s",
                    ", ".join(f"{n} {op}" for op, n in left.items()),
                )
            per_tensor.quantize_dynamic_per_tensor(
                model,
                op_types=op_types,
                per_channel=cfg.per_channel,
                reduce_range=self._reduce_range(cfg),
                weight_type=cfg.weight_type,
                exclude=exclude,
                progress=progress,
            )
        elif cfg.mode == "weight_only":
            per_tensor.quantize_weight_only_per_tensor(
                model,
                bits=cfg.bits,
                block_size=cfg.block_size,
                symmetric=cfg.symmetric,
                accuracy_level=cfg.accuracy_level,
                exclude=exclude,
                progress=progress,
            )
        else:
            converted = per_tensor.convert_fp16_per_tensor(
                model,
                op_block_list=cfg.exclude_op_types or None,
                node_block_list=sorted(exclude) or None,
                progress=progress,
            )
            common.TopologicalSortPass()(converted)
            replace_model_contents(model, converted)

    def _reduce_range(self, cfg: QuantizeConfig) -> bool:
        """Resolve `reduce_range: auto` for the CPU this runs on (the one the verification and benchmark use)."""
        if cfg.reduce_range != "auto":
            self.stats["reduce_range"] = f"{'on' if cfg.reduce_range else 'off'} (recipe)"
            return cfg.reduce_range
        isa = cpu_isa()
        u8s8 = cfg.weight_type == "int8" and (cfg.mode == "dynamic" or cfg.activation_type == "uint8")
        if u8s8 and u8s8_saturates(isa):
            self.stats["reduce_range"] = f"on (auto: {isa} CPU, full-range u8*s8 saturates)"
            self.ctx.logger.warning(
                "quantize: 7-bit weights (reduce_range) because this CPU (%s) saturates full-range u8*s8 "
                "products; set reduce_range: false for a model that will only run on VNNI CPUs",
                isa,
            )
            return True
        self.stats["reduce_range"] = f"off (auto: {isa} CPU)"
        return False

    def _ensure_opset(self, src: Path, minimum: int, large: bool) -> Path:
        """Per-channel Q/DQ needs the `axis` attribute of opset 13: convert older models first."""
        proto = onnx.load(str(src), load_external_data=False)
        current = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), minimum)
        if current >= minimum:
            return src
        from onnx import version_converter

        full = onnx.load(str(src))
        try:
            converted = version_converter.convert_version(full, minimum)
        except Exception as exc:  # the converter lacks adapters for some ops
            raise UserInputError(
                f"quantize: per-channel needs opset >= {minimum} and converting this opset-{current} model failed "
                f"({first_line(exc, 120)}); set per_channel: false"
            ) from exc
        target = src.with_name("opset_upgraded.onnx")
        onnx.save(converted, str(target), save_as_external_data=large)
        self.stats["opset"] = f"{current}->{minimum} (for per-channel)"
        return target

    def _dynamic(
        self, src: Path, out: Path, cfg: QuantizeConfig, exclude: list[str], large: bool, reduce_range: bool
    ) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            str(src),
            str(out),
            op_types_to_quantize=cfg.op_types or DYNAMIC_DEFAULT_OPS,
            per_channel=cfg.per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8 if cfg.weight_type == "int8" else QuantType.QUInt8,
            nodes_to_exclude=exclude,
            use_external_data_format=large,
            extra_options={"MatMulConstBOnly": True},
        )

    def _static(
        self,
        model: ir.Model,
        src: Path,
        out: Path,
        cfg: QuantizeConfig,
        large: bool,
        tmp: Path,
        reduce_range: bool,
    ) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        calibration = self.calibration()
        _check_histogram_shapes(cfg, calibration)
        if cfg.preprocess:
            src = self._preprocess(src, tmp, large)
        exclude = sorted({n for aliases in self._aliases.values() for n in aliases})
        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[cfg.calibration_method]
        extra: dict = {"CalibTensorRangeSymmetric": False}
        if cfg.calibration_method == "percentile":
            extra["CalibPercentile"] = cfg.percentile
        names = {name_of(v) for v in model.graph.inputs}
        reader = _FeedReader(calibration, cfg.calibration_samples, names)
        # min/max reduces each tensor inside the calibration graph; the histogram methods keep whole tensors.
        chunk = (
            len(reader)
            if cfg.calibration_method == "minmax"
            else calibration_chunk(
                len(reader), activation_bytes(model, calibration.feeds[0]), psutil.virtual_memory().available
            )
        )
        if chunk < len(reader):  # onnxruntime's option (named for min/max) calibrates chunk by chunk
            extra["CalibStridedMinMax"] = chunk
            self.stats["calibration_chunk"] = (
                f"{chunk} sample{'s' if chunk > 1 else ''} at a time (activations too large for memory)"
            )
        quantize_static(
            str(src),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=cfg.op_types,
            per_channel=cfg.per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8 if cfg.activation_type == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8 if cfg.weight_type == "int8" else QuantType.QUInt8,
            nodes_to_exclude=exclude,
            use_external_data_format=large,
            calibrate_method=method,
            extra_options=extra,
        )
        self.stats["calibration"] = (
            f"{min(len(calibration), cfg.calibration_samples)} samples from {calibration.source}"
        )

    def _preprocess(self, src: Path, tmp: Path, large: bool) -> Path:
        """ORT's recommended pre-processing (shape inference + basic fusions); skipped if it fails."""
        from onnxruntime.quantization.shape_inference import quant_pre_process

        target = tmp / "preprocessed.onnx"
        try:
            quant_pre_process(str(src), str(target), save_as_external_data=large)
        except Exception as exc:  # symbolic shape inference refuses some graphs; quantize without it
            self.stats["preprocess"] = f"skipped: {first_line(exc, 80)}"
            return src
        # Its fusions rename what they fuse ('<MatMul name>/MatMulAddFusion' for MatMul + Add): an excluded
        # node must stay excluded under its new name, or the pre-processing is not used.
        before = {n.name for n in onnx.load(str(src), load_external_data=False).graph.node}
        after = {n.name for n in onnx.load(str(target), load_external_data=False).graph.node}
        lost = []
        for name, names in self._aliases.items():
            if name not in after:
                fused = {n for n in after - before if n.startswith(f"{name}/")}
                names |= fused
                if not fused:
                    lost.append(name)
        if lost:
            self.stats["preprocess"] = f"skipped: it fuses excluded node(s) away ({', '.join(sorted(lost)[:3])})"
            for names in self._aliases.values():
                names -= after - before
            return src
        # Its constant sharing merges equal constants again, the private copies of excluded nodes included.
        return self._unshared(target, tmp, "preprocessed-unshared.onnx")

    def _unshared(self, src: Path, tmp: Path, name: str) -> Path:
        """`src` with each excluded node's shared constants copied (a new file `name`), or `src` if none are."""
        names = {n for aliases in self._aliases.values() for n in aliases}
        if not names:
            return src
        model = ir.load(src)
        copies = unshare_excluded_constants(model, names)
        if not copies:
            return src
        self.stats["constants_unshared"] = copies
        return write_for_tool(model, tmp, name)

    def _fp16(self, src: Path, out: Path, cfg: QuantizeConfig, exclude: list[str], large: bool) -> None:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        proto = onnx.load(str(src))
        converted = convert_float_to_float16(
            proto,
            keep_io_types=True,
            op_block_list=cfg.exclude_op_types or None,
            node_block_list=exclude or None,
        )
        onnx.save(converted, str(out), save_as_external_data=large)

    def _weight_only(self, src: Path, out: Path, cfg: QuantizeConfig, exclude: list[str], large: bool) -> None:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(src)),
            bits=cfg.bits,
            block_size=cfg.block_size,
            is_symmetric=cfg.symmetric,
            accuracy_level=cfg.accuracy_level,
            nodes_to_exclude=exclude,
            op_types_to_quantize=tuple(cfg.op_types) if cfg.op_types else None,
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=large)
