"""Per-layer attribution: rank the nodes that lose fidelity and find an exclude list that restores it."""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from optimizer_cli.model_io import load_model
from optimizer_cli.pipeline import normalize
from optimizer_cli.search.attribution import rank_nodes

from .conftest import run_cli


def test_rank_nodes_finds_the_quantized_layers(examples_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    proc = run_cli(
        str(examples_dir / "digits_cnn.onnx"),
        "-r",
        "cnn-int8",
        "-o",
        str(out),
        "--calib",
        str(examples_dir / "digits_calib.npz"),
        "--no-bench",
    )
    assert proc.returncode == 0, proc.stderr
    original = load_model(examples_dir / "digits_cnn.onnx")
    normalize(original)
    from optimizer_cli.data import load_dataset

    feeds = load_dataset(examples_dir / "digits_eval.npz", original).feeds[:4]
    ranked = rank_nodes(original, load_model(out), feeds)
    assert ranked and all(0.0 <= r["local_drop"] <= 2.0 for r in ranked)
    assert ranked == sorted(ranked, key=lambda r: -r["local_drop"])
    assert {"Conv", "Gemm"} & {op for r in ranked[:5] for op in r["op"].split("+")}


def _cnn_int8(examples_dir: Path, out: Path, *extra: str):
    return run_cli(
        str(examples_dir / "digits_cnn.onnx"), "-r", "cnn-int8", "-o", str(out),
        "--calib", str(examples_dir / "digits_calib.npz"), "--data", str(examples_dir / "digits_eval.npz"),
        "--providers", "cpu", "--set", "benchmark.rounds=2", "--no-memory", "--json", *extra,
    )  # fmt: skip


def test_cli_prints_a_patch_that_meets_the_threshold(examples_dir: Path, tmp_path: Path) -> None:
    proc = _cnn_int8(examples_dir, tmp_path / "q.onnx", "--set", "benchmark.attribution_threshold=0.995")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    cosine = report["benchmark"]["rows"][0]["fidelity"]["cosine_min"]
    attribution = report["attribution"]
    assert attribution["cosine"] == cosine < 0.995
    assert attribution["nodes"][0]["local_drop"] > 0
    assert attribution["patch"].startswith("--set 'passes.2.exclude_nodes=[")
    assert attribution["patch_fidelity"] > cosine
    # Applying the patch is what the user does next: it must be a valid --set and improve fidelity.
    patch = attribution["patch"].split("'")[1]
    again = _cnn_int8(examples_dir, tmp_path / "q2.onnx", "--set", patch, "--no-attribute")
    assert again.returncode == 0, again.stderr
    patched = json.loads(again.stdout)["benchmark"]["rows"][0]["fidelity"]["cosine_min"]
    assert patched > cosine and patched >= 0.995  # the patch was verified on the benchmark's samples
    onnx.checker.check_model(str(tmp_path / "q2.onnx"))


def test_sweep_times_each_shape(examples_dir: Path, tmp_path: Path) -> None:
    proc = run_cli(
        "bench",
        str(examples_dir / "digits_mlp.onnx"),
        str(examples_dir / "digits_mlp.onnx"),
        "--providers",
        "cpu",
        "--rounds",
        "2",
        "--sweep",
        "batch=1,4",
        "--no-memory",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["benchmark"]["rows"]
    assert [r["shape"] for r in rows] == ["batch=1", "batch=4"]
    assert rows[1]["latency_original"]["throughput"] > 0


def test_saturating_cpu_gets_a_reduce_range_patch_not_layer_exclusions(tmp_path: Path, monkeypatch) -> None:
    """On a CPU without VNNI, full-range int8 weights lose fidelity in every layer; the fix is one
    recipe key, found by re-running the recipe with it, not a list of excluded layers."""
    from optimizer_cli.data import random_dataset
    from optimizer_cli.pipeline import run_pipeline
    from optimizer_cli.recipe import parse_recipe
    from optimizer_cli.search import attribution

    from .builders import mlp

    source, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(mlp((64, 128, 64, 10)), str(source))
    recipe = parse_recipe("passes:\n  - type: quantize\n    mode: dynamic\n    reduce_range: false\n")
    run_pipeline(source, recipe, out)
    data = random_dataset(load_model(source), 8, 0, {"batch": 2})
    # The measured fidelity on a saturating CPU (this test may run on any CPU, so it is given).
    report = {"benchmark": {"rows": [{"usable": True, "fidelity": {"cosine_min": 0.8}}]}}

    monkeypatch.setattr(attribution, "u8s8_saturates", lambda: True)
    result = attribution.attribute_if_needed(report, source, out, recipe, data, None, None, 2)
    assert result is not None and result["patch"] == "--set 'passes.0.reduce_range=true'"
    assert result["patch_meets_threshold"] and result["patch_fidelity"] >= 0.99 and result["nodes"] == []

    monkeypatch.setattr(attribution, "u8s8_saturates", lambda: False)
    result = attribution.attribute_if_needed(report, source, out, recipe, data, None, None, 2)
    assert result is not None and "reduce_range" not in (result["patch"] or "")


def _stage(name: str, cosine: float) -> dict:
    return {"name": name, "type": name, "drift_vs_original": [{"cosine": cosine}]}


def test_blame_stage_names_the_largest_drop_not_the_last_pass() -> None:
    from optimizer_cli.search.attribution import blame_stage

    # reconstruct recovers part of what prune lost; quantize loses a little more.
    stages = [_stage("fuse", 1.0), _stage("prune", 0.8885), _stage("reconstruct", 0.95), _stage("quantize", 0.94)]
    blamed = blame_stage(stages)
    assert blamed is not None and blamed["index"] == 1 and blamed["type"] == "prune"
    assert blamed["cosine_before"] == 1.0 and abs(blamed["drop"] - 0.1115) < 1e-9
    assert blamed["quantize_share"] < 0.5 and blamed["quantize_index"] == 3
    blamed = blame_stage([_stage("fuse", 1.0), _stage("quantize", 0.98)])
    assert blamed is not None and blamed["type"] == "quantize" and blamed["quantize_share"] == 1.0
    # Without verification there is no per-stage drift: nothing to blame.
    assert blame_stage([{"name": "prune", "type": "prune", "drift_vs_original": []}]) is None


def test_loss_at_prune_blames_prune_and_prints_no_quantize_patch(examples_dir: Path, tmp_path: Path) -> None:
    """prune -> factorize -> reconstruct -> quantize where prune loses the fidelity: excluding nodes from
    quantization cannot bring it back, so the answer is prune's knob, not an exclude_nodes patch."""
    recipe = tmp_path / "pfrq.yaml"
    recipe.write_text(
        "passes:\n  - type: cleanup\n  - type: fuse\n"
        "  - type: prune\n    method: structured\n    sparsity: 0.3\n"
        "  - type: factorize\n  - type: reconstruct\n"
        "  - type: quantize\n    mode: static\n    per_channel: true\n"
    )
    proc = run_cli(
        str(examples_dir / "digits_cnn.onnx"), "-r", str(recipe), "-o", str(tmp_path / "p.onnx"),
        "--calib", str(examples_dir / "digits_calib.npz"), "--data", str(examples_dir / "digits_eval.npz"),
        "--providers", "cpu", "--set", "benchmark.rounds=2", "--no-memory", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    attribution = report["attribution"]
    assert attribution["cosine"] < 0.99
    assert attribution["stage"]["index"] == 2 and attribution["stage"]["type"] == "prune"
    assert attribution["stage"]["quantize_share"] < 0.5
    assert attribution["patch"] is None and "exclude_nodes=[" not in proc.stdout
    assert "passes.2.sparsity" in attribution["suggestion"] and "pass 2 (prune)" in attribution["search"]


def test_verification_failure_of_static_int8_gets_a_patch_that_passes(examples_dir: Path, tmp_path: Path) -> None:
    """Static int8 under a strict verify.min_cosine stops the run (exit 3); the search finds the layers to
    exclude, and the patch, applied with --set as printed, lets the same run pass."""
    from optimizer_cli.recipe import load_recipe, preset_path
    from optimizer_cli.search.attribution import min_cosine_failure_index, on_verification_failure

    calib, data = str(examples_dir / "digits_calib.npz"), str(examples_dir / "digits_eval.npz")
    strict = "verify.min_cosine=0.995"  # static int8 of the digits CNN measures ~0.989

    def run(*extra: str):
        return run_cli(
            str(examples_dir / "digits_cnn.onnx"), "-r", "cnn-int8", "-o", str(tmp_path / "q.onnx"),
            "--calib", calib, "--data", data, "--no-bench", "--json", "--set", strict, *extra,
        )  # fmt: skip

    failed = run()
    assert failed.returncode == 3, failed.stderr
    message = failed.stderr.strip().splitlines()[-1].removeprefix("error: ")
    index = min_cosine_failure_index(message)
    assert index == 2, message

    recipe = load_recipe(preset_path("cnn-int8"), [strict])
    # What the CLI calls with the error (the message is all it needs to find the failing pass).
    found = on_verification_failure(message, examples_dir / "digits_cnn.onnx", recipe, calib, data, 2)
    assert found is not None and found["verified"] and found["nodes"] and found["pass"] == 2
    assert found["message"].startswith("Recipe patch (verified") and found["patch"] in found["message"]
    assert found["patch"].startswith("--set 'passes.2.exclude_nodes=[") and found["patch_cosine"] >= 0.995

    passed = run("--set", found["patch"].split("'")[1])
    assert passed.returncode == 0, passed.stderr
    quantize = json.loads(passed.stdout)["stages"][2]
    assert quantize["type"] == "quantize" and min(d["cosine"] for d in quantize["drift_vs_original"]) >= 0.995
    assert quantize["stats"]["quant_ops"]  # a patch that excludes some layers, not the whole quantization


def test_verification_failure_of_a_non_quantize_pass_gets_its_knob_not_a_patch() -> None:
    from optimizer_cli.recipe import parse_recipe
    from optimizer_cli.search.attribution import (
        attribute_verification_failure,
        min_cosine_failure_index,
        on_verification_failure,
    )

    recipe = parse_recipe("passes:\n  - type: fuse\n  - type: prune\n    sparsity: 0.5\nverify: {min_cosine: 0.9}\n")
    assert min_cosine_failure_index("pass 1 (prune): output cosine vs original 0.3056 < verify.min_cosine 0.9") == 1
    assert min_cosine_failure_index("pass 1 (prune) produced an invalid model: bad") is None
    assert (
        on_verification_failure("pass 1 (prune) produced an invalid model: bad", "unused.onnx", recipe, None, None)
        is None
    )
    found = attribute_verification_failure("unused.onnx", recipe, 1, None, None)
    assert found is not None and found["patch"] is None and "passes.1.sparsity" in found["suggestion"]
    assert attribute_verification_failure("unused.onnx", parse_recipe("passes: [{type: fuse}]"), 0, None, None) is None


def test_verification_failure_out_of_reach_returns_no_patch(examples_dir: Path) -> None:
    """0.99999 is beyond what excluding every ranked layer reaches: no patch, only advice."""
    from optimizer_cli.recipe import load_recipe, preset_path
    from optimizer_cli.search.attribution import attribute_verification_failure

    recipe = load_recipe(preset_path("cnn-int8"), ["verify.min_cosine=0.99999"])
    found = attribute_verification_failure(
        examples_dir / "digits_cnn.onnx", recipe, 2, str(examples_dir / "digits_calib.npz"),
        str(examples_dir / "digits_eval.npz"), 2,
    )  # fmt: skip
    assert found is not None and found["patch"] is None and "verified" not in found
    assert found["best_cosine"] < 0.99999 and "exclude_nodes" not in found["suggestion"]
