"""tune searches the run target with the graph: the target is a dimension, the winner is (recipe, target),
its recipe carries the target and reproduces it, and the outputs say how to deploy it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from optimizer_cli.runtime.providers import probe_provider, search_targets
from optimizer_cli.runtime.targets import parse_target
from optimizer_cli.search.candidates import RecipeContext, recipe_for, summary
from optimizer_cli.search.space import Dimension
from optimizer_cli.search.tune import complexity, starting_points
from tests.conftest import run_cli
from tests.test_tune import PRUNE_SPACE, _split_data

# A second engine every host has (the CPU EP with a provider option): a target other than the reference.
OTHER = "cpu:use_arena=0"


def test_bare_providers_stand_for_their_precisions_and_unusable_ones_are_said() -> None:
    usable, unusable = search_targets(["cpu", "openvino", "trt"])
    assert usable[0] == "cpu"
    if probe_provider("openvino").usable:
        assert {"openvino", "openvino:f32"} <= set(usable)
    else:
        assert any(line.startswith("openvino: ") for line in unusable)
        assert not any(u.startswith("openvino") for u in usable)
    if not probe_provider("trt").usable:
        assert sum(line.startswith("trt: ") for line in unusable) == 1  # one line, not one per precision
    assert search_targets(["openvino:f32"])[0] in ([], ["openvino:f32"])  # an explicit precision stays itself


def test_a_candidate_on_another_target_carries_it_in_its_recipe_and_name() -> None:
    ctx = RecipeContext(None, {}, 2, "cpu")
    recipe = recipe_for({"quantize": "none", "target": "openvino:f32"}, ctx)
    assert recipe["runtime"] == {"target": "openvino:f32"}
    assert recipe["benchmark"]["providers"] == ["cpu", "openvino:f32"]
    assert "runtime" not in recipe_for({"quantize": "none", "target": "cpu"}, ctx)
    assert summary({"quantize": "none", "target": "openvino:f32"}) == "cleanup + fuse on openvino:f32"
    assert summary({"quantize": "none", "target": "cpu"}) == "cleanup + fuse"
    # When the timing cannot tell them apart, the CPU EP is the simpler deployment.
    assert complexity({"target": "openvino"}) > complexity({"target": "cpu"})


def test_every_target_is_tried_alone_first() -> None:
    dims = [
        Dimension("target", ("cpu", "openvino", "openvino:f32"), "where"),
        Dimension("quantize", ("none", "dynamic"), "mode"),
    ]
    points = starting_points(dims)
    assert points[:3] == [
        {"target": "cpu", "quantize": "none"},
        {"target": "openvino", "quantize": "none"},
        {"target": "openvino:f32", "quantize": "none"},
    ]
    assert not any(p.get("static_shapes") for p in points)  # no such dimension here: the data has several shapes


def test_every_other_engine_is_also_tried_on_fixed_shapes_where_the_data_has_one() -> None:
    dims = [
        Dimension("target", ("cpu", "openvino", "openvino:f32"), "where"),
        Dimension("quantize", ("none", "dynamic"), "mode"),
        Dimension("static_shapes", (False, True), "fix the symbolic dims"),
    ]
    points = starting_points(dims)
    assert points[3:5] == [
        {"target": "openvino", "quantize": "none", "static_shapes": True},
        {"target": "openvino:f32", "quantize": "none", "static_shapes": True},
    ]
    assert {"target": "cpu", "quantize": "none", "static_shapes": True} not in points  # the reference stays as given
    # Another CPU EP target (a provider option) is not a compiling engine: not tried on fixed shapes first.
    dims[0] = Dimension("target", ("cpu", "cpu:use_arena=0"), "where")
    assert not any(p.get("static_shapes") for p in starting_points(dims))


def test_tune_with_targets_writes_a_winner_that_runs_where_it_was_measured(examples_dir: Path, tmp_path: Path) -> None:
    calib, data = _split_data(examples_dir)
    space = tmp_path / "space.yaml"
    space.write_text(PRUNE_SPACE + f"target: ['{OTHER}']\n")
    out = tmp_path / "best.onnx"
    proc = run_cli(
        "tune", str(examples_dir / "digits_cnn.onnx"), "--calib", calib, "--data", data, "--space", str(space),
        "--eval-samples", "64", "--goal", "size_ratio<=0.8", "--goal", "cosine>=0.1", "--trials", "2",
        "--providers", f"cpu,{OTHER},openvino", "-o", str(out), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    if not probe_provider("openvino").usable:  # said in one line, and the search went on without it
        assert sum("not searching openvino" in line for line in proc.stderr.splitlines()) == 1
    doc = json.loads(proc.stdout)
    assert next(iter(doc)) == "schema_version" and doc["schema_version"] == 1  # tune.json says its version too
    assert json.loads((tmp_path / "best.tune.json").read_text())["schema_version"] == 1
    assert doc["space"]["target"] == [OTHER]
    assert all(t["params"]["target"] == OTHER for t in doc["trials"])
    winner = doc["winner"]
    assert winner["deploy"]["target"] == OTHER and winner["deploy"]["provider"] == "CPUExecutionProvider"
    assert str(out.resolve()) in winner["deploy"]["python"]
    scope: dict = {}
    exec(compile(winner["deploy"]["python"], "deploy", "exec"), scope)  # the snippet opens the written model
    assert scope["session"].get_inputs()[0].name == "image"
    recipe = yaml.safe_load((tmp_path / "best.recipe.yaml").read_text())
    assert recipe["runtime"] == {"target": OTHER}
    assert "Deploy:" in (tmp_path / "best.report.html").read_text()
    # The recipe reproduces the candidate where it was measured: the benchmark has the reference and the target.
    again = run_cli(
        str(examples_dir / "digits_cnn.onnx"), "--recipe", str(tmp_path / "best.recipe.yaml"), "-o",
        str(tmp_path / "repro.onnx"), "--set", "benchmark.rounds=2", "--set", "benchmark.runs_per_round=2",
        "--eval-samples", "8", "--no-memory", "--no-attribute", "--json",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    rows = json.loads(again.stdout)["benchmark"]["rows"]
    assert [r["provider"] for r in rows] == ["cpu", OTHER]
    assert rows[1]["engine_alone"] is not None and rows[1]["target"]["target"] == OTHER


def test_static_shapes_is_searched_where_the_data_has_one_shape(examples_dir: Path, tmp_path: Path) -> None:
    from optimizer_cli.search.tune import TuneRequest, prepare

    calib, data = _split_data(examples_dir)
    request = TuneRequest(
        model=examples_dir / "digits_cnn.onnx", goals=[], evaluation=data, calibration=calib, study_dir=tmp_path
    )
    dims = {d.name: d.choices for d in prepare(request, lambda _m: None).dims}
    assert dims["static_shapes"] == (False, True)
    recipe = recipe_for({"quantize": "none", "static_shapes": True}, RecipeContext(None, {}, 2, "cpu"))
    assert recipe["passes"][-1] == {"type": "static_shapes"}
    assert "static shapes" in summary({"static_shapes": True})


def test_a_repeated_proposal_is_listed_so_no_trial_number_is_missing(examples_dir: Path, tmp_path: Path) -> None:
    from tests.test_tune import _tune_args

    proc = run_cli(*_tune_args(examples_dir, tmp_path, "--trials", "4", "-o", str(tmp_path / "b.onnx"), "--json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = json.loads(proc.stdout)["trials"]
    numbers = [t["number"] for t in trials]
    assert numbers == list(range(len(numbers))), numbers
    duplicates = [t for t in trials if t["state"] == "duplicate"]
    assert duplicates and all(t["reason"].startswith("same as trial ") for t in duplicates)
    html = (tmp_path / "b.report.html").read_text()
    assert all(f">{t['number']}<" in html for t in duplicates)


def test_tune_proposes_prune_heads_on_a_transformer_with_heads(tmp_path: Path) -> None:
    """Issue 23: prune_heads takes part in tune where it applies (multi-head attention, calibration data)."""
    import onnx

    from optimizer_cli.model_io import load_model
    from optimizer_cli.pipeline import normalize
    from optimizer_cli.search.space import default_space, model_traits
    from tests.builders import tiny_encoder
    from tests.test_prune_heads import multi_head_encoder

    def space(proto: onnx.ModelProto, calibration: bool = True) -> dict:
        path = tmp_path / "m.onnx"
        onnx.save(proto, path)
        model = load_model(path)
        normalize(model)
        traits = model_traits(
            model, has_calibration=calibration, mixed_calibration_shapes=False, gpu=False, saturating_cpu=False
        )
        return {d.name: d.choices for d in default_space(traits)}

    assert space(multi_head_encoder())["prune_heads"] == (0.0, 0.125, 0.25)
    assert "prune_heads" not in space(multi_head_encoder(), calibration=False)  # head importance needs data
    assert "prune_heads" not in space(tiny_encoder())  # one head: nothing to remove
    recipe = recipe_for({"quantize": "none", "prune_heads": 0.25}, RecipeContext("c.npz", {}, 2, "cpu"))
    types = [p["type"] for p in recipe["passes"]]
    assert types.index("prune_heads") < types.index("fuse") and recipe["passes"][1]["sparsity"] == 0.25
    assert summary({"prune_heads": 0.25}).startswith("prune heads 0.25")


def _quantizing_dims(examples_dir: Path) -> list[Dimension]:
    from optimizer_cli.search.space import default_space
    from tests.test_tune import _traits

    targets = Dimension("target", ("cpu", "openvino", "openvino:f32"), "where")
    dims = [targets, *default_space(_traits(examples_dir / "digits_cnn.onnx"))]
    # As for a larger model whose data has one shape: 4 float groups possible, shapes fixable.
    dims = [Dimension(d.name, (0, 2, 4, 8), d.help, d.when) if d.name == "keep_float_k" else d for d in dims]
    shapes = Dimension("static_shapes", (False, True), "fix the symbolic dims")
    return dims if any(d.name == shapes.name for d in dims) else [*dims, shapes]


def test_the_fitted_mixed_precision_is_tried_on_each_engine_that_keeps_float_nodes_fp32(examples_dir: Path) -> None:
    """PP-OCRv4 det: its fitted int8 (26 of 64 groups float) scored 0.994 on OpenVINO f32 and 3.0x, 0.957 on
    OpenVINO's bf16 default, which rounds the float groups: the starting point goes where they stay fp32."""
    dims = _quantizing_dims(examples_dir)
    fitted = [p for p in starting_points(dims) if p.get("keep_float_fit")]
    assert [p.get("target") for p in fitted] == ["openvino:f32", "cpu"]  # the engine first: a budget may end
    assert fitted[0]["quantize"] == "static" and fitted[0].get("static_shapes") is True
    assert parse_target("openvino:f32").full_precision and parse_target("trt").full_precision
    assert not parse_target("openvino").full_precision and not parse_target("trt:fp16").full_precision


def test_starting_points_the_simulation_says_miss_the_goal_are_left_out(examples_dir: Path) -> None:
    """The ranking's simulation runs before the first trial: a model whose all-int8 cosine is far below the
    goal (det: 0.84 for 0.99) and needs many float groups gets neither the plain int8 points nor the 4-float
    one (each costs a calibration on a large model); the fitted one stays, and all stay in the space."""
    dims = _quantizing_dims(examples_dir)

    def static_points(ctx: RecipeContext | None) -> list[dict]:
        return [p for p in starting_points(dims, ctx, 0.99) if p["quantize"] == "static"]

    far = RecipeContext("c.npz", {}, 2, "cpu", fitted_keep={"static": 26}, simulated_int8={"static": 0.84})
    assert all(p.get("keep_float_fit") for p in static_points(far)) and static_points(far)
    near = RecipeContext("c.npz", {}, 2, "cpu", fitted_keep={"static": 2}, simulated_int8={"static": 0.985})
    assert static_points(near) == static_points(None)  # within reach: every point a person would try
    assert any(p.get("static_ops") == "compute" for p in static_points(near))
    assert any(p.get("keep_float_k") == 4 for p in static_points(near))


def test_no_fitted_points_where_no_fit_reaches_the_goal(examples_dir: Path) -> None:
    """When even all but the least sensitive group float misses the goal, a fitted trial would be the plain
    int8 model: no fitted or k-float starting point then (they stay in the space)."""
    dims = _quantizing_dims(examples_dir)
    hopeless = RecipeContext("c.npz", {}, 2, "cpu", simulated_int8={"static": 0.5})
    assert not [p for p in starting_points(dims, hopeless, 0.99) if p["quantize"] == "static"]
