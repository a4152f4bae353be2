"""Small ONNX models the tests build themselves (seeded weights, static spatial shapes)."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class Builder:
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, array: np.ndarray, prefix: str = "w") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str:
        name = self.name(op_type.lower())
        outs = [f"{name}_out{i}" if i else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0]

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, stride: int = 1, bias: bool = True) -> str:
        w = self.const(
            (self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2 / (cin // group * k * k))).astype(
                np.float32
            )
        )
        inputs = [x, w]
        if bias:
            inputs.append(self.const((0.1 * self.rng.standard_normal(cout)).astype(np.float32), "b"))
        return self.op("Conv", inputs, kernel_shape=[k, k], pads=[k // 2] * 4, group=group, strides=[stride, stride])

    def bn(self, x: str, c: int) -> str:
        params = [
            (1 + 0.2 * self.rng.standard_normal(c)).astype(np.float32),
            (0.1 * self.rng.standard_normal(c)).astype(np.float32),
            (0.1 * self.rng.standard_normal(c)).astype(np.float32),
            (0.5 + self.rng.random(c)).astype(np.float32),
        ]
        return self.op("BatchNormalization", [x, *(self.const(p, "bn") for p in params)], epsilon=1e-5)

    def matmul(self, x: str, k: int, n: int, bias: bool = True) -> str:
        y = self.op("MatMul", [x, self.const((self.rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32))])
        if bias:
            y = self.op("Add", [y, self.const((0.1 * self.rng.standard_normal(n)).astype(np.float32), "b")])
        return y

    def model(
        self, inputs: list[tuple[str, int, list]], outputs: list[tuple[str, str]], opset: int = OPSET
    ) -> onnx.ModelProto:
        """outputs: (graph output name, internal value name) pairs; an Identity renames them."""
        for out_name, value in outputs:
            self.nodes.append(helper.make_node("Identity", [value], [out_name], name=self.name("out")))
        graph = helper.make_graph(
            self.nodes,
            "test",
            [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n, _ in outputs],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        # Graph outputs need a declared shape: take the inferred one.
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
        for out in model.graph.output:
            src = next(n.input[0] for n in model.graph.node if n.output[0] == out.name)
            if src in inferred:
                out.type.CopyFrom(inferred[src].type)
        onnx.checker.check_model(model)
        return model


def mlp(sizes: tuple[int, ...] = (32, 64, 48, 10), seed: int = 0) -> onnx.ModelProto:
    b = Builder(seed)
    x = "x"
    for i, (k, n) in enumerate(itertools.pairwise(sizes)):
        x = b.matmul(x, k, n)
        if i < len(sizes) - 2:
            x = b.op("Relu", [x])
    return b.model([("x", TensorProto.FLOAT, ["batch", sizes[0]])], [("y", x)])


def resnet_like(width: int = 16, seed: int = 0, size: int = 16) -> onnx.ModelProto:
    """Conv+BN+Relu stem, a residual block, a Concat of two branches, a depthwise conv, Flatten+Gemm."""
    b = Builder(seed)
    w = width
    x = b.op("Relu", [b.bn(b.conv("x", 3, w), w)])
    y = b.op("Relu", [b.bn(b.conv(x, w, w), w)])
    y = b.bn(b.conv(y, w, w), w)
    x = b.op("Relu", [b.op("Add", [x, y])])
    left = b.op("Relu", [b.conv(x, w, w, k=1)])
    right = b.op("Relu", [b.conv(x, w, w // 2, k=3)])
    x = b.op("Concat", [left, right], axis=1)
    c = w + w // 2
    x = b.op("Relu", [b.bn(b.conv(x, c, c, k=3, group=c), c)])
    x = b.op("Relu", [b.conv(x, c, 2 * w, k=1, stride=2)])
    x = b.op("GlobalAveragePool", [x])
    x = b.op("Flatten", [x], axis=1)
    logits = b.op(
        "Gemm",
        [
            x,
            b.const((b.rng.standard_normal((2 * w, 10)) * 0.3).astype(np.float32)),
            b.const(np.zeros(10, np.float32), "b"),
        ],
    )
    return b.model([("x", TensorProto.FLOAT, ["batch", 3, size, size])], [("logits", logits)])


def flatten_head(width: int = 8, seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> Flatten over spatial positions (channel c expands to H*W features) -> Gemm."""
    b = Builder(seed)
    x = b.op("Relu", [b.conv("x", 2, width, k=3)])
    x = b.op("Flatten", [x], axis=1)
    g = b.op(
        "Gemm",
        [
            x,
            b.const((b.rng.standard_normal((width * 16, 5)) * 0.1).astype(np.float32)),
            b.const(np.zeros(5, np.float32), "b"),
        ],
    )
    return b.model([("x", TensorProto.FLOAT, [1, 2, 4, 4])], [("y", g)])


def random_feed(model: onnx.ModelProto, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in model.graph.input:
        dims = [d.dim_value if d.dim_value > 0 else batch for d in inp.type.tensor_type.shape.dim]
        feed[inp.name] = rng.standard_normal(dims).astype(np.float32)
    return feed


def run(model, feed: dict[str, np.ndarray], opt_level: str = "disable") -> list[np.ndarray]:
    """ORT run of an onnx ModelProto or onnx_ir Model (graph optimizations off unless asked)."""
    import onnx_ir as ir
    import onnxruntime as ort

    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    opts.log_severity_level = 4
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feed.items() if k in names})


def check(model) -> None:
    """onnx.checker + strict shape inference, as the pipeline does after every pass."""
    import onnx_ir as ir

    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    onnx.checker.check_model(proto)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)


def context(tmp_path, calibration=None, load_original=None):
    """A PassContext for calling passes directly."""
    from optimizer_cli.data import Dataset
    from optimizer_cli.passes.base import PassContext

    return PassContext(
        calibration=calibration,
        verify_data=Dataset([]),
        rng=np.random.default_rng(0),
        tmp_dir=tmp_path,
        load_original=load_original,
    )


def to_ir(model: onnx.ModelProto):
    import onnx_ir as ir

    from optimizer_cli.pipeline import normalize

    m = ir.serde.deserialize_model(model)
    normalize(m)
    return m


def tiny_encoder(
    seq: int | str = "sequence",
    hidden: int = 16,
    vocab: int = 50,
    seed: int = 0,
    pooled: bool = True,
    masked: bool = True,
    hard_coded_seq: int | None = None,
) -> onnx.ModelProto:
    """One-layer BERT-style encoder: embeddings + positions, masked single-head attention, FFN, mean pooling.

    pooled=False outputs the per-token states; masked=False drops the attention mask (outputs then
    depend on padded positions); hard_coded_seq adds a Reshape that fixes the sequence length.
    """
    b = Builder(seed)
    h = hidden
    words = b.const((0.5 * b.rng.standard_normal((vocab, h))).astype(np.float32), "word")
    positions = b.const((0.1 * b.rng.standard_normal((512, h))).astype(np.float32), "pos")
    x = b.op("Gather", [words, "input_ids"])
    seq_len = b.op("Gather", [b.op("Shape", ["input_ids"]), b.const(np.array(1, np.int64), "i")])
    pos_ids = b.op("Range", [b.const(np.array(0, np.int64), "i"), seq_len, b.const(np.array(1, np.int64), "i")])
    x = b.op("Add", [x, b.op("Gather", [positions, pos_ids])])
    if hard_coded_seq is not None:
        x = b.op("Reshape", [x, b.const(np.array([-1, hard_coded_seq, h], np.int64), "shape")])
    mask = b.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    q, k, v = (b.matmul(x, h, h) for _ in range(3))
    scores = b.op("Mul", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 2, 1])]), b.const(np.float32(h**-0.5))])
    if masked:
        bias = b.op("Mul", [b.op("Sub", [b.const(np.float32(1.0)), mask]), b.const(np.float32(-10000.0))])
        scores = b.op("Add", [scores, b.op("Unsqueeze", [bias, b.const(np.array([1], np.int64), "axes")])])
    context_ = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
    ln_scale, ln_bias = b.const(np.ones(h, np.float32), "ln"), b.const(np.zeros(h, np.float32), "ln")
    x = b.op("LayerNormalization", [b.op("Add", [x, b.matmul(context_, h, h)]), ln_scale, ln_bias], axis=-1)
    x = b.op("Add", [x, b.matmul(b.op("Relu", [b.matmul(x, h, 4 * h)]), 4 * h, h)])
    inputs = [("input_ids", TensorProto.INT64, ["batch", seq]), ("attention_mask", TensorProto.INT64, ["batch", seq])]
    if not pooled:
        return b.model(inputs, [("hidden", x)])
    axes = b.const(np.array([1], np.int64), "axes")
    weighted = b.op("Mul", [x, b.op("Unsqueeze", [mask, b.const(np.array([2], np.int64), "axes")])])
    summed = b.op("ReduceSum", [weighted, axes], keepdims=0)
    count = b.op("ReduceSum", [mask, axes], keepdims=1)
    return b.model(inputs, [("embedding", b.op("Div", [summed, count]))])


def padded_feed(lengths: list[int], seq: int, vocab: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded token ids and mask: row i keeps lengths[i] tokens; padding holds random ids."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(len(lengths), seq)).astype(np.int64)
    mask = (np.arange(seq)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}
