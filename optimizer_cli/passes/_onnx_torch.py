"""The ONNX model as a trainable torch module (onnx2torch), and its trained weights written back.

Which torch tensor holds which ONNX initializer is learnt, not assumed: the model is converted once
with every trainable initializer filled with its own seeded random values, and each torch parameter
or buffer is matched to the initializer it equals (as is, reshaped or transposed: Gemm's transB, say).
A tensor onnx2torch derived by arithmetic matches nothing and is not trained; an initializer held by
two torch tensors is not trained either (training would untie them). Import torch only from here.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from optimizer_cli.errors import UserInputError

# Initializers a fine-tune may change: float inputs of these ops at these positions (weights, biases,
# normalization scales, embedding tables). Shape operands, Resize scales, Clip bounds never are.
TRAINABLE_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "Add": (0, 1),
    "Sub": (0, 1),
    "Mul": (0, 1),
    "BatchNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "PRelu": (1,),
    "Gather": (0,),
}


def missing_packages() -> list[str]:
    return [name for name in ("torch", "onnx2torch") if importlib.util.find_spec(name) is None]


def _convert(proto: onnx.ModelProto) -> Any:
    """onnx2torch.convert. onnx2torch imports torchvision for two detection ops (NonMaxSuppression,
    RoiAlign) only; where torchvision is absent or does not match torch, those raise when used, and the
    rest of onnx2torch works."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]

        def unavailable(*_args: Any, **_kwargs: Any) -> Any:
            raise UserInputError("distill: this model's NonMaxSuppression/RoiAlign need torchvision (not installed)")

        stub, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
        ops.nms = ops.roi_align = ops.box_convert = unavailable  # type: ignore[attr-defined]
        stub.ops = ops  # type: ignore[attr-defined]
        sys.modules.update({"torchvision": stub, "torchvision.ops": ops})
    from onnx2torch import convert

    for node in proto.graph.node:
        # An omitted trailing optional input ("", e.g. Clip's max) means the same as no input, and onnx2torch
        # reads "" as a tensor name.
        while node.input and node.input[-1] == "":
            node.input.pop()
    try:
        return convert(proto)
    except UserInputError:
        raise
    except Exception as exc:  # an op onnx2torch does not convert: say which, in one line
        raise UserInputError(f"distill: onnx2torch cannot convert this model: {str(exc).splitlines()[0]}") from exc


def trainable_initializers(model: ir.Model) -> list[str]:
    """Float32 initializers (2+ values) read only at TRAINABLE_INPUTS positions."""
    names = []
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.dtype != ir.DataType.FLOAT or tensor.size < 2 or value.is_graph_input():
            continue
        uses = value.uses()
        if uses and all(u.idx in TRAINABLE_INPUTS.get(u.node.op_type, ()) for u in uses):
            names.append(name)
    return names


@dataclass
class Binding:
    """torch tensor `attr` (a dotted name in the module) holds initializer `initializer`, maybe transposed."""

    attr: str
    initializer: str
    transposed: bool


def _match(tensor: np.ndarray, probes: dict[str, np.ndarray]) -> tuple[str, bool] | None:
    for name, probe in probes.items():
        if probe.size != tensor.size:
            continue
        if np.array_equal(probe.reshape(-1), tensor.reshape(-1)):
            return name, False
        if tensor.ndim == 2 and probe.ndim == 2 and np.array_equal(probe.T.reshape(-1), tensor.reshape(-1)):
            return name, True
    return None


def bindings(model: ir.Model, names: list[str]) -> list[Binding]:
    """Which module tensor holds which trainable initializer (a probe conversion, see the module doc)."""
    proto = ir.serde.serialize_model(model)
    probes: dict[str, np.ndarray] = {}
    wanted = set(names)
    for k, init in enumerate(proto.graph.initializer):
        if init.name in wanted:
            shape = tuple(init.dims)
            probe = np.random.default_rng(k).standard_normal(shape).astype(np.float32)
            probes[init.name] = probe
            init.CopyFrom(onnx.numpy_helper.from_array(probe, init.name))
    module = _convert(proto)
    found: list[Binding] = []
    for attr, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        hit = _match(tensor.detach().numpy(), probes)
        if hit is not None:
            found.append(Binding(attr, hit[0], hit[1]))
    held = [b.initializer for b in found]
    return [b for b in found if held.count(b.initializer) == 1]


def _owner(module: Any, attr: str) -> tuple[Any, str]:
    *path, leaf = attr.split(".")
    for part in path:
        module = getattr(module, part)
    return module, leaf


def trainable_module(model: ir.Model, binds: list[Binding]) -> tuple[Any, list[Any]]:
    """The converted model in eval mode (BatchNorm uses its running statistics) with only the bound tensors
    trainable (buffers turned into parameters); returns it and those parameters."""
    import torch

    module = _convert(ir.serde.serialize_model(model))
    for p in module.parameters():
        p.requires_grad_(False)
    params = []
    for bind in binds:
        owner, leaf = _owner(module, bind.attr)
        tensor = getattr(owner, leaf)
        if leaf in owner._buffers:
            del owner._buffers[leaf]
        param = torch.nn.Parameter(tensor.detach().clone(), requires_grad=True)
        owner.register_parameter(leaf, param)
        params.append(param)
    module.eval()
    return module, params


def module_weights(module: Any, binds: list[Binding]) -> dict[str, np.ndarray]:
    """The bound tensors' current values, laid out as their initializers."""
    out = {}
    for bind in binds:
        owner, leaf = _owner(module, bind.attr)
        array = getattr(owner, leaf).detach().numpy()
        out[bind.initializer] = np.ascontiguousarray(array.T if bind.transposed else array)
    return out


def write_weights(model: ir.Model, weights: dict[str, np.ndarray]) -> dict[str, ir.TensorProtocol]:
    """Replace those initializers' values (shapes kept); returns the previous tensors, to restore."""
    previous = {}
    for name, array in weights.items():
        value = model.graph.initializers[name]
        assert value.const_value is not None
        previous[name] = value.const_value
        shape = tuple(value.const_value.shape.numpy())
        value.const_value = ir.tensor(array.reshape(shape).astype(np.float32), name=name)
    return previous


def restore_weights(model: ir.Model, previous: dict[str, ir.TensorProtocol]) -> None:
    for name, tensor in previous.items():
        model.graph.initializers[name].const_value = tensor
