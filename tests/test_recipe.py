from __future__ import annotations

from pathlib import Path

import pytest

from optimizer_cli.errors import UserInputError
from optimizer_cli.passes import PASS_REGISTRY
from optimizer_cli.recipe import load_recipe, parse_recipe, preset_path, presets, recipe_json_schema

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {"int8.yaml", "fp16.yaml", "prune.yaml", "lowrank.yaml", "cnn-int8.yaml", "transformer-int8.yaml"}


def test_shipped_recipes_exist_and_validate() -> None:
    shipped = {p.name for p in presets().values()}
    assert shipped >= REQUIRED
    for name in shipped:
        recipe = load_recipe(preset_path(name))
        assert recipe.passes, name
        assert all(p.type in PASS_REGISTRY for p in recipe.passes)


def test_unknown_key_names_key_and_line() -> None:
    text = "name: x\npasses:\n  - type: quantize\n    mode: dynamic\n    per_chanel: true\n"
    with pytest.raises(UserInputError) as err:
        parse_recipe(text, "r.yaml")
    assert "r.yaml:5" in str(err.value)
    assert "per_chanel" in str(err.value)


def test_unknown_top_level_key() -> None:
    with pytest.raises(UserInputError, match=r"r.yaml:2: unknown key 'bogus'"):
        parse_recipe("passes: []\nbogus: 1\n", "r.yaml")


def test_unknown_pass_type_lists_known() -> None:
    with pytest.raises(UserInputError) as err:
        parse_recipe("passes:\n  - type: sparsify\n", "r.yaml")
    assert "unknown pass type 'sparsify'" in str(err.value)
    assert "quantize" in str(err.value)
    assert "r.yaml:2" in str(err.value)


def test_bad_value_and_bad_yaml() -> None:
    with pytest.raises(UserInputError, match="mode"):
        parse_recipe("passes:\n  - type: quantize\n    mode: int3\n", "r.yaml")
    with pytest.raises(UserInputError, match="invalid YAML"):
        parse_recipe("passes: [\n", "r.yaml")
    with pytest.raises(UserInputError, match="mapping"):
        parse_recipe("- a\n- b\n", "r.yaml")


def test_set_overrides() -> None:
    text = "passes:\n  - type: fuse\n  - type: quantize\n    mode: dynamic\n"
    r = parse_recipe(text, "r.yaml", ["passes.1.mode=static", "benchmark.providers=[cpu]", "verify.samples=7"])
    assert r.passes[1].mode == "static"
    assert r.benchmark.providers == ["cpu"]
    assert r.verify.samples == 7
    with pytest.raises(UserInputError, match="no list item 5"):
        parse_recipe(text, "r.yaml", ["passes.5.mode=static"])
    with pytest.raises(UserInputError, match="KEY=VALUE"):
        parse_recipe(text, "r.yaml", ["passes.1.mode"])
    with pytest.raises(UserInputError, match="unknown key 'nope'"):
        parse_recipe(text, "r.yaml", ["passes.1.nope=1"])


def test_s8s8_refused_on_x86_at_run_time_unless_allowed(monkeypatch) -> None:
    """The recipe means the same on every host (it validates); the run refuses S8S8 on x86 before loading."""
    import optimizer_cli.passes.quantize as quantize
    from optimizer_cli.passes import RunInputs
    from optimizer_cli.pipeline import requirement_problems

    text = "passes:\n  - type: quantize\n    mode: static\n    activation_type: int8\n"
    recipe = parse_recipe(text)  # valid wherever it is validated
    inputs = RunInputs(calibration="random")
    monkeypatch.setattr(quantize, "is_x86", lambda: True)
    assert any("S8S8" in p for p in requirement_problems(recipe, inputs))
    assert not requirement_problems(parse_recipe(text + "    allow_s8s8: true\n"), inputs)
    monkeypatch.setattr(quantize, "is_x86", lambda: False)
    assert not requirement_problems(recipe, inputs)


def test_factorize_needs_exactly_one_rank_rule() -> None:
    assert parse_recipe("passes:\n  - type: factorize\n    rank: 16\n").passes[0].energy is None
    with pytest.raises(UserInputError):
        parse_recipe("passes:\n  - type: factorize\n    energy: null\n")


def test_schema_is_json() -> None:
    import json

    schema = json.loads(recipe_json_schema())
    assert "passes" in schema["properties"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("passes:\n  - type: prune\n    sparsity: 1.0\n", "r.yaml:3: passes.0.sparsity: Input should be less than 1"),
        ("passes:\n  - type: prune\n    sparsity: -0.1\n", "passes.0.sparsity"),
        ("passes:\n  - type: factorize\n    rank: 0\n", "r.yaml:3: passes.0.rank"),
        ("passes:\n  - type: factorize\n    energy: 1.5\n", "passes.0.energy"),
        ("passes:\n  - type: factorize\n    energy: 0\n", "passes.0.energy"),
        ("passes:\n  - type: quantize\n    percentile: 150\n", "passes.0.percentile"),
        ("verify:\n  samples: 0\n", "r.yaml:2: verify.samples"),
        ("benchmark:\n  attribution_threshold: 2\n", "benchmark.attribution_threshold"),
        ("data:\n  dims: {batch: 0}\n", "data.dims.batch"),
        ("session:\n  execution_mode: parallel\n  inter_op_threads: 0\n", "r.yaml:3: session.inter_op_threads"),
    ],
)
def test_out_of_bounds_options_name_the_key(text: str, needle: str) -> None:
    with pytest.raises(UserInputError) as err:
        parse_recipe(text, "r.yaml")
    assert needle in str(err.value)


def test_bounds_keep_the_edges_that_make_sense() -> None:
    assert parse_recipe("passes:\n  - type: prune\n    sparsity: 0\n").passes[0].sparsity == 0
    assert parse_recipe("passes:\n  - type: factorize\n    energy: 1\n").passes[0].energy == 1
    assert parse_recipe("passes:\n  - type: factorize\n    rank: 1\n").passes[0].rank == 1


def _numeric(annotation: object) -> bool:
    """int / float, optional or not (containers and Literals bound their items otherwise)."""
    import types
    import typing

    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_numeric(a) for a in typing.get_args(annotation))
    return annotation in (int, float)


def test_every_option_is_described_and_every_number_bounded() -> None:
    from annotated_types import Ge, Gt, Le, Lt

    from optimizer_cli.recipe import BenchmarkSettings, DataSettings, Recipe, SessionSettings, VerifySettings

    models = [
        Recipe,
        VerifySettings,
        DataSettings,
        BenchmarkSettings,
        SessionSettings,
        *(c.Config for c in PASS_REGISTRY.values()),
    ]
    for model in models:
        for name, field in model.model_fields.items():
            if name in ("type", "label"):
                continue
            assert field.description, f"{model.__name__}.{name} has no description"
            if _numeric(field.annotation):
                bounded = any(isinstance(m, (Ge, Gt, Le, Lt)) for m in field.metadata)
                assert bounded, f"{model.__name__}.{name} is a number without bounds"


def test_session_section_defaults_to_what_the_benchmark_did_before() -> None:
    session = parse_recipe("{}").session
    assert session.model_dump() == {
        "opt_level": None,
        "execution_mode": "sequential",
        "mem_pattern": True,
        "inter_op_threads": None,
        "threads": None,
    }
    text = "session:\n  opt_level: basic\n  execution_mode: parallel\n  mem_pattern: false\n  inter_op_threads: 2\n"
    session = parse_recipe(text).session
    assert (session.opt_level, session.execution_mode, session.mem_pattern, session.inter_op_threads) == (
        "basic",
        "parallel",
        False,
        2,
    )
    assert parse_recipe("{}", "r.yaml", ["session.execution_mode=parallel"]).session.execution_mode == "parallel"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("session:\n  mem_patern: false\n", "r.yaml:2: unknown key 'mem_patern' at session.mem_patern (did you mean"),
        ("session:\n  opt_level: fast\n", "r.yaml:2: session.opt_level: Input should be 'disable'"),
        ("session:\n  execution_mode: async\n", "session.execution_mode"),
        ("session:\n  inter_op_threads: 2\n", "inter_op_threads applies only with execution_mode: parallel"),
        ("session: {mem_pattern: maybe}\n", "session.mem_pattern"),
    ],
)
def test_session_section_refuses_what_onnxruntime_would_not_do(text: str, needle: str) -> None:
    with pytest.raises(UserInputError) as err:
        parse_recipe(text, "r.yaml")
    assert needle in str(err.value)


def test_schema_has_the_session_section() -> None:
    import json

    schema = json.loads(recipe_json_schema())
    assert "session" in schema["properties"] and schema["properties"]["session"]["description"]
    props = schema["$defs"]["SessionSettings"]["properties"]
    assert set(props) == {"opt_level", "execution_mode", "mem_pattern", "inter_op_threads", "threads"}
    assert schema["$defs"]["SessionSettings"]["additionalProperties"] is False


# The classic "billion laughs": 9 levels of 9 aliases, ~10^9 strings once expanded.
BILLION_LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)


def test_alias_bomb_is_refused_without_expanding_it() -> None:
    assert len(BILLION_LAUGHS) < 500
    with pytest.raises(UserInputError, match=r"r.yaml: refused: aliases expand"):
        parse_recipe(BILLION_LAUGHS, "r.yaml")
    with pytest.raises(UserInputError, match=r"--set 'name=.*refused: aliases expand"):
        parse_recipe("{}", "r.yaml", ["name=" + BILLION_LAUGHS.replace("\n", ", ").join("{}")])


@pytest.mark.parametrize("text", ["x: &x [*x]\n", "passes: &p\n  - type: fuse\n  - *p\n", "a: &a {b: *a}\n"])
def test_recursive_alias_is_refused(text: str) -> None:
    with pytest.raises(UserInputError, match=r"r.yaml: refused: an alias refers to its own anchor"):
        parse_recipe(text, "r.yaml")


def test_deep_nesting_is_refused_and_small_aliases_still_work() -> None:
    with pytest.raises(UserInputError, match="nested too deeply"):
        parse_recipe("[" * 5000 + "]" * 5000, "r.yaml")
    recipe = parse_recipe(
        "passes:\n  - type: factorize\n    op_types: &ops [MatMul, Gemm]\n  - type: reconstruct\n    op_types: *ops\n"
    )
    assert recipe.passes[1].op_types == ["MatMul", "Gemm"]


BAD = """passes:
  - type: quantize
    per_chanel: true
    bits: 3
  - type: quantise
benchmark:
  thread: 2
"""


def test_every_problem_is_listed_with_its_line_and_a_suggestion() -> None:
    from optimizer_cli.recipe import RecipeProblems

    with pytest.raises(RecipeProblems) as err:
        parse_recipe(BAD, "r.yaml")
    assert err.value.problems == [
        "r.yaml:3: unknown key 'per_chanel' at passes.0.per_chanel (did you mean 'per_channel'?)",
        "r.yaml:4: passes.0.bits: Input should be 4 or 8",
        "r.yaml:5: unknown pass type 'quantise' at passes.1 (did you mean 'quantize'?) (known: "
        + ", ".join(sorted(PASS_REGISTRY))
        + ")",
        "r.yaml:7: unknown key 'thread' at benchmark.thread (did you mean 'threads'?)",
    ]
    # `run` stops at the first one, as before.
    assert str(err.value) == err.value.problems[0] + " (and 3 more problems)"


def test_union_members_failing_on_one_value_are_one_problem() -> None:
    from optimizer_cli.recipe import RecipeProblems

    with pytest.raises(RecipeProblems) as err:
        parse_recipe("passes:\n  - type: quantize\n    reduce_range: maybe\n", "r.yaml")
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith("r.yaml:3: passes.0.reduce_range: ")


def test_set_errors_point_at_the_flag() -> None:
    text = "name: x\npasses:\n  - type: fuse\n  - type: quantize\n"
    with pytest.raises(UserInputError) as err:
        parse_recipe(text, "r.yaml", ["passes.1.mode=x"])
    assert str(err.value).startswith("--set 'passes.1.mode=x': passes.1.mode: ")
    with pytest.raises(UserInputError, match=r"^--set 'verify.sampels=3': unknown key .*did you mean 'samples'"):
        parse_recipe(text, "r.yaml", ["verify.sampels=3"])
    with pytest.raises(UserInputError, match=r"^--set 'benchmark.rounds=1': benchmark.rounds"):
        parse_recipe("{}", "<no recipe>", ["benchmark.rounds=1"])


def test_set_addresses_passes_by_label() -> None:
    text = "passes:\n  - type: fuse\n  - type: quantize\n    label: myquant\n"
    assert parse_recipe(text, "r.yaml", ["passes.myquant.mode=static"]).passes[1].mode == "static"
    with pytest.raises(UserInputError, match=r"no list item myqant at passes \(did you mean 'myquant'\?\)"):
        parse_recipe(text, "r.yaml", ["passes.myqant.mode=static"])
    with pytest.raises(UserInputError, match=r"^--set 'passes.myquant.bits=3': passes.1.bits"):
        parse_recipe(text, "r.yaml", ["passes.myquant.bits=3"])
    twice = text + "  - type: quantize\n    label: myquant\n"
    with pytest.raises(UserInputError, match="used by several items"):
        parse_recipe(twice, "r.yaml", ["passes.myquant.mode=static"])
