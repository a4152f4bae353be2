"""Build large test models, weights in external data, without holding them in memory.

    python -m optimizer_cli.large_examples decoder --hidden 2048 --layers 12 -o big/decoder.onnx
    python -m optimizer_cli.large_examples chain --dim 8192 --layers 10 -o big/chain.onnx

Weights are random (seeded, scaled 1/sqrt(fan_in) so activations stay in range) and generated one
tensor at a time as the file is written (onnx_ir LazyTensor), so a 2.5 GB model is built in bounded
memory. The decoder has the shape of the models people bring: token embedding, N pre-LayerNorm blocks
of causal multi-head attention (Q/K/V/O MatMul + bias) and an MLP (4x, Erf GELU), a final LayerNorm and
an LM head; `input_ids` int64 [batch, seq] in, `logits` [batch, seq, vocab] out. The chain is N
MatMul [dim, dim] + Relu on a [batch, dim] input.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

OPSET = 17


class _Builder:
    """A graph under construction whose weights are LazyTensors (seeded per tensor)."""

    def __init__(self, seed: int) -> None:
        self.graph = ir.Graph([], [], nodes=[], opset_imports={"": OPSET}, name="large_example")
        self.seed = seed
        self._count = 0

    def weight(self, name: str, shape: tuple[int, ...], scale: float, offset: float = 0.0) -> ir.Value:
        seed = self.seed * 1_000_003 + self._count
        self._count += 1

        def make() -> ir.TensorProtocol:
            rng = np.random.default_rng(seed)
            array = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale) + np.float32(offset)
            return ir.tensor(array, name=name)

        return self._register(name, ir.LazyTensor(make, ir.DataType.FLOAT, ir.Shape(shape), name=name))

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        return self._register(name, ir.tensor(array, name=name))

    def _register(self, name: str, tensor: ir.TensorProtocol) -> ir.Value:
        value = ir.Value(
            name=name, shape=ir.Shape(tensor.shape.numpy()), type=ir.TensorType(tensor.dtype), const_value=tensor
        )
        self.graph.register_initializer(value)
        return value

    def op(self, op_type: str, name: str, inputs: list[ir.Value], **attrs: Any) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attrs, name=name, num_outputs=1)
        node.outputs[0].name = f"{name}_out"
        self.graph.append(node)
        return node.outputs[0]

    def linear(self, name: str, x: ir.Value, fan_in: int, fan_out: int, bias: bool = True) -> ir.Value:
        y = self.op("MatMul", name, [x, self.weight(f"{name}.weight", (fan_in, fan_out), 1 / math.sqrt(fan_in))])
        if bias:
            y = self.op("Add", f"{name}_bias", [y, self.weight(f"{name}.bias", (fan_out,), 0.02)])
        return y

    def layer_norm(self, name: str, x: ir.Value, hidden: int) -> ir.Value:
        scale = self.weight(f"{name}.scale", (hidden,), 0.05, offset=1.0)
        bias = self.weight(f"{name}.bias", (hidden,), 0.02)
        return self.op("LayerNormalization", name, [x, scale, bias], axis=-1, epsilon=1e-5)


def _attention(b: _Builder, name: str, x: ir.Value, hidden: int, heads: int) -> ir.Value:
    head_dim = hidden // heads
    split = b.const(f"{name}.split_shape", np.array([0, 0, heads, head_dim], dtype=np.int64))
    merge = b.const(f"{name}.merge_shape", np.array([0, 0, hidden], dtype=np.int64))

    def heads_of(proj: str, perm: list[int]) -> ir.Value:
        y = b.linear(f"{name}.{proj}", x, hidden, hidden)
        y = b.op("Reshape", f"{name}.{proj}_split", [y, split])
        return b.op("Transpose", f"{name}.{proj}_heads", [y], perm=perm)

    q = heads_of("q", [0, 2, 1, 3])
    k = heads_of("k", [0, 2, 3, 1])
    v = heads_of("v", [0, 2, 1, 3])
    scores = b.op("MatMul", f"{name}.qk", [q, k])
    scores = b.op("Mul", f"{name}.scale", [scores, b.const(f"{name}.inv_sqrt_d", np.array(head_dim**-0.5, np.float32))])
    # Causal mask from the scores' own shape: -1e4 above the diagonal, so any sequence length works.
    ones = b.op(
        "ConstantOfShape",
        f"{name}.ones",
        [b.op("Shape", f"{name}.scores_shape", [scores])],
        value=ir.tensor(np.array([1.0], np.float32)),
    )
    upper = b.op("Trilu", f"{name}.upper", [ones, b.const(f"{name}.one", np.array(1, np.int64))], upper=1)
    mask = b.op("Mul", f"{name}.mask", [upper, b.const(f"{name}.neg", np.array(-1e4, np.float32))])
    probs = b.op("Softmax", f"{name}.softmax", [b.op("Add", f"{name}.masked", [scores, mask])], axis=-1)
    context = b.op("Transpose", f"{name}.context_t", [b.op("MatMul", f"{name}.pv", [probs, v])], perm=[0, 2, 1, 3])
    context = b.op("Reshape", f"{name}.merge", [context, merge])
    return b.linear(f"{name}.o", context, hidden, hidden)


def _gelu(b: _Builder, name: str, x: ir.Value) -> ir.Value:
    """GELU as exported before opset 20: x * 0.5 * (1 + erf(x / sqrt(2)))."""
    inner = b.op("Div", f"{name}_div", [x, b.const(f"{name}.sqrt2", np.array(math.sqrt(2.0), np.float32))])
    one = b.op(
        "Add", f"{name}_add", [b.op("Erf", f"{name}_erf", [inner]), b.const(f"{name}.one", np.array(1.0, np.float32))]
    )
    half = b.op("Mul", f"{name}_mul", [x, one])
    return b.op("Mul", f"{name}_half", [half, b.const(f"{name}.half", np.array(0.5, np.float32))])


def build_decoder(hidden: int = 64, layers: int = 2, heads: int = 4, vocab: int = 256, seed: int = 0) -> ir.Model:
    """A causal LM graph (see the module docstring); 12*hidden^2 weights per block plus 2*vocab*hidden."""
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
    b = _Builder(seed)
    ids = ir.Value(name="input_ids", shape=ir.Shape(["batch", "seq"]), type=ir.TensorType(ir.DataType.INT64))
    b.graph.inputs.append(ids)
    x = b.op("Gather", "embed", [b.weight("embed.weight", (vocab, hidden), 0.5), ids], axis=0)
    for i in range(layers):
        h = _attention(b, f"layers.{i}.attn", b.layer_norm(f"layers.{i}.ln1", x, hidden), hidden, heads)
        x = b.op("Add", f"layers.{i}.attn_residual", [x, h])
        h = b.linear(f"layers.{i}.mlp.up", b.layer_norm(f"layers.{i}.ln2", x, hidden), hidden, 4 * hidden)
        h = b.linear(f"layers.{i}.mlp.down", _gelu(b, f"layers.{i}.mlp.gelu", h), 4 * hidden, hidden)
        x = b.op("Add", f"layers.{i}.mlp_residual", [x, h])
    logits = b.linear("lm_head", b.layer_norm("final_ln", x, hidden), hidden, vocab, bias=False)
    logits.name = "logits"
    logits.dtype = ir.DataType.FLOAT
    logits.shape = ir.Shape(["batch", "seq", vocab])
    b.graph.outputs.append(logits)
    return ir.Model(b.graph, ir_version=8, producer_name="optimizer_cli.large_examples")


def build_matmul_chain(dim: int = 256, layers: int = 4, seed: int = 0) -> ir.Model:
    """`layers` x (MatMul [dim, dim] + Relu) on x [batch, dim]."""
    b = _Builder(seed)
    x = ir.Value(name="x", shape=ir.Shape(["batch", dim]), type=ir.TensorType(ir.DataType.FLOAT))
    b.graph.inputs.append(x)
    y = x
    for i in range(layers):
        y = b.op("Relu", f"relu_{i}", [b.linear(f"matmul_{i}", y, dim, dim, bias=False)])
    y.name = "y"
    y.dtype = ir.DataType.FLOAT
    y.shape = ir.Shape(["batch", dim])
    b.graph.outputs.append(y)
    return ir.Model(b.graph, ir_version=8, producer_name="optimizer_cli.large_examples")


def save_large(model: ir.Model, path: str | Path) -> Path:
    """Save with every weight over 1 KiB in `NAME.onnx.data`, one tensor in memory at a time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, path, external_data=path.name + ".data", size_threshold_bytes=1024)
    return path


BUILDERS: dict[str, Callable[..., ir.Model]] = {"decoder": build_decoder, "chain": build_matmul_chain}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(BUILDERS))
    parser.add_argument("-o", "--out", required=True, help="model path (weights go to OUT.data beside it)")
    parser.add_argument("--hidden", type=int, default=2048, help="decoder: hidden size")
    parser.add_argument("--layers", type=int, default=None, help="blocks (decoder, default 12) or MatMuls (chain, 10)")
    parser.add_argument("--heads", type=int, default=16, help="decoder: attention heads")
    parser.add_argument("--vocab", type=int, default=8192, help="decoder: vocabulary size")
    parser.add_argument("--dim", type=int, default=8192, help="chain: MatMul size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.kind == "decoder":
        model = build_decoder(args.hidden, args.layers or 12, args.heads, args.vocab, args.seed)
    else:
        model = build_matmul_chain(args.dim, args.layers or 10, args.seed)
    path = save_large(model, args.out)
    size = path.stat().st_size + (path.parent / (path.name + ".data")).stat().st_size
    print(f"{path}: {size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
