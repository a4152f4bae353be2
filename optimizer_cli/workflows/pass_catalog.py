"""`optimize passes` as a library call: every registered pass's contract, options and what tune may vary in it.

The document returned is exactly `optimize passes --json`'s (less the schema_version the CLI puts first);
report/listing.py renders it as text.
"""

from __future__ import annotations

from typing import Any

from optimizer_cli.passes import PASS_REGISTRY, PLUGIN_PROBLEMS, OptimizationPass
from optimizer_cli.passes.base import COMPUTE_OPS, DYNAMIC_TARGETS, ModelTraits
from optimizer_cli.recipe import pass_info
from optimizer_cli.search.space import TRANSFORMER_MARKERS


def pass_catalog(name: str | None = None) -> dict[str, Any]:
    """One pass in detail (`name`; an unknown one is a UserInputError with a suggestion), or every registered
    pass with the plugin passes that could not be registered."""
    if name is not None:
        return _entry(name)
    return {"passes": [_entry(n) for n in sorted(PASS_REGISTRY)], "plugin_problems": list(PLUGIN_PROBLEMS)}


def _entry(name: str) -> dict[str, Any]:
    info = pass_info(name)  # checks the name first
    searched, opt_in = tune_dimension_names(PASS_REGISTRY[name])
    return {**info, "tune_dimensions": searched, "tune_opt_in_dimensions": opt_in}


def tune_dimension_names(cls: type[OptimizationPass]) -> tuple[list[str], list[str]]:
    """The dimensions `optimize tune` may vary in this pass: those it declares on a model that gives every
    shipped pass something to act on (the most a pass declares: on a real model tune keeps only those that
    apply), then those searched only where a space file names them."""
    searched = [d.name for d in cls.search_dimensions(_traits_of_everything())]
    opt_in = [d.name for d in cls.opt_in_dimensions()]
    return searched, opt_in


def _traits_of_everything() -> ModelTraits:
    """A model with every kind of work a shipped pass looks for (quantizable ops, prunable and factorizable
    weights, an attention mask, multi-head attentions, residual blocks, symbolic inputs, an integer input the
    data holds constant), calibration data, one evaluation shape and a GPU target on a CPU whose int8 kernels do
    not saturate: no declared dimension is left out for lack of something to act on."""
    ops = (*COMPUTE_OPS, *DYNAMIC_TARGETS, *TRANSFORMER_MARKERS, "Softmax")
    return ModelTraits(
        ops=dict.fromkeys(ops, 64),
        depthwise_nodes=["depthwise_conv"],
        prunable_groups=64,
        factorizable=64,
        mask_input="attention_mask",
        transformer=True,
        has_calibration=True,
        mixed_calibration_shapes=False,
        gpu=True,
        saturating_cpu=False,
        residual_blocks=64,
        head_attentions=64,
        symbolic_inputs=True,
        one_evaluation_shape=True,
        constant_config_inputs=("sample_rate",),
    )
