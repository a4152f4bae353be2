"""What the numbers were measured on: tool, runtime, CPU and GPU versions."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

from optimizer_cli import __version__
from optimizer_cli.runtime.providers import installed_runtimes


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# The int8 speedup on CPU depends mostly on these (ORT picks its int8 GEMM kernels by them): VNNI does a
# u8*s8 dot product in one instruction, plain AVX2 needs three, so the same model gains less.
INT8_ISA_FLAGS = (
    ("amx_int8", "AMX-INT8"),
    ("avx512_vnni", "AVX512-VNNI"),
    ("avx_vnni", "AVX-VNNI"),
    ("avx512bw", "AVX512BW"),
    ("avx2", "AVX2"),
    ("asimddp", "NEON-DOTPROD"),
    ("asimd", "NEON"),
)


def cpu_isa(cpuinfo_text: str | None = None) -> str:
    """The best int8-relevant vector extension of this CPU, e.g. 'AVX512-VNNI' or 'AVX2 (no VNNI)'."""
    if cpuinfo_text is None:
        path = Path("/proc/cpuinfo")
        cpuinfo_text = path.read_text(errors="replace") if path.exists() else ""
    flags: set[str] = set()
    for line in cpuinfo_text.splitlines():
        key = line.split(":", 1)[0].strip().lower()
        if key in ("flags", "features"):
            flags.update(line.split(":", 1)[1].split())
    for flag, label in INT8_ISA_FLAGS:
        if flag in flags:
            return f"{label} (no VNNI)" if label in ("AVX512BW", "AVX2") else label
    return "unknown" if not flags else "no AVX2/NEON"


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
