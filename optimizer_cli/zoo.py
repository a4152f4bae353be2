"""Models for tests and benchmarks that need no download: onnx's weightless "light" classic CNNs
(filled with seeded random weights) and a ResNet-18-like CNN built here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LIGHT_MODELS = (
    "bvlc_alexnet",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "resnet50",
    "shufflenet",
    "squeezenet",
    "vgg19",
    "zfnet512",
)


def light_model_path(name: str) -> Path:
    import onnx.backend.test

    return Path(onnx.backend.test.__file__).parent / "data" / "light" / f"light_{name}.onnx"


def materialize_light_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """Replace each ConstantOfShape weight with seeded random data of that shape.

    Conv/Gemm weights get He-scaled normals; BatchNorm variances are positive, so the network's
    activations stay in a sane range and fusion/quantization behave as on a trained model.
    """
    model = onnx.load(str(light_model_path(name)))
    rng = np.random.default_rng(seed)
    shapes = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    consumers: dict[str, tuple[str, int]] = {}
    for node in model.graph.node:
        for i, name_in in enumerate(node.input):
            consumers.setdefault(name_in, (node.op_type, i))
    keep_nodes, new_inits = [], []
    for node in model.graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in shapes:
            keep_nodes.append(node)
            continue
        shape = tuple(int(d) for d in shapes[node.input[0]])
        op, idx = consumers.get(node.output[0], ("", -1))
        if op == "BatchNormalization" and idx == 4:
            data = 0.5 + rng.random(shape)
        elif op == "BatchNormalization" and idx == 1:
            data = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) >= 2:
            fan_in = int(np.prod(shape[1:])) if op != "Gemm" else shape[-1]
            data = rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))
        else:
            data = 0.05 * rng.standard_normal(shape)
        new_inits.append(numpy_helper.from_array(data.astype(np.float32), node.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(keep_nodes)
    used = {i for n in keep_nodes for i in n.input}
    kept_inits = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept_inits + new_inits)
    graph_inputs = [i for i in model.graph.input if i.name in used or i.name not in shapes]
    del model.graph.input[:]
    model.graph.input.extend(i for i in graph_inputs if i.name not in {t.name for t in new_inits})
    # IR 3 requires every initializer to be a graph input; IR 4 lets weights be plain initializers.
    model.ir_version = max(model.ir_version, 4)
    return model


def resnet18_like(width: int = 64, image: int = 112, classes: int = 100, seed: int = 0) -> onnx.ModelProto:
    """ResNet-18 topology (BN after every conv, residual Adds, strided downsampling, GAP + Gemm head)."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    counter = [0]

    def name(prefix: str) -> str:
        counter[0] += 1
        return f"{prefix}{counter[0]}"

    def const(arr: np.ndarray, prefix: str) -> str:
        n = name(prefix)
        inits.append(numpy_helper.from_array(arr.astype(np.float32), n))
        return n

    def conv_bn(x: str, cin: int, cout: int, k: int, stride: int, relu: bool) -> str:
        w = const(rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k)), "w")
        c = name("conv")
        nodes.append(
            helper.make_node("Conv", [x, w], [c], name=c, kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride] * 2)
        )
        bn = name("bn")
        params = [
            const(1 + 0.1 * rng.standard_normal(cout), "g"),
            const(0.05 * rng.standard_normal(cout), "b"),
            const(0.05 * rng.standard_normal(cout), "m"),
            const(0.5 + rng.random(cout), "v"),
        ]
        nodes.append(helper.make_node("BatchNormalization", [c, *params], [bn], name=bn))
        if not relu:
            return bn
        r = name("relu")
        nodes.append(helper.make_node("Relu", [bn], [r], name=r))
        return r

    x = conv_bn("image", 3, width, 7, 2, True)
    p = name("pool")
    nodes.append(helper.make_node("MaxPool", [x], [p], name=p, kernel_shape=[3, 3], pads=[1] * 4, strides=[2, 2]))
    x, cin = p, width
    for stage, cout in enumerate([width, width * 2, width * 4, width * 8]):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            y = conv_bn(x, cin, cout, 3, stride, True)
            y = conv_bn(y, cout, cout, 3, 1, False)
            skip = conv_bn(x, cin, cout, 1, stride, False) if stride != 1 or cin != cout else x
            a = name("add")
            nodes.append(helper.make_node("Add", [y, skip], [a], name=a))
            r = name("relu")
            nodes.append(helper.make_node("Relu", [a], [r], name=r))
            x, cin = r, cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["feat"], name="flatten", axis=1))
    fc_w = const(rng.standard_normal((cin, classes)) * np.sqrt(1.0 / cin), "fc_w")
    fc_b = const(np.zeros(classes), "fc_b")
    nodes.append(helper.make_node("Gemm", ["feat", fc_w, fc_b], ["logits"], name="fc"))
    graph = helper.make_graph(
        nodes,
        "resnet18_like",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, image, image])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="optimizer-cli-zoo")
    model.ir_version = 8
    return model


def calibrate_batchnorm(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Set every BatchNorm's mean/var to the statistics of its input on `feeds`, layer by layer.

    Random weights with arbitrary BN statistics give exploding or collapsing activations (every
    input predicts the same class); real statistics give a well-conditioned network, as training does.
    """
    import onnxruntime as ort

    inits = {t.name: i for i, t in enumerate(model.graph.initializer)}

    def activation(name: str) -> np.ndarray:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.output[:]
        probe.graph.output.append(helper.make_empty_tensor_value_info(name))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return sess.run(None, feeds)[0]

    def put(name: str, value: np.ndarray) -> None:
        model.graph.initializer[inits[name]].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    for node in [n for n in model.graph.node if n.op_type == "BatchNormalization"]:
        act = activation(node.input[0])
        axes = (0, *range(2, act.ndim))
        put(node.input[3], act.mean(axis=axes))
        put(node.input[4], act.var(axis=axes))
    # Standardize the classifier's input features (folded into the Gemm), so logits vary with the
    # input instead of being dominated by the features' common mean.
    head = next((n for n in model.graph.node if n.op_type == "Gemm"), None)
    if head is not None and head.input[1] in inits:
        feats = activation(head.input[0])
        mean, std = feats.mean(0), feats.std(0) + 1e-6
        w = numpy_helper.to_array(model.graph.initializer[inits[head.input[1]]])
        put(head.input[1], w / std[:, None])
        if len(head.input) > 2 and head.input[2] in inits:
            b = numpy_helper.to_array(model.graph.initializer[inits[head.input[2]]])
            put(head.input[2], b - (mean / std) @ w)
    return model
