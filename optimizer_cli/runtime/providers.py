"""Execution providers: aliases, and probes that decide which ones really work.

get_available_providers() lists what the onnxruntime build contains, not what works: onnxruntime-gpu
lists CUDA and TensorRT on a machine without a GPU, and a session asking for them silently falls back
to CPU. So usability is decided by creating a tiny probe session and reading session.get_providers().
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from optimizer_cli.errors import UserInputError, first_line

PROVIDER_ALIASES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "rocm": "ROCMExecutionProvider",
}
DEFAULT_PROVIDERS = ("cpu", "cuda", "trt")


def resolve_provider(alias: str) -> str:
    """'cuda' -> 'CUDAExecutionProvider'; full names pass through."""
    key = alias.strip()
    if key.lower() in PROVIDER_ALIASES:
        return PROVIDER_ALIASES[key.lower()]
    if key.endswith("ExecutionProvider"):
        return key
    known = ", ".join(sorted(set(PROVIDER_ALIASES)))
    raise UserInputError(f"unknown execution provider '{alias}' (known: {known})")


@contextlib.contextmanager
def silence_native_output() -> Iterator[None]:
    """Redirect the process-level stdout/stderr (fd 1 and 2) to /dev/null.

    ORT's TensorRT EP prints a banner with printf when it fails to load; that must never reach
    stdout, where --json output goes.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


@dataclass(frozen=True)
class ProviderStatus:
    alias: str
    name: str
    usable: bool
    reason: str


def installed_runtimes() -> list[str]:
    """Names and versions of installed onnxruntime distributions (two at once clobber each other)."""
    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append(f"{dist}=={importlib.metadata.version(dist)}")
    return found


def _probe_model_bytes() -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


_PROBE_CACHE: dict[str, ProviderStatus] = {}


def probe_provider(alias: str) -> ProviderStatus:
    """Create a tiny session on the provider and check that it is really the one used."""
    import numpy as np
    import onnxruntime as ort

    name = resolve_provider(alias)
    if name in _PROBE_CACHE:
        return _PROBE_CACHE[name]
    if name not in ort.get_available_providers():
        status = ProviderStatus(
            alias, name, False, f"not in this onnxruntime build ({', '.join(installed_runtimes())})"
        )
    elif name == "CPUExecutionProvider":
        status = ProviderStatus(alias, name, True, "ok")
    else:
        options = ort.SessionOptions()
        options.log_severity_level = 4
        provider_opts = {}
        if name == "TensorrtExecutionProvider":
            provider_opts = {"trt_engine_cache_enable": "False"}
        try:
            with silence_native_output():
                sess = ort.InferenceSession(
                    _probe_model_bytes(), options, providers=[(name, provider_opts), "CPUExecutionProvider"]
                )
                sess.run(None, {"x": np.ones((1, 4), np.float32)})
            active = sess.get_providers()
            if name in active:
                status = ProviderStatus(alias, name, True, "ok")
            else:
                status = ProviderStatus(
                    alias, name, False, f"session fell back to {', '.join(active)} (no usable device or libraries)"
                )
        except Exception as exc:  # the EP's own load errors vary; report them, do not crash
            status = ProviderStatus(alias, name, False, f"session failed: {first_line(exc, 200)}")
    _PROBE_CACHE[name] = status
    return status


def parse_provider_list(text: str | None) -> list[str]:
    """'cpu,cuda' -> ['cpu', 'cuda'] (validated); None -> the defaults."""
    if not text:
        return list(DEFAULT_PROVIDERS)
    aliases = [p.strip().lower() for p in text.split(",") if p.strip()]
    for alias in aliases:
        resolve_provider(alias)
    return aliases
