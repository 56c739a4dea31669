"""PyTorch -> ONNX: export with dynamic axes, check, infer shapes, prove parity, write the artifact."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch

from trimformer import __version__
from trimformer.artifact import (
    EXPORTED_FROM,
    MODEL_FILE,
    ArtifactMeta,
    IOSpec,
    LineageStep,
    ModelArtifact,
    TokenizerSpec,
    write_meta,
)
from trimformer.data.tokenizer import TOKENIZER_FILES
from trimformer.errors import UserError
from trimformer.exporters.configs import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, ExportConfig, export_config_for
from trimformer.exporters.parity import ParityResult, check_parity, random_feeds
from trimformer.formats.qat_ranges import QAT_RANGES_FILE
from trimformer.formats.tasks import CAUSAL_LM
from trimformer.fsutil import atomic_output_dir
from trimformer.onnx_io import TWO_GB, load_onnx, save_onnx
from trimformer.runtime.session import cpu_session
from trimformer.sources import LoadedSource, load_source
from trimformer.sources.causal_lm import GENERATION_CONFIG

__all__ = ["ExportResult", "export_model", "export_source", "write_side_files"]

logger = logging.getLogger(__name__)


class ExportResult:
    def __init__(
        self,
        artifact: ModelArtifact,
        parity: ParityResult,
        seconds: float,
        details: dict[str, Any] | None = None,
    ) -> None:
        self.artifact = artifact
        self.parity = parity
        self.seconds = seconds
        # A decoder's greedy-token parity (prompts, tokens compared) beside the logits' difference.
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "artifact": str(self.artifact.path),
            "opset": self.artifact.meta.opset,
            "parity_max_abs_diff": self.parity.max_abs_diff,
            "seconds": round(self.seconds, 2),
            "size_mb": round(self.artifact.size_bytes() / 1e6, 3),
            **self.details,
        }


def _vocab_size(source: LoadedSource) -> int:
    return int(source.config.get("vocab_size") or source.tokenizer.get_vocab_size())


def _trace(source: LoadedSource, config: ExportConfig, path: Path) -> None:
    batch, seq = config.trace_shape
    seq = min(seq, source.max_length)
    feeds = random_feeds(
        config.input_names, batch, seq, _vocab_size(source), seed=1234, pad_token_id=source.pad_token_id
    )
    args = tuple(torch.from_numpy(feeds[n]) for n in config.input_names)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # TorchScript export: onnxruntime's transformer fusions recognise its BERT graph fully,
        # the dynamo export's not at all (see shared FINDINGS).
        torch.onnx.export(
            source.module,
            args,
            str(path),
            input_names=list(config.input_names),
            output_names=list(config.output_names),
            dynamic_axes=config.dynamic_axes,
            opset_version=config.opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _io_specs(model: onnx.ModelProto, config: ExportConfig) -> tuple[list[IOSpec], list[IOSpec]]:
    def spec(value: onnx.ValueInfoProto) -> IOSpec:
        ttype = value.type.tensor_type
        dims: list[str | int] = []
        for dim in ttype.shape.dim:
            dims.append(dim.dim_param if dim.dim_param else int(dim.dim_value))
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type).name
        return IOSpec(name=value.name, dtype=dtype, shape=dims)

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


def write_side_files(source: LoadedSource, folder: Path) -> None:
    """Tokenizer files, QAT ranges, generation settings and config.json beside the graph."""
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
        if (source.folder / name).is_file():
            shutil.copy2(source.folder / name, folder / name)
    if (source.folder / QAT_RANGES_FILE).is_file():
        # The activation ranges of quantization-aware training travel with the graph to `quantize`.
        shutil.copy2(source.folder / QAT_RANGES_FILE, folder / QAT_RANGES_FILE)
    # Always ship a tokenizers file: the runtime reads nothing else.
    source.tokenizer.save(str(folder / "tokenizer.json"))
    config = dict(source.config)
    if source.labels is not None:
        config["id2label"] = {str(i): label for i, label in enumerate(source.labels)}
        config["label2id"] = {label: i for i, label in enumerate(source.labels)}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _export_causal_lm(
    source: LoadedSource,
    out: Path,
    opset: int,
    atol: float,
    overwrite: bool,
    params: dict[str, Any] | None,
    prompts: str | None,
    parity_tokens: int,
) -> ExportResult:
    from trimformer.exporters.decoder import export_decoder

    artifact, parity, seconds = export_decoder(
        source, out, opset, atol, overwrite, prompts, parity_tokens, params
    )
    logits = ParityResult({"logits@prompts": parity.logits_max_abs_diff})
    return ExportResult(artifact, logits, seconds, {"greedy_parity": parity.to_dict()})


# Parity tolerance per task when none is given: a decoder's logits are compared over its whole
# vocabulary and grow with training, so they get a looser absolute bound (tokens must be equal).
DEFAULT_ATOL = {CAUSAL_LM: 1e-3}
ENCODER_ATOL = 1e-4


def _checked(traced: Path) -> onnx.ModelProto:
    """The traced graph, through the ONNX checker (and shape inference below protobuf's limit)."""
    model = load_onnx(traced)
    try:
        if model.ByteSize() < TWO_GB:
            onnx.checker.check_model(model, full_check=False)
            return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        onnx.checker.check_model(str(traced))
    except Exception as exc:
        raise UserError(f"the exported graph fails the ONNX checker: {str(exc).splitlines()[0]}") from exc
    return model


def export_source(
    source: LoadedSource,
    out: Path,
    opset: int = DEFAULT_OPSET,
    atol: float | None = None,
    overwrite: bool = False,
    params: dict[str, Any] | None = None,
    prompts: str | None = None,
    parity_tokens: int = 32,
) -> ExportResult:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(
            f"opset {opset} is not supported; choose {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})"
        )
    atol = DEFAULT_ATOL.get(source.task, ENCODER_ATOL) if atol is None else atol
    if atol <= 0:
        raise UserError(f"--atol must be positive, got {atol}")
    if source.task == CAUSAL_LM:
        return _export_causal_lm(source, Path(out), opset, atol, overwrite, params, prompts, parity_tokens)
    if prompts is not None:
        raise UserError("--prompts is for causal language models; an encoder's parity uses random inputs")
    started = time.perf_counter()
    source.eval()
    config = export_config_for(source, opset=opset, atol=atol)
    with atomic_output_dir(Path(out), overwrite=overwrite) as tmp, tempfile.TemporaryDirectory() as scratch:
        traced = Path(scratch) / MODEL_FILE
        try:
            _trace(source, config, traced)
        except Exception as exc:
            raise UserError(f"torch.onnx.export failed at opset {opset}: {str(exc).splitlines()[0]}") from exc
        model = _checked(traced)
        save_onnx(model, tmp / MODEL_FILE)
        session = cpu_session(tmp / MODEL_FILE)
        parity = check_parity(source, session, config.parity_shapes, config.atol, _vocab_size(source))
        del session
        write_side_files(source, tmp)
        inputs, outputs = _io_specs(model, config)
        meta = ArtifactMeta(
            task=source.task,  # type: ignore[arg-type]
            architecture=source.architecture,
            labels=source.labels,
            inputs=inputs,
            outputs=outputs,
            tokenizer=TokenizerSpec(
                max_length=source.max_length,
                pad_token_id=source.pad_token_id,
                uses_token_type_ids=source.uses_token_type_ids,
            ),
            opset=opset,
            source_hash=source.files_hash,
        )
        # Where the PyTorch model was: `trimformer prune` finds it there for Fisher importance and
        # block reconstruction while its files still hash to source_hash. Not in the lineage, which
        # bundles ship: a local path is nobody else's business.
        meta.extras[EXPORTED_FROM] = str(source.folder.resolve())
        qat = (tmp / QAT_RANGES_FILE).is_file()
        if qat:
            meta.extras["qat_ranges"] = QAT_RANGES_FILE
        output_hash = ModelArtifact(tmp, meta).model_hash()
        meta.lineage.append(
            LineageStep(
                step="export",
                params={
                    "opset": opset,
                    "atol": atol,
                    "exporter": "torchscript",
                    **({"qat_ranges": QAT_RANGES_FILE} if qat else {}),
                    **(params or {}),
                },
                input_hash=source.files_hash,
                output_hash=output_hash,
                trimformer=__version__,
                seconds=round(time.perf_counter() - started, 3),
                stats={"parity_max_abs_diff": parity.max_abs_diff},
            )
        )
        write_meta(tmp, meta)
    artifact = ModelArtifact.open(out)
    logger.info("exported %s to %s (max parity diff %.2g)", source.architecture, out, parity.worst)
    return ExportResult(artifact, parity, time.perf_counter() - started)


def export_model(
    model: str | Path,
    out: str | Path,
    task: str | None = None,
    opset: int = DEFAULT_OPSET,
    atol: float | None = None,
    overwrite: bool = False,
    prompts: str | None = None,
    parity_tokens: int = 32,
) -> ExportResult:
    """Export a trained model folder to an artifact folder, parity-checked against PyTorch
    (a causal LM: prompt logits and greedy tokens over ``prompts``, see exporters/decoder.py)."""
    source = load_source(model, task=task)
    return export_source(
        source,
        Path(out),
        opset=opset,
        atol=atol,
        overwrite=overwrite,
        params={"task": source.task},
        prompts=prompts,
        parity_tokens=parity_tokens,
    )
