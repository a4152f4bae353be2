"""Issue 23 item 4: presets. The shipped recipes are package data; `--recipe NAME` finds one from any folder,
a file always wins, an unknown name is exit 2 with the list, and `optimize recipes` lists them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from optimizer_cli.errors import UserInputError
from optimizer_cli.recipe import (
    PRESETS_DIR,
    code_references,
    load_recipe,
    preset_list,
    preset_of,
    presets,
    resolve_recipe,
)

from .conftest import ROOT, run_cli

SHIPPED = {
    "int8", "fp16", "int4", "cnn-int8", "transformer-int8", "prune", "lowrank", "cnn-prune-int8",
    "transformer-prune-int8", "transformer-int8-trim", "cnn-distill-int8", "transformer-distill-int8",
}  # fmt: skip
FAST = ["--providers", "cpu", "--set", "benchmark.rounds=2", "--set", "benchmark.runs_per_round=2"]
FAST += ["--eval-samples", "4", "--no-memory", "--no-attribute"]
MINE = "name: mine\ndescription: the user's own\npasses:\n  - type: cleanup\n"


def test_the_presets_are_package_data_and_the_old_folder_is_gone() -> None:
    assert set(presets()) == SHIPPED
    assert PRESETS_DIR.parent == Path(__import__("optimizer_cli").__file__).resolve().parent
    assert not (ROOT / "recipes").exists(), "the recipes live in the package only (one copy, no drift)"


def test_every_preset_validates_names_no_code_and_has_a_one_line_summary() -> None:
    listed = preset_list()
    assert [item["name"] for item in listed] == sorted(SHIPPED)
    for item in listed:
        rec = load_recipe(item["path"])
        assert rec.name == item["name"], "a preset's name is the one it is asked by"
        assert rec.passes and not code_references(rec), item["name"]
        assert item["summary"].endswith(".") and "\n" not in item["summary"], item
        assert 10 < len(item["summary"]) <= 110, f"{item['name']}: one line: {item['summary']!r}"


def test_resolution_a_file_wins_then_a_preset_by_name_then_exit_2(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe("int8") == (PRESETS_DIR / "int8.yaml", "int8")
    assert resolve_recipe("int8.yaml") == (PRESETS_DIR / "int8.yaml", "int8")
    (tmp_path / "int8").write_text(MINE)
    assert resolve_recipe("int8") == (Path("int8"), None)
    assert resolve_recipe("int8.yaml")[1] == "int8"  # another name: no such file, so the preset
    with pytest.raises(UserInputError, match=r"no such file or preset 'int9' \(did you mean 'int8'\?\) \(presets: "):
        resolve_recipe("int9")
    # The old layout's path is a missing file, not silently a preset; the message points at the preset.
    with pytest.raises(UserInputError, match=r"no such file or preset 'recipes/cnn-int8.yaml' .*'cnn-int8'"):
        resolve_recipe("recipes/cnn-int8.yaml")
    assert preset_of(PRESETS_DIR / "fp16.yaml") == "fp16" and preset_of(tmp_path / "int8") is None


def test_int8_preset_runs_from_a_folder_without_recipes(examples_dir: Path, tmp_path: Path) -> None:
    """The acceptance command, from a folder with no recipes/: the report says which recipe ran."""
    proc = run_cli(
        str(examples_dir / "digits_mlp.onnx"), "--recipe", "int8", "-o", "o.onnx", *FAST, "--json", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o.onnx").exists()
    assert f"recipe: preset 'int8' ({PRESETS_DIR / 'int8.yaml'})" in proc.stderr
    section = json.loads(proc.stdout)["recipe"]
    assert section["preset"] == "int8" and section["path"] == str(PRESETS_DIR / "int8.yaml")


def test_a_file_named_like_a_preset_wins_and_the_run_says_so(tmp_path: Path) -> None:
    (tmp_path / "int8").write_text(MINE)
    proc = run_cli("m.onnx", "-r", "int8", "--dry-run", "--json", cwd=tmp_path)
    plan = json.loads(proc.stdout)
    assert plan["recipe"] == "mine" and plan["preset"] is None
    assert [p["type"] for p in plan["passes"]] == ["cleanup"]
    assert "recipe: file int8 (not the preset 'int8': a file always wins)" in proc.stderr
    proc = run_cli("m.onnx", "-r", "cnn-int8.yaml", "--dry-run", "--json", cwd=tmp_path)
    plan = json.loads(proc.stdout)
    assert plan["recipe"] == "cnn-int8" and plan["preset"] == "cnn-int8"
    assert plan["recipe_path"] == str(PRESETS_DIR / "cnn-int8.yaml")


def test_an_unknown_name_is_exit_2_with_the_list(tmp_path: Path) -> None:
    proc = run_cli("m.onnx", "-r", "cnn-int9", "-o", "o.onnx", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: no such file or preset 'cnn-int9' (did you mean 'cnn-int8'?) (presets: ")
    assert all(name in line for name in SHIPPED)
    proc = run_cli("validate", "nope", "--json", cwd=tmp_path)
    assert proc.returncode == 2 and "no such file or preset 'nope'" in json.loads(proc.stdout)["error"]


def test_validate_takes_a_preset_name(tmp_path: Path) -> None:
    proc = run_cli("validate", "transformer-int8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ok preset 'transformer-int8'" in proc.stdout and "cleanup -> fuse -> quantize" in proc.stdout
    doc = json.loads(run_cli("validate", "prune", "--json", cwd=tmp_path).stdout)
    assert doc["valid"] and doc["preset"] == "prune" and doc["recipe"]["name"] == "prune"
    assert doc["path"] == str(PRESETS_DIR / "prune.yaml")


def test_optimize_recipes_lists_every_preset_one_line_each(tmp_path: Path) -> None:
    proc = run_cli("recipes", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    by_name = {line.split()[0]: line for line in lines}
    assert len(lines) == len(SHIPPED) and set(by_name) == SHIPPED
    for item in preset_list():
        assert by_name[item["name"]].endswith(item["summary"])
    doc = json.loads(run_cli("recipes", "--json", cwd=tmp_path).stdout)
    assert [p["name"] for p in doc["presets"]] == sorted(SHIPPED)
    assert doc["presets"][0]["passes"] and doc["presets"][0]["description"]


@pytest.mark.slow
def test_the_wheel_carries_the_presets(tmp_path: Path) -> None:
    """A non-editable install has them: the built wheel's file list holds every preset."""
    # Built from a copy: an in-tree build would leave build/ and egg-info in the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "optimizer_cli", src / "optimizer_cli", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run(
        [*pip, str(src), "-w", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("optimizer_cli-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"optimizer_cli/recipes/{name}.yaml" for name in SHIPPED} <= names
