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

Each pass declares its own dimensions (`OptimizationPass.search_dimensions`, read from the `ModelTraits`
computed here), registered plugins included; this module orders them and adds the engine's settings.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx_ir as ir

from optimizer_cli.analysis.graph import op_counts
from optimizer_cli.errors import UserInputError
from optimizer_cli.passes import PASS_REGISTRY, OptimizationPass
from optimizer_cli.passes._graph import is_symbolic_dim
from optimizer_cli.passes.base import ModelTraits, SearchDimension

# Each pass declares its own dimensions (passes/*.py, `search_dimensions`); the old names stay importable here.
Dimension = SearchDimension
TRANSFORMER_MARKERS = ("LayerNormalization", "SkipLayerNormalization", "Attention", "MultiHeadAttention")
# Where the engine's dimensions enter the space, among the passes' (see SPACE_ORDER).
ENGINE = "<engine>"
# Every registered pass an order does not name (plugins, in registration order).
OTHER_PASSES = "*"
# The order the dimensions are suggested in. A seeded sampler draws in this order, so it stays as it was (the
# same seed proposes the same trials); static_shapes joined the space after the engine's knobs and stays there,
# freeze_inputs after it.
SPACE_ORDER = (
    "quantize",
    "prune",
    "factorize",
    "drop_layers",
    "prune_heads",
    "trim_padding",
    "fuse",
    OTHER_PASSES,
    ENGINE,
    "static_shapes",
    "freeze_inputs",
)


def ordered_passes(order: tuple[str, ...]) -> list[str | type[OptimizationPass]]:
    """`order` with its pass names resolved to the registered classes and OTHER_PASSES expanded to every
    registered pass it does not name; markers (ENGINE) stay as they are."""
    named = set(order)
    out: list[str | type[OptimizationPass]] = []
    for item in order:
        if item == OTHER_PASSES:
            out += [cls for name, cls in PASS_REGISTRY.items() if name not in named]
        elif item in PASS_REGISTRY:
            out.append(PASS_REGISTRY[item])
        else:
            out.append(item)
    return out


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


def _symbolic_inputs(model: ir.Model) -> bool:
    """Whether any graph input has a dim that is not a fixed size."""
    return any(
        v.shape is not None and any(is_symbolic_dim(d) for d in v.shape.dims)
        for v in model.graph.inputs
        if v.name not in model.graph.initializers
    )


def model_traits(
    model: ir.Model,
    *,
    has_calibration: bool,
    mixed_calibration_shapes: bool,
    gpu: bool,
    saturating_cpu: bool,
    one_evaluation_shape: bool = False,
    constant_config_inputs: tuple[str, ...] = (),
) -> ModelTraits:
    """The traits of `model` the passes derive their dimensions from; the keywords are what the run adds (its
    data and targets, this CPU)."""
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
        symbolic_inputs=_symbolic_inputs(model),
        one_evaluation_shape=one_evaluation_shape,
        constant_config_inputs=constant_config_inputs,
    )


# The engine's settings: not passes, they are the recipe's `session` section.
ENGINE_DIMENSIONS = [Dimension("opt_level", ("all", "extended"), "onnxruntime graph optimization level")]


def fewer_threads_dimension() -> Dimension:
    """The optimized model on one intra-op thread instead of --threads (null): thread hand-offs cost more than
    they give on a model of a millisecond or two (PP-OCR cls on a 2-core Xeon: 1.5 ms on 2 threads, 1.1 ms on
    1). Searched only when --threads is above 1; never more threads than the original gets."""
    return Dimension("threads", (None, 1), "intra-op threads of the optimized model (null: --threads)")


def default_space(t: ModelTraits) -> list[Dimension]:
    """Every registered pass's dimensions for a model with these traits, and the engine's, in SPACE_ORDER."""
    dims: list[Dimension] = []
    for item in ordered_passes(SPACE_ORDER):
        if item == ENGINE:
            dims += ENGINE_DIMENSIONS
        elif not isinstance(item, str):
            dims += item.search_dimensions(t)
    return dims


# Keys a space file may name that the default space leaves out (they rarely pay off, but a user may ask).
EXTRA_DIMENSIONS = {
    "mem_pattern": Dimension("mem_pattern", (True, False), "onnxruntime memory pattern optimization"),
    # Parallel mode adds an inter-op pool beside the intra-op one: on few cores it oversubscribes them, and its
    # spinning threads disturb whatever is timed next (measured: final-timing intervals 5x wider).
    "execution_mode": Dimension("execution_mode", ("sequential", "parallel"), "onnxruntime execution mode"),
}


def extra_dimensions() -> dict[str, Dimension]:
    """What a space file may add to the default space: the engine's extras and the passes' opt-in dimensions."""
    extras = dict(EXTRA_DIMENSIONS)
    for item in ordered_passes(SPACE_ORDER):
        if not isinstance(item, str):
            extras |= {d.name: d for d in item.opt_in_dimensions()}
    return extras


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
    extras = extra_dimensions()
    out = list(dims)
    for name, value in spec.items():
        choices = _as_choices(name, value)
        known = by_name.get(name) or extras.get(name)
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
        problems = [p for cls in PASS_REGISTRY.values() for p in cls.search_problems(name, choices)]
        if problems:
            raise UserInputError(f"space: {problems[0]}", source)
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
