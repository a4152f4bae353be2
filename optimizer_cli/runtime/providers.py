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
from typing import Any

from optimizer_cli.errors import UserInputError, first_line
from optimizer_cli.runtime import ep_plugins
from optimizer_cli.runtime.targets import (
    PROVIDER_ALIASES,
    RunTarget,
    parse_target,
    parse_targets,
    resolve_provider,
)

__all__ = ["PROVIDER_ALIASES", "ProviderStatus", "probe_provider", "resolve_provider"]

DEFAULT_PROVIDERS = ("cpu", "cuda", "trt")


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


def installed_plugins() -> list[str]:
    """Plugin EP packages (onnxruntime-ep-*) installed beside onnxruntime, with versions."""
    return [p.distribution for p in ep_plugins.plugin_libraries()]


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


def configure_target(options: Any, target: RunTarget, threads: int) -> list[Any] | None:
    """Make `options` (an ort.SessionOptions) run on `target`; returns the `providers=` list for the session,
    or None when the provider was added to `options` itself (a plugin EP, chosen by its device)."""

    name = target.ep_name
    provider_options = target.provider_options(threads)
    if not _chosen_by_device(name):
        entries: list[Any] = [(name, provider_options)] if provider_options else [name]
        return entries if name == "CPUExecutionProvider" else [*entries, "CPUExecutionProvider"]
    device = device_for(target)
    if device is None:
        raise UserInputError(f"execution provider '{target.label}' is not usable: {_plugin_problem(target)}")
    options.add_provider_for_devices([device], provider_options)
    return None


def _chosen_by_device(ep_name: str) -> bool:
    """Whether a session takes this EP through one of its devices (a plugin EP, or one this onnxruntime build
    lacks) rather than by name. A registered plugin's EP also appears in get_available_providers(), but
    providers=[name] silently falls back to the CPU EP."""
    import onnxruntime as ort

    return ep_plugins.is_plugin_ep(ep_name) or ep_name not in ort.get_available_providers()


def device_for(target: RunTarget) -> Any | None:
    """The OrtEpDevice a plugin EP offers for the target's device type (its first), or None."""
    wanted = target.device or "cpu"
    return next((d for d in ep_plugins.ep_devices(target.ep_name) if ep_plugins.device_type(d) == wanted), None)


def _plugin_problem(target: RunTarget) -> str:
    """Why a provider that is not part of this onnxruntime build cannot run `target`, in a sentence."""
    name = target.ep_name
    plugin = ep_plugins.plugin_for(name)
    if plugin is None:
        extra = ' (pip install -e ".[openvino]")' if name == "OpenVINOExecutionProvider" else ""
        return f"not in this onnxruntime build ({', '.join(installed_runtimes())}) and no plugin package provides it{extra}"
    if not plugin.registered:
        return f"{plugin.distribution}: {plugin.problem}"
    offered = sorted({ep_plugins.device_type(d) for d in ep_plugins.ep_devices(name)})
    wanted = target.device or "cpu"
    return (
        f"{plugin.distribution} offers no {wanted.upper()} device on this host (CPU vendor "
        f"{ep_plugins.host_cpu_vendor()}; devices offered: {', '.join(offered) or 'none'})"
    )


def probe_provider(spec: str | RunTarget) -> ProviderStatus:
    """Create a tiny session on the target and check that its provider really ran the node."""
    import numpy as np
    import onnxruntime as ort

    target = spec if isinstance(spec, RunTarget) else parse_target(spec)
    name = target.ep_name
    if target.label in _PROBE_CACHE:
        return _PROBE_CACHE[target.label]
    if name == "CPUExecutionProvider":
        status = ProviderStatus(target.label, name, True, "ok")
    elif _chosen_by_device(name) and device_for(target) is None:
        status = ProviderStatus(target.label, name, False, _plugin_problem(target))
    else:
        options = ort.SessionOptions()
        options.log_severity_level = 4
        options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        try:
            with silence_native_output():
                providers = configure_target(options, target, threads=1)
                if name == "TensorrtExecutionProvider":
                    providers = [(name, {"trt_engine_cache_enable": "False"}), "CPUExecutionProvider"]
                sess = ort.InferenceSession(_probe_model_bytes(), options, providers=providers)
                sess.run(None, {"x": np.ones((1, 4), np.float32)})
            counts = node_placement(sess)
            if counts.get(name):
                status = ProviderStatus(target.label, name, True, "ok")
            else:
                taken = ", ".join(counts) or ", ".join(sess.get_providers())
                status = ProviderStatus(
                    target.label, name, False, f"session fell back to {taken} (no usable device or libraries)"
                )
        except Exception as exc:  # the EP's own load errors vary; report them, do not crash
            status = ProviderStatus(target.label, name, False, f"session failed: {first_line(exc, 200)}")
    _PROBE_CACHE[target.label] = status
    return status


def engine_failure(exc: BaseException) -> str:
    """Why an engine refused a model, in one line: OpenVINO's converter report names the ops it could not convert
    and its first reason; other errors give their first line."""
    import re

    text = str(exc)
    failed = re.search(r"Conversion is failed for: (.+)", text)
    if failed is None:
        return first_line(exc, 240)
    reason = re.search(r"GeneralFailure:\s*\n?\s*(.+)", text)
    why = f" ({reason.group(1).strip()[:160]})" if reason else ""
    return f"its converter failed on {failed.group(1).strip()}{why}"


def node_placement(sess: Any) -> dict[str, int]:
    """How many of the session's (optimized) graph nodes each execution provider took, largest first.

    Read from onnxruntime's own assignment record (the session must be created with the session config
    entry session.record_ep_graph_assignment_info=1); empty when the build offers no such record."""
    counts: dict[str, int] = {}
    try:
        for subgraph in sess.get_provider_graph_assignment_info():
            counts[subgraph.ep_name] = counts.get(subgraph.ep_name, 0) + len(subgraph.get_nodes())
    except Exception:  # an onnxruntime without the record, or a session created without asking for it
        return {}
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def default_providers() -> tuple[str, ...]:
    """What `--providers` means when not given: the CPU, CUDA and TensorRT EPs, plus every installed plugin EP
    (each is probed: an unusable one is a row saying why)."""
    extra = []
    for plugin in ep_plugins.plugin_libraries():
        for name in plugin.ep_names:
            alias = next((a for a, n in PROVIDER_ALIASES.items() if n == name), name)
            if alias not in DEFAULT_PROVIDERS and alias not in extra:
                extra.append(alias)
    return (*DEFAULT_PROVIDERS, *extra)


def parse_provider_list(text: str | None) -> list[str]:
    """'cpu,openvino:bf16' -> ['cpu', 'openvino:bf16'] (validated, canonical); None -> the defaults."""
    return [t.label for t in parse_targets(text, default_providers())]


# What a user can ask of each provider through a target, shown by `optimize providers`.
TARGET_OPTIONS: dict[str, str] = {
    "CPUExecutionProvider": "the reference: the model's own precision; threads from --threads",
    "OpenVINOExecutionProvider": "precision f32 | bf16 | f16 (OpenVINO's INFERENCE_PRECISION_HINT; default: "
    "OpenVINO's, bf16 on CPUs with AMX), device @cpu | @gpu | @npu, num_of_threads from --threads, any "
    "KEY=VALUE provider option",
    "TensorrtExecutionProvider": "precision fp16 | int8 (int8 wants a QDQ model), trt_engine_cache_path=DIR, "
    "any KEY=VALUE provider option",
    "CUDAExecutionProvider": "the model's own precision (quantize or convert with a pass); any KEY=VALUE option",
}


def provider_catalog() -> list[dict[str, Any]]:
    """Every provider this host could offer: built into onnxruntime or a plugin package, with its devices,
    whether it is usable here (a probe session) and why not, and the target options that matter."""
    import onnxruntime as ort

    names = list(
        dict.fromkeys([*ort.get_available_providers(), *(n for p in ep_plugins.plugin_libraries() for n in p.ep_names)])
    )
    names += [n for n in ("OpenVINOExecutionProvider",) if n not in names]  # said even when not installed
    rows = []
    for name in names:
        alias = next((a for a, n in PROVIDER_ALIASES.items() if n == name), name)
        status = probe_provider(alias)
        plugin = ep_plugins.plugin_for(name)
        devices = sorted({ep_plugins.device_type(d) for d in ep_plugins.ep_devices(name)})
        rows.append(
            {
                "alias": alias,
                "provider": name,
                "source": plugin.distribution
                if plugin
                else ("onnxruntime" if name in ort.get_available_providers() else "not installed"),
                "devices": devices,
                "usable": status.usable,
                "reason": status.reason,
                "options": TARGET_OPTIONS.get(name, "any KEY=VALUE provider option"),
            }
        )
    return sorted(rows, key=lambda r: (r["provider"] != "CPUExecutionProvider", not r["usable"], r["alias"]))


# A bare provider in tune's --providers stands for these precisions of it: the engine's default (OpenVINO's is
# bf16 on CPUs with AMX, which cost a text detector 0.05 of cosine) and the one that keeps fp32 fidelity or
# trades it for speed, so the search can find whichever meets the goal.
PRECISION_VARIANTS: dict[str, tuple[str, ...]] = {
    "OpenVINOExecutionProvider": ("", "f32"),
    "TensorrtExecutionProvider": ("", "fp16"),
}


def search_targets(labels: list[str]) -> tuple[list[str], list[str]]:
    """The usable run targets `labels` stand for (bare providers expanded into their precisions), and one line
    per target that is not usable here, saying why."""
    usable: list[str] = []
    unusable: list[str] = []
    for label in labels:
        target = parse_target(label)
        variants = [target.label]
        if target.precision is None and not target.options and target.ep_name in PRECISION_VARIANTS:
            variants = [f"{target.label}:{p}" if p else target.label for p in PRECISION_VARIANTS[target.ep_name]]
        for variant in variants:
            status = probe_provider(variant)
            if status.usable:
                if variant not in usable:
                    usable.append(variant)
            elif f"{label}: {status.reason}" not in unusable:
                unusable.append(f"{label}: {status.reason}")
    return usable, unusable
