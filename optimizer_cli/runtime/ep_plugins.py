"""Plugin execution providers: shared libraries that onnxruntime loads at run time.

Since onnxruntime 1.22 an execution provider can ship as its own pip package instead of a build of
onnxruntime (`pip install onnxruntime-ep-openvino`). Such a package is a module named `onnxruntime_ep_*`
with `get_library_path()` and `get_ep_names()` (or `get_ep_name()`); the library is registered with
`onnxruntime.register_execution_provider_library(name, path)`, after which `onnxruntime.get_ep_devices()`
lists the devices the plugin offers *on this host* (the OpenVINO plugin offers Intel devices only: on an AMD
CPU it offers none), and a session uses one through `SessionOptions.add_provider_for_devices`.
Discovery is by distribution name, so any plugin that follows the convention works the same way.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Any

from optimizer_cli.errors import first_line

PLUGIN_PREFIXES = ("onnxruntime-ep-", "onnxruntime_ep_")


@dataclass(frozen=True)
class PluginLibrary:
    """One installed plugin EP package and what registering it gave."""

    distribution: str  # "onnxruntime-ep-openvino==1.8.1"
    module: str  # "onnxruntime_ep_openvino"
    ep_names: tuple[str, ...]
    path: str | None
    problem: str | None = None  # why it could not be registered (None: registered)

    @property
    def registered(self) -> bool:
        return self.problem is None


def _plugin_modules() -> list[tuple[str, str]]:
    """(distribution==version, top-level module) of every installed plugin EP package, sorted."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        if not name.lower().replace("_", "-").startswith(PLUGIN_PREFIXES[0]):
            continue
        top_level = (dist.read_text("top_level.txt") or "").split()
        module = top_level[0] if top_level else name.lower().replace("-", "_")
        found[f"{name}=={dist.version}"] = module
    return sorted(found.items())


_REGISTERED: dict[str, PluginLibrary] = {}


def _register(distribution: str, module_name: str) -> PluginLibrary:
    import onnxruntime as ort

    try:
        module = importlib.import_module(module_name)
        names = tuple(module.get_ep_names()) if hasattr(module, "get_ep_names") else (str(module.get_ep_name()),)
        path = str(module.get_library_path())
    except Exception as exc:  # a broken or foreign package: report it, never crash discovery
        return PluginLibrary(distribution, module_name, (), None, f"cannot load: {first_line(exc, 200)}")
    for ep_name in names:
        try:
            ort.register_execution_provider_library(ep_name, path)
        except Exception as exc:
            if "already registered" in str(exc).lower():
                continue
            return PluginLibrary(distribution, module_name, names, path, f"registration failed: {first_line(exc, 200)}")
    return PluginLibrary(distribution, module_name, names, path)


def plugin_libraries() -> list[PluginLibrary]:
    """Every installed plugin EP package, registered with onnxruntime once per process."""
    for distribution, module in _plugin_modules():
        if distribution not in _REGISTERED:
            _REGISTERED[distribution] = _register(distribution, module)
    return list(_REGISTERED.values())


def plugin_for(ep_name: str) -> PluginLibrary | None:
    """The plugin package that provides `ep_name`, if one is installed."""
    return next((p for p in plugin_libraries() if ep_name in p.ep_names), None)


def is_plugin_ep(ep_name: str) -> bool:
    """Whether `ep_name` comes from a plugin library (its own name, or a variant it also registers, such as
    OpenVINO's 'OpenVINOExecutionProvider.AUTO')."""
    return any(ep_name == n or ep_name.startswith(n + ".") for p in plugin_libraries() for n in p.ep_names)


def ep_devices(ep_name: str) -> list[Any]:
    """onnxruntime's OrtEpDevice entries for one EP (after registering the plugins), in its order."""
    import onnxruntime as ort

    plugin_libraries()
    devices: list[Any] = []
    with contextlib.suppress(AttributeError):  # onnxruntime before 1.22 has no get_ep_devices
        devices = [d for d in ort.get_ep_devices() if d.ep_name == ep_name]
    return devices


def device_type(device: Any) -> str:
    """'cpu', 'gpu' or 'npu' for an OrtEpDevice."""
    return str(device.device.type).rsplit(".", 1)[-1].lower()


def host_cpu_vendor() -> str:
    """The CPU vendor onnxruntime sees (a plugin may offer devices of its own vendor only)."""
    import onnxruntime as ort

    with contextlib.suppress(Exception):
        for d in ort.get_ep_devices():
            if d.ep_name == "CPUExecutionProvider":
                return str(d.device.vendor) or "unknown"
    return "unknown"
