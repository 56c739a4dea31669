from __future__ import annotations

import pytest

from trimformer.runtime.cpu import CPU_CLASSES, classify, cpu_class, cpu_name


@pytest.mark.parametrize(
    ("machine", "flags", "expected"),
    [
        ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, "x86-vnni"),  # Zen 4/5, Xeon
        ("x86_64", {"avx2", "avx_vnni"}, "x86-vnni"),  # Alder Lake and later
        ("x86_64", {"avx2", "fma"}, "x86-avx2"),  # Zen 2
        ("x86_64", {"sse4_2"}, "x86"),
        ("aarch64", {"asimd", "asimddp"}, "arm64"),
        ("riscv64", set(), "other"),
    ],
)
def test_cpu_classes(machine: str, flags: set[str], expected: str) -> None:
    assert classify(machine, frozenset(flags)) == expected


def test_this_machine_has_a_class_and_a_name() -> None:
    assert cpu_class() in CPU_CLASSES and cpu_name()
