"""Mixed precision by output sensitivity: which quantized nodes the model's outputs cannot afford.

Local attribution (attribution.rank_nodes) ranks nodes by what their own output loses; on sensitive models (a
text detector's probability map) a node that loses little locally can cost the output most, and keeping the
locally worst nodes float does not reach the goal. This measures the output instead, in one onnxruntime
session:

1. Gate the static QDQ model: every quantized node reads `Where(gate, DQ(Q(x)), x)` for each quantized
   input, so a boolean graph input per group chooses its int8 or float path. The float path of an activation is x,
   with the Relu/Clip the quantizer dropped at it replayed (in the int8 path the Q saturation does their work).
   A weight's float path is the weight before quantization.
2. Group the gates: a compute node (Conv, MatMul, Gemm) with the quantized non-compute nodes that follow it.
3. Sensitivity: the worst output cosine vs the float model with one group quantized alone.
4. Fit: quantize groups from the least sensitive on and bisect for the longest run that keeps the cosine at
   the target; the rest stay float.

The simulation runs float kernels on int8-rounded values, which is what the int8 kernels compute up to
rounding of their requantized outputs; the real model is always built and measured afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from optimizer_cli.analysis.graph import output_names
from optimizer_cli.bench.accuracy import fidelity
from optimizer_cli.runtime.session import SessionConfig, create_session, run_model, run_session

COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
GATE_PREFIX = "__sensitivity_gate__"


@dataclass
class GatedModel:
    model: onnx.ModelProto
    # gate input name -> node names (of the QDQ graph, which keeps the float graph's names) it switches
    groups: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Sensitivity:
    """Groups worst first (lowest cosine when quantized alone) and how many of them the target needs float."""

    ranked: list[list[str]]
    cosine_alone: list[float]
    keep_float: int | None  # None: even everything but the least sensitive group misses the target
    fitted_cosine: float | None
    all_quantized: float
    all_float: float


def _producer_map(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def _group_root(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> str:
    """The nearest compute node upstream (through the first produced input, skipping Q/DQ), else the node."""
    current: onnx.NodeProto | None = node
    for _ in range(64):
        if current is None:
            break
        if current.op_type in COMPUTE_OPS:
            return current.name
        upstream = None
        for name in current.input:
            producer = producers.get(name)
            while producer is not None and producer.op_type in QDQ_OPS:
                producer = producers.get(producer.input[0])
            if producer is not None:
                upstream = producer
                break
        current = upstream
    return node.name


def _float_weight(dq_input: str, shape_of: dict[str, TensorProto]) -> TensorProto | None:
    """The float weight a quantized initializer came from (onnxruntime names it `<weight>_quantized`)."""
    if not dq_input.endswith("_quantized"):
        return None
    return shape_of.get(dq_input[: -len("_quantized")])


class _Builder:
    def __init__(self, qdq: onnx.ModelProto, float_model: onnx.ModelProto) -> None:
        self.producers = _producer_map(qdq.graph)
        self.inits = {i.name: i for i in qdq.graph.initializer}
        self.float_inits = {i.name: i for i in float_model.graph.initializer}
        self.activations: dict[str, str] = {}
        self.qdq_values = {o for n in qdq.graph.node for o in n.output} | {i.name for i in qdq.graph.input}
        self.float_producers = _producer_map(float_model.graph)
        self.float_consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in float_model.graph.node:
            for name in node.input:
                self.float_consumers.setdefault(name, []).append(node)
        self.float_weights: dict[str, str] = {}
        self.new_inits: list[TensorProto] = []

    def _activation(self, q: onnx.NodeProto, before: list[onnx.NodeProto]) -> str:
        """The activation's float path: the tensor itself, or the Relu/Clip the quantizer dropped after it
        (its QuantizeLinear's saturation did that op in the int8 path), replayed."""
        source = q.input[0]
        if source in self.activations:
            return self.activations[source]
        # The quantizer drops Relu/Clip either by writing their output name from their producer, or by
        # leaving their input to a Q that their consumers then read.
        producer = self.float_producers.get(source)
        dropped = [
            n
            for n in [*self.float_consumers.get(source, []), *([producer] if producer is not None else [])]
            if n.op_type in ("Relu", "Clip")
            and (n.output[0] not in self.qdq_values if n is not producer else n.input[0] not in self.qdq_values)
        ]
        path = source
        if dropped:
            path = self._replay(dropped[0], source, before)
        self.activations[source] = path
        return path

    def _replay(self, op: onnx.NodeProto, source: str, before: list[onnx.NodeProto]) -> str:
        out = f"{source}{GATE_PREFIX}{op.op_type.lower()}"
        inputs = [source]
        for bound in op.input[1:]:
            if bound and bound not in self.float_inits:
                return source  # a computed bound: leave the path unclipped rather than guess
            if bound:
                copy = TensorProto()
                copy.CopyFrom(self.float_inits[bound])
                copy.name = f"{out}_{len(inputs)}"
                self.new_inits.append(copy)
                inputs.append(copy.name)
            else:
                inputs.append("")
        replayed = helper.make_node(op.op_type, inputs, [out])
        replayed.attribute.extend(op.attribute)
        before.append(replayed)
        return out

    def _weight(self, dq_input: str) -> str | None:
        if dq_input in self.float_weights:
            return self.float_weights[dq_input]
        original = _float_weight(dq_input, self.float_inits)
        quantized = self.inits.get(dq_input)
        if original is None or quantized is None or list(original.dims) != list(quantized.dims):
            return None
        copy = TensorProto()
        copy.CopyFrom(original)
        copy.name = f"{original.name}{GATE_PREFIX}float"
        self.new_inits.append(copy)
        self.float_weights[dq_input] = copy.name
        return copy.name

    def float_path(self, value: str, before: list[onnx.NodeProto]) -> str | None:
        dq = self.producers.get(value)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        q = self.producers.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            return self._activation(q, before)
        return self._weight(dq.input[0])


def _switch(groups: list[str], before: list[onnx.NodeProto], cache: dict[tuple[str, ...], str]) -> str:
    """A boolean that is true when any of the groups is quantized (an Or chain of their gates). Every prefix
    of the chain is built once and reused: the sets (a, b) and (a, b, c) share the Or of a and b, whose value
    a graph may declare only once (YOLOv8's detection head has such overlapping reader sets)."""
    key = tuple(sorted(set(groups)))
    current = GATE_PREFIX + key[0]
    for end in range(2, len(key) + 1):
        prefix = key[:end]
        if prefix not in cache:
            combined = f"{GATE_PREFIX}any{len(cache)}"
            before.append(helper.make_node("Or", [current, GATE_PREFIX + key[end - 1]], [combined]))
            cache[prefix] = combined
        current = cache[prefix]
    return current


def gate_qdq_model(qdq: onnx.ModelProto, float_model: onnx.ModelProto) -> GatedModel:
    """The QDQ model with a boolean input per group choosing its int8 or float path. Each DequantizeLinear's
    output becomes `Where(switch, int8 value, float value)`: onnxruntime quantizes a tensor when any node that
    produces or reads it is quantized, so an activation's switch is on when its producer's or any reader's
    group is; a weight's when any reader's is."""
    gated = onnx.ModelProto()
    gated.CopyFrom(qdq)
    graph = gated.graph
    builder = _Builder(gated, float_model)
    roots = {n.name: _group_root(n, builder.producers) for n in graph.node if n.op_type not in QDQ_OPS}
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        if node.op_type not in QDQ_OPS:
            for name in node.input:
                readers.setdefault(name, []).append(roots[node.name])
    result = GatedModel(gated)
    cache: dict[tuple[str, ...], str] = {}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type != "DequantizeLinear":
            continue
        q = builder.producers.get(node.input[0])
        source = builder.producers.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        groups = readers.get(node.output[0], []) + (
            [roots[source.name]] if source is not None and source.name in roots else []
        )
        before: list[onnx.NodeProto] = []
        alternative = builder.float_path(node.output[0], before)
        if not groups or alternative is None:
            continue
        for group in groups:
            result.groups.setdefault(GATE_PREFIX + group, [])
        int8 = f"{node.output[0]}{GATE_PREFIX}int8"
        switched = node.output[0]
        node.output[0] = int8
        nodes += [*before, helper.make_node("Where", [_switch(groups, nodes, cache), int8, alternative], [switched])]
    for name, root in roots.items():
        if GATE_PREFIX + root in result.groups:
            result.groups[GATE_PREFIX + root].append(name)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(builder.new_inits)
    for gate in result.groups:
        graph.input.append(helper.make_tensor_value_info(gate, TensorProto.BOOL, []))
    return result


class _Simulator:
    def __init__(
        self, gated: GatedModel, feeds: list[dict[str, np.ndarray]], reference: list[list[np.ndarray]], threads: int
    ) -> None:
        self.gates = list(gated.groups)
        model = ir.serde.deserialize_model(gated.model)
        self.session = create_session(model, SessionConfig(threads=threads))
        self.names = output_names(model)
        self.feeds, self.reference = feeds, reference

    def cosine(self, quantized: set[str], samples: int | None = None) -> float:
        count = len(self.feeds) if samples is None else samples
        outs = []
        for feed in self.feeds[:count]:
            full = dict(feed)
            full.update({g: np.array(g in quantized) for g in self.gates})
            outs.append(run_session(self.session, full))
        worst = fidelity(self.reference[:count], outs, self.names).cosine_min
        return float(worst) if worst is not None else 1.0


def _longest_passing(order: list[str], sim: _Simulator, target: float) -> tuple[int, float | None]:
    """The longest prefix of `order` (least sensitive first) that, quantized, keeps the cosine at the target;
    bisection assumes more quantized groups never raise the cosine, which holds up to noise."""
    lo, hi, best_cos = 0, len(order), None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        cos = sim.cosine(set(order[:mid]))
        if cos >= target:
            lo, best_cos = mid, cos
        else:
            hi = mid - 1
    return lo, best_cos


def with_headroom(threshold: float) -> float:
    """The simulated cosine a fit aims at: the threshold plus a quarter of its headroom (the simulation runs on
    other samples, or float kernels, than the real check)."""
    return threshold + (1.0 - threshold) * 0.25


# Seconds the one-group-at-a-time probes may take: 4 samples a group on PP-OCRv4 det at 736x736 (64 groups,
# 0.6 s a run) took 2.5 minutes, half of a 5 minute search; the fit itself always runs on every sample.
PROBE_SECONDS = 90.0


def probe_budget(samples: int, run_seconds: float, groups: int) -> int:
    """Samples per group that keep the probes within PROBE_SECONDS, at least 1 and at most `samples`."""
    return max(1, min(samples, int(PROBE_SECONDS / max(run_seconds * groups, 1e-9))))


def output_sensitivity(
    qdq: ir.Model,
    float_model: ir.Model,
    feeds: list[dict[str, np.ndarray]],
    target: float,
    threads: int = 2,
    probe_samples: int = 4,
) -> Sensitivity:
    """Rank the QDQ model's quantized groups by the output cosine each costs alone and fit the float set.
    Groups list only nodes of `float_model` (what exclude_nodes can name); a group with none (nodes onnxruntime's
    pre-processing made) is measured but cannot be kept float, so it is left out of the ranking and the count."""
    reference = run_model(float_model, feeds, SessionConfig(threads=threads))
    gated = gate_qdq_model(ir.serde.serialize_model(qdq), ir.serde.serialize_model(float_model))
    sim = _Simulator(gated, feeds, reference, threads)
    sim.cosine(set(), 1)  # the first run pays the session's start-up: untimed
    start = time.perf_counter()
    sim.cosine(set(sim.gates[:1]), 1)  # one run timed, so a large model's probes are bounded in time
    samples = probe_budget(probe_samples, time.perf_counter() - start, len(sim.gates))
    alone = {gate: sim.cosine({gate}, samples) for gate in sim.gates}
    worst_first = sorted(sim.gates, key=lambda g: alone[g])
    quantized, fitted = _longest_passing(worst_first[::-1], sim, target)
    names = {str(n.name) for n in float_model.graph}
    excludable = {g: [n for n in gated.groups[g] if n in names] for g in worst_first}
    kept = [g for g in worst_first[: len(worst_first) - quantized] if excludable[g]]
    return Sensitivity(
        ranked=[excludable[g] for g in worst_first if excludable[g]],
        cosine_alone=[alone[g] for g in worst_first if excludable[g]],
        keep_float=len(kept) if quantized > 0 else None,
        fitted_cosine=fitted,
        all_quantized=sim.cosine(set(sim.gates)),
        all_float=sim.cosine(set()),
    )
