"""Issue 23: each pass declares what `optimize tune` may vary in it (`search_dimensions`), the recipe entries a
trial's parameters give (`recipe_entries`) and its part of the candidate's name (`describe_trial`); the space,
the recipes and the names are assembled from those declarations, for shipped and registered passes alike."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import onnx_ir as ir
import pytest
from pydantic import Field

from optimizer_cli.errors import UserInputError
from optimizer_cli.model_io import load_model
from optimizer_cli.passes import PASS_REGISTRY, OptimizationPass, PassConfig, register_pass, unregister_pass
from optimizer_cli.passes.base import ModelTraits, RecipeContext, SearchDimension
from optimizer_cli.pipeline import normalize
from optimizer_cli.recipe import Recipe
from optimizer_cli.search.candidates import recipe_for, summary
from optimizer_cli.search.space import Dimension, default_space, limit_space, model_traits, suggest
from optimizer_cli.search.tune import complexity

INT8 = (("quantize", ("dynamic", "static")),)
STATIC = (("quantize", ("static",)),)
KEEP_K = (("quantize", ("dynamic", "static")), ("keep_float_fit", (False, None)))


def _space(path: Path) -> list[tuple[str, tuple[Any, ...], tuple[Any, ...]]]:
    model = load_model(path)
    normalize(model)
    traits = model_traits(model, has_calibration=True, mixed_calibration_shapes=False, gpu=False, saturating_cpu=False)
    return [(d.name, d.choices, d.when) for d in default_space(traits)]


def test_the_example_models_spaces_are_what_tune_searched_before_the_move(examples_dir: Path) -> None:
    """Names, values, conditions and order as they were when search/space.py held them: tune.json readers and
    resumed studies key on the names, and a seeded sampler draws in this order."""
    quantize_knobs = [
        ("per_channel", (True, False), INT8),
        ("reduce_range", ("auto", True), INT8),
        ("calibration_method", ("minmax", "percentile", "entropy"), STATIC),
        ("static_ops", ("all", "compute"), STATIC),
    ]
    assert _space(examples_dir / "digits_cnn.onnx") == [
        ("quantize", ("none", "dynamic", "static"), ()),
        *quantize_knobs,
        ("keep_depthwise_float", (False, True), STATIC),
        ("keep_float_fit", (False, True), STATIC),
        ("keep_float_k", (0, 2), KEEP_K),
        ("prune_sparsity", (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), ()),
        ("opt_level", ("all", "extended"), ()),
    ]
    assert _space(examples_dir / "digits_mlp.onnx") == [
        ("quantize", ("none", "dynamic", "static"), ()),
        *quantize_knobs,
        ("keep_float_fit", (False, True), STATIC),
        ("keep_float_k", (0, 2), KEEP_K),
        ("factorize_energy", (0.0, 0.99, 0.95, 0.9), ()),
        ("opt_level", ("all", "extended"), ()),
    ]


def test_recipes_and_candidate_names_are_what_tune_built_before_the_move() -> None:
    ctx = RecipeContext("c.npz", {"batch": 1}, 2, "cpu", ["dw"], {"static": [["a", "b"], ["c"]]}, {"static": 1})
    every_pass = {
        "quantize": "static",
        "per_channel": False,
        "reduce_range": True,
        "calibration_method": "entropy",
        "static_ops": "compute",
        "keep_depthwise_float": True,
        "keep_float_fit": False,
        "keep_float_k": 2,
        "prune_sparsity": 0.3,
        "factorize_energy": 0.95,
        "drop_layers": 0.97,
        "prune_heads": 0.125,
        "trim_padding": True,
        "fuse_transformer": True,
        "static_shapes": True,
        "distill": True,
        "opt_level": "extended",
    }
    assert recipe_for(every_pass, ctx)["passes"] == [
        {"type": "cleanup"},
        {"type": "trim_padding"},
        {"type": "drop_layers", "min_cosine": 0.97},
        {"type": "prune_heads", "sparsity": 0.125},
        {"type": "prune", "method": "structured", "sparsity": 0.3},
        {"type": "reconstruct"},
        {"type": "factorize", "energy": 0.95},
        {"type": "reconstruct"},
        {"type": "distill"},
        {"type": "fuse", "transformer": "bert"},
        {
            "type": "quantize",
            "mode": "static",
            "per_channel": False,
            "reduce_range": True,
            "calibration_method": "entropy",
            "op_types": ["Conv", "MatMul", "Gemm"],
            "exclude_nodes": ["a", "b", "c", "dw"],
        },
        {"type": "static_shapes"},
    ]
    assert summary(every_pass) == (
        "trim_padding + drop blocks (cosine >= 0.97) + prune heads 0.125 + prune 0.3 + factorize 0.95 + distill"
        " + bert fusions + static shapes + static int8 (per-tensor, 7-bit, entropy, compute ops, depthwise float,"
        " 2 float) [opt_level=extended]"
    )
    fitted = {"quantize": "static", "keep_float_fit": True}
    assert recipe_for(fitted, ctx)["passes"][-1]["exclude_nodes"] == ["a", "b"]  # the fitted count: one group
    assert summary(fitted) == "static int8 (float nodes fitted to the goal)"
    # Given the context, the name says what the fit chose: the count, or that nothing stays float.
    assert summary(fitted, ctx) == "static int8 (1 float group fitted to the goal)"
    none_needed = RecipeContext("c.npz", {}, 2, "cpu", [], {"static": [["a", "b"]]}, {"static": 0})
    assert "exclude_nodes" not in recipe_for(fitted, none_needed)["passes"][-1]
    assert summary(fitted, none_needed) == "static int8 (no float nodes: the goal needs none)"
    assert recipe_for(fitted, none_needed)["description"].endswith("(no float nodes: the goal needs none)")
    assert recipe_for({"quantize": "weight_only", "bits": 8}, ctx)["passes"] == [
        {"type": "cleanup"},
        {"type": "fuse"},
        {"type": "quantize", "mode": "weight_only", "bits": 8},
    ]
    assert summary({"quantize": "weight_only"}) == "weight-only int4"
    assert summary({"quantize": "none", "prune_sparsity": 0.0}) == "cleanup + fuse"
    # float nodes kept (k=2), passes added (8 switches on), knobs off their defaults (5 quantize knobs + opt_level)
    assert complexity(every_pass) == (2, 8, 6)


def _everything(**changes: Any) -> ModelTraits:
    """Traits of a model every shipped pass has something to act on."""
    traits = ModelTraits(
        ops={"Conv": 4, "MatMul": 8, "Gemm": 1, "Softmax": 2},
        depthwise_nodes=["dw"],
        prunable_groups=3,
        factorizable=2,
        mask_input="attention_mask",
        transformer=True,
        has_calibration=True,
        mixed_calibration_shapes=False,
        gpu=True,
        saturating_cpu=False,
        residual_blocks=4,
        head_attentions=2,
        symbolic_inputs=True,
        one_evaluation_shape=True,
    )
    return dataclasses.replace(traits, **changes)


def test_each_searched_pass_declares_its_own_dimensions() -> None:
    owners = {d.name: name for name, cls in PASS_REGISTRY.items() for d in cls.search_dimensions(_everything())}
    assert {n for n, owner in owners.items() if owner == "quantize"} >= {"quantize", "per_channel", "keep_float_k"}
    assert {owner: n for n, owner in owners.items() if owner != "quantize"} == {
        "prune": "prune_sparsity",
        "factorize": "factorize_energy",
        "drop_layers": "drop_layers",
        "prune_heads": "prune_heads",
        "trim_padding": "trim_padding",
        "fuse": "fuse_transformer",
        "static_shapes": "static_shapes",
    }
    space = [d.name for d in default_space(_everything())]
    assert len(space) == len(set(space)) == len(owners) + 1  # one declaring pass per dimension, and opt_level
    assert space[-2:] == ["opt_level", "static_shapes"]  # the engine's knob, then static_shapes, as before
    assert [d.name for cls in PASS_REGISTRY.values() for d in cls.opt_in_dimensions()] == ["distill"]


@pytest.mark.parametrize(
    ("changes", "absent"),
    [
        ({"residual_blocks": 1}, "drop_layers"),  # one block: nothing to drop while keeping one
        ({"head_attentions": 0}, "prune_heads"),
        ({"has_calibration": False}, "prune_heads"),  # head importance and block cost are measured on data
        ({"has_calibration": False}, "drop_layers"),
        ({"one_evaluation_shape": False}, "static_shapes"),  # no one shape to fix
        ({"symbolic_inputs": False}, "static_shapes"),
        ({"mask_input": None}, "trim_padding"),
    ],
)
def test_a_pass_joins_the_space_only_where_it_applies(changes: dict[str, Any], absent: str) -> None:
    assert absent in {d.name for d in default_space(_everything())}
    assert absent not in {d.name for d in default_space(_everything(**changes))}


def test_every_declared_value_builds_a_recipe_the_passes_accept() -> None:
    dims = default_space(_everything())
    ctx = RecipeContext("c.npz", {}, 2, "cpu", ["dw"], {"static": [["a"]], "dynamic": [["b"]]}, {"static": 1})
    for dim in dims:
        for choice in dim.choices:
            # The dimension's conditions met, every other dimension at its first value.
            wanted = {dim.name: choice, **{key: values[0] for key, values in dim.when}}
            params = suggest(dims, lambda d, w=wanted: w.get(d.name, d.choices[0]))
            assert params[dim.name] == choice
            Recipe.model_validate(recipe_for(params, ctx))


def test_an_opt_in_dimension_is_refused_where_its_pass_cannot_run(
    examples_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from optimizer_cli.passes import _onnx_torch

    model = load_model(examples_dir / "digits_cnn.onnx")
    dims = default_space(
        model_traits(model, has_calibration=True, mixed_calibration_shapes=False, gpu=False, saturating_cpu=False)
    )
    monkeypatch.setattr(_onnx_torch, "missing_packages", lambda: ["torch"])
    with pytest.raises(UserInputError, match="space: distill needs torch"):
        limit_space(dims, {"distill": [False, True]}, "s.yaml")
    assert [d.name for d in limit_space(dims, {"distill": False}, "s.yaml")][-1] == "distill"  # off: no torch needed


# --- a registered plugin pass -----------------------------------------------------------------------


class ScaleOutputsConfig(PassConfig):
    type: Literal["scale_outputs"] = "scale_outputs"
    factor: float = Field(1.0, gt=0, description="What the outputs are multiplied by.")


class ScaleOutputsPass(OptimizationPass[ScaleOutputsConfig]):
    """A toy plugin that declares one dimension (it leaves the model as it is: only tune's view of it is tested)."""

    name = "scale_outputs"
    Config = ScaleOutputsConfig
    contract = "none: a test pass"
    search_switches = ("scale_factor",)

    @classmethod
    def search_dimensions(cls, traits: ModelTraits) -> list[SearchDimension]:
        if not traits.ops.get("Gemm"):
            return []
        return [SearchDimension("scale_factor", (0.0, 0.5, 2.0), "scale the outputs (0: not)")]

    @classmethod
    def recipe_entries(cls, params: dict[str, Any], ctx: RecipeContext) -> list[dict[str, Any]]:
        factor = params.get("scale_factor") or 0.0
        return [{"type": "scale_outputs", "factor": factor}] if factor else []

    @classmethod
    def describe_trial(cls, params: dict[str, Any]) -> str | None:
        return f"scale {params['scale_factor']:g}" if params.get("scale_factor") else None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, False)


@pytest.fixture()
def scale_outputs() -> Iterator[type[OptimizationPass]]:
    register_pass(ScaleOutputsPass)
    try:
        yield ScaleOutputsPass
    finally:
        unregister_pass(ScaleOutputsPass.name)


def test_a_registered_pass_takes_part_in_tune(
    scale_outputs: type[OptimizationPass], examples_dir: Path, tmp_path: Path
) -> None:
    from optimizer_cli.search.tune import TuneRequest, prepare

    request = TuneRequest(
        model=examples_dir / "digits_cnn.onnx",
        goals=[],
        evaluation=str(examples_dir / "digits_eval.npz"),
        calibration=str(examples_dir / "digits_calib.npz"),
        study_dir=tmp_path,
    )
    dims = prepare(request, lambda _m: None).dims
    names = [d.name for d in dims]
    # After the shipped passes' dimensions, before the engine's.
    assert names.index("prune_sparsity") < names.index("scale_factor") == names.index("opt_level") - 1
    limited = limit_space(dims, {"scale_factor": [0.0, 2.0]}, "s.yaml")
    assert next(d.choices for d in limited if d.name == "scale_factor") == (0.0, 2.0)

    ctx = RecipeContext("c.npz", {}, 2, "cpu")
    params = {"quantize": "dynamic", "prune_sparsity": 0.2, "scale_factor": 2.0}
    recipe = Recipe.model_validate(recipe_for(params, ctx))
    # On the plain graph after the shipped structural passes, before the fusions and the precision.
    assert [p.type for p in recipe.passes] == ["cleanup", "prune", "reconstruct", "scale_outputs", "fuse", "quantize"]
    assert summary(params) == "prune 0.2 + scale 2 + dynamic int8"
    assert complexity(params)[1] == 2  # prune and the plugin: two passes added to the plain recipe

    unregister_pass(scale_outputs.name)
    try:
        assert "scale_factor" not in {d.name for d in prepare(request, lambda _m: None).dims}
        assert [p["type"] for p in recipe_for(params, ctx)["passes"]] == [
            "cleanup",
            "prune",
            "reconstruct",
            "fuse",
            "quantize",
        ]
        assert complexity(params)[1] == 1
    finally:
        register_pass(scale_outputs)  # the fixture unregisters it


def test_a_dimension_is_still_importable_from_the_search_layer() -> None:
    assert Dimension is SearchDimension
