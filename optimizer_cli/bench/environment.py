"""What the numbers were measured on: tool, runtime, CPU and GPU versions."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

from optimizer_cli import __version__
from optimizer_cli.runtime.cpu import cpu_isa
from optimizer_cli.runtime.providers import installed_runtimes


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_label(env: dict) -> str:
    """'AMD EPYC, AVX2 (no VNNI)': the model name with the int8 vector extension (older reports lack it)."""
    return f"{env['cpu']}, {env['cpu_isa']}" if env.get("cpu_isa") else env["cpu"]


def gpu_info() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def environment() -> dict:
    import onnx
    import onnxruntime as ort

    return {
        "tool": f"optimizer-cli {__version__}",
        "onnxruntime": ort.__version__,
        "onnxruntime_packages": installed_runtimes(),
        "onnx": onnx.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_isa": cpu_isa(),
        "cpu_count": os.cpu_count(),
        "gpus": gpu_info(),
    }
