"""What this CPU offers int8 kernels: the vector extension onnxruntime's MLAS picks its GEMMs by."""

from __future__ import annotations

import platform
from pathlib import Path

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


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def u8s8_saturates(isa: str | None = None) -> bool:
    """True on x86 CPUs without VNNI: ORT's u8*s8 kernels there (VPMADDUBSW) add pairs of products in
    int16 with saturation, so full-range int8 weights can clip (onnxruntime's quantization docs; measured
    here: a trained ResNet's top-1 fell from 98.7% to 86.9%). 7-bit weights (reduce_range) cannot."""
    if not is_x86():
        return False
    return (isa or cpu_isa()).endswith("(no VNNI)")
