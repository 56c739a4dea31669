"""The facts a bundle manifest records: graph io, validation report, lineage.

Everything here is a pure function of the artifact's bytes and the report's content, with no
timestamps, absolute paths or host names, so packaging the same inputs twice gives the same manifest.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import onnx

from trimformer.artifact import ModelArtifact
from trimformer.errors import UserError
from trimformer.formats.onnx_ops import QUANTIZED_OPS
from trimformer.fsutil import sha256_bytes
from trimformer.runtime.manifest import ModelSpec, TensorSpec
from trimformer.runtime.session import PROVIDERS

__all__ = ["lineage_facts", "model_facts", "validation_facts"]

logger = logging.getLogger(__name__)

_METRICS = (
    "accuracy",
    "agreement",
    "mean_kl",
    "mean_cosine",
    "n_examples",
    "size_mb",
    "peak_memory_mb",
    "latency_ms",
    "throughput_per_s",
    "natural_latency_ms",
    "speedup",
    # causal LMs (trimformer.validation.decoder)
    "perplexity",
    "perplexity_context",
    "perplexity_increase_pct",
    "token_agreement",
    "kl",
    "prompt_latency_ms",
    "time_to_first_token_ms",
    "decode_tokens_per_s",
    "decode_speedup",
)


def _io(value: onnx.ValueInfoProto) -> TensorSpec:
    ttype = value.type.tensor_type
    shape: list[str | int | None] = []
    dynamic: dict[str, str] = {}
    for axis, dim in enumerate(ttype.shape.dim):
        if dim.dim_param:
            shape.append(dim.dim_param)
            dynamic[str(axis)] = dim.dim_param
        elif dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
        else:
            shape.append(None)
            dynamic[str(axis)] = f"dim_{axis}"
    return TensorSpec(
        name=value.name,
        dtype=onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type).name,
        shape=tuple(shape),
        dynamic_axes=dynamic,
    )


def _op_types(model: onnx.ModelProto) -> set[str]:
    ops: set[str] = set()
    graphs = [model.graph, *(f for f in model.functions)]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            ops.add(node.op_type)
            for attr in node.attribute:
                graphs.extend(attr.graphs)
                if attr.HasField("g"):
                    graphs.append(attr.g)
    return ops


def model_facts(model: onnx.ModelProto, external_data: list[str]) -> ModelSpec:
    """Opset, IR version, producer and io (with dynamic axes) of the graph as shipped."""
    initializers = {t.name for t in model.graph.initializer}
    opsets = {(d.domain or "ai.onnx"): int(d.version) for d in model.opset_import}
    return ModelSpec(
        file="model.onnx",
        ir_version=int(model.ir_version),
        opset=opsets.get("ai.onnx"),
        opset_imports=dict(sorted(opsets.items())),
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        inputs=tuple(_io(v) for v in model.graph.input if v.name not in initializers),
        outputs=tuple(_io(v) for v in model.graph.output),
        quantized=bool(_op_types(model) & QUANTIZED_OPS),
        external_data=tuple(sorted(external_data)),
    )


def _name_only(value: Any) -> Any:
    # Reports name models by the path they were run from; a bundle keeps only the last part.
    return Path(str(value)).name if value is not None else None


def validation_facts(report_path: Path, artifact: ModelArtifact) -> dict[str, Any]:
    """The parts of a ``trimformer validate`` report.json that describe the shipped model."""
    report_path = Path(report_path)
    if report_path.is_dir():
        report_path = report_path / "report.json"
    if not report_path.is_file():
        raise UserError(f"validation report {report_path} does not exist; run `trimformer validate` first")
    raw = report_path.read_bytes()
    try:
        report = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(
            f"{report_path} is not valid JSON ({exc}); pass the report.json `trimformer validate` wrote"
        ) from exc
    is_report = isinstance(report, dict) and (
        "provider" in report and ("latency_ms" in report or "perplexity" in report)
    )
    if not is_report:
        raise UserError(
            f"{report_path} is not a trimformer validation report; pass the report.json of `trimformer validate`"
        )
    if report.get("task") not in (None, artifact.task):
        raise UserError(
            f"{report_path} validates a {report.get('task')} model but {artifact.path} is {artifact.task}; "
            "pass the report of this model"
        )
    _check_report_is_for(report, report_path, artifact)
    env = report.get("env") or {}
    provider = str(report.get("provider"))
    raw_by_provider = report.get("by_provider")
    by_provider: dict[str, Any] = raw_by_provider if isinstance(raw_by_provider, dict) else {}
    providers = [str(name) for name in by_provider] or [provider]
    reference = report.get("reference")
    return {
        "report_sha256": sha256_bytes(raw),
        "validated_on": {
            "onnxruntime": env.get("onnxruntime"),
            "onnx": env.get("onnx"),
            "trimformer": env.get("trimformer"),
            "cpu": env.get("cpu"),
            "providers": [PROVIDERS.get(name, name) for name in providers],
            "threads": report.get("threads"),
        },
        "metrics": {key: report.get(key) for key in _METRICS if key in report},
        # Several providers validated: each one's figures (the top-level metrics are the first's).
        "by_provider": {
            PROVIDERS.get(str(name), str(name)): {k: one.get(k) for k in _METRICS if k in one}
            for name, one in by_provider.items()
            if isinstance(one, dict)
        }
        or None,
        "gates": report.get("gates"),
        "reference": None
        if not isinstance(reference, dict)
        else {
            "model": _name_only(reference.get("model")),
            "provider": reference.get("provider"),
            "accuracy": reference.get("accuracy"),
            "size_mb": reference.get("size_mb"),
            "latency_ms": reference.get("latency_ms"),
            **{k: reference[k] for k in ("perplexity", "decode_tokens_per_s") if k in reference},
        },
    }


def _check_report_is_for(report: dict[str, Any], report_path: Path, artifact: ModelArtifact) -> None:
    """Refuse a report that provably describes another model (by hash, or by the folder it names)."""
    model_hash = artifact.model_hash()
    recorded = report.get("model_hash")
    if isinstance(recorded, str) and recorded != model_hash:
        raise UserError(
            f"{report_path} was measured on another model ({recorded[:19]}…, this one is {model_hash[:19]}…); "
            "validate this model and pass its report"
        )
    named = report.get("model")
    if recorded is None and isinstance(named, str) and (Path(named) / "trimformer.json").is_file():
        try:
            other = ModelArtifact.open(named).model_hash()
        except UserError:
            return
        if other != model_hash:
            raise UserError(
                f"{report_path} was measured on {named}, which is a different model from {artifact.path}; "
                "validate this model and pass its report"
            )


def lineage_facts(artifact: ModelArtifact) -> dict[str, Any]:
    """Every step from the teacher (or source checkpoint) to the shipped graph, checked at the end."""
    steps = artifact.meta.lineage
    model_hash = artifact.model_hash()
    if steps and steps[-1].output_hash and steps[-1].output_hash != model_hash:
        raise UserError(
            f"{artifact.model_path} does not match the last step recorded in its trimformer.json "
            f"({steps[-1].step}); it was changed outside trimformer: re-run that step"
        )
    chain = all(
        steps[i].input_hash is not None and steps[i].input_hash == steps[i - 1].output_hash
        for i in range(1, len(steps))
    )
    return {
        "model_hash": model_hash,
        "origin_hash": steps[0].input_hash if steps else artifact.meta.source_hash,
        "source_hash": artifact.meta.source_hash,
        "chain_complete": chain,
        "steps": [
            {
                "step": s.step,
                "params": s.params,
                "input_hash": s.input_hash,
                "output_hash": s.output_hash,
                "trimformer": s.trimformer,
            }
            for s in steps
        ],
    }
