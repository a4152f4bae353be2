"""The pass manager: requirements before loading, verification after every pass, honest failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from optimizer_cli.errors import UserInputError, VerificationError
from optimizer_cli.passes.fuse import FusePass
from optimizer_cli.pipeline import run_pipeline
from optimizer_cli.recipe import parse_recipe

from .builders import mlp, random_feed, run


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(mlp((16, 32, 8)), str(path))
    return path


def test_stages_report_drift_and_output_matches(model_path: Path, tmp_path: Path) -> None:
    recipe = parse_recipe("passes:\n  - type: cleanup\n  - type: fuse\n  - type: quantize\n")
    result = run_pipeline(model_path, recipe, tmp_path / "out.onnx")
    assert [s.pass_type for s in result.stages] == ["cleanup", "fuse", "quantize"]
    assert result.stages[1].drift_vs_previous[0].max_abs < 1e-5
    assert 0.99 < result.stages[2].worst_cosine() <= 1.0
    feed = random_feed(onnx.load(str(model_path)))
    out = run(onnx.load(str(tmp_path / "out.onnx")), feed, "all")[0]
    ref = run(onnx.load(str(model_path)), feed)[0]
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.99


def test_exact_pass_that_changes_outputs_is_caught(model_path: Path, tmp_path: Path, monkeypatch) -> None:
    original_call = FusePass.call

    def corrupting_call(self, model: ir.Model):
        result = original_call(self, model)
        w = next(v for v in model.graph.initializers.values() if v.const_value.numpy().ndim == 2)
        w.const_value = ir.tensor(w.const_value.numpy() * 1.01, name=w.name)
        return result

    monkeypatch.setattr(FusePass, "call", corrupting_call)
    with pytest.raises(VerificationError, match=r"pass 0 \(fuse\) is declared exact but changed output 'y'"):
        run_pipeline(model_path, parse_recipe("passes:\n  - type: fuse\n"), tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists(), "nothing is written when verification fails"


def test_invalid_model_from_a_pass_is_caught(model_path: Path, tmp_path: Path, monkeypatch) -> None:
    def breaking_call(self, model: ir.Model):
        node = next(iter(model.graph))
        node.op_type = "NoSuchOp"
        return ir.passes.PassResult(model, True)

    monkeypatch.setattr(FusePass, "call", breaking_call)
    with pytest.raises(VerificationError, match="produced an invalid model"):
        run_pipeline(model_path, parse_recipe("passes:\n  - type: fuse\n"), tmp_path / "out.onnx")


def test_min_cosine_bounds_approximate_passes(model_path: Path, tmp_path: Path) -> None:
    recipe = parse_recipe(
        "passes:\n  - type: prune\n    method: magnitude\n    sparsity: 0.9\nverify:\n  min_cosine: 0.999\n"
    )
    with pytest.raises(VerificationError, match="verify.min_cosine"):
        run_pipeline(model_path, recipe, tmp_path / "out.onnx")


def test_requirements_checked_before_loading(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    recipe = parse_recipe("passes:\n  - type: quantize\n    mode: static\n")
    with pytest.raises(UserInputError, match="needs calibration data"):
        run_pipeline(garbage, recipe, tmp_path / "out.onnx")


def test_random_calibration_is_noted(model_path: Path, tmp_path: Path) -> None:
    recipe = parse_recipe("passes:\n  - type: quantize\n    mode: static\n")
    result = run_pipeline(model_path, recipe, tmp_path / "out.onnx", calibration="random")
    assert any("random" in n for n in result.notes)
    assert result.stages[0].stats["quant_ops"]["QuantizeLinear"] > 0


def test_approximate_stages_are_judged_with_orts_optimized_kernels(
    model_path: Path, tmp_path: Path, monkeypatch
) -> None:
    """QDQ models run as float simulation with optimizations off, as int8 kernels with them on; the
    kernels are what users get (they saturate on CPUs without VNNI), so the gate must see them."""
    import optimizer_cli.verify as verify

    real_run_model = verify.run_model
    levels: list[str] = []

    def kernels_that_drift(model, feeds, config, outputs=None):
        levels.append(config.opt_level)
        results = real_run_model(model, feeds, config, outputs)
        if config.opt_level == "all":  # stand-in for int8 kernels that disagree with the float simulation
            return [[-r for r in res] for res in results]
        return results

    monkeypatch.setattr(verify, "run_model", kernels_that_drift)
    recipe = "passes:\n  - type: cleanup\n  - type: quantize\n    mode: dynamic\n"
    result = run_pipeline(model_path, parse_recipe(recipe), tmp_path / "out.onnx")
    assert levels.count("all") == 1, "only the approximate stage is run with optimizations on"
    assert result.stages[0].worst_cosine() == pytest.approx(1.0)
    assert result.stages[1].worst_cosine() < 0  # the optimized run's drift is the one reported
    with pytest.raises(VerificationError, match="verify.min_cosine"):
        run_pipeline(model_path, parse_recipe(recipe + "verify:\n  min_cosine: 0.9\n"), tmp_path / "out2.onnx")


def test_approximate_stage_that_fails_with_optimizations_on_is_caught(
    model_path: Path, tmp_path: Path, monkeypatch
) -> None:
    import optimizer_cli.verify as verify

    real_run_model = verify.run_model

    def optimizer_rejects(model, feeds, config, outputs=None):
        if config.opt_level == "all":
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : fusion broke a node")
        return real_run_model(model, feeds, config, outputs)

    monkeypatch.setattr(verify, "run_model", optimizer_rejects)
    recipe = parse_recipe("passes:\n  - type: quantize\n    mode: dynamic\n")
    with pytest.raises(VerificationError, match=r"pass 0 \(quantize\).*graph optimizations on.*fusion broke"):
        run_pipeline(model_path, recipe, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def _raising_fuse(monkeypatch, exc: Exception) -> None:
    def call(self, model: ir.Model):
        raise exc

    monkeypatch.setattr(FusePass, "call", call)


def test_a_bug_in_a_pass_is_an_internal_error_naming_the_pass(model_path: Path, tmp_path: Path, monkeypatch) -> None:
    """Issue 24 item 9: exit 3 means the output broke its contract; a pass's own exception is a bug (exit 4)."""
    from optimizer_cli.errors import InternalError

    _raising_fuse(monkeypatch, KeyError("w7"))
    with pytest.raises(InternalError, match=r"internal error: pass 0 \(fuse\) raised KeyError: 'w7'") as raised:
        run_pipeline(model_path, parse_recipe("passes:\n  - type: fuse\n"), tmp_path / "out.onnx")
    assert raised.value.exit_code == 4 and isinstance(raised.value.__cause__, KeyError)
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(
    ("exc", "code"),
    [(UserInputError("fuse: bad option"), 2), (VerificationError("fuse: broke it"), 3), (ValueError("bug"), 4)],
    ids=["user-input", "verification", "bug"],
)
def test_each_exit_code_means_one_thing_at_the_command_line(
    model_path: Path, tmp_path: Path, monkeypatch, capsys, exc: Exception, code: int
) -> None:
    """A pass raising each kind of error: the documented code, one line on stderr, one JSON document with --json."""
    import json

    from optimizer_cli.cli import main

    _raising_fuse(monkeypatch, exc)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes: [{type: fuse}]\n")
    with pytest.raises(SystemExit) as done:
        main([str(model_path), "-r", str(recipe), "-o", str(tmp_path / "out.onnx"), "--no-bench", "--json"])
    out, err = capsys.readouterr()
    assert done.value.code == code, err
    assert json.loads(out)["exit_code"] == code
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "Traceback" not in err
    assert ("internal error" in error_lines[0]) == (code == 4)
