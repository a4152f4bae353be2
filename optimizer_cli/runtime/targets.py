"""Run targets: where and how a model runs, as (execution provider, device, options).

The same graph runs at very different speeds and precisions on different engines (the OpenVINO EP runs an
unmodified fp32 CNN several times faster than the CPU EP on an Intel CPU with AMX, in bf16 unless told
otherwise), so the unit the benchmark and tune measure is a target, written as text:

    PROVIDER[@DEVICE][:PRECISION][:KEY=VALUE ...]

    cpu                     onnxruntime's CPU EP (the reference every fidelity is measured against)
    openvino                the OpenVINO EP on its CPU device, OpenVINO's default precision (bf16 on AMX)
    openvino:f32            ... with OpenVINO's INFERENCE_PRECISION_HINT f32 (true fp32)
    openvino@gpu:f16        ... on an Intel GPU in f16
    trt:fp16                TensorRT with fp16 kernels allowed; trt:int8 with int8 (QDQ models)
    cuda                    the CUDA EP
    openvino:num_streams=1  any other KEY=VALUE is passed to the provider as one of its options

A precision is asked of the engine, never assumed: the benchmark checks the outputs (see
runtime/placement.py), because an engine may ignore an option (the OpenVINO EP's own `precision` option
changed nothing on an AMX host, which is why f32/bf16/f16 here go through INFERENCE_PRECISION_HINT).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizer_cli.errors import UserInputError

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


def resolve_provider(alias: str) -> str:
    """'cuda' -> 'CUDAExecutionProvider'; full names pass through; a target's text resolves to its provider."""
    key = alias.strip().split(":", 1)[0].split("@", 1)[0]
    if key.lower() in PROVIDER_ALIASES:
        return PROVIDER_ALIASES[key.lower()]
    if "ExecutionProvider" in key:  # a full EP name, e.g. a plugin's 'OpenVINOExecutionProvider.AUTO'
        return key
    known = ", ".join(sorted(set(PROVIDER_ALIASES)))
    raise UserInputError(f"unknown execution provider '{alias}' (known: {known})")


# Precision words each provider understands -> the canonical word.
PRECISIONS: dict[str, dict[str, str]] = {
    "OpenVINOExecutionProvider": {"f32": "f32", "fp32": "f32", "bf16": "bf16", "f16": "f16", "fp16": "f16"},
    "TensorrtExecutionProvider": {"fp16": "fp16", "f16": "fp16", "int8": "int8"},
}
DEVICES = ("cpu", "gpu", "npu")
# The default device of each provider: plugin EPs offer several, the others run where they are.
DEFAULT_DEVICE = {
    "CPUExecutionProvider": "cpu",
    "OpenVINOExecutionProvider": "cpu",
    "CUDAExecutionProvider": "gpu",
    "TensorrtExecutionProvider": "gpu",
}


# Providers that run float ops in fp32 unless asked otherwise (TensorRT's fp16 is opt-in: trt:fp16).
FP32_BY_DEFAULT = frozenset({"CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"})


@dataclass(frozen=True)
class RunTarget:
    """One way to run a model: provider alias, device, precision and extra provider options."""

    provider: str  # the alias or name as written ('openvino'), lower-cased when it is an alias
    device: str | None = None  # 'cpu' / 'gpu' / 'npu'; None: the provider's default
    precision: str | None = None  # canonical word from PRECISIONS; None: the engine's default
    options: tuple[tuple[str, str], ...] = ()  # extra provider options, sorted

    @property
    def ep_name(self) -> str:
        return resolve_provider(self.provider)

    @property
    def label(self) -> str:
        """The canonical spelling: what the table, the JSON and a recipe show."""
        text = self.provider + (f"@{self.device}" if self.device else "")
        if self.precision:
            text += f":{self.precision}"
        return text + "".join(f":{k}={v}" for k, v in self.options)

    @property
    def is_reference(self) -> bool:
        """The CPU EP as onnxruntime ships it: what every fidelity is measured against."""
        return self.ep_name == "CPUExecutionProvider" and not self.precision and not self.options

    @property
    def full_precision(self) -> bool:
        """Computes float ops in fp32: asked to (f32), or a provider whose default is fp32. OpenVINO's default
        follows the host (bf16 on AMX, f16 on some GPUs), so only openvino:f32 counts."""
        if self.precision is not None:
            return self.precision == "f32"
        return self.ep_name in FP32_BY_DEFAULT

    def provider_options(self, threads: int) -> dict[str, str]:
        """The options this target passes to its provider (threads: the benchmark's intra-op threads)."""
        options: dict[str, str] = {}
        if self.ep_name == "OpenVINOExecutionProvider":
            options["num_of_threads"] = str(threads)  # same cores as the CPU EP, or the ratio means nothing
            if self.precision:
                options["load_config"] = str(_openvino_config(self.device or "cpu", self.precision))
        elif self.ep_name == "TensorrtExecutionProvider":
            options["trt_fp16_enable"] = str(self.precision in ("fp16", "int8"))
            options["trt_int8_enable"] = str(self.precision == "int8")
        options.update(dict(self.options))
        return options

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.label,
            "provider": self.ep_name,
            "device": self.device or DEFAULT_DEVICE.get(self.ep_name),
            "precision": self.precision,
            "options": dict(self.options),
        }


def _openvino_config(device: str, precision: str) -> Path:
    """A load_config file asking OpenVINO for `precision` on `device` (one per content, reused)."""
    text = json.dumps({device.upper(): {"INFERENCE_PRECISION_HINT": precision}}, sort_keys=True)
    folder = Path(tempfile.gettempdir()) / "optimize-ov-config"
    folder.mkdir(exist_ok=True)
    path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(f".{id(text)}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def parse_target(text: str) -> RunTarget:
    """'openvino@cpu:bf16' -> RunTarget; a mistake is a UserInputError that says what is allowed."""
    spec = text.strip()
    if not spec:
        raise UserInputError("empty execution target (expected e.g. cpu, openvino:bf16, trt:fp16)")
    head, *items = spec.split(":")
    provider, _, device_text = head.partition("@")
    provider = provider.strip()
    alias = provider.lower() if provider.lower() in PROVIDER_ALIASES else provider
    ep_name = resolve_provider(alias)  # unknown providers fail here, with the known ones
    device = device_text.strip().lower() or None
    if device is not None and device not in DEVICES:
        raise UserInputError(f"target '{spec}': unknown device '{device}' (known: {', '.join(DEVICES)})")
    precision = None
    options: dict[str, str] = {}
    allowed = PRECISIONS.get(ep_name, {})
    for item in (i.strip() for i in items):
        if "=" in item:
            key, _, value = item.partition("=")
            if not key.strip():
                raise UserInputError(f"target '{spec}': option '{item}' has no name (expected KEY=VALUE)")
            options[key.strip()] = value.strip()
        elif item.lower() in allowed:
            if precision is not None:
                raise UserInputError(f"target '{spec}': more than one precision")
            precision = allowed[item.lower()]
        else:
            words = sorted(set(allowed.values()))
            hint = f"one of {', '.join(words)}" if words else "none: this provider runs the model's own precision"
            raise UserInputError(f"target '{spec}': unknown precision or option '{item}' (precisions: {hint})")
    return RunTarget(alias, device, precision, tuple(sorted(options.items())))


def parse_targets(text: str | None, default: tuple[str, ...]) -> list[RunTarget]:
    """A comma list of targets (validated, duplicates dropped in order); None: `default`."""
    specs = [s for s in (text.split(",") if text else default) if s.strip()]
    targets: list[RunTarget] = []
    for spec in specs:
        target = parse_target(spec)
        if target not in targets:
            targets.append(target)
    return targets


def deployment_snippet(target: RunTarget, model_path: str, threads: int, session: dict[str, Any] | None = None) -> str:
    """Python that creates an onnxruntime session for `model_path` on `target`, as the benchmark measured it
    (threads, graph optimization level and the recipe's session options included)."""
    session = session or {}
    threads = session.get("threads") or threads  # the recipe's own thread count, where it has one
    lines = ["import onnxruntime as ort", "", "options = ort.SessionOptions()"]
    lines.append(f"options.intra_op_num_threads = {threads}")
    level = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED"}.get(
        str(session.get("opt_level")), "ORT_ENABLE_ALL"
    )
    lines.append(f"options.graph_optimization_level = ort.GraphOptimizationLevel.{level}")
    if session.get("execution_mode") == "parallel":
        lines.append("options.execution_mode = ort.ExecutionMode.ORT_PARALLEL")
        if session.get("inter_op_threads"):
            lines.append(f"options.inter_op_num_threads = {session['inter_op_threads']}")
    if session.get("mem_pattern") is False:
        lines.append("options.enable_mem_pattern = False")
    provider_options = target.provider_options(threads)
    if "load_config" in provider_options:  # a file of ours: inline what it says
        config = json.loads(Path(provider_options.pop("load_config")).read_text())
        lines += [
            "",
            "import json, tempfile  # OpenVINO's own precision hint (the EP's `precision` option can be ignored)",
            "config = tempfile.NamedTemporaryFile('w', suffix='.json', delete=False)",
            f"json.dump({config!r}, config)",
            "config.close()",
        ]
        provider_options_text = f"{{**{provider_options!r}, 'load_config': config.name}}"
    else:
        provider_options_text = repr(provider_options)
    name = target.ep_name
    if name == "OpenVINOExecutionProvider":
        device = (target.device or "cpu").upper()
        lines += [
            "",
            "import onnxruntime_ep_openvino as ov  # pip install onnxruntime-ep-openvino",
            "ort.register_execution_provider_library(ov.get_ep_name(), ov.get_library_path())",
            "device = next(d for d in ort.get_ep_devices()",
            f"              if d.ep_name == ov.get_ep_name() and d.device.type == ort.OrtHardwareDeviceType.{device})",
            f"options.add_provider_for_devices([device], {provider_options_text})",
            f"session = ort.InferenceSession({model_path!r}, options)",
        ]
    else:
        providers = f"[({name!r}, {provider_options_text})]" if provider_options else f"[{name!r}]"
        if name != "CPUExecutionProvider":
            providers = providers[:-1] + ", 'CPUExecutionProvider']"
        lines.append(f"session = ort.InferenceSession({model_path!r}, options, providers={providers})")
    return "\n".join(lines) + "\n"
