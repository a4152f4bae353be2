"""The bounded-memory quantizers (passes/_per_tensor.py) against onnxruntime's own tools.

Oracle: on a small decoder (embedding, attention, MLP, LM head; weights in external data, loaded
memory-mapped like a large model) each per-tensor rewrite gives the graph onnxruntime's tool gives
(every node's type, name, inputs and outputs) and the same initializers bit for bit, passes onnx.checker
and strict shape inference, and runs in onnxruntime. The slow test runs the int8, fp16 and int4 recipes
on a model over 2 GB and bounds the command's peak memory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxruntime as ort
import pytest
from onnx.reference.op_run import OpRun

from optimizer_cli.bench.memory import command_peak
from optimizer_cli.large_examples import build_decoder, build_matmul_chain, save_large
from optimizer_cli.model_io import save_model
from optimizer_cli.passes import _graph
from optimizer_cli.passes import _per_tensor as per_tensor
from optimizer_cli.passes.quantize import QuantizeConfig, QuantizePass
from optimizer_cli.runtime.cpu import u8s8_saturates

from .builders import context

FEED = {"input_ids": np.array([[3, 17, 250, 9, 0, 101]], dtype=np.int64)}


@pytest.fixture
def decoder_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Small weights go to the scratch store and get stubbed too, as every weight of a large model would.
    monkeypatch.setattr(_graph, "STORE_MIN_BYTES", 1024)
    return save_large(build_decoder(hidden=64, layers=2, heads=4, vocab=256), tmp_path / "decoder.onnx")


def _ours(path: Path, rewrite, out: Path) -> onnx.ModelProto:
    model = ir.load(path)  # weights stay in external data, memory-mapped
    result = rewrite(model)
    if isinstance(result, ir.Model):  # fp16 returns the converted model
        common.TopologicalSortPass()(result)
        model.graph = result.graph
    save_model(model, out, external_data=True)
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    return proto


def _same_as_onnxruntime(ours: onnx.ModelProto, theirs: onnx.ModelProto) -> None:
    def nodes(m: onnx.ModelProto) -> list[tuple]:
        return sorted((n.op_type, n.domain, n.name, tuple(n.input), tuple(n.output)) for n in m.graph.node)

    assert nodes(ours) == nodes(theirs)
    mine = {t.name: onnx.numpy_helper.to_array(t) for t in ours.graph.initializer}
    reference = {t.name: onnx.numpy_helper.to_array(t) for t in theirs.graph.initializer}
    assert set(mine) == set(reference)
    for name, array in reference.items():
        assert mine[name].dtype == array.dtype and mine[name].shape == array.shape, name
        assert mine[name].tobytes() == array.tobytes(), name
    assert {o.domain: o.version for o in ours.opset_import} == {o.domain: o.version for o in theirs.opset_import}


def _run(model: Path | onnx.ModelProto, optimize: bool = True) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    options = ort.SessionOptions()
    if not optimize:  # each node by its own kernel: equal graphs give equal bits, whatever the node order
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, FEED)[0]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _same_outputs_as_onnxruntime(ours: onnx.ModelProto, theirs: onnx.ModelProto) -> None:
    """The reference computed on this host: the tool's model through this CPU's own kernels (VNNI, AMX or
    plain AVX2 give different int8 results, so a fixed cosine bound on them would hold on some hosts only)."""
    assert np.array_equal(_run(ours, optimize=False), _run(theirs, optimize=False))


# ---- int8 arithmetic without this CPU's kernels (see CONTRIBUTING.md, "Tests and the CPU's int8 kernels") ----
#
# onnx.reference evaluates MatMulInteger in numpy, so a fidelity bound checked on it holds on every host.
# _SaturatingMatMulInteger models x86 CPUs without VNNI: MLAS's u8*s8 kernels there multiply with
# VPMADDUBSW, which adds each pair of adjacent products along K in int16 with saturation before summing
# in int32; on the decoder below it reproduces the cosine an AVX2-only AMD EPYC reported (0.99858).


class _ExactMatMulInteger(OpRun):
    op_domain = ""

    def _run(self, a, b, a_zero_point=None, b_zero_point=None):  # type: ignore[no-untyped-def]
        za = np.int64(a_zero_point) if a_zero_point is not None else np.int64(0)
        zb = b_zero_point.astype(np.int64) if b_zero_point is not None else np.int64(0)
        return (((a.astype(np.int64) - za) @ (b.astype(np.int64) - zb)).astype(np.int32),)


class _SaturatingMatMulInteger(_ExactMatMulInteger):
    def _run(self, a, b, a_zero_point=None, b_zero_point=None):  # type: ignore[no-untyped-def]
        a, b = a.astype(np.int64), b.astype(np.int64)
        if a.shape[-1] % 2:  # the kernels pad K with zeros
            a = np.concatenate([a, np.zeros((*a.shape[:-1], 1), np.int64)], axis=-1)
            b = np.concatenate([b, np.zeros((1, *b.shape[1:]), np.int64)], axis=0)
        pairs = np.einsum("...kp,kpn->...kn", a.reshape(*a.shape[:-1], -1, 2), b.reshape(-1, 2, *b.shape[1:]))
        raw = np.clip(pairs, -32768, 32767).sum(axis=-2)
        # Zero points are applied exactly, from row and column sums, as MLAS does.
        za = np.int64(a_zero_point) if a_zero_point is not None else np.int64(0)
        zb = b_zero_point.astype(np.int64) if b_zero_point is not None else np.int64(0)
        k = a.shape[-1]
        return ((raw - a.sum(axis=-1, keepdims=True) * zb - za * b.sum(axis=0) + za * zb * k).astype(np.int32),)


class _DequantizeLinear(OpRun):  # onnx.reference implements it from opset 19 only
    op_domain = ""

    def _run(self, x, scale, zero_point=None, axis=1, block_size=None, output_dtype=None):  # type: ignore[no-untyped-def]
        zp = np.asarray(zero_point if zero_point is not None else 0).astype(np.float32)
        if scale.ndim == 1 and x.ndim > 1:
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), (zp.reshape(shape) if zp.ndim else zp)
        return (((x.astype(np.float32) - zp) * scale).astype(np.float32),)


for _cls, _name in ((_ExactMatMulInteger, "MatMulInteger"), (_SaturatingMatMulInteger, "MatMulInteger")):
    _cls.__name__ = _name
_DequantizeLinear.__name__ = "DequantizeLinear"


def _int8_reference(model: onnx.ModelProto, saturating: bool = False) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    matmul = _SaturatingMatMulInteger if saturating else _ExactMatMulInteger
    return ReferenceEvaluator(model, new_ops=[matmul, _DequantizeLinear]).run(None, FEED)[0]


@pytest.mark.parametrize("reduce_range", [False, True])
@pytest.mark.parametrize("per_channel", [True, False])
def test_dynamic_int8_equals_quantize_dynamic(
    decoder_path: Path, tmp_path: Path, per_channel: bool, reduce_range: bool
) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    theirs = tmp_path / "ort.onnx"
    quantize_dynamic(
        str(decoder_path),
        str(theirs),
        op_types_to_quantize=["MatMul", "Gather"],
        per_channel=per_channel,
        reduce_range=reduce_range,
        weight_type=QuantType.QInt8,
        extra_options={"MatMulConstBOnly": True},
    )
    ours = _ours(
        decoder_path,
        lambda m: per_tensor.quantize_dynamic_per_tensor(
            m,
            op_types={"MatMul", "Gather"},
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type="int8",
            exclude=set(),
        ),
        tmp_path / "ours.onnx",
    )
    reference = onnx.load(str(theirs))
    _same_as_onnxruntime(ours, reference)
    assert sum(n.op_type == "MatMulInteger" for n in ours.graph.node) == 2 * 6 + 1
    _same_outputs_as_onnxruntime(ours, reference)
    # The quantization's own fidelity, in exact integer arithmetic (numpy, so the same on every host; what
    # VNNI/AMX/ARM kernels compute): 0.99973 / 0.99936 per channel, 0.99953 / 0.99891 per tensor (full / 7-bit
    # range). Full-range weights on AVX2-only CPUs saturate (see the next test); reduce_range: auto avoids that.
    assert _cos(_run(decoder_path), _int8_reference(ours)) > 0.998


@pytest.mark.parametrize("per_channel", [True, False])
def test_full_range_int8_saturates_avx2_pairs_and_7_bit_weights_do_not(
    decoder_path: Path, tmp_path: Path, per_channel: bool
) -> None:
    """Why the int8 tests hold on AVX2-only, AVX512-VNNI and AMX hosts alike: a uint8 activation (<= 255)
    times a 7-bit weight (|w| <= 64) gives pairs of at most 2 * 255 * 64 = 32640, inside int16, so
    reduce_range: auto (7-bit weights where u8s8_saturates) computes on AVX2 what VNNI computes exactly;
    full-range weights (|w| <= 127) reach 64770 and saturate there."""
    for reduce_range in (False, True):
        model = ir.load(decoder_path)
        per_tensor.quantize_dynamic_per_tensor(
            model,
            op_types={"MatMul", "Gather"},
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type="int8",
            exclude=set(),
        )
        out = tmp_path / f"q{reduce_range}.onnx"
        save_model(model, out, external_data=True)
        proto = onnx.load(str(out))
        exact, saturated = _int8_reference(proto), _int8_reference(proto, saturating=True)
        assert np.array_equal(exact, saturated) == reduce_range
        if reduce_range or not u8s8_saturates():  # where this host's kernels compute int8 exactly
            assert np.allclose(_run(proto), exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True)])
def test_weight_only_equals_matmul_nbits_quantizer(
    decoder_path: Path, tmp_path: Path, bits: int, symmetric: bool
) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(decoder_path)), bits=bits, block_size=32, is_symmetric=symmetric, accuracy_level=4
    )
    quantizer.process()
    ours = _ours(
        decoder_path,
        lambda m: per_tensor.quantize_weight_only_per_tensor(
            m, bits=bits, block_size=32, symmetric=symmetric, accuracy_level=4, exclude=set()
        ),
        tmp_path / "ours.onnx",
    )
    _same_as_onnxruntime(ours, quantizer.model.model)
    assert sum(n.op_type == "MatMulNBits" for n in ours.graph.node) == 2 * 6 + 1
    _same_outputs_as_onnxruntime(ours, quantizer.model.model)
    # accuracy_level 4 runs this CPU's int8 kernels; the weights' fidelity is judged with float compute
    # (accuracy_level unset: blocks dequantized, float32 GEMM), which every host computes alike.
    for node in ours.graph.node:
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend(kept)
    assert _cos(_run(decoder_path), _run(ours)) > (0.95 if bits == 4 else 0.999)


def test_fp16_equals_convert_float_to_float16(decoder_path: Path, tmp_path: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    theirs = convert_float_to_float16(onnx.load(str(decoder_path)), keep_io_types=True)
    ours = _ours(
        decoder_path,
        lambda m: per_tensor.convert_fp16_per_tensor(m, op_block_list=None, node_block_list=None),
        tmp_path / "ours.onnx",
    )
    _same_as_onnxruntime(ours, theirs)
    _same_outputs_as_onnxruntime(ours, theirs)
    # CPUs differ in float16 arithmetic (AVX512-FP16 computes in it, others widen to float32): the
    # conversion's fidelity is judged on the float16-rounded weights computed in float32.
    rounded = onnx.load(str(decoder_path))
    for tensor in rounded.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            array = per_tensor.to_float16(onnx.numpy_helper.to_array(tensor)).astype(np.float32)
            tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    assert _cos(_run(decoder_path), _run(rounded)) > 0.9999


def test_to_float16_clamps_like_the_converter() -> None:
    from onnxruntime.transformers.float16 import convert_np_to_float16

    rng = np.random.default_rng(0)
    magnitudes = 10.0 ** rng.integers(-12, 8, 20000)
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, 5.96e-8, -5.96e-8, 5.9e-8, 65504, -65504, 65505, -7e5, 1e-45]
    array = np.concatenate([rng.standard_normal(20000) * magnitudes, special]).astype(np.float32).reshape(-1, 3)
    assert np.array_equal(per_tensor.to_float16(array).view(np.uint16), convert_np_to_float16(array).view(np.uint16))


def test_structure_proto_reads_no_weight(tmp_path: Path) -> None:
    path = save_large(build_matmul_chain(dim=512, layers=2), tmp_path / "chain.onnx")
    model = ir.load(path)
    proto, stubbed = per_tensor.structure_proto(model)
    assert stubbed == {"matmul_0.weight", "matmul_1.weight"}
    assert all(t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data for t in proto.graph.initializer)
    # The model itself is untouched: its weights still read from the original file.
    assert isinstance(model.graph.initializers["matmul_0.weight"].const_value, ir.ExternalTensor)
    assert model.graph.initializers["matmul_0.weight"].const_value.location == "chain.onnx.data"


def test_pass_per_tensor_reports_ops_it_leaves_float(tmp_path: Path) -> None:
    """Gemm is among dynamic mode's defaults; the per-tensor path quantizes MatMul/Gather and says so."""
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            onnx.helper.make_node("Gemm", ["h", "g"], ["y"], name="gemm"),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 8])],
        [
            onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32), "w"),
            onnx.numpy_helper.from_array(np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32), "g"),
        ],
    )
    model = ir.serde.deserialize_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    instance = QuantizePass(QuantizeConfig(mode="dynamic", per_tensor=True), context(tmp_path))
    result = instance(model)
    assert result.modified
    assert instance.stats["engine"].startswith("per tensor")
    assert instance.stats["left_float"] == {"Gemm": 1}
    assert instance.stats["quant_ops"]["MatMulInteger"] == 1


@pytest.mark.slow
def test_recipes_on_a_model_over_2gb_stay_under_1_5x_its_size(tmp_path: Path) -> None:
    """8 MatMul 8192x8192 (2.15 GB in external data) through int8, fp16 and int4: each succeeds, the
    result runs in onnxruntime, and the whole command's peak RSS stays under 1.5x the model."""
    model = save_large(build_matmul_chain(dim=8192, layers=8), tmp_path / "chain.onnx")
    size = model.stat().st_size + (tmp_path / "chain.onnx.data").stat().st_size
    assert size > 2**31
    for recipe in ("int8", "fp16", "int4"):  # presets, by name
        out = tmp_path / f"chain.{recipe}.onnx"
        report = tmp_path / f"{recipe}.json"
        command = [
            sys.executable,
            "-m",
            "optimizer_cli",
            "run",
            str(model),
            "--recipe",
            recipe,
        ]
        command += ["-o", str(out), "--no-bench", "--report", str(report)]
        measured = command_peak(command)
        rc, peak = measured["rc"], measured["peak_rss"]
        assert rc == 0, (recipe, measured["last_line"])
        assert peak <= 1.5 * size, f"{recipe}: peak RSS {peak / 1e9:.2f} GB for a {size / 1e9:.2f} GB model"
        stages = json.loads(report.read_text())["stages"]
        assert stages[-1]["stats"]["engine"].startswith("per tensor")
        assert min(d["cosine"] for d in stages[-1]["drift_vs_original"]) > 0.95
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert np.isfinite(session.run(None, {"x": np.ones((1, 8192), np.float32)})[0]).all()
        del session
        out.unlink()
        (tmp_path / f"{out.name}.data").unlink()


def test_weight_only_quantizes_a_shared_weight_once(tmp_path: Path) -> None:
    weight = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
            onnx.helper.make_node("MatMul", ["x", "w"], ["b"], name="second"),
            onnx.helper.make_node("Add", ["a", "b"], ["y"], name="sum"),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 32])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    model = ir.serde.deserialize_model(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    )
    assert (
        per_tensor.quantize_weight_only_per_tensor(
            model, bits=4, block_size=32, symmetric=True, accuracy_level=None, exclude=set()
        )
        == 2
    )
    nodes = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert nodes[0].inputs[1] is nodes[1].inputs[1] and "w" not in model.graph.initializers
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    y = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    assert np.allclose(y, 2 * x @ weight, atol=0.15 * np.abs(2 * x @ weight).max())


def test_progress_names_every_weight(decoder_path: Path, tmp_path: Path) -> None:
    ctx = context(tmp_path)
    lines: list[str] = []
    ctx.progress = lines.append
    QuantizePass(QuantizeConfig(mode="weight_only", per_tensor=True), ctx)(ir.load(decoder_path))
    assert len(lines) == 2 * 6 + 1
    assert lines[0] == "quantize: weight 1 of 13 (layers.0.attn.q.weight)" and lines[-1].endswith("(lm_head.weight)")


@pytest.mark.parametrize("opset", [10, 12])
def test_dynamic_per_tensor_keeps_the_opset_and_refuses_below_11(tmp_path: Path, opset: int) -> None:
    """Per-channel MatMulInteger needs no newer opset (raising it without converting other ops would break
    them); DynamicQuantizeLinear needs 11, so an opset-10 model is left unchanged, with the reason."""
    weight = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 16])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=7)
    model = ir.serde.deserialize_model(proto)
    instance = QuantizePass(QuantizeConfig(mode="dynamic", per_tensor=True), context(tmp_path))
    result = instance(model)
    assert model.opset_imports[""] == opset
    if opset < 11:
        assert not result.modified and "opset >= 11" in instance.stats["skipped"]
        return
    assert result.modified
    quantized = ir.serde.serialize_model(model)
    onnx.checker.check_model(quantized)
    x = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    y = ort.InferenceSession(quantized.SerializeToString()).run(None, {"x": x})[0]
    assert np.allclose(y, x @ weight, atol=0.05 * np.abs(x @ weight).max())
