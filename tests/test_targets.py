"""Run targets: parsing, plugin EP discovery, node placement, and (where a device exists) the OpenVINO EP."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from optimizer_cli.errors import UserInputError
from optimizer_cli.runtime import ep_plugins
from optimizer_cli.runtime.providers import node_placement, parse_provider_list, probe_provider
from optimizer_cli.runtime.session import SessionConfig, create_session, session_target
from optimizer_cli.runtime.targets import parse_target

from .builders import mlp, random_feed, run


@pytest.mark.parametrize(
    ("text", "label", "precision", "device"),
    [
        ("cpu", "cpu", None, None),
        ("CPU", "cpu", None, None),
        ("openvino", "openvino", None, None),
        ("openvino:bf16", "openvino:bf16", "bf16", None),
        ("openvino:FP32", "openvino:f32", "f32", None),
        ("openvino@gpu:fp16", "openvino@gpu:f16", "f16", "gpu"),
        ("trt:fp16", "trt:fp16", "fp16", None),
        ("tensorrt:int8", "tensorrt:int8", "int8", None),
        ("openvino:num_streams=1:bf16", "openvino:bf16:num_streams=1", "bf16", None),
        ("CUDAExecutionProvider", "CUDAExecutionProvider", None, None),
    ],
)
def test_target_syntax(text: str, label: str, precision: str | None, device: str | None) -> None:
    target = parse_target(text)
    assert (target.label, target.precision, target.device) == (label, precision, device)
    assert parse_target(target.label) == target  # the label reads back as the same target


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cpu:bf16", "runs the model's own precision"),
        ("openvino:int4", "one of bf16, f16, f32"),
        ("openvino:bf16:f32", "more than one precision"),
        ("openvino@tpu", "unknown device 'tpu'"),
        ("tpu", "unknown execution provider 'tpu'"),
        ("openvino:=1", "has no name"),
        ("", "empty execution target"),
    ],
)
def test_target_mistakes_say_what_is_allowed(text: str, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        parse_target(text)


def test_provider_lists_are_canonical_and_deduplicated() -> None:
    assert parse_provider_list("cpu, openvino:BF16,cpu") == ["cpu", "openvino:bf16"]


def test_openvino_precision_goes_through_its_own_precision_hint() -> None:
    """The EP's `precision` option was ignored on AMX hosts: the precision is asked of OpenVINO itself."""
    import json

    options = parse_target("openvino:f32").provider_options(threads=3)
    assert options["num_of_threads"] == "3" and "precision" not in options
    assert json.loads(Path(options["load_config"]).read_text()) == {"CPU": {"INFERENCE_PRECISION_HINT": "f32"}}
    gpu = json.loads(Path(parse_target("openvino@gpu:f16").provider_options(2)["load_config"]).read_text())
    assert gpu == {"GPU": {"INFERENCE_PRECISION_HINT": "f16"}}
    assert "load_config" not in parse_target("openvino").provider_options(2)  # the engine's default, said so


def test_tensorrt_flags_of_older_recipes_become_the_target_precision() -> None:
    target = session_target(SessionConfig(provider="trt", trt_fp16=True, trt_cache_dir=None))
    assert target.precision == "fp16"
    assert target.provider_options(2)["trt_fp16_enable"] == "True"
    assert session_target(SessionConfig(provider="trt:int8")).provider_options(2)["trt_int8_enable"] == "True"


def _fake_plugin(root: Path, name: str, library: Path) -> None:
    """An installed plugin EP package as pip lays it out: a module and its dist-info."""
    module = f"onnxruntime_ep_{name}"
    (root / module).mkdir()
    (root / module / "__init__.py").write_text(
        f"def get_library_path():\n    return {str(library)!r}\n\n"
        f"def get_ep_names():\n    return ['{name.capitalize()}ExecutionProvider']\n"
    )
    info = root / f"onnxruntime_ep_{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: onnxruntime-ep-{name}\nVersion: 0.1\n")
    (info / "top_level.txt").write_text(module + "\n")


def test_plugin_packages_are_discovered_and_a_broken_one_is_reported(tmp_path: Path, monkeypatch) -> None:
    library = tmp_path / "not_a_library.so"
    library.write_text("not an ELF file")
    _fake_plugin(tmp_path, "fake", library)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(ep_plugins, "_REGISTERED", {})
    found = {p.distribution: p for p in ep_plugins.plugin_libraries()}
    fake = found["onnxruntime-ep-fake==0.1"]
    assert fake.ep_names == ("FakeExecutionProvider",) and fake.path == str(library)
    assert not fake.registered and "registration failed" in str(fake.problem)
    status = probe_provider("FakeExecutionProvider")
    assert not status.usable and "onnxruntime-ep-fake==0.1" in status.reason
    sys.modules.pop("onnxruntime_ep_fake", None)


def test_a_provider_nobody_provides_names_what_to_install() -> None:
    status = probe_provider("coreml")
    assert not status.usable
    assert "not in this onnxruntime build" in status.reason


def test_placement_counts_nodes_per_provider_and_shows_a_silent_fallback(tmp_path: Path) -> None:
    proto = mlp()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    cpu = create_session(path, SessionConfig(provider="cpu", opt_level="disable"))
    assert node_placement(cpu) == {"CPUExecutionProvider": len(proto.graph.node)}
    if probe_provider("cuda").usable:
        pytest.skip("a GPU is here: CUDA takes the nodes, there is no fallback to show")
    # onnxruntime-gpu lists CUDA without a GPU and silently runs everything on the CPU: the record says so.
    cuda = create_session(path, SessionConfig(provider="cuda", opt_level="disable"))
    assert node_placement(cuda) == {"CPUExecutionProvider": len(proto.graph.node)}


@pytest.mark.openvino
def test_openvino_f32_matches_the_cpu_ep_and_takes_the_nodes(tmp_path: Path) -> None:
    proto = mlp()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    feed = random_feed(proto, batch=2)
    sess = create_session(path, SessionConfig(provider="openvino:f32"))
    assert "OpenVINOExecutionProvider" in node_placement(sess)
    (got,) = sess.run(None, feed)
    np.testing.assert_allclose(got, run(proto, feed)[0], rtol=1e-4, atol=1e-4)


def test_catalog_lists_the_reference_first_and_openvino_even_when_absent() -> None:
    from optimizer_cli.runtime.providers import provider_catalog

    rows = provider_catalog()
    assert rows[0]["alias"] == "cpu" and rows[0]["usable"] and rows[0]["devices"] == ["cpu"]
    openvino = next(r for r in rows if r["provider"] == "OpenVINOExecutionProvider")
    assert openvino["usable"] == probe_provider("openvino").usable
    if not openvino["usable"]:
        assert openvino["reason"] and openvino["reason"] != "ok"
    assert "f32" in openvino["options"] and "bf16" in openvino["options"]


def test_the_deployment_snippet_creates_the_session_it_describes(tmp_path: Path) -> None:
    from optimizer_cli.runtime.targets import deployment_snippet

    path = tmp_path / "m.onnx"
    onnx.save(mlp(), path)
    code = deployment_snippet(parse_target("cpu"), str(path), 3, {"opt_level": "extended"})
    scope: dict = {}
    exec(compile(code, "snippet", "exec"), scope)
    session = scope["session"]
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert scope["options"].intra_op_num_threads == 3
    # OpenVINO: the plugin is registered, its device chosen, the precision asked through OpenVINO's own hint.
    ov = deployment_snippet(parse_target("openvino:f32"), "best.onnx", 2)
    compile(ov, "snippet", "exec")
    assert "register_execution_provider_library" in ov and "INFERENCE_PRECISION_HINT" in ov
    assert "add_provider_for_devices" in ov and "OrtHardwareDeviceType.CPU" in ov


@pytest.mark.openvino
def test_openvino_rows_are_scored_against_the_cpu_ep_with_placement_and_a_precision_check(tmp_path: Path) -> None:
    """Where the OpenVINO EP offers a CPU device: its row has the engine alone beside the optimized model, the
    nodes it took, and the f32 hint checked against bf16 (identical outputs are said, not assumed away)."""
    from optimizer_cli.bench.harness import BenchSettings, run_benchmark
    from optimizer_cli.data import Dataset

    proto = mlp()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    data = Dataset([random_feed(proto, seed=s, batch=1) for s in range(4)], None, "test", False)
    settings = BenchSettings(providers=["openvino:f32"], rounds=2, runs_per_round=2, warmup=1, memory=False)
    (row,) = run_benchmark(path, path, settings, data).rows
    assert row.usable and row.engine_alone is not None
    assert row.placement and row.placement["optimized"].get("OpenVINOExecutionProvider", 0) > 0
    assert row.fidelity is not None and row.fidelity.cosine_min > 0.9999  # f32: the CPU EP's outputs
    assert row.precision_check is not None and row.precision_check["against"] == "openvino:bf16"
