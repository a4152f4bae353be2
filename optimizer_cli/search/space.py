"""The search space of `optimize tune`: recipe keys as dimensions, derived from the model.

A dimension exists only where the model has something for it to act on (no `prune_sparsity` without a
prunable channel group, no `quantize: static` without calibration data, no `fp16` without a GPU provider),
and its values are ones the pass accepts (each trial's recipe is validated by the passes' pydantic
configs). A space file limits or fixes dimensions:

    quantize: [none, static]     # search only these
    per_channel: true            # fix one value
    prune_sparsity: [0, 0.2, 0.4]

Dimensions that only matter for some values of another (`calibration_method` for static quantization)
are conditional: they are suggested only then, so the sampler never spends trials on a knob that does
nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from optimizer_cli.analysis.graph import op_counts
from optimizer_cli.errors import UserInputError

# Ops whose weights the integer kernels take; the rest of a static QDQ graph is data movement.
COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
DYNAMIC_TARGETS = ("MatMul", "Gemm", "LSTM", "Attention")
TRANSFORMER_MARKERS = ("LayerNormalization", "SkipLayerNormalization", "Attention", "MultiHeadAttention")


@dataclass(frozen=True)
class Dimension:
    name: str
    choices: tuple[Any, ...]
    help: str
    # Suggested only when another dimension has one of these values, e.g. {"quantize": ("static",)}.
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def applies(self, params: dict[str, Any]) -> bool:
        return all(params.get(key) in values for key, values in self.when)


@dataclass
class ModelTraits:
    """What the default space is derived from."""

    ops: dict[str, int]
    depthwise_nodes: list[str]
    prunable_groups: int
    factorizable: int
    mask_input: str | None
    transformer: bool
    has_calibration: bool
    mixed_calibration_shapes: bool
    gpu: bool
    saturating_cpu: bool  # reduce_range=auto already means 7-bit weights here
    notes: list[str] = field(default_factory=list)
    residual_blocks: int = 0  # identity-shortcut blocks drop_layers could remove
    head_attentions: int = 0  # standard multi-head attentions with 2+ heads prune_heads could thin

    @property
    def has_dynamic_targets(self) -> bool:
        return any(self.ops.get(op) for op in DYNAMIC_TARGETS)

    @property
    def has_static_targets(self) -> bool:
        return any(self.ops.get(op) for op in COMPUTE_OPS)


def _depthwise(model: ir.Model) -> list[str]:
    names = []
    for node in model.graph:
        if node.op_type != "Conv":
            continue
        group = node.attributes.get("group")
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        shape = weight.shape if weight is not None else None
        groups = group.as_int() if group is not None else 1
        # Depthwise: one input channel per group (weight [C_out, 1, kh, kw]) and more than one group.
        if groups > 1 and shape is not None and len(shape) == 4 and shape[1] == 1:
            names.append(str(node.name))
    return names


def _factorizable(model: ir.Model, min_size: int = 64) -> int:
    count = 0
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if weight is None or weight.const_value is None or weight.const_value.shape is None:
            continue
        dims = weight.const_value.shape.numpy()  # a constant's shape is concrete
        if len(dims) == 2 and min(dims) >= min_size:
            count += 1
    return count


def _attention_matmul(model: ir.Model) -> bool:
    """A MatMul of two activations (Q x K^T, or scores x V): the mark of attention, unlike a classifier head's
    MatMul with a weight."""
    return any(
        node.op_type == "MatMul" and all(v is not None and v.const_value is None for v in node.inputs[:2])
        for node in model.graph
    )


def _prunable_groups(model: ir.Model) -> int:
    from optimizer_cli.analysis.channel_groups import analyze

    try:
        return len(analyze(model).prunable())
    except Exception:  # the analysis refuses graphs it does not understand: then there is nothing to prune
        return 0


def _residual_blocks(model: ir.Model) -> int:
    from optimizer_cli.passes._graph import infer_shapes
    from optimizer_cli.passes.drop_layers import find_blocks

    infer_shapes(model)  # blocks are matched on shapes (the residual Add must not broadcast)
    return len(find_blocks(model))


def _head_attentions(model: ir.Model) -> int:
    """Attentions prune_heads recognizes (unfused, unshared) with at least two heads: the ones it can thin."""
    from optimizer_cli.passes._graph import infer_shapes
    from optimizer_cli.passes.prune_heads import match_attention

    if not any(n.op_type == "Softmax" for n in model.graph):
        return 0
    infer_shapes(model)  # the head reshapes are read from shapes, as the pass reads them
    found = [match_attention(n) for n in model.graph if n.op_type == "Softmax"]
    return sum(1 for a in found if a is not None and a.heads >= 2)


def _mask_input(model: ir.Model) -> str | None:
    from optimizer_cli.passes.trim_padding import find_mask_input

    try:
        return find_mask_input(model, None).name
    except Exception:  # no attention-mask-like input: trim_padding has nothing to act on
        return None


def model_traits(
    model: ir.Model, *, has_calibration: bool, mixed_calibration_shapes: bool, gpu: bool, saturating_cpu: bool
) -> ModelTraits:
    ops = dict(op_counts(model))
    return ModelTraits(
        ops=ops,
        depthwise_nodes=_depthwise(model),
        prunable_groups=_prunable_groups(model),
        factorizable=_factorizable(model),
        mask_input=_mask_input(model),
        transformer=any(ops.get(op) for op in TRANSFORMER_MARKERS)
        or (bool(ops.get("Softmax")) and _attention_matmul(model)),
        has_calibration=has_calibration,
        mixed_calibration_shapes=mixed_calibration_shapes,
        gpu=gpu,
        saturating_cpu=saturating_cpu,
        residual_blocks=_residual_blocks(model),
        head_attentions=_head_attentions(model),
    )


QUANTIZED = ("dynamic", "static")


def _quantize_dimensions(t: ModelTraits) -> list[Dimension]:
    modes: list[str] = ["none"]
    if t.has_dynamic_targets:
        modes.append("dynamic")
    if t.has_static_targets and t.has_calibration:
        modes.append("static")
    if t.ops.get("MatMul", 0) >= 4:  # MatMulNBits pays off on MatMul-heavy models (transformers, MLPs)
        modes.append("weight_only")
    if t.gpu:
        modes.append("fp16")
    dims = [Dimension("quantize", tuple(modes), "quantize pass mode (none: no quantization)")]
    if len(modes) == 1:
        return dims
    dims.append(
        Dimension("per_channel", (True, False), "one weight scale per output channel", (("quantize", QUANTIZED),))
    )
    if not t.saturating_cpu:
        # On a CPU whose u8*s8 kernels saturate, auto already is 7-bit: the two values would be one.
        dims.append(Dimension("reduce_range", ("auto", True), "7-bit weights", (("quantize", QUANTIZED),)))
    if "static" in modes:
        methods = ("minmax",) if t.mixed_calibration_shapes else ("minmax", "percentile", "entropy")
        static = (("quantize", ("static",)),)
        dims.append(Dimension("calibration_method", methods, "static activation range calibration", static))
        dims.append(
            Dimension(
                "static_ops", ("all", "compute"), "all: every op ORT quantizes; compute: Conv/MatMul/Gemm only", static
            )
        )
        if t.depthwise_nodes:
            dims.append(Dimension("keep_depthwise_float", (False, True), "leave depthwise Convs in float", static))
    if "static" in modes:
        # Mixed precision fitted to the goal: the groups the outputs are most sensitive to stay float, as
        # many as a fake-quant simulation on the calibration data says the goal needs (search/sensitivity.py).
        dims.append(
            Dimension(
                "keep_float_fit",
                (False, True),
                "keep float the nodes output sensitivity says the fidelity goal needs (static)",
                static,
            )
        )
    if "static" in modes or "dynamic" in modes:
        # Mixed precision: the k nodes that lose the most fidelity locally (attribution) stay float; up to a
        # half of the quantizable nodes (a detector may need dozens, an MLP one or two).
        quantizable = sum(t.ops.get(op, 0) for op in (*COMPUTE_OPS, "LSTM", "Attention"))
        ks = tuple(k for k in (0, 2, 4, 8, 16, 32, 64) if k <= max(2, quantizable // 2))
        dims.append(
            Dimension(
                "keep_float_k",
                ks,
                "k most fidelity-costly nodes kept in float",
                (("quantize", QUANTIZED), ("keep_float_fit", (False, None))),
            )
        )
    if "weight_only" in modes:
        dims.append(Dimension("bits", (4, 8), "weight-only bits", (("quantize", ("weight_only",)),)))
    return dims


def default_space(t: ModelTraits) -> list[Dimension]:
    dims = _quantize_dimensions(t)
    if t.prunable_groups and t.has_calibration:
        dims.append(Dimension("prune_sparsity", (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), "structured prune + reconstruct"))
    if t.factorizable and t.has_calibration:
        dims.append(
            Dimension("factorize_energy", (0.0, 0.99, 0.95, 0.9), "low-rank factorization + reconstruct (0: none)")
        )
    if t.residual_blocks >= 2 and t.has_calibration:
        dims.append(
            Dimension(
                "drop_layers",
                (0.0, 0.99, 0.97, 0.95),
                "drop residual blocks, cheapest first, while the calibration cosine stays >= this (0: none)",
            )
        )
    if t.head_attentions and t.has_calibration:
        dims.append(
            Dimension(
                "prune_heads",
                (0.0, 0.125, 0.25),
                "remove this fraction of each attention's heads, least contributing first (0: none)",
            )
        )
    if t.mask_input is not None:
        dims.append(Dimension("trim_padding", (False, True), "slice padded sequences to their last real token"))
    if t.transformer:
        dims.append(Dimension("fuse_transformer", (False, True), "onnxruntime.transformers fusions (bert)"))
    dims.append(Dimension("opt_level", ("all", "extended"), "onnxruntime graph optimization level"))
    return dims


# Keys a space file may name that the default space leaves out (they rarely pay off, but a user may ask).
EXTRA_DIMENSIONS = {
    "mem_pattern": Dimension("mem_pattern", (True, False), "onnxruntime memory pattern optimization"),
    # Parallel mode adds an inter-op pool beside the intra-op one: on few cores it oversubscribes them, and its
    # spinning threads disturb whatever is timed next (measured: final-timing intervals 5x wider).
    "execution_mode": Dimension("execution_mode", ("sequential", "parallel"), "onnxruntime execution mode"),
    # Fine-tuning costs minutes per trial on a CPU: searched only where a space file asks for it.
    "distill": Dimension(
        "distill", (False, True), "fine-tune the compressed model toward the original (the distill extra)"
    ),
}


def _as_choices(name: str, value: Any) -> tuple[Any, ...]:
    if isinstance(value, list):
        if not value:
            raise UserInputError(f"space: '{name}' has no values")
        return tuple(value)
    return (value,)


def limit_space(dims: list[Dimension], spec: dict[str, Any], source: str | Path) -> list[Dimension]:
    """Apply a space file: every named dimension must exist for this model (or be an extra one) and every
    value must be one the model accepts for it."""
    by_name = {d.name: d for d in dims}
    out = list(dims)
    for name, value in spec.items():
        choices = _as_choices(name, value)
        known = by_name.get(name) or EXTRA_DIMENSIONS.get(name)
        if known is None:
            raise UserInputError(
                f"space: unknown or inapplicable dimension '{name}' for this model (its space: {', '.join(by_name)})",
                source,
            )
        refused = [c for c in choices if c not in known.choices]
        if refused:
            allowed = ", ".join(str(c) for c in known.choices)
            raise UserInputError(
                f"space: {name}={refused[0]!r} is not searchable on this model (allowed: {allowed})", source
            )
        if name == "distill" and True in choices:
            from optimizer_cli.passes._onnx_torch import missing_packages

            missing = missing_packages()
            if missing:
                raise UserInputError(
                    f'space: distill needs {" and ".join(missing)}: pip install -e ".[distill]"', source
                )
        limited = Dimension(name, choices, known.help, known.when)
        out = [limited if d.name == name else d for d in out] if name in by_name else [*out, limited]
    return out


def load_space_file(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserInputError(f"cannot read the space file: {exc}", path) from exc
    if not isinstance(data, dict):
        raise UserInputError("a space file is a mapping of dimension -> value or list of values", path)
    return data


def suggest(dims: list[Dimension], choose: Callable[[Dimension], Any]) -> dict[str, Any]:
    """Parameters of one trial: `choose` picks a value for each dimension that applies, in order."""
    params: dict[str, Any] = {}
    for dim in dims:
        if dim.applies(params):
            params[dim.name] = dim.choices[0] if len(dim.choices) == 1 else choose(dim)
    return params


def describe(dims: list[Dimension]) -> dict[str, list[Any]]:
    return {d.name: list(d.choices) for d in dims}
