"""Issue 23: `optimize passes` says, per pass, which dimensions `optimize tune` may vary in it, read from the
pass's own declaration (`search_dimensions`, `opt_in_dimensions`), for shipped and registered passes alike."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import onnx_ir as ir
import pytest
from pydantic import Field

from optimizer_cli.model_io import load_model
from optimizer_cli.passes import PASS_REGISTRY, OptimizationPass, PassConfig, register_pass, unregister_pass
from optimizer_cli.passes.base import ModelTraits, SearchDimension
from optimizer_cli.pipeline import normalize
from optimizer_cli.search.space import ENGINE_DIMENSIONS, default_space, model_traits
from optimizer_cli.workflows.pass_catalog import pass_catalog, tune_dimension_names


class BlurConfig(PassConfig):
    type: Literal["blur"] = "blur"
    radius: int = Field(0, ge=0, description="Blur radius in weights.")


class BlurPass(OptimizationPass[BlurConfig]):
    """A toy plugin whose one dimension applies only to models with convolutions and calibration data."""

    name = "blur"
    Config = BlurConfig
    contract = "none: a test pass"

    @classmethod
    def search_dimensions(cls, traits: ModelTraits) -> list[SearchDimension]:
        if not (traits.ops.get("Conv") and traits.has_calibration):
            return []
        return [SearchDimension("blur_radius", (0, 1, 2), "blur the weights (0: not)")]

    @classmethod
    def opt_in_dimensions(cls) -> list[SearchDimension]:
        return [SearchDimension("blur_twice", (False, True), "blur again")]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, False)


@pytest.fixture()
def blur() -> Iterator[type[OptimizationPass]]:
    register_pass(BlurPass)
    try:
        yield BlurPass
    finally:
        unregister_pass(BlurPass.name)


def _passes(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    from optimizer_cli.cli import main

    with pytest.raises(SystemExit) as done:
        main(["passes", *args])
    out, err = capsys.readouterr()
    assert done.value.code == 0, err
    return out


def test_a_registered_plugin_pass_shows_its_declared_dimensions(
    blur: type[OptimizationPass], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    listed = {p["type"]: p for p in json.loads(_passes(["--json"], capsys))["passes"]}
    assert listed["blur"]["tune_dimensions"] == ["blur_radius"]
    assert listed["blur"]["tune_opt_in_dimensions"] == ["blur_twice"]
    one = json.loads(_passes(["blur", "--json"], capsys))
    assert (one["tune_dimensions"], one["tune_opt_in_dimensions"]) == (["blur_radius"], ["blur_twice"])

    text = _passes(["blur"], capsys).splitlines()
    assert text[0].startswith("blur (exact): none: a test pass")
    assert text[1:3] == ["tune may vary: blur_radius", "tune may vary where a --space file names it: blur_twice"]
    cleanup = _passes(["cleanup"], capsys)
    assert "tune may vary" not in cleanup, "a pass that declares nothing says nothing"

    unregister_pass(blur.name)
    try:
        assert "blur" not in {p["type"] for p in pass_catalog()["passes"]}
    finally:
        register_pass(blur)  # the fixture unregisters it


def test_the_shipped_passes_list_what_they_declare() -> None:
    listed = {p["type"]: (p["tune_dimensions"], p["tune_opt_in_dimensions"]) for p in pass_catalog()["passes"]}
    assert listed["prune"] == (["prune_sparsity"], [])
    assert listed["distill"] == ([], ["distill"])
    assert listed["cleanup"] == ([], [])
    # quantize's knobs that need calibration data, depthwise convolutions, MatMul-heavy models or a CPU whose
    # kernels do not saturate are all listed.
    quantize = listed["quantize"][0]
    assert quantize[0] == "quantize"
    assert {"calibration_method", "keep_depthwise_float", "bits", "reduce_range", "keep_float_k"} <= set(quantize)


@pytest.mark.parametrize("model", ["digits_cnn.onnx", "digits_mlp.onnx"])
@pytest.mark.parametrize("gpu", [False, True])
def test_every_dimension_tune_searches_on_a_real_model_is_listed_for_its_pass(
    examples_dir: Path, model: str, gpu: bool
) -> None:
    """The listing reads the declarations on traits that give every pass something to act on: whatever tune
    derives from a real model (here with calibration data, on a CPU or a GPU target) is a part of it."""
    graph = load_model(examples_dir / model)
    normalize(graph)
    traits = model_traits(graph, has_calibration=True, mixed_calibration_shapes=False, gpu=gpu, saturating_cpu=True)
    engine = {d.name for d in ENGINE_DIMENSIONS}
    searched = {d.name for d in default_space(traits)} - engine
    assert searched, "the example models give tune something to search"
    listed = {name for cls in PASS_REGISTRY.values() for name in tune_dimension_names(cls)[0]}
    assert searched <= listed, sorted(searched - listed)


def test_an_unknown_pass_is_refused_with_a_suggestion() -> None:
    from optimizer_cli.errors import UserInputError

    with pytest.raises(UserInputError, match="did you mean 'quantize'"):
        pass_catalog("quantise")
