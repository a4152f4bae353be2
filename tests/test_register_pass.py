"""Third-party passes: register_pass and the entry point group `optimizer_cli.passes` make a pass usable by
recipes, validation and `optimize passes`; a broken plugin is reported, never fatal."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import onnx
import onnx_ir as ir
import pytest

from optimizer_cli.passes import PASS_REGISTRY, OptimizationPass, PassConfig, register_pass, unregister_pass
from optimizer_cli.recipe import parse_recipe, pass_info
from tests.conftest import ROOT

from .builders import Builder

PLUGIN_SOURCE = '''
from typing import Literal

import onnx_ir as ir

from optimizer_cli.passes import OptimizationPass, PassConfig


class DropIdentityConfig(PassConfig):
    type: Literal["drop_identity"] = "drop_identity"


class DropIdentityPass(OptimizationPass[DropIdentityConfig]):
    """Bypasses Identity nodes that are not graph outputs (exact)."""

    name = "drop_identity"
    Config = DropIdentityConfig
    contract = "removes Identity nodes whose output is not a graph output; outputs exact"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        outputs = set(model.graph.outputs)
        gone = [n for n in model.graph if n.op_type == "Identity" and n.outputs[0] not in outputs]
        for node in gone:
            node.outputs[0].replace_all_uses_with(node.inputs[0])
            model.graph.remove(node, safe=True)
        self.stats["removed"] = len(gone)
        return ir.passes.PassResult(model, bool(gone))
'''


@pytest.fixture()
def drop_identity(tmp_path: Path) -> Iterator[type[OptimizationPass]]:
    """The plugin's pass class, registered for the test and removed after it."""
    (tmp_path / "plugin_pass.py").write_text(PLUGIN_SOURCE)
    sys.path.insert(0, str(tmp_path))
    try:
        import plugin_pass

        yield register_pass(plugin_pass.DropIdentityPass)
    finally:
        unregister_pass("drop_identity")
        sys.path.remove(str(tmp_path))
        sys.modules.pop("plugin_pass", None)


def test_a_registered_pass_runs_in_a_recipe_and_is_verified(drop_identity, tmp_path: Path) -> None:
    from optimizer_cli.pipeline import run_pipeline

    assert PASS_REGISTRY["drop_identity"] is drop_identity
    assert pass_info("drop_identity")["contract"].startswith("removes Identity")
    b = Builder()
    y = b.op("Relu", [b.op("Identity", ["x"])])
    path = tmp_path / "m.onnx"
    onnx.save(b.model([("x", onnx.TensorProto.FLOAT, [1, 4])], [("y", y)]), path)
    rec = parse_recipe("passes: [{type: drop_identity}]\n")
    result = run_pipeline(path, rec, tmp_path / "o.onnx")
    assert result.stages[-1].as_dict()["stats"]["removed"] == 1
    relu = next(n for n in onnx.load(tmp_path / "o.onnx").graph.node if n.op_type == "Relu")
    assert list(relu.input) == ["x"]  # the Identity before it is gone


def test_after_unregistering_recipes_refuse_it_again(drop_identity) -> None:
    unregister_pass("drop_identity")
    with pytest.raises(Exception, match="drop_identity"):
        parse_recipe("passes: [{type: drop_identity}]\n")
    register_pass(drop_identity)  # the fixture removes it again


def test_register_pass_refuses_what_is_not_a_proper_pass() -> None:
    class WrongType(PassConfig):
        type: Literal["other"] = "other"

    class Mismatched(OptimizationPass[WrongType]):
        name = "mismatched"
        Config = WrongType

        def call(self, model: ir.Model) -> ir.passes.PassResult:
            return ir.passes.PassResult(model, False)

    with pytest.raises(TypeError, match="not a subclass"):
        register_pass(dict)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Literal\\['mismatched'\\]"):
        register_pass(Mismatched)
    impostor = type("Impostor", (PASS_REGISTRY["quantize"],), {"__module__": "elsewhere"})
    with pytest.raises(TypeError, match="already registered"):
        register_pass(impostor)  # a proper pass whose name is taken by a shipped one
    with pytest.raises(ValueError, match="shipped"):
        unregister_pass("quantize")


def _installed_plugin(root: Path, entry: str) -> dict[str, str]:
    """A package as pip installs it: a module, and a dist-info declaring the entry point."""
    (root / "plugin_pass.py").write_text(PLUGIN_SOURCE)
    info = root / "plugin_pass-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-pass\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[optimizer_cli.passes]\n{entry}\n")
    return dict(os.environ, PYTHONPATH=str(root), ORT_DISABLE_TELEMETRY="1", COLUMNS="200")


def test_an_installed_plugin_appears_in_passes_and_validates(tmp_path: Path) -> None:
    import subprocess

    env = _installed_plugin(tmp_path, "drop_identity = plugin_pass:DropIdentityPass")
    run = [sys.executable, "-m", "optimizer_cli"]
    listed = subprocess.run([*run, "passes", "--json"], capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    assert listed.returncode == 0, listed.stderr
    doc = json.loads(listed.stdout)
    assert "drop_identity" in {p["type"] for p in doc["passes"]} and doc["plugin_problems"] == []
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - type: drop_identity\n  - type: cleanup\n")
    valid = subprocess.run([*run, "validate", str(recipe)], capture_output=True, text=True, env=env, check=False)
    assert valid.returncode == 0, valid.stderr


def test_a_broken_plugin_is_reported_not_fatal(tmp_path: Path) -> None:
    import subprocess

    env = _installed_plugin(tmp_path, "missing = no_such_module:Pass")
    listed = subprocess.run(
        [sys.executable, "-m", "optimizer_cli", "passes", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    problems = json.loads(listed.stdout)["plugin_problems"]
    assert len(problems) == 1 and problems[0].startswith("missing (plugin-pass): cannot load no_such_module:Pass")
