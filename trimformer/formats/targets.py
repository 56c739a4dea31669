"""Deployment targets: the one place that says what a graph built for a device may contain.

A target names the hardware a model is built for and fixes what the passes may do for it: the ops
it may run (per domain: every standard op up to its opset, and the ``com.microsoft`` ops its
onnxruntime execution provider has kernels for), the static int8 quantization preset (``None``:
the target has no int8 activation kernels), whether the CPU-kernel rewrites apply, fp16 support, and
the CPU class a machine must have to validate it faithfully. ``auto`` is the target of the CPU
running the command (:func:`target_for_cpu_class`); the pipeline resolves it, prints it, and records
it in the lineage and the bundle manifest. Every pass's output is checked with :func:`check_graph`
before it is written, so no pass can emit an op its target lacks. docs/TARGETS.md has the table.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import onnx

from trimformer.errors import UserError

__all__ = [
    "AUTO_TARGET",
    "PRESET_TARGETS",
    "TARGETS",
    "TARGET_NAMES",
    "Target",
    "built_for",
    "check_graph",
    "check_target_name",
    "check_validating_cpu",
    "ops_outside",
    "resolve_target",
    "target_for_cpu_class",
]

MS_DOMAIN = "com.microsoft"
AUTO_TARGET = "auto"


@functools.cache
def _cpu_provider_ops(domain: str) -> frozenset[str]:
    """The ops onnxruntime's CPU execution provider has kernels for, in ``domain`` (its registry,
    so the check follows the onnxruntime that validates the model)."""
    from onnxruntime.capi import _pybind_state as C

    return frozenset(
        d.op_name
        for d in C.get_all_opkernel_def()
        if d.provider == "CPUExecutionProvider" and (d.domain or "") == domain
    )


# onnxruntime's WebGPU execution provider: its com.microsoft kernels
# (onnxruntime/contrib_ops/webgpu/webgpu_contrib_kernels.cc). No integer-activation kernels
# (QAttention, MatMulIntegerToFloat, DynamicQuantizeMatMul) and no EmbedLayerNormalization: weights go
# through MatMulNBits and activations stay float (fp16).
_WEBGPU_MS_OPS = frozenset(
    {
        "Attention",
        "BiasAdd",
        "BiasGelu",
        "BiasSplitGelu",
        "FastGelu",
        "FusedConv",
        "GatherBlockQuantized",
        "Gelu",
        "GroupQueryAttention",
        "MatMulNBits",
        "MultiHeadAttention",
        "QuickGelu",
        "RotaryEmbedding",
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
    }
)


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    # The static int8 preset (trimformer.passes.quantize.presets); None: no int8 activation kernels.
    quantize_preset: str | None
    # onnxruntime's CPU-kernel rewrites (split SkipLayerNorm, biases in the int8 matmuls).
    cpu_kernels: bool
    fp16: bool
    max_opset: int
    # com.microsoft ops allowed: "cpu" (the CPU execution provider's kernels), or a fixed set.
    ms_ops: str | frozenset[str]
    # A machine validating this target must be of this CPU class (else its numbers are not the
    # device's: without VNNI, u8 x s8 products are summed in int16 and may saturate).
    validating_cpu_class: str | None = None

    def allowed_ms_ops(self) -> frozenset[str]:
        return _cpu_provider_ops(MS_DOMAIN) if self.ms_ops == "cpu" else frozenset(self.ms_ops)


# onnxruntime's CPU execution provider (x86, ARM64, and the wasm build of the same kernels).
_CPU = Target(
    "x86-vnni",
    "x86 with AVX512-VNNI or AVX-VNNI (Intel Cascade Lake and later, AMD Zen 4/5): "
    "u8 x s8 int8 accumulated in int32",
    "cpu-vnni",
    cpu_kernels=True,
    fp16=False,
    max_opset=21,
    ms_ops="cpu",
    validating_cpu_class="x86-vnni",
)

TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        _CPU,
        replace(
            _CPU,
            name="x86-avx2",
            description="x86 with AVX2 and no VNNI (AMD Zen 2/3, older Intel): 7-bit weights, so int16 "
            "pair sums cannot saturate",
            quantize_preset="cpu-avx2",
            validating_cpu_class=None,
        ),
        replace(
            _CPU,
            name="arm64",
            description="ARM64 (NEON dot product / i8mm): onnxruntime's CPU kernels",
            quantize_preset="arm64",
            validating_cpu_class=None,
        ),
        replace(
            _CPU,
            name="wasm",
            description="onnxruntime-web's WebAssembly backend (the CPU kernels built for wasm SIMD, no "
            "VNNI): 7-bit weights",
            quantize_preset="cpu-avx2",
            validating_cpu_class=None,
        ),
        Target(
            "webgpu",
            "onnxruntime's WebGPU execution provider: fp16 activations, weight-only MatMulNBits, "
            "no static int8 kernels",
            None,
            cpu_kernels=False,
            fp16=True,
            max_opset=21,
            ms_ops=_WEBGPU_MS_OPS,
        ),
        Target(
            "tensorrt",
            "NVIDIA TensorRT: standard ONNX ops only, symmetric s8s8 QDQ",
            "tensorrt",
            cpu_kernels=False,
            fp16=True,
            max_opset=20,
            ms_ops=frozenset(),
        ),
    )
}
TARGET_NAMES: tuple[str, ...] = (*TARGETS, AUTO_TARGET)
# The quantization presets that named a target before targets existed (``--preset`` stays an alias).
PRESET_TARGETS = {"cpu-vnni": "x86-vnni", "cpu-avx2": "x86-avx2", "arm64": "arm64", "tensorrt": "tensorrt"}
# CPU class (trimformer.runtime.cpu) -> the target ``auto`` stands for. Plain x86 without AVX2
# widens in 16 bits too, so it takes the AVX2 target's 7-bit weights.
_CLASS_TARGETS = {"x86-vnni": "x86-vnni", "x86-avx2": "x86-avx2", "x86": "x86-avx2", "arm64": "arm64"}


def check_target_name(name: str) -> str:
    if name not in TARGET_NAMES:
        raise UserError(f"unknown target {name!r}; known targets: {', '.join(TARGET_NAMES)}")
    return name


def target_for_cpu_class(cpu_class: str) -> Target:
    """The target ``auto`` stands for on a CPU of this class."""
    name = _CLASS_TARGETS.get(cpu_class)
    if name is None:
        raise UserError(
            f"cannot tell which target this CPU ({cpu_class}) is; name one with --target "
            f"({', '.join(TARGETS)})"
        )
    return TARGETS[name]


def resolve_target(name: str, cpu_class: str) -> Target:
    """The target ``name`` stands for; ``auto`` is the one of a CPU of ``cpu_class``."""
    check_target_name(name)
    return target_for_cpu_class(cpu_class) if name == AUTO_TARGET else TARGETS[name]


def built_for(lineage_params: list[dict[str, object]]) -> str | None:
    """The target the last targeted step of a lineage built for (None before targets existed)."""
    for params in reversed(lineage_params):
        target = params.get("target")
        if isinstance(target, str):
            return target
    return None


def check_validating_cpu(target_name: str | None, cpu_class: str, what: str) -> None:
    """Refuse to measure a model built for a CPU class this machine is not: its numbers would not
    be the device's (without VNNI, onnxruntime sums u8 x s8 pairs in int16 and may saturate)."""
    target = TARGETS.get(target_name or "")
    if target is None or target.validating_cpu_class in (None, cpu_class):
        return
    raise UserError(
        f"{what} was built for target {target.name} and this CPU is {cpu_class}, without VNNI: its int8 "
        f"products would be summed in int16 here and may saturate, so accuracy measured here is not the "
        f"device's; validate it on a VNNI CPU, or rebuild it with --target auto"
    )


def ops_outside(model: onnx.ModelProto, target: Target) -> list[str]:
    """``domain.op`` of every op in ``model`` (subgraphs and functions too) that ``target`` cannot
    run, sorted; empty when the graph fits."""
    local = {(f.domain, f.name) for f in model.functions}
    allowed_ms = target.allowed_ms_ops()
    outside: set[str] = set()
    graphs = [model.graph, *(f for f in model.functions)]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            for attribute in node.attribute:
                graphs.extend(attribute.graphs)
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
            domain = node.domain or ""
            if (domain, node.op_type) in local or domain in ("", "ai.onnx"):
                continue
            if domain != MS_DOMAIN or node.op_type not in allowed_ms:
                outside.add(f"{domain}.{node.op_type}")
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), None)
    if opset is not None and opset > target.max_opset:
        outside.add(f"opset {opset} (at most {target.max_opset})")
    return sorted(outside)


def check_graph(model: onnx.ModelProto, target: Target, what: str) -> None:
    """Refuse ``model`` (the output of ``what``) when it holds an op ``target`` cannot run."""
    outside = ops_outside(model, target)
    if outside:
        raise UserError(
            f"{what} made a graph with {', '.join(outside)}, which target {target.name} cannot run; "
            f"choose another target or leave out the pass that adds it"
        )
