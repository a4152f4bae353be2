"""Issue 24, recipes: code a shared recipe names runs only with consent (item 12); recipe size, pass count,
empty documents and duplicate keys are refused with the file, line and limit (item 14)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from optimizer_cli.errors import UserInputError
from optimizer_cli.passes import PASS_REGISTRY
from optimizer_cli.recipe import (
    DATA_SOURCE_OPTIONS,
    MAX_NODES,
    MAX_PASSES,
    MAX_RECIPE_BYTES,
    code_consent_problem,
    code_references,
    empty_recipe,
    load_recipe,
    parse_recipe,
    unconsented_code,
)

from .builders import mlp, to_ir
from .conftest import run_cli

# A loader that leaves a marker when it is imported: the marker proves the file ran.
MARKER_LOADER = """\
import pathlib

import numpy as np

pathlib.Path(__file__).with_name("ran.marker").write_text("ran")


def samples():
    rng = np.random.default_rng(0)
    for _ in range(8):
        yield {{"x": rng.standard_normal((1, 32)).astype(np.float32)}}
"""

NO_BENCH = ["--no-bench", "--no-attribute", "--set", "verify.samples=2"]


@pytest.fixture
def shared(tmp_path: Path) -> tuple[Path, Path, str]:
    """A tiny model, a 'downloaded' recipe whose data.calibration names a loader file, and the loader spec."""
    onnx.save(mlp(), tmp_path / "m.onnx")
    (tmp_path / "evil.py").write_text(MARKER_LOADER.format())
    spec = f"{tmp_path / 'evil.py'}:samples"
    recipe = tmp_path / "downloaded.yaml"
    recipe.write_text(f"passes:\n  - type: cleanup\ndata:\n  calibration: {spec}\n")
    return tmp_path, recipe, spec


def _run(folder: Path, recipe: Path, *extra: str):
    return run_cli(str(folder / "m.onnx"), "--recipe", str(recipe), "-o", str(folder / "out.onnx"), *NO_BENCH, *extra)


# --- item 12: code named in a recipe ---------------------------------------------------------------------


def test_recipe_loader_does_not_run_without_consent(shared) -> None:
    folder, recipe, _spec = shared
    proc = _run(folder, recipe)
    assert proc.returncode == 2, proc.stderr
    assert not (folder / "ran.marker").exists()
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(folder / "evil.py") in errors[0] and "--allow-code" in errors[0] and "data.calibration" in errors[0]
    assert not (folder / "out.onnx").exists()


def test_recipe_loader_runs_with_allow_code(shared) -> None:
    folder, recipe, _spec = shared
    proc = _run(folder, recipe, "--allow-code")
    assert proc.returncode == 0, proc.stderr
    assert (folder / "ran.marker").exists()


def test_recipe_loader_runs_when_given_on_the_command_line(shared) -> None:
    folder, recipe, spec = shared
    proc = _run(folder, recipe, "--calib", spec)
    assert proc.returncode == 0, proc.stderr
    assert (folder / "ran.marker").exists()


def test_validate_and_dry_run_never_execute_it(shared) -> None:
    folder, recipe, _spec = shared
    proc = run_cli("validate", str(recipe))
    assert proc.returncode == 0, proc.stderr
    assert "evil.py" in proc.stdout + proc.stderr  # validate says the recipe names code
    dry = _run(folder, recipe, "--dry-run", "--json")
    assert dry.returncode == 2, dry.stderr
    plan = json.loads(dry.stdout)
    assert any("--allow-code" in p for p in plan["problems"])
    assert _run(folder, recipe, "--dry-run", "--allow-code").returncode == 0
    assert not (folder / "ran.marker").exists()


def test_every_field_that_names_code_is_found(tmp_path: Path) -> None:
    loader = tmp_path / "l.py"
    text = (
        "passes:\n  - type: cleanup\n  - type: distill\n    train_data: pkg.mod:train\n"
        f"data:\n  calibration: {loader}:calib\n  evaluation: {loader}:evaluate\n"
    )
    rec = parse_recipe(text, "r.yaml")
    found = {(r.key, r.spec) for r in code_references(rec)}
    assert found == {
        ("data.calibration", f"{loader}:calib"),
        ("data.evaluation", f"{loader}:evaluate"),
        ("passes.1.train_data", "pkg.mod:train"),
    }
    by_key = {r.key: r for r in code_references(rec)}
    assert by_key["data.calibration"].file == loader.resolve() and by_key["passes.1.train_data"].file is None
    # Data files and 'random' are not code.
    npz = tmp_path / "d.npz"
    npz.write_bytes(b"")
    assert code_references(parse_recipe(f"data: {{calibration: random, evaluation: {npz}}}\n", "r.yaml")) == []


def test_consent_comes_from_the_flag_or_the_command_line(tmp_path: Path) -> None:
    loader = tmp_path / "l.py"
    text = f"passes:\n  - type: cleanup\ndata:\n  calibration: {loader}:calib\n  evaluation: {loader}:evaluate\n"
    rec = parse_recipe(text, "r.yaml")
    assert {r.key for r in unconsented_code(rec)} == {"data.calibration", "data.evaluation"}
    assert unconsented_code(rec, allow_code=True) == []
    # --calib replaces the recipe's calibration (it never runs); the same loader by another path is consent.
    left = unconsented_code(rec, calibration="other.npz", command_line=[f"{tmp_path}/./l.py:evaluate"])
    assert left == []
    # Another function of the same file is not the same loader.
    assert [r.key for r in unconsented_code(rec, calibration="random", command_line=[f"{loader}:other"])] == [
        "data.evaluation"
    ]
    # A value typed in --set is on the command line.
    typed = parse_recipe("passes: [{type: cleanup}]\n", "r.yaml", [f"data.evaluation={loader}:evaluate"])
    assert unconsented_code(typed, command_line=[f"{loader}:evaluate"]) == []


def test_provider_options_that_load_libraries_are_code(tmp_path: Path) -> None:
    lib = tmp_path / "evil.so"
    text = (
        "passes: [{type: cleanup}]\n"
        f"benchmark: {{providers: [cpu, 'openvino:num_streams=1', 'trt:fp16:trt_extra_plugin_lib_paths={lib}']}}\n"
    )
    rec = parse_recipe(text, "r.yaml")
    (ref,) = unconsented_code(rec)
    assert ref.key == "benchmark.providers.2" and ref.file == lib.resolve()
    assert "--providers" in code_consent_problem([ref]) and str(lib) in code_consent_problem([ref])
    assert unconsented_code(rec, providers="cpu") == [] and unconsented_code(rec, allow_code=True) == []
    qnn = parse_recipe(
        "passes: [{type: cleanup}]\nbenchmark: {providers: ['QNNExecutionProvider:backend_path=x.so']}\n"
    )
    assert [r.key for r in code_references(qnn)] == ["benchmark.providers.0"]


def test_dry_run_names_a_provider_library(tmp_path: Path) -> None:
    onnx.save(mlp(), tmp_path / "m.onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"passes: [{{type: cleanup}}]\nbenchmark: {{providers: ['trt:trt_extra_plugin_lib_paths={tmp_path}/e.so']}}\n"
    )
    dry = run_cli(str(tmp_path / "m.onnx"), "--recipe", str(recipe), "--dry-run", "--json")
    assert dry.returncode == 2 and any("e.so" in p for p in json.loads(dry.stdout)["problems"]), dry.stderr
    ok = run_cli(str(tmp_path / "m.onnx"), "--recipe", str(recipe), "--dry-run", "--providers", "cpu")
    assert ok.returncode == 0, ok.stderr


def test_every_pass_option_that_reads_data_is_checked() -> None:
    """A new string option of a pass must be classified: a data source (checked for code) or not."""
    not_data = {"mask_input"}  # an input name
    scalar_str = {
        name
        for cls in PASS_REGISTRY.values()
        for name, field in cls.Config.model_fields.items()
        if name not in ("type", "label") and str(field.annotation) in ("str", "str | None", "typing.Optional[str]")
    }
    assert scalar_str == set(DATA_SOURCE_OPTIONS) | not_data


def test_tune_space_files_cannot_name_code() -> None:
    """tune builds its recipes from --calib/--data and a space file of known dimensions and values only."""
    from optimizer_cli.search.space import default_space, limit_space, model_traits

    traits = model_traits(
        to_ir(mlp()), has_calibration=True, mixed_calibration_shapes=False, gpu=False, saturating_cpu=False
    )
    dims = default_space(traits)
    for spec in ({"calibration": "evil.py:f"}, {"train_data": "evil.py:f"}, {"distill": "evil.py:f"}):
        with pytest.raises(UserInputError, match="space"):
            limit_space(dims, spec, "s.yaml")


# --- item 14: size, pass count, empty documents, duplicate keys -----------------------------------------


def test_oversized_recipe_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("passes:\n  - type: fuse\n" + "# padding\n" * (MAX_RECIPE_BYTES // 10 + 1))
    with pytest.raises(UserInputError) as err:
        load_recipe(path)
    message = str(err.value)
    assert str(path) in message and "1 MB" in message
    with pytest.raises(UserInputError, match="1 MB"):
        parse_recipe(path.read_text(), "big.yaml")


def test_too_many_passes_are_refused_before_the_yaml_is_composed(monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    def never(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("composed a recipe over a limit")

    # Composing costs ~60 us a node in PyYAML: a 1 MB file of passes took 10 s before this check.
    monkeypatch.setattr(yaml.SafeLoader, "get_single_node", never)
    text = "passes:\n" + "  - type: fuse\n" * (MAX_PASSES + 1)
    with pytest.raises(UserInputError) as err:
        parse_recipe(text, "r.yaml")
    assert str(err.value) == f"r.yaml:2: refused: over {MAX_PASSES} passes; a recipe has at most {MAX_PASSES}"
    # The same for any other huge list inside the 1 MB.
    names = ",".join(["n"] * MAX_NODES)
    with pytest.raises(UserInputError, match=rf"r.yaml:3: refused: over {MAX_NODES} YAML nodes"):
        parse_recipe(f"passes:\n  - type: quantize\n    exclude_nodes: [{names}]\n", "r.yaml")


def test_pass_limit_holds_for_set_too() -> None:
    many = "[" + ",".join(["{type: fuse}"] * (MAX_PASSES + 1)) + "]"
    with pytest.raises(UserInputError, match="passes"):
        parse_recipe("{}", "r.yaml", [f"passes={many}"])
    assert len(parse_recipe("passes:\n" + "  - type: fuse\n" * MAX_PASSES, "r.yaml").passes) == MAX_PASSES


@pytest.mark.parametrize("text", ["", "\n", "# nothing here\n", "null\n", "~\n", "---\n"])
def test_empty_or_null_recipe_is_refused(text: str) -> None:
    with pytest.raises(UserInputError, match=r"^r.yaml: empty recipe"):
        parse_recipe(text, "r.yaml")


def test_empty_recipe_helper_still_works() -> None:
    assert empty_recipe(["benchmark.threads=3"]).benchmark.threads == 3


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "passes:\n  - type: fuse\npasses:\n  - type: quantize\n",
            "r.yaml:3: refused: duplicate key 'passes' (first at line 1)",
        ),
        (
            "passes:\n  - type: quantize\n    mode: dynamic\n    mode: static\n",
            "r.yaml:4: refused: duplicate key 'mode' (first at line 3)",
        ),
        ("benchmark: {threads: 1, threads: 2}\n", "r.yaml:1: refused: duplicate key 'threads' (first at line 1)"),
    ],
)
def test_duplicate_keys_are_refused_with_their_line(text: str, needle: str) -> None:
    with pytest.raises(UserInputError) as err:
        parse_recipe(text, "r.yaml")
    assert str(err.value).startswith(needle), str(err.value)


def test_duplicate_keys_in_set_values_and_merge_keys() -> None:
    with pytest.raises(UserInputError, match=r"--set .*duplicate key 'threads'"):
        parse_recipe("{}", "r.yaml", ["benchmark={threads: 1, threads: 2}"])
    # A merge key's entries are overridden by the mapping's own keys: YAML's rule, not a duplicate.
    rec = parse_recipe("benchmark:\n  <<: {threads: 1, rounds: 3}\n  threads: 4\n", "r.yaml")
    assert rec.benchmark.threads == 4 and rec.benchmark.rounds == 3
