"""`validate`, `passes` and `schema` as users see them: every problem, real JSON types, one source of truth."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import run_cli
from .test_recipe import BAD, BILLION_LAUGHS


def test_validate_lists_every_problem_exit_2(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(BAD)
    proc = run_cli("validate", str(recipe), "--set", "passes.0.mode=x")
    assert proc.returncode == 2 and proc.stdout == ""
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 5, proc.stderr
    assert errors[0].startswith("error: --set 'passes.0.mode=x': ")
    assert any("did you mean 'per_channel'" in e for e in errors)
    assert any("did you mean 'quantize'" in e for e in errors)
    doc = json.loads(run_cli("validate", str(recipe), "--json").stdout)
    assert doc["valid"] is False and len(doc["problems"]) == 4


def test_validate_refuses_an_alias_bomb_exit_2(tmp_path: Path) -> None:
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(BILLION_LAUGHS)
    proc = run_cli("validate", str(recipe))
    assert proc.returncode == 2 and "refused: aliases expand" in proc.stderr


def test_passes_json_has_real_types_bounds_and_meaning() -> None:
    proc = run_cli("passes", "--json")
    assert proc.returncode == 0, proc.stderr
    passes = {p["type"]: p for p in json.loads(proc.stdout)["passes"]}
    sparsity = passes["prune"]["options"]["sparsity"]
    assert sparsity["default"] == 0.3 and sparsity["bounds"] == "[0, 1)"
    assert sparsity["constraints"] == {"ge": 0, "lt": 1} and sparsity["description"]
    assert passes["quantize"]["options"]["per_channel"]["default"] is True
    assert passes["quantize"]["options"]["op_types"]["default"] is None
    assert passes["factorize"]["options"]["rank"]["bounds"] == ">= 1"
    assert passes["factorize"]["options"]["energy"]["bounds"] == "(0, 1]"
    assert "True" not in proc.stdout and "None" not in proc.stdout


def test_passes_name_shows_one_pass_and_unknown_name_suggests() -> None:
    one = run_cli("passes", "quantize")
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith("quantize (approximate)") and "prune" not in one.stdout
    assert "list[str]" in one.stdout and "(0, 100]" in one.stdout and "True" not in one.stdout
    assert json.loads(run_cli("passes", "prune", "--json").stdout)["options"]["sparsity"]["bounds"] == "[0, 1)"
    bad = run_cli("passes", "quantise")
    assert bad.returncode == 2 and "did you mean 'quantize'" in bad.stderr and "Traceback" not in bad.stderr


def test_schema_carries_descriptions_and_bounds() -> None:
    from optimizer_cli.recipe import recipe_json_schema

    schema = json.loads(recipe_json_schema())
    sparsity = schema["$defs"]["PruneConfig"]["properties"]["sparsity"]
    assert sparsity["minimum"] == 0 and sparsity["exclusiveMaximum"] == 1 and sparsity["description"]
    assert schema["$defs"]["VerifySettings"]["properties"]["samples"]["description"]


def _readme_pass_rows() -> dict[str, list[str]]:
    """docs/passes.md's "Passes and their contracts" table: pass name -> cells."""
    section = (Path(__file__).resolve().parent.parent / "docs" / "passes.md").read_text()
    rows = [ln for ln in section.splitlines() if ln.startswith("| `")]
    return {row.split("|")[1].strip().strip("`"): [c.strip() for c in row.split("|")[2:-1]] for row in rows}


def test_docs_pass_table_matches_the_pass_metadata() -> None:
    import re

    from optimizer_cli.passes import PASS_REGISTRY
    from optimizer_cli.recipe import pass_info

    rows = _readme_pass_rows()
    assert set(rows) == set(PASS_REGISTRY)
    for name, cells in rows.items():
        info = pass_info(name)
        assert cells[0] == info["exactness"], name
        options = info["options"]
        # Every `option` or `option: value` the row names must exist, with an allowed value.
        for token in re.findall(r"`([^`]+)`", " ".join(cells)):
            key, _, value = (part.strip() for part in token.partition(":"))
            choices = {c.strip() for opt in options.values() for c in opt["type"].split("|")}
            if key in options:
                allowed = {c.strip() for c in options[key]["type"].split("|")}
                assert not value or value in allowed or allowed & {"float", "int", "str"}, (name, token)
            else:
                assert not value and (key in choices or key in PASS_REGISTRY), (name, token)
