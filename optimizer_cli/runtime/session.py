"""Create ONNX Runtime sessions from onnx_ir models or files, with explicit threads and providers."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from optimizer_cli.model_io import model_to_bytes, save_for_reading
from optimizer_cli.runtime.providers import configure_target, resolve_provider, silence_native_output
from optimizer_cli.runtime.targets import RunTarget, parse_target

OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
EXECUTION_MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}


def ort_log_severity() -> int:
    """onnxruntime's own log lines (colour-coded warnings and errors) reach the user only with -v: its errors
    also come back as exceptions, which we report in one line."""
    return 2 if logging.getLogger("optimizer_cli").isEnabledFor(logging.INFO) else 4


def ort_error_message(exc: BaseException) -> str:
    """The part of an onnxruntime error a user can act on (without its C++ source location)."""
    text = " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip()) or type(exc).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    # "/onnxruntime_src/...cc:256 onnxruntime::Model::Model(...) Unsupported model IR version" -> the message
    text = re.sub(r"/onnxruntime_src/\S+:\d+ (?:[\w:~<>]+\(.*?\)(?: const)? )?", "", text)
    return text[:300]


@dataclass
class SessionConfig:
    provider: str = "cpu"
    threads: int = 2
    opt_level: str = "all"
    trt_fp16: bool = False
    trt_int8: bool = False
    trt_cache_dir: str | None = None
    extra_provider_options: dict[str, Any] = field(default_factory=dict)
    execution_mode: str = "sequential"  # a key of EXECUTION_MODES; parallel runs independent nodes at once
    mem_pattern: bool = True  # onnxruntime's enable_mem_pattern (its default)
    inter_op_threads: int | None = None  # None: 1 in sequential mode, onnxruntime's default in parallel mode
    # onnxruntime's CPU arena keeps every buffer a run grew it to until the session ends: verification turns
    # it off, so a large model's weights cast at run time (fp16 on CPU) are freed op by op.
    cpu_mem_arena: bool = True
    # Prepacking re-lays constant weights for the fast kernels at session start (3.5 s and a second copy for a
    # 2.7 GB fp32 model); a session run a few times to check outputs is done before it would pay off.
    prepacking: bool = True

    def with_session(self, options: dict[str, Any]) -> SessionConfig:
        """These options overlaid (a recipe's `session` section; None keeps this config's value)."""
        return dataclasses.replace(self, **{k: v for k, v in options.items() if v is not None})


def session_target(config: SessionConfig) -> RunTarget:
    """The run target of a session config: its provider text, with the TensorRT flags of older recipes
    (benchmark.trt_fp16 / trt_int8 / trt_cache_dir) and extra provider options folded in."""
    target = parse_target(config.provider)
    options = dict(target.options)
    if target.ep_name == "TensorrtExecutionProvider":
        precision = target.precision or ("int8" if config.trt_int8 else "fp16" if config.trt_fp16 else None)
        if config.trt_cache_dir:
            Path(config.trt_cache_dir).mkdir(parents=True, exist_ok=True)
            options.setdefault("trt_engine_cache_enable", "True")
            options.setdefault("trt_engine_cache_path", config.trt_cache_dir)
        target = dataclasses.replace(target, precision=precision)
    options.update({k: str(v) for k, v in config.extra_provider_options.items()})
    return dataclasses.replace(target, options=tuple(sorted(options.items())))


class ModelSource:
    """A model ready for sessions: in-memory bytes when small, else a file (kept for the lifetime)."""

    def __init__(self, model: ir.Model | str | Path) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.data: bytes | str
        if isinstance(model, ir.Model):
            raw = model_to_bytes(model)
            if raw is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="optimize-session-")
                self.data = str(save_for_reading(model, Path(self._tmp.name)))
            else:
                self.data = raw
        else:
            self.data = str(model)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def create_session(source: ModelSource | ir.Model | str | Path, config: SessionConfig | None = None):
    """InferenceSession with explicit thread count and optimization level; native chatter silenced."""
    import onnxruntime as ort

    config = config or SessionConfig()
    if not isinstance(source, ModelSource):
        source = ModelSource(source)
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.threads
    if config.inter_op_threads is not None:
        options.inter_op_num_threads = config.inter_op_threads
    elif config.execution_mode == "sequential":
        options.inter_op_num_threads = 1
    options.execution_mode = getattr(ort.ExecutionMode, EXECUTION_MODES[config.execution_mode])
    options.enable_mem_pattern = config.mem_pattern
    options.enable_cpu_mem_arena = config.cpu_mem_arena
    if not config.prepacking:
        options.add_session_config_entry("session.disable_prepacking", "1")
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[config.opt_level])
    options.log_severity_level = ort_log_severity()
    # onnxruntime's record of which provider took which node: the benchmark reports it (fallback honesty).
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    silence = (
        silence_native_output()
        if resolve_provider(config.provider) != "CPUExecutionProvider"
        else contextlib.nullcontext()
    )
    with silence:
        providers = configure_target(options, session_target(config), config.threads)
        if providers is None:  # a plugin EP, added to the options by its device
            return ort.InferenceSession(source.data, options)
        return ort.InferenceSession(source.data, options, providers=providers)


def timed_session(source: ModelSource, config: SessionConfig, feeds: dict[str, np.ndarray]):
    """Session plus setup time (creation + first run, where TensorRT builds its engine)."""
    start = time.perf_counter()
    sess = create_session(source, config)
    silence = (
        silence_native_output()
        if resolve_provider(config.provider) != "CPUExecutionProvider"
        else contextlib.nullcontext()
    )
    with silence:
        run_session(sess, feeds)
    return sess, time.perf_counter() - start


def run_session(sess, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    return sess.run(outputs, {k: v for k, v in feeds.items() if k in names})


def session_feeds(sess, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Each feed restricted to the inputs `sess` takes, filtered once before timing: a model whose inputs were
    frozen (freeze_inputs) no longer takes them, and onnxruntime refuses a feed it does not know."""
    names = {i.name for i in sess.get_inputs()}
    return [{k: v for k, v in f.items() if k in names} for f in feeds]


def run_model(
    model: ir.Model, feeds: list[dict[str, np.ndarray]], config: SessionConfig, outputs: list[str] | None = None
) -> list[list[np.ndarray]]:
    """One session over every feed (outputs in graph order, or just `outputs`)."""
    source = ModelSource(model)
    try:
        sess = create_session(source, config)
        return [run_session(sess, feed, outputs) for feed in feeds]
    finally:
        source.close()


def capture_values(
    model: ir.Model, feeds: list[dict[str, np.ndarray]], names: list[str], threads: int
) -> dict[str, list[np.ndarray]]:
    """Run the model exposing `names` as outputs (outputs are restored afterwards)."""
    values = {v.name: v for n in model.graph for v in n.outputs}
    values.update({v.name: v for v in model.graph.inputs})
    original_outputs = list(model.graph.outputs)
    added = [
        values[n] for n in names if n in values and values[n] not in original_outputs and not values[n].is_graph_input()
    ]
    model.graph.outputs.extend(added)
    source = ModelSource(model)
    try:
        sess = create_session(source, SessionConfig(threads=threads, opt_level="disable"))
        input_names = {i.name for i in sess.get_inputs()}
        out: dict[str, list[np.ndarray]] = {n: [] for n in names}
        fetch = [n for n in names if n in values and not values[n].is_graph_input()]
        for feed in feeds:
            f = {k: v for k, v in feed.items() if k in input_names}
            results = dict(zip(fetch, sess.run(fetch, f), strict=True)) if fetch else {}
            for n in names:
                out[n].append(f[n] if n in f else results[n])
        return out
    finally:
        source.close()
        # pop(), not slice deletion: onnx_ir only clears a value's graph-output flag through pop/remove.
        while len(model.graph.outputs) > len(original_outputs):
            model.graph.outputs.pop()
