"""What CPU this is, in the terms kernel choices depend on.

onnxruntime's int8 kernels differ by CPU class: with VNNI (AVX512-VNNI or AVX-VNNI) u8 x s8 products
accumulate in int32; with AVX2 alone they are summed in pairs into int16 first (vpmaddubsw) and can
saturate unless weights use 7 bits; ARM64 has its own dot-product kernels. Defaults that depend on
this (the quantization preset) read :func:`cpu_class` here, and reports name the CPU with
:func:`cpu_name`, so every figure states the CPU it ran on.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

__all__ = ["CPU_CLASSES", "cpu_class", "cpu_flags", "cpu_name"]

CPU_CLASSES = ("x86-vnni", "x86-avx2", "x86", "arm64", "other")
_CPUINFO = Path("/proc/cpuinfo")


@functools.cache
def _cpuinfo() -> str:
    try:
        return _CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _first_value(key: str) -> str | None:
    for line in _cpuinfo().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return None


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags the kernel reports (empty where /proc/cpuinfo is not readable)."""
    return frozenset((_first_value("flags") or _first_value("Features") or "").split())


def cpu_name() -> str:
    return _first_value("model name") or platform.processor() or platform.machine() or "unknown"


def classify(machine: str, flags: frozenset[str]) -> str:
    """One of :data:`CPU_CLASSES` for a machine name (``platform.machine()``) and its flags."""
    machine = machine.lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return "other"
    if flags & {"avx512_vnni", "avx_vnni"}:
        return "x86-vnni"
    return "x86-avx2" if "avx2" in flags else "x86"


def cpu_class() -> str:
    """This machine's class (see :func:`classify`)."""
    return classify(platform.machine(), cpu_flags())
