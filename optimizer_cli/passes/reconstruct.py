"""reconstruct (approximate, improves fidelity): refit compressed layers by least squares.

After prune/factorize, each changed layer L (MatMul/Gemm/Conv whose weights differ from the layer
that produces the same output name in the original model) is refit, in topological order, so that
its output matches the original layer's output on calibration data:
    W*, b* = argmin ||[X 1] [W; b] - Y||^2 + lam ||W||^2
X: L's input in the compressed model (after earlier refits, so errors upstream are compensated),
Y: the original model's tensor with L's output name. Conv uses im2col rows. lam is `damping` times
the mean diagonal of X^T X. A refit is kept only if it lowers the layer's error on the data.
Contract: touches only weights/biases of those layers; shapes and graph structure are unchanged.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_ir as ir
from numpy.lib.stride_tricks import sliding_window_view
from pydantic import Field

from optimizer_cli.analysis.graph import int_attr, name_of
from optimizer_cli.errors import UserInputError
from optimizer_cli.model_io import read_weight
from optimizer_cli.passes._graph import KEPT_CHANNELS_META, set_const
from optimizer_cli.passes.base import Exactness, OptimizationPass, PassConfig
from optimizer_cli.runtime.session import capture_values


class ReconstructConfig(PassConfig):
    type: Literal["reconstruct"] = "reconstruct"
    samples: int = Field(128, ge=1, description="Calibration samples used for the fit.")
    damping: float = Field(1e-3, ge=0, description="Ridge damping, relative to the mean diagonal of X^T X.")
    max_rows: int = Field(50_000, ge=1, description="Rows sampled per layer for the least-squares fit.")
    op_types: list[str] = Field(["MatMul", "Gemm", "Conv"], description="Op types refitted.")
    scope: Literal["changed", "all"] = Field(
        "changed", description="Refit layers changed by earlier passes, or all of them."
    )
    exclude_nodes: list[str] = Field([], description="Node names left alone.")


def im2col(
    x: np.ndarray, kernel: tuple[int, int], strides: list[int], pads: list[int], dilations: list[int]
) -> np.ndarray:
    """Rows (n, ho, wo) x columns (c, kh, kw), matching W.reshape(Co, -1) of an NCHW Conv."""
    _n, c = x.shape[:2]
    kh, kw = kernel
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    eh, ew = dilations[0] * (kh - 1) + 1, dilations[1] * (kw - 1) + 1
    win = sliding_window_view(x, (eh, ew), axis=(2, 3))[
        :, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]
    ]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw)


def _rows(ys: list[np.ndarray], conv: bool, cfg: ReconstructConfig) -> int:
    """Rows the layer's fit would get: positions of its output over the samples (Conv: batch x H x W)."""
    return min(cfg.max_rows, sum(t.size // t.shape[1 if conv else -1] for t in ys if t.ndim and t.size))


def _fan_in(node: ir.Node) -> int:
    """Columns of the layer's least-squares design: its weight's input features (Conv: C x kH x kW)."""
    dims = node.inputs[1].const_value.shape.numpy()  # type: ignore[union-attr]
    if node.op_type == "Conv":
        return int(np.prod(dims[1:]))
    if node.op_type == "Gemm" and int_attr(node, "transB", 0):
        return int(dims[-1])
    return int(dims[0])


def ridge(x: np.ndarray, y: np.ndarray, damping: float) -> np.ndarray:
    x = x.astype(np.float64)
    gram = x.T @ x
    lam = damping * float(np.mean(np.diag(gram))) if gram.size else 0.0
    return np.linalg.solve(gram + lam * np.eye(gram.shape[0]), x.T @ y.astype(np.float64))


class ReconstructPass(OptimizationPass[ReconstructConfig]):
    name = "reconstruct"
    Config = ReconstructConfig
    exactness = Exactness.APPROXIMATE
    contract = "refits weights of changed MatMul/Gemm/Conv layers by least squares to the original outputs"

    @classmethod
    def calibration_use(cls, config: ReconstructConfig) -> str | None:
        return "reconstruct"

    @classmethod
    def fidelity_advice(cls, config: ReconstructConfig, key: str, excluded_tried: bool) -> str | None:
        return (
            f"raise {key}.samples (now {config.samples}) or {key}.damping (now {config.damping}), "
            f"or exclude layers with {key}.exclude_nodes"
        )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.config
        calibration = self.calibration()
        if self.ctx.load_original is None:
            raise UserInputError("reconstruct needs the original model (run it through the pipeline)")
        reference = self.ctx.load_original()
        ref_producers = {name_of(out): n for n in reference.graph for out in n.outputs}
        layers = [n for n in model.graph if self._candidate(n, ref_producers, cfg)]
        feeds = calibration.feeds[: cfg.samples]
        targets = capture_values(reference, feeds, [name_of(n.outputs[0]) for n in layers], self.ctx.threads)
        refit, details, too_few = 0, [], 0
        for i, node in enumerate(layers):
            if self.ctx.progress:
                self.ctx.progress(f"reconstruct: layer {i + 1} of {len(layers)} ({node.name})")
            if _rows(targets[name_of(node.outputs[0])], node.op_type == "Conv", cfg) < 2 * (_fan_in(node) + 1):
                too_few += 1  # the fit would be refused (see _refit): do not run the model to capture inputs
                continue
            source = name_of(node.inputs[0]) if node.inputs[0] is not None else ""
            inputs = capture_values(model, feeds, [source], self.ctx.threads)[source]
            before, after = self._refit(model, node, inputs, targets[name_of(node.outputs[0])], cfg)
            if after is not None:
                refit += 1
                details.append(f"{node.name}: {before:.3f}->{after:.3f}")
        self.stats = {
            "layers_refit": f"{refit}/{len(layers)}",
            "rel_error": "; ".join(details[:6]) + (" ..." if len(details) > 6 else ""),
        }
        if too_few:
            self.stats["too_few_rows"] = f"{too_few} layers (calibration rows < 2x their inputs: give more samples)"
        return ir.passes.PassResult(model, refit > 0)

    def _candidate(self, node: ir.Node, ref_producers: dict[str, ir.Node], cfg: ReconstructConfig) -> bool:
        if node.op_type not in cfg.op_types or node.name in cfg.exclude_nodes or node.domain not in ("", "ai.onnx"):
            return False
        if len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[1].const_value is None:
            return False
        if node.op_type == "Conv" and (
            int_attr(node, "group", 1) != 1
            or node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID")
        ):
            return False
        if node.op_type == "Gemm" and (
            int_attr(node, "transA", 0)
            or node.attributes.get_float("alpha", 1.0) != 1.0
            or node.attributes.get_float("beta", 1.0) != 1.0
        ):
            return False
        ref = ref_producers.get(name_of(node.outputs[0]))
        if ref is None:
            return False
        if cfg.scope == "all":
            return True
        weight = node.inputs[1].const_value
        ref_weight = (
            ref.inputs[1].const_value
            if len(ref.inputs) > 1 and ref.inputs[1] is not None and ref.inputs[1].const_value is not None
            else None
        )
        if ref_weight is None or ref_weight.shape != weight.shape:
            return True
        # Read, not memory-mapped: on a large model the pages would stay resident for both copies.
        return not np.allclose(read_weight(ref_weight), read_weight(weight))

    def _refit(
        self, model: ir.Model, node: ir.Node, xs: list[np.ndarray], ys: list[np.ndarray], cfg: ReconstructConfig
    ) -> tuple[float, float | None]:
        w = read_weight(node.inputs[1].const_value)  # type: ignore[arg-type, union-attr]
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].const_value is not None
        b = read_weight(node.inputs[2].const_value) if has_bias else None  # type: ignore[arg-type, union-attr]
        if node.op_type == "Conv":
            k = tuple(w.shape[2:])
            if len(k) != 2:
                return 0.0, None
            strides = list(node.attributes.get_ints("strides", [1, 1]))
            pads = list(node.attributes.get_ints("pads", [0, 0, 0, 0]))
            dil = list(node.attributes.get_ints("dilations", [1, 1]))
            x = np.concatenate([im2col(a, k, strides, pads, dil) for a in xs])
            y = np.concatenate([t.transpose(0, 2, 3, 1).reshape(-1, t.shape[1]) for t in ys])
            w_mat = w.reshape(w.shape[0], -1).T
        else:
            trans_b = node.op_type == "Gemm" and int_attr(node, "transB", 0)
            x = np.concatenate([a.reshape(-1, a.shape[-1]) for a in xs])
            y = np.concatenate([t.reshape(-1, t.shape[-1]) for t in ys])
            w_mat = w.T if trans_b else w
        kept = node.outputs[0].meta.get(KEPT_CHANNELS_META)
        if kept is not None and y.shape[1] != w_mat.shape[1] and len(kept) == w_mat.shape[1]:
            y = y[:, kept]  # pruned output channels: fit the original channels that were kept
        if x.shape[1] != w_mat.shape[0] or y.shape[1] != w_mat.shape[1] or x.shape[0] != y.shape[0]:
            return 0.0, None
        if x.shape[0] > cfg.max_rows:
            rows = self.ctx.rng.choice(x.shape[0], cfg.max_rows, replace=False)
            x, y = x[rows], y[rows]
        if x.shape[0] < 2 * (x.shape[1] + 1):
            return 0.0, None  # too few rows to fit without overfitting: keep the weights
        # Fit on 80% of the rows; keep the refit only if it lowers the error on the other 20%.
        order = self.ctx.rng.permutation(x.shape[0])
        cut = int(0.8 * len(order))
        fit, hold = order[:cut], order[cut:]
        bias_vec = b.reshape(-1) if b is not None else np.zeros(w_mat.shape[1])
        norm = float(np.linalg.norm(y[hold])) or 1.0
        before = float(np.linalg.norm(x[hold] @ w_mat + bias_vec - y[hold])) / norm
        design = np.hstack([x, np.ones((len(x), 1))]) if has_bias else x
        sol = ridge(design[fit], y[fit], cfg.damping)
        new_w, new_b = (sol[:-1], sol[-1]) if has_bias else (sol, None)
        after = float(np.linalg.norm(x[hold] @ new_w + (new_b if new_b is not None else 0) - y[hold])) / norm
        if not after < before:
            return before, None
        if node.op_type == "Conv":
            out_w = new_w.T.reshape(w.shape)
        elif node.op_type == "Gemm" and int_attr(node, "transB", 0):
            out_w = new_w.T
        else:
            out_w = new_w
        set_const(node, 1, np.ascontiguousarray(out_w.astype(w.dtype)), model.graph)
        if new_b is not None and b is not None:
            set_const(node, 2, new_b.reshape(b.shape).astype(b.dtype), model.graph)
        return before, after
