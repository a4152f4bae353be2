"""Build small example models on real data (scikit-learn's digits, offline) for the quick start.

    python -m optimizer_cli.examples --out examples/

writes
  digits_cnn.onnx   ResNet-style CNN (Conv+BN+Relu, residual Add, depthwise conv, Gemm head) on 16x16
                    digits; convs are random features with real BatchNorm statistics, the head is
                    fit by ridge regression, so the model really classifies (~95% test accuracy).
  digits_mlp.onnx   MLP (MatMul+Add+Relu) trained with scikit-learn's MLPClassifier.
  digits_calib.npz  256 training images (+labels) for calibration.
  digits_eval.npz   held-out test images (+labels) for accuracy.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def load_digits_images(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Digits scaled to [0, 1] and upsampled to size x size (nearest)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    factor = size // 8
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    return images[:, None, :, :], digits.target.astype(np.int64)


class _GraphBuilder:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.bn_names: list[str] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def conv(self, name: str, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1) -> str:
        fan_in = cin // group * k * k
        w = (self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        self.const(f"{name}.weight", w)
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.weight"],
                [f"{name}.out"],
                name=name,
                kernel_shape=[k, k],
                pads=[k // 2] * 4,
                strides=[stride, stride],
                group=group,
            )
        )
        return f"{name}.out"

    def bn(self, name: str, x: str, c: int) -> str:
        self.const(f"{name}.scale", (1.0 + 0.1 * self.rng.standard_normal(c)).astype(np.float32))
        self.const(f"{name}.bias", (0.1 * self.rng.standard_normal(c)).astype(np.float32))
        self.const(f"{name}.mean", np.zeros(c, np.float32))
        self.const(f"{name}.var", np.ones(c, np.float32))
        self.nodes.append(
            helper.make_node(
                "BatchNormalization",
                [x, f"{name}.scale", f"{name}.bias", f"{name}.mean", f"{name}.var"],
                [f"{name}.out"],
                name=name,
                epsilon=1e-5,
            )
        )
        self.bn_names.append(name)
        return f"{name}.out"

    def op(self, op_type: str, name: str, inputs: list[str], **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [f"{name}.out"], name=name, **attrs))
        return f"{name}.out"


def _make_model(b: _GraphBuilder, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(b.nodes, "digits", inputs, outputs, b.inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="optimizer-cli-examples"
    )
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for name in outputs:
        if name not in existing:
            m.graph.output.append(helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feed)


def _set_init(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
            return
    raise KeyError(name)


def _ridge(features: np.ndarray, labels: np.ndarray, classes: int, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares classifier on one-hot targets: [W; b] = (F^T F + lam I)^-1 F^T Y."""
    f = np.hstack([features, np.ones((len(features), 1), np.float32)]).astype(np.float64)
    y = np.eye(classes)[labels]
    reg = lam * np.eye(f.shape[1])
    reg[-1, -1] = 0.0
    wb = np.linalg.solve(f.T @ f + reg, f.T @ y)
    return wb[:-1].astype(np.float32), wb[-1].astype(np.float32)


def build_digits_cnn(
    images: np.ndarray, labels: np.ndarray, n_train: int, seed: int = 0, width: int = 32
) -> onnx.ModelProto:
    b = _GraphBuilder(np.random.default_rng(seed))
    w = width
    x = b.op("Relu", "relu1", [b.bn("bn1", b.conv("conv1", "image", 1, w, 3), w)])
    y = b.op("Relu", "relu2", [b.bn("bn2", b.conv("conv2", x, w, w, 3), w)])
    y = b.bn("bn3", b.conv("conv3", y, w, w, 3), w)
    x = b.op("Relu", "relu3", [b.op("Add", "res1", [x, y])])
    x = b.op("Relu", "relu4", [b.bn("bn4", b.conv("conv4", x, w, 2 * w, 3, stride=2), 2 * w)])
    x = b.op("Relu", "relu5", [b.bn("bn5", b.conv("conv5_dw", x, 2 * w, 2 * w, 3, group=2 * w), 2 * w)])
    x = b.op("Relu", "relu6", [b.bn("bn6", b.conv("conv6", x, 2 * w, 2 * w, 1), 2 * w)])
    x = b.op("GlobalAveragePool", "gap", [x])
    feats = b.op("Flatten", "flatten", [x], axis=1)
    b.const("fc.weight", np.zeros((2 * w, 10), np.float32))
    b.const("fc.bias", np.zeros(10, np.float32))
    b.nodes.append(helper.make_node("Gemm", [feats, "fc.weight", "fc.bias"], ["logits"], name="fc"))
    side = images.shape[-1]
    model = _make_model(
        b,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, side, side])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
    )
    train = {"image": images[:n_train]}
    # Real BatchNorm statistics, layer by layer (each depends on the ones before it).
    for name in b.bn_names:
        (act,) = _run(model, train, [_bn_input(model, name)])
        _set_init(model, f"{name}.mean", act.mean(axis=(0, 2, 3)))
        _set_init(model, f"{name}.var", act.var(axis=(0, 2, 3)))
    (features,) = _run(model, train, [feats])
    weight, bias = _ridge(features, labels[:n_train], 10, lam=1e-2)
    _set_init(model, "fc.weight", weight)
    _set_init(model, "fc.bias", bias)
    return model


def _bn_input(model: onnx.ModelProto, bn_name: str) -> str:
    return next(n.input[0] for n in model.graph.node if n.name == bn_name)


def build_digits_mlp(images: np.ndarray, labels: np.ndarray, n_train: int, seed: int = 0) -> onnx.ModelProto:
    from sklearn.neural_network import MLPClassifier

    flat = _pool8(images)
    clf = MLPClassifier(hidden_layer_sizes=(256, 128), max_iter=300, random_state=seed)
    clf.fit(flat[:n_train], labels[:n_train])
    b = _GraphBuilder(np.random.default_rng(seed))
    x = "pixels"
    for i, (w, bias) in enumerate(zip(clf.coefs_, clf.intercepts_, strict=True)):
        b.const(f"fc{i}.weight", w.astype(np.float32))
        b.const(f"fc{i}.bias", bias.astype(np.float32))
        mm = b.op("MatMul", f"fc{i}.matmul", [x, f"fc{i}.weight"])
        last = i == len(clf.coefs_) - 1
        out = "logits" if last else f"fc{i}.add.out"
        b.nodes.append(helper.make_node("Add", [mm, f"fc{i}.bias"], [out], name=f"fc{i}.add"))
        x = out if last else b.op("Relu", f"relu{i}", [out])
    return _make_model(
        b,
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
    )


def _pool8(images: np.ndarray) -> np.ndarray:
    """Back to the 8x8 grid (mean pool) and flatten: the MLP takes the original 64 pixels."""
    n, _, s, _ = images.shape
    f = s // 8
    return images.reshape(n, 8, f, 8, f).mean(axis=(2, 4)).reshape(n, 64).astype(np.float32)


def write_examples(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits_images(16)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    images, labels = images[order], labels[order]
    n_train = 1400
    cnn = build_digits_cnn(images, labels, n_train, seed)
    mlp = build_digits_mlp(images, labels, n_train, seed)
    paths = {
        "cnn": out / "digits_cnn.onnx",
        "mlp": out / "digits_mlp.onnx",
        "calib": out / "digits_calib.npz",
        "eval": out / "digits_eval.npz",
        "mlp_calib": out / "digits_mlp_calib.npz",
        "mlp_eval": out / "digits_mlp_eval.npz",
    }
    onnx.checker.check_model(cnn, full_check=True)
    onnx.checker.check_model(mlp, full_check=True)
    onnx.save(cnn, str(paths["cnn"]))
    onnx.save(mlp, str(paths["mlp"]))
    np.savez(paths["calib"], image=images[:256], labels=labels[:256])
    np.savez(paths["eval"], image=images[n_train:], labels=labels[n_train:])
    flat = _pool8(images)
    np.savez(paths["mlp_calib"], pixels=flat[:256], labels=labels[:256])
    np.savez(paths["mlp_eval"], pixels=flat[n_train:], labels=labels[n_train:])
    return paths


def accuracy(model_path: str | Path, data_path: str | Path) -> float:
    import onnxruntime as ort

    data = np.load(data_path)
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    (logits,) = sess.run(None, {name: data[name]})
    return float(np.mean(logits.argmax(-1) == data["labels"]))


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    parser = argparse.ArgumentParser(prog="python -m optimizer_cli.examples", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples", help="output folder (default: examples)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_examples(args.out, args.seed)
    print(f"wrote {paths['cnn']} (test accuracy {accuracy(paths['cnn'], paths['eval']):.3f})")
    print(f"wrote {paths['mlp']} (test accuracy {accuracy(paths['mlp'], paths['mlp_eval']):.3f})")
    for key in ("calib", "eval", "mlp_calib", "mlp_eval"):
        print(f"wrote {paths[key]}")


if __name__ == "__main__":
    main()
