"""Quantizer settings: presets are typed settings, overrides make new ones, the report keeps its keys."""

from __future__ import annotations

import dataclasses

import pytest

import trimformer.passes.quantize.presets as presets_module
from trimformer.errors import UserError
from trimformer.passes.quantize.int8 import QuantizeConfig
from trimformer.passes.quantize.presets import PRESETS, QuantizerSettings, host_preset

REPORT_KEYS = {
    "preset",
    "format",
    "activation_type",
    "weight_type",
    "per_channel",
    "reduce_range",
    "symmetric_activations",
    "attention",
    "embeddings",
    "smooth_alpha",
    "cpu_kernels",
    "ranges_from_training",
}


def test_presets_differ_only_where_their_hardware_needs_it() -> None:
    vnni, avx2, arm, trt = (PRESETS[n] for n in ("cpu-vnni", "cpu-avx2", "arm64", "tensorrt"))
    assert all(p.preset == name for name, p in PRESETS.items())
    assert dataclasses.replace(avx2, preset="cpu-vnni", reduce_range=False) == vnni
    assert dataclasses.replace(arm, preset="cpu-vnni") == vnni
    assert (trt.format, trt.activation_type, trt.symmetric_activations) == ("qdq", "int8", True)
    assert not (trt.attention or trt.embeddings or trt.cpu_kernels)
    with pytest.raises(dataclasses.FrozenInstanceError):
        vnni.per_channel = False  # type: ignore[misc]


def test_config_overrides_the_preset() -> None:
    settings = QuantizeConfig(preset="cpu-avx2", per_channel=False, smooth_alpha=0.0).resolved()
    assert isinstance(settings, QuantizerSettings)
    assert settings == dataclasses.replace(PRESETS["cpu-avx2"], per_channel=False, smooth_alpha=0.0)
    assert QuantizeConfig().resolved() == PRESETS[host_preset()]


@pytest.mark.parametrize(
    ("cpu", "preset", "trained"),
    [("x86-vnni", "cpu-vnni", "cpu-vnni"), ("x86-avx2", "cpu-avx2", "cpu-vnni"), ("arm64", "arm64", "arm64")],
)
def test_auto_resolves_by_cpu_class_and_keeps_what_qat_trained(
    monkeypatch: pytest.MonkeyPatch, cpu: str, preset: str, trained: str
) -> None:
    monkeypatch.setattr(presets_module, "cpu_class", lambda: cpu)
    assert QuantizeConfig().resolved().preset == preset
    # A QAT student was trained for full 8-bit weights; 7-bit ones would not compute what it learned.
    assert presets_module.get_preset("auto", trained_for_full_range=True).preset == trained


def test_qdq_format_turns_off_the_integer_only_parts() -> None:
    settings = PRESETS["cpu-vnni"].overridden(format="qdq")
    assert settings.format == "qdq" and not settings.integer_ops
    assert not settings.attention and not settings.embeddings
    with pytest.raises(UserError, match="unknown format 'int4'"):
        PRESETS["cpu-vnni"].overridden(format="int4")


def test_report_records_the_settings_without_the_description() -> None:
    recorded = PRESETS["tensorrt"].to_dict()
    assert set(recorded) == REPORT_KEYS
    assert recorded["preset"] == "tensorrt" and recorded["symmetric_activations"] is True
    assert PRESETS["tensorrt"].description and "description" not in recorded
