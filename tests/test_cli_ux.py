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
