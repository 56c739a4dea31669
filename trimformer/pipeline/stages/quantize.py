"""The fuse and quantize stages: artifact in, fused, int8 or weight-only (a causal LM) artifact out.

Glue between the CLI (or a recipe) and the passes: opens the artifact, checks the data before
anything runs, builds the PassContext (:mod:`trimformer.pipeline.context`: streaming calibration,
an accuracy ``evaluate``, QAT ranges), calls ``apply_pass``, and writes the calibration ranges
and a ``quantization_report.json`` next to the new model. Nothing is written when a check or the accuracy gate fails.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trimformer.artifact import ModelArtifact
from trimformer.errors import UserError
from trimformer.formats.targets import AUTO_TARGET, PRESET_TARGETS, Target
from trimformer.formats.tasks import CAUSAL_LM
from trimformer.fsutil import check_output_dir
from trimformer.passes.base import PassContext, PassReport, apply_pass, check_model_kind, get_pass
from trimformer.passes.fuse.decoder import DecoderFuseConfig
from trimformer.passes.fuse.fusion import FuseConfig
from trimformer.passes.quantize.int8 import QuantizeConfig
from trimformer.passes.quantize.presets import AUTO_PRESET
from trimformer.passes.quantize.weight_only import WeightOnlyConfig
from trimformer.pipeline.context import (
    DataRequest,
    StageOptions,
    add_training_ranges,
    build_decoder_context,
    build_pass_context,
    host_target,
)
from trimformer.pipeline.stages.params import EvalSplit, QuantizeStageParams

__all__ = [
    "REPORT_FILE",
    "QuantizeStageConfig",
    "WeightOnlyStageConfig",
    "run_fuse",
    "run_fuse_decoder",
    "run_quantize",
    "run_weight_only",
]

logger = logging.getLogger(__name__)

REPORT_FILE = "quantization_report.json"
_DEFAULTS = QuantizeStageParams()
# A pass config with attention dimensions (fuse, quantize).


@dataclass
class QuantizeStageConfig(StageOptions):
    quantize: QuantizeConfig
    eval: str | None = None
    batch_size: int = _DEFAULTS.batch_size
    pad_to: int | None = _DEFAULTS.pad_to
    eval_limit: int | None = _DEFAULTS.eval_limit
    eval_split: EvalSplit = _DEFAULTS.eval_split
    seed: int = 0

    def data_request(self) -> DataRequest:
        params = QuantizeStageParams(
            batch_size=self.batch_size,
            pad_to=self.pad_to,
            eval_split=self.eval_split,
            eval_limit=self.eval_limit,
        )
        return DataRequest(
            calibration=self.calibration,
            evaluate=self.eval,
            samples=self.quantize.samples,
            batch_size=params.batch_size,
            pad_to=params.pad_to,
            eval_split=params.eval_split,
            eval_limit=params.eval_limit,
            columns=self.columns(),
            seed=self.seed,
        )


def _check_inputs(config: QuantizeStageConfig) -> None:
    """Refuse what cannot work before anything is read."""
    qcfg = config.quantize
    qcfg.check()
    config.data_request()  # refuses batch_size, pad_to or eval_limit below 1
    if qcfg.max_accuracy_drop is not None and config.eval is None:
        raise UserError("--max-accuracy-drop needs an evaluation set; pass --eval DATA")
    if (
        not qcfg.dynamic
        and config.calibration is None
        and qcfg.calibration_cache is None
        and not qcfg.ranges_from_training
    ):
        raise UserError("static quantization needs calibration data; pass --calibration DATA (or --dynamic)")


def _write_reports(folder: Path, report: PassReport) -> None:
    """The pass's files (calibration ranges) and the full report, next to the new model."""
    for name, path in report.files.items():
        shutil.copy2(path, folder / name)
    (folder / REPORT_FILE).write_text(
        json.dumps(report.stats, indent=1, default=float) + "\n", encoding="utf-8"
    )


def _summary(
    result: ModelArtifact, artifact: ModelArtifact, out: Path, stats: dict[str, Any], target: str
) -> dict[str, Any]:
    return {
        "out": str(out),
        "size_mb": round(result.size_bytes() / 1e6, 2),
        "input_size_mb": round(artifact.size_bytes() / 1e6, 2),
        "quantized": stats["quantized"],
        "quantizable": stats["quantizable"],
        "float_nodes": stats["float_nodes"],
        "settings": stats["settings"],
        "calibration": stats.get("calibration"),
        "accuracy_aware": {k: v for k, v in stats.get("accuracy_aware", {}).items() if k != "sensitivity"},
        "output_rel_error": stats["output_rel_error"],
        "target": target,
        "seconds": stats["seconds"],
    }


def run_quantize(config: QuantizeStageConfig) -> dict[str, Any]:
    """Quantize an artifact; returns a summary (the full stats are in the report file and lineage)."""
    _check_inputs(config)
    out = Path(config.out)
    check_output_dir(out, config.overwrite)
    artifact = ModelArtifact.open(config.model)
    qcfg, target = quantize_target(config.quantize, config.target)
    with tempfile.TemporaryDirectory(prefix="trimformer-quantize-") as tmp:
        ctx = build_pass_context(artifact, config.data_request(), Path(tmp), target=target)
        if qcfg.ranges_from_training:
            add_training_ranges(ctx, artifact, config.model)
        extra = {
            "calibration": config.calibration,
            "eval": config.eval,
            "pad_to": config.pad_to,
            "batch_size": config.batch_size,
        }
        result, report = apply_pass(
            artifact, "quantize", qcfg, ctx, out, config.overwrite, extra, _write_reports
        )
    return _summary(result, artifact, out, report.stats, target.name)


@dataclass
class WeightOnlyStageConfig:
    """``quantize --weight-only`` on a causal LM: GPTQ reads ``calibration``'s train split; token
    parity runs on ``prompts``' test split (the built-in prompts without it)."""

    model: str
    out: str
    weight_only: WeightOnlyConfig
    calibration: str | None = None
    prompts: str | None = None
    target: str = AUTO_TARGET
    overwrite: bool = False
    seed: int = 0


def run_weight_only(config: WeightOnlyStageConfig) -> dict[str, Any]:
    """Weight-only quantization of a decoder artifact; returns a summary (the full stats are in
    the report file and the lineage)."""
    wcfg = config.weight_only
    if wcfg.algo == "gptq" and config.calibration is None:
        raise UserError("GPTQ is calibrated on text: pass --calibration DATA (its train split is read)")
    out = Path(config.out)
    check_output_dir(out, config.overwrite)
    artifact = ModelArtifact.open(config.model)
    check_model_kind(get_pass("weight-only"), artifact)
    target = host_target(config.target)
    extra = {"symmetric": wcfg.is_symmetric(), "calibration": config.calibration, "prompts": config.prompts}
    with tempfile.TemporaryDirectory(prefix="trimformer-weight-only-") as tmp:
        ctx = build_decoder_context(
            artifact,
            config.calibration,
            config.prompts,
            wcfg.samples,
            wcfg.new_tokens,
            Path(tmp),
            target,
            config.seed,
        )
        result, report = apply_pass(
            artifact, "weight-only", wcfg, ctx, out, config.overwrite, extra, _write_reports
        )
    stats = report.stats
    return {
        "out": str(out),
        "target": target.name,
        "settings": stats["settings"],
        "matmul_nbits": stats["matmul_nbits"],
        "lm_head": stats["lm_head"],
        "embedding": stats["embedding"],
        "size_mb": round(result.size_bytes() / 1e6, 2),
        "input_size_mb": round(artifact.size_bytes() / 1e6, 2),
        "accuracy_level": stats["accuracy_level"],
        "accuracy_levels": stats.get("accuracy_levels"),
        "fidelity": stats["fidelity"],
        "seconds": stats["seconds"],
    }


def quantize_target(config: QuantizeConfig, name: str) -> tuple[QuantizeConfig, Target]:
    """The target a quantize run builds for and its config with the target's preset. ``--preset``
    alone names its target (the presets were the targets before ``--target``); both given must
    agree; ``auto`` for both keeps the preset ``auto`` (this CPU's, QAT students included)."""
    explicit_preset = config.preset != AUTO_PRESET
    if name == AUTO_TARGET and explicit_preset:
        name = PRESET_TARGETS[config.preset]
    target = host_target(name)
    if target.quantize_preset is None:
        raise UserError(
            f"target {target.name} has no int8 activation kernels (no QAttention or MatMulIntegerToFloat); "
            "it takes float or weight-only models: leave out the quantize step for it"
        )
    if explicit_preset and PRESET_TARGETS[config.preset] != target.name:
        raise UserError(
            f"--preset {config.preset} is the preset of target {PRESET_TARGETS[config.preset]}, not "
            f"{target.name}; give --target alone"
        )
    if not explicit_preset and name != AUTO_TARGET:
        config = config.model_copy(update={"preset": target.quantize_preset})
    return config, target


def run_fuse(
    model: str,
    out: str,
    config: FuseConfig | None = None,
    overwrite: bool = False,
    target: str = AUTO_TARGET,
) -> dict[str, Any]:
    """Fuse an artifact's transformer blocks; returns the counts per fusion."""
    out_path = Path(out)
    check_output_dir(out_path, overwrite)
    artifact = ModelArtifact.open(model)
    if artifact.task == CAUSAL_LM:
        if config is not None and (config.num_heads or config.hidden_size):
            raise UserError(
                "a causal LM's head counts come from its decoder spec; leave out --num-heads and --hidden-size"
            )
        return run_fuse_decoder(artifact, out_path, DecoderFuseConfig(), overwrite, target)
    config = config or FuseConfig()
    resolved = host_target(target)
    if not resolved.cpu_kernels:
        config = config.model_copy(update={"cpu_kernels": False})
    with tempfile.TemporaryDirectory(prefix="trimformer-fuse-") as tmp:
        ctx = PassContext(scratch=Path(tmp), target=resolved)
        _, report = apply_pass(artifact, "fuse", config, ctx, out_path, overwrite)
    return {"out": str(out_path), "target": resolved.name, **report.stats}


def run_fuse_decoder(
    artifact: ModelArtifact,
    out: Path,
    config: DecoderFuseConfig,
    overwrite: bool = False,
    target: str = AUTO_TARGET,
    prompts: str | None = None,
) -> dict[str, Any]:
    """A causal LM's fused graph (GroupQueryAttention, SimplifiedLayerNormalization, ...), written
    only when its greedy tokens equal the exported graph's."""
    check_output_dir(out, overwrite)
    resolved = host_target(target)
    with tempfile.TemporaryDirectory(prefix="trimformer-fuse-") as tmp:
        ctx = build_decoder_context(artifact, None, prompts, 0, config.new_tokens, Path(tmp), resolved)
        _, report = apply_pass(artifact, "fuse-decoder", config, ctx, out, overwrite, {"prompts": prompts})
    return {"out": str(out), "task": CAUSAL_LM, "target": resolved.name, **report.stats}
